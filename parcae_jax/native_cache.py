"""Where the native libraries this package compiles for the machine at hand are cached: the CPU
attention kernel (model/cpu_kernels/library.py) and the big-buffer allocator
(runtime/buffer_reuse.py). Imports nothing heavy: the command layer asks before JAX starts."""

from __future__ import annotations

import os
from pathlib import Path

ENV = "PARCAE_JAX_KERNEL_CACHE"


def cache_dir() -> Path:
    """`$PARCAE_JAX_KERNEL_CACHE`, else `$XDG_CACHE_HOME/parcae_jax/kernels`, else
    `~/.cache/parcae_jax/kernels`."""
    root = os.environ.get(ENV)
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "parcae_jax" / "kernels"
