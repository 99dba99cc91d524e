"""Multi-process start-up: jax.distributed.initialize when the environment asks for it.

- Cloud TPU pod slices (several hosts, on plain TPU VMs or GKE) and Slurm jobs are detected
  the way JAX itself detects them (`detected_process_count`); one host skips start-up;
- GPU clusters elsewhere: set config.dist.coordinator_address / num_processes / process_id,
  or the environment variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID.
One process per host; every process runs the same command.
"""

from __future__ import annotations

import os

import jax
from absl import logging


def _env_process_count() -> int:
    """Processes announced by environment variables (GKE TPU pods, Slurm); 1 if none."""
    hosts = [h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
    slurm = int(os.environ.get("SLURM_NTASKS", "1")) if "SLURM_JOB_ID" in os.environ else 1
    return max(len(hosts), slurm, 1)


def detected_process_count() -> int:
    """The process count of the cluster JAX's own auto-detection finds (1 if none).

    This asks the same cluster types `jax.distributed.initialize()` asks, in its order: a
    Cloud TPU VM pod slice through the GCE metadata server (plain TPU VMs set no
    TPU_WORKER_HOSTNAMES; only GKE does), GKE, Slurm, Open MPI, ... They live in a private
    module, so on any failure we fall back to the environment variables."""
    try:
        from jax._src import clusters

        for env in clusters.ClusterEnv._cluster_types:
            if not env.opt_in_only_method and env.is_env_present():
                return max(int(env.get_process_count()), 1)
        return _env_process_count()
    except Exception as e:  # noqa: BLE001 - a private API may move between jax versions
        logging.warning("cluster auto-detection failed (%s); using environment variables", e)
        return _env_process_count()


def maybe_initialize(dist) -> bool:
    """Initialises jax.distributed if configured or detected; returns whether it did."""
    address = dist.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if dist.initialize == "never":
        return False
    if address:
        num = dist.num_processes if dist.num_processes is not None else int(os.environ["JAX_NUM_PROCESSES"])
        pid = dist.process_id if dist.process_id is not None else int(os.environ["JAX_PROCESS_ID"])
        jax.distributed.initialize(coordinator_address=address, num_processes=num, process_id=pid)
    elif dist.initialize == "always" or detected_process_count() > 1:
        jax.distributed.initialize()  # auto-detects the cluster (Cloud TPU, Slurm, ...)
    else:
        return False
    logging.info("process %d of %d, %d local / %d global devices", jax.process_index(), jax.process_count(),
                 jax.local_device_count(), jax.device_count())
    return True
