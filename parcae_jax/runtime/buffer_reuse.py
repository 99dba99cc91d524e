"""The big-buffer allocator (buffer_reuse.c), built for this machine and preloaded into CPU
commands by the command layer's re-exec (runtime/huge_pages.py).

Why: XLA:CPU allocates a program's temporary buffer on every call and frees it on return;
glibc maps a block that big afresh each time, so the kernel zeroes it again on every training
step. The preloaded allocator keeps freed blocks of 32 MiB and more mapped and hands them out
again (buffer_reuse.c says how). Measured on a 2-core Zen 4: bench_cpu's bf16 step +3-4%
(docs/performance_zen4_sittings.md).

`library()` never raises: it returns the built library's path, or None where there is none
(not Linux with glibc, no C compiler, a failed build or smoke test), and the command then runs
with glibc's allocator alone. `PARCAE_JAX_BUFFER_REUSE=0` opts out; so does any LD_PRELOAD
already set (another allocator may be preloaded: ours would hand its pointers to glibc).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from parcae_jax.native_cache import cache_dir

SOURCE = Path(__file__).with_name("buffer_reuse.c")
FLAGS = ("-O2", "-shared", "-fPIC")
OPT_OUT = "PARCAE_JAX_BUFFER_REUSE"


def wanted(environ: os._Environ | dict = os.environ) -> bool:
    """Whether to preload the allocator: Linux with glibc, not opted out, no LD_PRELOAD set."""
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return False
    if environ.get(OPT_OUT, "1").lower() in ("0", "false", "off", "no"):
        return False
    return not environ.get("LD_PRELOAD", "").strip()


def loaded() -> bool:
    """Whether this process runs with the allocator preloaded."""
    try:
        return hasattr(ctypes.CDLL(None), "parcae_buffer_reuse_stats")
    except OSError:
        return False


def with_preload(environ: dict, path: Path) -> dict:
    """`environ` with the allocator preloaded."""
    return {**environ, "LD_PRELOAD": str(path)}


def library() -> Path | None:
    """The allocator built for this machine (cached per source, compiler and flags), or None."""
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":  # it interposes glibc's malloc
        return None
    cc = shutil.which(os.environ.get("CC", "gcc")) or shutil.which("cc") or shutil.which("clang")
    if cc is None:
        return None
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    key = hashlib.sha256("\0".join([SOURCE.read_text(), version, " ".join(FLAGS), platform.machine()]).encode())
    path = cache_dir() / f"buffer_reuse-{key.hexdigest()[:16]}.so"
    return path if path.exists() or _build(cc, path) else None


def _build(cc: str, path: Path) -> bool:
    """Compiles the allocator to `path` (via a temporary file renamed into place, so processes
    that race never see half a library) once a Python started with it preloaded has run."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.stem, suffix=".so.tmp", dir=path.parent)
        os.close(fd)
    except OSError:
        return False
    try:
        built = subprocess.run([cc, *FLAGS, str(SOURCE), "-o", tmp, "-ldl", "-lpthread"],
                               capture_output=True, timeout=120).returncode == 0
        smoke = "b = bytearray(64 << 20); b[-1] = 1; del b; b = bytearray(40 << 20)"
        if built and subprocess.run([sys.executable, "-c", smoke], env={**os.environ, "LD_PRELOAD": tmp},
                                    capture_output=True, timeout=120).returncode == 0:
            os.replace(tmp, path)
            return True
        return False
    except (OSError, subprocess.SubprocessError):
        return False
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
