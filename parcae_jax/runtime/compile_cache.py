"""XLA's persistent compilation cache: a restarted or resumed run (every preemption on a pod)
loads its compiled steps instead of compiling them again, which for the published sizes
takes minutes. With several processes JAX has process 0 write the cache and every process
read it, so it must be one folder every host reads (gs://...).

On CPU "auto" turns it on only for one device in one process: with several, an executable
read from the cache does not pair its collectives with freshly compiled ones. Seen in our
tests: with several CPU devices in one process, all-reduces of a cached train step and of a
fresh program time out in XLA's rendezvous (the process aborts after 40 s); with several
processes, gloo aborts with "collective mismatch". One device has no collectives, and there a
sweep's or a learning-rate scan's later runs load the step their first run compiled (the
schedule's values are arguments of the step, optim.schedule_values), ~10 s each on 2 cores."""

from __future__ import annotations

import os

import jax
from absl import logging


def enable(directory: str, data_cache_dir: str | None) -> str | None:
    """Points JAX at `directory` ("auto": <data cache>/xla in a one-process run, on CPU only with
    one device, else off; "": off); returns the folder used, or None."""
    if not directory:
        return None
    cpu = jax.default_backend() == "cpu"
    if directory == "auto":
        if jax.process_count() > 1 or (cpu and jax.device_count() > 1):  # see above
            return None
        from parcae_jax.data.corpus import default_cache_dir

        directory = os.path.join(data_cache_dir or default_cache_dir(), "xla")
    if jax.config.jax_compilation_cache_dir == directory:  # already on (main, then each run it trains)
        return directory
    if cpu and jax.device_count() > 1:
        logging.warning("compilation_cache_dir on CPU with %d devices: cached and fresh executables may not pair "
                        "their collectives (XLA aborts after a 40 s rendezvous timeout); use it with one device",
                        jax.device_count())
    if "://" not in directory:
        os.makedirs(directory, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", directory)
    # The step functions, not the many tiny eager ops (XLA's default, 1 s, would skip small steps too).
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)
    logging.info("compilation cache: %s", directory)
    return directory
