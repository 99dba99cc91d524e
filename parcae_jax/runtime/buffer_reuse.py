"""The big-buffer allocator (buffer_reuse.c), built for this machine and preloaded into CPU
commands by the command layer's re-exec (runtime/huge_pages.py).

Why: XLA:CPU allocates a program's temporary buffer on every call and frees it on return;
glibc maps a block that big afresh each time, so the kernel zeroes it again on every training
step. The preloaded allocator keeps freed blocks of 32 MiB and more mapped and hands them out
again (buffer_reuse.c says how). Measured on a 2-core Zen 4: bench_cpu's bf16 step +3-4% by
the medians of separate processes, +9-12% (float32 +13%) by steps alternating with it on and
off in one process (docs/performance_zen4_allocator.md).

`library()` never raises: it returns the built library's path, or None where there is none
(not Linux with glibc, no C compiler, a failed build or smoke test), and the command then runs
with glibc's allocator alone. `PARCAE_JAX_BUFFER_REUSE=0` opts out; so does any LD_PRELOAD
already set (another allocator may be preloaded: ours would hand its pointers to glibc).
`PARCAE_JAX_BUFFER_REUSE_IDLE_MB` caps the idle blocks kept (default: an eighth of the
machine's memory, or of its cgroup's limit where that is lower).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

from parcae_jax.native_cache import cache_dir, install

SOURCE = Path(__file__).with_name("buffer_reuse.c")
FLAGS = ("-O2", "-shared", "-fPIC")
OPT_OUT = "PARCAE_JAX_BUFFER_REUSE"
IDLE_MB = "PARCAE_JAX_BUFFER_REUSE_IDLE_MB"  # read by buffer_reuse.c: the most it keeps idle
PREFIX = "buffer_reuse-"  # the built library's file name: buffer_reuse-<key>.so


def opted_out(environ: os._Environ | dict, name: str) -> bool:
    """Whether the environment variable `name` turns a feature off (0, false, off, no)."""
    return environ.get(name, "1").lower() in ("0", "false", "off", "no")


def _linux_glibc() -> bool:  # the allocator interposes glibc's malloc
    return sys.platform == "linux" and platform.libc_ver()[0] == "glibc"


def wanted(environ: os._Environ | dict = os.environ) -> bool:
    """Whether to preload the allocator: Linux with glibc, not opted out, no LD_PRELOAD set."""
    return _linux_glibc() and not opted_out(environ, OPT_OUT) and not environ.get("LD_PRELOAD", "").strip()


def loaded() -> bool:
    """Whether this process runs with the allocator preloaded."""
    return _stats_function() is not None


def stats() -> dict[str, int] | None:
    """Blocks handed out again, blocks mapped, and bytes idle in this process; None without the
    allocator. A benchmark reports them: `mapped` rising every step would mean no reuse."""
    function = _stats_function()
    if function is None:
        return None
    out = (ctypes.c_ulong * 3)()
    function(out)
    return {"reused": out[0], "mapped": out[1], "idle_bytes": out[2]}


def _stats_function():
    try:
        return getattr(ctypes.CDLL(None), "parcae_buffer_reuse_stats", None)
    except OSError:
        return None


def with_preload(environ: dict, path: Path) -> dict:
    """`environ` with the allocator preloaded."""
    return {**environ, "LD_PRELOAD": str(path)}


def forget_preload(environ: os._Environ | dict) -> None:
    """Takes the allocator out of `environ`'s LD_PRELOAD (what the programs a command starts
    inherit), leaving any other library there; ld.so separates entries by `:` or whitespace."""
    entries = re.split(r"[:\s]+", environ.get("LD_PRELOAD", "").strip())
    kept = [e for e in entries if e and not Path(e).name.startswith(PREFIX)]
    if len(kept) < len([e for e in entries if e]):
        if kept:
            environ["LD_PRELOAD"] = ":".join(kept)
        else:
            del environ["LD_PRELOAD"]


def library() -> Path | None:
    """The allocator built for this machine (cached per source, compiler, flags and C library),
    or None."""
    if not _linux_glibc():
        return None
    cc = shutil.which(os.environ.get("CC", "gcc")) or shutil.which("cc") or shutil.which("clang")
    if cc is None:
        return None
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
        key = hashlib.sha256("\0".join([SOURCE.read_text(), version, " ".join(FLAGS), platform.machine(),
                                        " ".join(platform.libc_ver())]).encode())
        path = cache_dir() / f"{PREFIX}{key.hexdigest()[:16]}.so"
        if re.search(r"[:\s]", str(path)):  # ld.so would split the path: LD_PRELOAD cannot name it
            return None
        failed = path.with_suffix(".failed")  # built or smoke-tested in vain once: not every start
        if path.exists():
            return path
        return None if failed.exists() or not _build(cc, path, failed) else path
    except (OSError, subprocess.SubprocessError, ValueError):  # unreadable source, cache, output
        return None


# Run with the new library preloaded before it is cached: a block freed and asked for again
# must come back, with its contents, and the allocator must say so.
_SMOKE = """
import ctypes
c = ctypes.CDLL(None)
c.malloc.restype = ctypes.c_void_p
c.free.argtypes = [ctypes.c_void_p]
a = c.malloc(64 << 20); ctypes.memset(a, 1, 64 << 20); c.free(a)
b = c.malloc(60 << 20); ctypes.memset(b, 2, 60 << 20)
stats = (ctypes.c_ulong * 3)(); c.parcae_buffer_reuse_stats(stats)
assert a == b and stats[0] == 1, (a, b, list(stats))
c.free(b)
"""


def _build(cc: str, path: Path, failed: Path) -> bool:
    """Compiles the allocator into the cache at `path` once a Python started with it preloaded
    passed _SMOKE; else leaves the `failed` marker (delete it to try again)."""

    def compile_and_try(tmp: str) -> str | None:
        try:
            if subprocess.run([cc, *FLAGS, str(SOURCE), "-o", tmp, "-ldl", "-lpthread"],
                              capture_output=True, timeout=120).returncode != 0:
                return "did not compile"
            env = {**os.environ, "LD_PRELOAD": tmp, IDLE_MB: "1024"}  # room for the smoke's block
            smoke = subprocess.run([sys.executable, "-c", _SMOKE], env=env, capture_output=True, timeout=120)
        except (OSError, subprocess.SubprocessError) as e:
            return str(e)
        return None if smoke.returncode == 0 else "failed its smoke test"

    if install(path, compile_and_try) is None:
        return True
    failed.touch()
    return False
