"""Where the native libraries this package compiles for the machine at hand are cached: the CPU
attention kernel (model/cpu_kernels/library.py) and the big-buffer allocator
(runtime/buffer_reuse.py). Imports nothing heavy: the command layer asks before JAX starts."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

ENV = "PARCAE_JAX_KERNEL_CACHE"


def cache_dir() -> Path:
    """`$PARCAE_JAX_KERNEL_CACHE`, else `$XDG_CACHE_HOME/parcae_jax/kernels`, else
    `~/.cache/parcae_jax/kernels`."""
    root = os.environ.get(ENV)
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "parcae_jax" / "kernels"


def install(path: Path, make: Callable[[str], str | None]) -> str | None:
    """Puts a file built by `make` at `path` in the cache: `make(tmp)` writes it to a temporary
    file beside `path` and returns None, or why it could not. The file is then made readable by
    all (mkstemp's 0600 would lock out others sharing the cache) and renamed into place, so
    processes that race never see half a library; nothing is left behind otherwise. Returns
    None once installed, else the reason."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.stem, suffix=".so.tmp", dir=path.parent)
        os.close(fd)
    except OSError as e:
        return f"cannot write its cache {path.parent}: {e} (set {ENV})"
    try:
        why = make(tmp)
        if why is None:
            os.chmod(tmp, 0o755)
            os.replace(tmp, path)
        return why
    except OSError as e:
        return f"cannot install {path}: {e}"
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
