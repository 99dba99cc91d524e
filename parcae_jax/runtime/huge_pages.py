"""Transparent huge pages for XLA:CPU's buffers: a command re-executes itself once with glibc's
malloc told to ask for them (`GLIBC_TUNABLES=glibc.malloc.hugetlb=1`).

Why: XLA:CPU allocates a compiled program's temporary buffer afresh on every call (the
bench_cpu train step's is 315 MB). glibc serves an allocation that large with a new mmap and
returns it with munmap, so every step faults its buffer in again, 4 KiB at a time: ~80k page
faults a step. Where the kernel gives huge pages only on request (THP mode `madvise`, the
common default), the tunable makes malloc request them, and a step faults 2 MiB at a time.
Measured on a 2-core Xeon (docs/performance.md): bench_cpu's step +14% in bf16, +9% in
float32; the official PyTorch step gains nothing from it (its allocations are smaller).

glibc reads tunables only when a process starts, hence the re-exec, done before the command
imports JAX: the process keeps its pid, arguments, streams and environment, plus the tunable.
Nothing happens when the tunable is already set, `PARCAE_JAX_HUGE_PAGES=0`, the C library is
not glibc 2.35 or later, THP is `always` or `never`, a JAX backend is already running, or the
process was not started to run this command (another program calls the command in its own
process, or runs it as the tests' fork server does, whose command line is its own).
"""

from __future__ import annotations

import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "PARCAE_JAX_HUGE_PAGES"
_THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"


def wanted(environ: os._Environ | dict = os.environ) -> bool:
    """Whether re-executing with the tunable would change how this machine maps big buffers."""
    if sys.platform != "linux" or environ.get(OPT_OUT, "1") == "0":
        return False
    if "glibc.malloc.hugetlb" in environ.get("GLIBC_TUNABLES", ""):
        return False
    libc, version = platform.libc_ver()
    if libc != "glibc" or tuple(int(p) for p in version.split(".")[:2] if p.isdigit()) < (2, 35):
        return False
    try:
        with open(_THP_MODE) as f:
            return "[madvise]" in f.read()
    except OSError:
        return False


def with_tunable(environ: os._Environ | dict) -> dict:
    """`environ` with the tunable added to any GLIBC_TUNABLES already there."""
    env = dict(environ)
    env["GLIBC_TUNABLES"] = ":".join(t for t in (env.get("GLIBC_TUNABLES", ""), TUNABLE) if t)
    return env


def started_for(argv: list[str], orig_argv: list[str]) -> bool:
    """Whether the interpreter's command line `orig_argv` is that of the program whose
    `sys.argv` is `argv`: `python [opts] -m MODULE ARGS` or `python [opts] SCRIPT ARGS`."""
    head = orig_argv[:len(orig_argv) - (len(argv) - 1)]
    if len(head) < 2 or orig_argv[len(head):] != argv[1:]:
        return False
    return head[-1] == argv[0] or head[-2] == "-m"


def _backend_running() -> bool:
    bridge = sys.modules.get("jax._src.xla_bridge")
    return bool(getattr(bridge, "_backends", None))


def reexec_if_wanted(is_program: bool) -> None:
    """Replaces this process by itself with the tunable set, when that helps (see the module).

    Called by the command layer before the command computes, `is_program` telling whether the
    command is this process's program (not a function another program called); returns when
    nothing is done."""
    if not (is_program and wanted()) or _backend_running() or not started_for(sys.argv, sys.orig_argv):
        return
    argv = [sys.executable, *sys.orig_argv[1:]]  # argv[0] as run, not looked up on PATH again
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, argv, with_tunable(os.environ))
