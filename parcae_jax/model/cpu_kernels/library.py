"""Builds the fused CPU kernels (attention.cc, adamw.cc, transpose.cc, head_xent.cc) for this CPU with the
system C++ compiler into one library, loads it and registers its FFI targets with XLA:CPU;
once per process.

The library is compiled with `-march=native` (AVX-512, and AVX512-BF16 / AMX where the CPU has
them), so it is cached per source, compiler, jaxlib and CPU: `$PARCAE_JAX_KERNEL_CACHE`, else
`$XDG_CACHE_HOME/parcae_jax/kernels`, else `~/.cache/parcae_jax/kernels`. A build takes ~10 s
(the sources compiled side by side); processes that race write their own temporary file and
rename it into place.

`load()` never raises: it returns the loaded library, or the reason there is none (not x86-64
Linux, no AVX-512, no compiler, a failed build), which "auto" reads as "use XLA" and an
explicit attention_impl, loss_impl or optim.update_impl "cpu" turns into a ConfigError.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import hashlib
import math
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jaxlib

from parcae_jax.native_cache import cache_dir, install

HERE = Path(__file__).parent
SOURCES = tuple(sorted(HERE.glob("*.cc")))  # each includes .h files beside it
FLAGS = ("-O3", "-march=native", "-std=c++20", "-shared", "-fPIC")
# The FFI handlers; the forward's name also tells model/remat.py which calls' outputs to keep.
TARGETS = FORWARD_TARGET, BACKWARD_TARGET, PREFILL_TARGET, ADAMW_TARGET, TRANSPOSE_TARGET, HEAD_XENT_TARGET = (
    "parcae_attention_fwd", "parcae_attention_bwd", "parcae_attention_prefill", "parcae_adamw", "parcae_transpose",
    "parcae_head_xent")

FLOAT32, NATIVE_BF16, AMX = 1, 2, 4  # parcae_attention_init's feature bits


@dataclasses.dataclass(frozen=True)
class Library:
    path: Path
    handle: ctypes.CDLL
    features: int  # FLOAT32 | NATIVE_BF16 | AMX, as this CPU and build run them
    query_block: int  # queries per block; a block reads keys up to its own end

    def set_amx(self, allow: bool) -> int:
        """Turn the AMX tiles on or off for bfloat16 products (tests check both paths);
        returns the feature bits now in force."""
        return self.handle.parcae_attention_init(int(allow))


def unavailable_here() -> str | None:
    """Why a kernel of the library cannot run in the trace at hand (None when it can): a CPU
    backend, no mesh of more than one device (XLA cannot partition a custom call), the library
    built."""
    if jax.default_backend() != "cpu":
        return f"runs on CPUs only, but JAX runs on {jax.default_backend()}"
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and math.prod(mesh.axis_sizes) > 1:
        return "runs on one device (XLA cannot partition it over a mesh)"
    lib = load()
    return lib if isinstance(lib, str) else None


def cpu_flags() -> set[str]:
    """The CPU feature flags Linux reports (empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++") or shutil.which("clang++")


@functools.cache
def load() -> Library | str:
    """The kernel library, built if needed and registered with XLA, or why it is unavailable."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"needs x86-64 Linux (this is {platform.system()} on {platform.machine()})"
    flags = cpu_flags()
    if "avx512f" not in flags:
        return "needs a CPU with AVX-512 (avx512f is not in /proc/cpuinfo)"
    cxx = _compiler()
    if cxx is None:
        return "needs a C++ compiler (g++, c++ or clang++ on PATH, or $CXX)"
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return f"cannot run the C++ compiler {cxx}: {e}"
    sources = "".join(p.read_text() for p in sorted([*SOURCES, *HERE.glob("*.h")]))
    key = hashlib.sha256("\0".join([sources, version, " ".join(FLAGS), jaxlib.__version__,
                                    " ".join(sorted(flags))]).encode()).hexdigest()[:16]
    path = cache_dir() / f"kernels-{key}.so"
    if not path.exists():
        why = _build(cxx, path)
        if why:
            return why
    try:
        handle = ctypes.CDLL(str(path))
        for name in TARGETS:
            jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(handle, name)), platform="cpu")
    except (OSError, AttributeError) as e:  # a damaged cache file, a symbol missing
        return f"cannot load {path}: {e} (delete it to rebuild)"
    return Library(path, handle, handle.parcae_attention_init(1), handle.parcae_attention_query_block())


def _build(cxx: str, path: Path) -> str | None:
    """Each source compiled on its own, side by side (the FFI header alone takes ~3 s a file),
    into a private folder beside `path`, then linked into `path`."""
    include = f"-I{jax.ffi.include_dir()}"

    def compile_to(tmp: str) -> str | None:
        with tempfile.TemporaryDirectory(prefix=path.stem, dir=path.parent) as objects_dir:
            objects = {s: str(Path(objects_dir) / f"{s.stem}.o") for s in SOURCES}
            return (_run_all("compile", [[cxx, *FLAGS, include, "-c", str(s), "-o", o] for s, o in objects.items()])
                    or _run_all("link", [[cxx, *FLAGS, *objects.values(), "-o", tmp]]))

    why = install(path, compile_to)
    return None if why and path.exists() else why  # another process built it meanwhile


def _run_all(what: str, commands: list[list[str]]) -> str | None:
    """Runs the commands at once; the first that fails, as a reason naming it and its first
    error line (the others are stopped)."""
    procs, cmd = [], commands[0]
    try:
        for cmd in commands:
            procs.append((cmd, subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)))
        for cmd, proc in procs:
            err = proc.communicate(timeout=300)[1]
            if proc.returncode != 0:
                lines = err.strip().splitlines() or ["(no output)"]
                first = next((ln for ln in lines if "error" in ln), lines[-1])
                return f"did not {what} ({' '.join(cmd)}): {first.strip()}"
    except (OSError, subprocess.SubprocessError) as e:
        return f"did not {what} ({' '.join(cmd)}): {e}"
    finally:
        for _, proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return None
