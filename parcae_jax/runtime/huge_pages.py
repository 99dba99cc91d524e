"""Transparent huge pages for XLA:CPU's buffers: a command re-executes itself once with glibc's
malloc told to ask for them (`GLIBC_TUNABLES=glibc.malloc.hugetlb=1`).

Why: XLA:CPU allocates a compiled program's temporary buffer afresh on every call (the
bench_cpu train step's is 315 MB). glibc serves an allocation that large with a new mmap and
returns it with munmap, so every step faults its buffer in again, 4 KiB at a time: ~80k page
faults a step. Where the kernel gives huge pages only on request (THP mode `madvise`, the
common default), the tunable makes malloc request them, and a step faults 2 MiB at a time.
Measured on a 2-core Xeon (docs/performance_xeon.md): bench_cpu's step +14% in bf16, +9% in
float32; the official PyTorch step gains nothing from it (its allocations are smaller).

The same re-exec preloads our big-buffer allocator (runtime/buffer_reuse.py), which keeps
those buffers mapped between calls instead, so they are neither faulted in nor zeroed again
(on any THP mode; `PARCAE_JAX_BUFFER_REUSE=0` opts out). The programs a command starts inherit
the tunable but not the allocator: a command among them preloads it itself, other programs
never get it (a forked copy of the process keeps it, as it keeps everything).

glibc reads tunables only when a process starts, hence the re-exec, done before the command
computes: the process keeps its pid, arguments, streams and environment (less the preload,
once loaded). The tunable is not
added when it is already set, `PARCAE_JAX_HUGE_PAGES=0`, JAX is to run on an accelerator
(JAX_PLATFORMS, or a TPU runtime or GPU plugin installed), the C library is not glibc 2.35 or
later, or THP is `always` or `never`; the allocator is not preloaded on an accelerator host,
with `LD_PRELOAD` already set (another allocator), or where it cannot be built. Nothing is
re-executed when a JAX backend is already running, or the process was not started to run this
command (another program calls it in its own process, runs it as the tests' fork server does,
or runs it for you: a debugger, a profiler, coverage).
"""

from __future__ import annotations

import importlib.util
import os
import platform
import sys

from parcae_jax.runtime import buffer_reuse

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "PARCAE_JAX_HUGE_PAGES"
_THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"


def cpu_host(environ: os._Environ | dict = os.environ) -> bool:
    """Linux, with JAX to run on the CPU: accelerator hosts keep their allocator as it is."""
    return sys.platform == "linux" and environ.get("JAX_PLATFORMS", "cpu").split(",")[0] in ("", "cpu") \
        and not _accelerator_installed()


def wanted(environ: os._Environ | dict = os.environ) -> bool:
    """Whether re-executing with the tunable would change how this machine maps big buffers:
    a CPU host on glibc 2.35+ with THP `madvise`, not opted out and not already set."""
    if sys.platform != "linux" or buffer_reuse.opted_out(environ, OPT_OUT):
        return False
    if "glibc.malloc.hugetlb" in environ.get("GLIBC_TUNABLES", "") or not cpu_host(environ):
        return False
    libc, version = platform.libc_ver()
    if libc != "glibc" or tuple(int(p) for p in version.split(".")[:2] if p.isdigit()) < (2, 35):
        return False
    try:
        with open(_THP_MODE) as f:
            return "[madvise]" in f.read()
    except OSError:
        return False


def in_force() -> dict:
    """What this process's allocation runs with, for a benchmark's JSON: the tunable, and the
    allocator's counts (None without it)."""
    return {"huge_pages": TUNABLE in os.environ.get("GLIBC_TUNABLES", "").split(":"),
            "buffer_reuse": buffer_reuse.stats()}


def _accelerator_installed() -> bool:
    """A TPU runtime or a JAX GPU plugin is installed (JAX would then not run on the CPU)."""
    return any(importlib.util.find_spec(name) is not None for name in ("libtpu", "jax_plugins"))


def with_tunable(environ: os._Environ | dict) -> dict:
    """`environ` with the tunable added to any GLIBC_TUNABLES already there."""
    env = dict(environ)
    env["GLIBC_TUNABLES"] = ":".join(t for t in (env.get("GLIBC_TUNABLES", ""), TUNABLE) if t)
    return env


def started_for(argv: list[str], orig_argv: list[str]) -> bool:
    """Whether the interpreter's command line `orig_argv` is that of the program whose
    `sys.argv` is `argv`: `python [interpreter options] -m MODULE ARGS` or `python [options]
    SCRIPT ARGS`, the program a file. Not a program another one runs for it (`python -m pdb
    -m MODULE`, cProfile, coverage: restarting them would lose their state), nor a script
    read from a stream (`python - < f.py`: it cannot be read twice)."""
    n_args = len(argv) - 1
    if not argv or not os.path.isfile(argv[0]) or n_args >= len(orig_argv) - 1:
        return False
    head, tail = orig_argv[:len(orig_argv) - n_args], orig_argv[len(orig_argv) - n_args:]
    if tail != argv[1:]:
        return False
    if head[-1].startswith("-m") and len(head[-1]) > 2:  # python -mMODULE
        options = head[1:-1]
    elif len(head) >= 3 and head[-2] == "-m":
        options = head[1:-2]
    elif head[-1] == argv[0]:
        options = head[1:-1]
    else:
        return False
    i = 0
    while i < len(options):  # only the interpreter's own options may come before the program
        word = options[i]
        if not word.startswith("-") or word in ("-", "-m", "-c") or word.startswith(("-m", "-c")):
            return False
        i += 2 if word in ("-X", "-W") else 1
    return True


def _backend_running() -> bool:
    bridge = sys.modules.get("jax._src.xla_bridge")
    return bool(getattr(bridge, "_backends", None))


def reexec_if_wanted(is_program: bool) -> None:
    """Replaces this process by itself with the tunable set and the allocator preloaded, where
    either helps (see the module); then takes the allocator out of the environment the programs
    it starts inherit (a command among them preloads it itself; other programs never get it).

    Called by the command layer before the command computes, `is_program` telling whether the
    command is this process's program (not a function another program called); returns when
    nothing is done."""
    have_allocator = buffer_reuse.loaded()
    if is_program and not _backend_running() and started_for(sys.argv, sys.orig_argv):
        env = with_tunable(os.environ) if wanted() else dict(os.environ)
        if not have_allocator and cpu_host(env) and buffer_reuse.wanted(env) and (allocator := buffer_reuse.library()):
            env = buffer_reuse.with_preload(env, allocator)
        if env != os.environ:
            argv = [sys.executable, *sys.orig_argv[1:]]  # argv[0] as run, not looked up on PATH again
            sys.stdout.flush()
            sys.stderr.flush()
            try:
                os.execve(sys.executable, argv, env)
            except OSError:  # no executable to run again: carry on as we are
                pass
    buffer_reuse.forget_preload(os.environ)  # ours only; also one that failed to load
