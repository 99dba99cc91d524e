"""Multi-process start-up: jax.distributed.initialize when the environment asks for it.

- Cloud TPU pod slices (several hosts) and Slurm jobs are detected by JAX itself;
- GPU clusters elsewhere: set config.dist.coordinator_address / num_processes / process_id,
  or the environment variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID.
One process per host; every process runs the same command.
"""

from __future__ import annotations

import os

import jax
from absl import logging


def _multi_host_tpu() -> bool:
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return len([h for h in hosts.split(",") if h]) > 1


def _slurm_multi_task() -> bool:
    return int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in os.environ


def maybe_initialize(dist) -> bool:
    """Initialises jax.distributed if configured or detected; returns whether it did."""
    address = dist.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if dist.initialize == "never":
        return False
    if address:
        num = dist.num_processes if dist.num_processes is not None else int(os.environ["JAX_NUM_PROCESSES"])
        pid = dist.process_id if dist.process_id is not None else int(os.environ["JAX_PROCESS_ID"])
        jax.distributed.initialize(coordinator_address=address, num_processes=num, process_id=pid)
    elif dist.initialize == "always" or _multi_host_tpu() or _slurm_multi_task():
        jax.distributed.initialize()  # auto-detects the cluster (Cloud TPU, Slurm, ...)
    else:
        return False
    logging.info("process %d of %d, %d local / %d global devices", jax.process_index(), jax.process_count(),
                 jax.local_device_count(), jax.device_count())
    return True
