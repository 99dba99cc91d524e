"""Multi-process start-up: jax.distributed.initialize when the environment asks for it.

- Cloud TPU pod slices (several hosts, on plain TPU VMs or GKE) and Slurm jobs are detected
  the way JAX itself detects them (`detected_process_count`); one host skips start-up;
- GPU clusters elsewhere: set config.dist.coordinator_address / num_processes / process_id,
  or the environment variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID.
One process per host; every process runs the same command.
"""

from __future__ import annotations

import os
import socket
import time

import jax
from absl import logging

from parcae_jax.errors import UserError


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


class DistributedError(UserError, RuntimeError):
    """A multi-process start-up that cannot work; the message is one line naming the fix."""


def explicit_coordinator(dist) -> tuple[str, int, int] | None:
    """(address, num_processes, process_id) from config.dist or JAX_* variables, if given."""
    address = dist.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if not address:
        return None
    try:
        num = dist.num_processes if dist.num_processes is not None else int(os.environ["JAX_NUM_PROCESSES"])
        pid = dist.process_id if dist.process_id is not None else int(os.environ["JAX_PROCESS_ID"])
    except (KeyError, ValueError) as e:
        raise DistributedError(f"coordinator {address} given, but not {e}: set config.dist.num_processes and "
                               "process_id (or JAX_NUM_PROCESSES and JAX_PROCESS_ID)") from None
    if not 0 <= pid < num:
        raise DistributedError(f"process_id={pid} must be in [0, num_processes={num})")
    return address, num, pid


def wanted(dist) -> bool:
    """Whether this run has several processes (and so calls jax.distributed.initialize)."""
    if dist.initialize == "never":
        return False
    return dist.initialize == "always" or explicit_coordinator(dist) is not None or detected_process_count() > 1


def _wait_for_coordinator(address: str, timeout_s: float) -> None:
    """Process 0 serves the coordinator; the others first check that something listens there,
    so that a wrong address or a missing process 0 is one line, not a C++ abort after minutes."""
    host, _, port = address.rpartition(":")
    if not port.isdigit():
        raise DistributedError(f"coordinator address {address!r} must be HOST:PORT")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
            return
        except OSError as e:
            if time.monotonic() > deadline:
                raise DistributedError(
                    f"cannot reach the coordinator at {address} within {timeout_s:.0f} s ({e.strerror or e}); "
                    "start process 0 there with the same command, or fix config.dist.coordinator_address") from None
            time.sleep(1.0)


def maybe_initialize(dist) -> bool:
    """Initialises jax.distributed if configured or detected; returns whether it did."""
    if not wanted(dist):
        return False
    timeouts = dict(initialization_timeout=int(dist.init_timeout_s),
                    heartbeat_timeout_seconds=int(dist.heartbeat_timeout_s))
    explicit = explicit_coordinator(dist)
    if explicit:
        address, num, pid = explicit
        if pid != 0:
            _wait_for_coordinator(address, dist.init_timeout_s)
        jax.distributed.initialize(coordinator_address=address, num_processes=num, process_id=pid, **timeouts)
    else:
        jax.distributed.initialize(**timeouts)  # auto-detects the cluster (Cloud TPU, Slurm, ...)
    logging.info("process %d of %d, %d local / %d global devices", jax.process_index(), jax.process_count(),
                 jax.local_device_count(), jax.device_count())
    return True
