"""The paper's recurrence-scaling grid at 140m: mean recurrence {1,2,4,6,8,10,12} x training
budgets {1,2,4,8,16}e18 FLOPs, backprop depth ceil(recurrence / 2), 256 x 2048 tokens a step.

Command:  python -m parcae_jax.commands.sweep --action=plan --sweep=recurrence_140m[:ROOT] --commands
          (ROOT, where the 35 workdirs go, e.g. gs://BUCKET/sweeps/recurrence_140m)
Hardware: each point is a 140m training run on a GPU node or TPU pod slice; the points
          are independent, so a cluster runs them side by side (`--commands`).
Expect:   `plan` prints 35 points, from 1,532 steps (0.80B tokens; C = 1e18, recurrence 12)
          to 64,034 steps (33.6B tokens; C = 16e18, recurrence 1); README table.
          `fit` then gives the exponents of the optimal recurrence and tokens in C (the
          paper: about 0.40 and 0.78).
"""

import ml_collections


def get_config(root: str = "sweeps/recurrence_140m"):
    return ml_collections.ConfigDict(dict(
        base="140m",
        root=root,
        recurrences=(1, 2, 4, 6, 8, 10, 12),
        budgets=(1e18, 2e18, 4e18, 8e18, 16e18),
        backprop="half",
        set=(("train.batch_size", 256), ("train.eval_every", 1000)),
        warmup_fraction=0.05,
        # No `launcher`: each point is `python -m parcae_jax.main ...` (grid.LAUNCHER). On a cluster,
        # e.g. launcher="sbatch launch/slurm_gpu.sbatch {config} {workdir} {flags}", or
        # "python launch/tpu_pod.py run --tpu=NAME --zone=ZONE {config} {workdir} -- {flags}".
    ))
