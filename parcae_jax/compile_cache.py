"""XLA's persistent compilation cache: a restarted or resumed run (every preemption on a pod)
loads its compiled steps instead of compiling them again, which for the published sizes
takes minutes. On a pod, a gs:// folder lets every host share one cache."""

from __future__ import annotations

import os

import jax
from absl import logging


def enable(directory: str, data_cache_dir: str | None) -> str | None:
    """Points JAX at `directory` ("auto": <data cache>/xla; "": off); returns the folder used."""
    if not directory:
        return None
    if directory == "auto":
        from parcae_jax.data.corpus import default_cache_dir

        directory = os.path.join(data_cache_dir or default_cache_dir(), "xla")
    if "://" not in directory:
        os.makedirs(directory, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", directory)
    # The step functions, not the many tiny eager ops (XLA's default, 1 s, would skip small steps too).
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)
    logging.info("compilation cache: %s", directory)
    return directory
