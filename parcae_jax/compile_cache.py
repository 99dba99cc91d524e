"""XLA's persistent compilation cache: a restarted or resumed run (every preemption on a pod)
loads its compiled steps instead of compiling them again, which for the published sizes
takes minutes. On a pod every host reads one cache (a gs:// folder) that process 0 writes."""

from __future__ import annotations

import os

import jax
from absl import logging


def enable(directory: str, data_cache_dir: str | None) -> str | None:
    """Points JAX at `directory` ("auto": <data cache>/xla on one process; "": off); returns the folder used."""
    if not directory:
        return None
    if directory == "auto" and jax.process_count() > 1:
        # A local folder per host would give process 0 cached executables and the others fresh
        # ones; the cache must be one that every process reads.
        logging.warning("compilation cache off: with several processes, set compilation_cache_dir to a folder "
                        "every host reads (gs://...)")
        return None
    if directory == "auto":
        from parcae_jax.data.corpus import default_cache_dir

        directory = os.path.join(data_cache_dir or default_cache_dir(), "xla")
    if jax.process_count() > 1 and jax.default_backend() == "cpu":
        # Only process 0 writes entries and every process reads them; on CPU an executable
        # read from the cache does not pair its gloo collectives with those of a process that
        # compiled its own (gloo aborts: "collective mismatch"), so multi-process CPU runs
        # compile afresh. (On TPU a cache shared by all hosts is what JAX intends.)
        logging.warning("compilation cache off: not supported for multi-process CPU runs")
        return None
    if "://" not in directory:
        os.makedirs(directory, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", directory)
    # The step functions, not the many tiny eager ops (XLA's default, 1 s, would skip small steps too).
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)
    logging.info("compilation cache: %s", directory)
    return directory
