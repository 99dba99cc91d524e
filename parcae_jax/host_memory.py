"""Keep freed host memory in the process when JAX computes on the CPU.

XLA:CPU allocates each executable's temp buffer (350 MB for the bench_cpu step) with
malloc on every call, from a PjRt worker thread. glibc serves an allocation that large
from a fresh mmap and unmaps it on free, so every step touches ~90k new pages: a page
fault and a page clear each, about 10% of a CPU step. One malloc arena without mmap
and a high trim threshold make the next step reuse the same memory instead.

This must run before JAX creates its CPU client (its threads keep the arena they first
got), and only where the CPU is the compute device: on accelerator hosts, memory freed
after a large host-side restore would never go back to the OS.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.metadata
import os
import sys

_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8  # glibc's mallopt parameter numbers
_ACCELERATOR_PREFIXES = ("libtpu", "jax-cuda", "jax-rocm", "jax-tpu", "jax-metal")  # PJRT plugin distributions


def cpu_is_the_device() -> bool:
    """True when JAX can only pick the CPU: JAX_PLATFORMS=cpu, or no accelerator plugin installed."""
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    names = ((d.metadata["Name"] or "").lower().replace("_", "-") for d in importlib.metadata.distributions())
    return not any(n.startswith(_ACCELERATOR_PREFIXES) for n in names)


def reuse_freed_memory() -> bool:
    """Sets glibc's malloc to keep and reuse large freed blocks; True if it did.

    A no-op (False) off Linux/glibc, when an accelerator may be the device, or with
    PARCAE_JAX_SYSTEM_MALLOC=1.
    """
    if not sys.platform.startswith("linux") or os.environ.get("PARCAE_JAX_SYSTEM_MALLOC") == "1":
        return False
    if not cpu_is_the_device():
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return all([mallopt(_M_ARENA_MAX, 1), mallopt(_M_MMAP_MAX, 0), mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)])
