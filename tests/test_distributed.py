"""Cluster detection for jax.distributed start-up, the way JAX's own auto-detection sees it."""

from parcae_jax.runtime.distributed import detected_process_count

SLURM = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4", "SLURM_PROCID": "1", "SLURM_LOCALID": "0",
         "SLURM_STEP_NODELIST": "node[1-4]", "SLURM_NODELIST": "node[1-4]"}


def test_one_host_without_a_cluster_skips_start_up(monkeypatch):
    for key in [*SLURM, "TPU_WORKER_HOSTNAMES", "OMPI_MCA_orte_hnp_uri", "KUBERNETES_SERVICE_HOST"]:
        monkeypatch.delenv(key, raising=False)
    assert detected_process_count() == 1


def test_a_slurm_job_of_4_tasks_is_detected(monkeypatch):
    for key, value in SLURM.items():
        monkeypatch.setenv(key, value)
    assert detected_process_count() == 4
