"""The toy sweep of `python -m parcae_jax.commands.report --preset=toy`: a 267K-parameter
Parcae (width 64, 1/2/1 layers, 128-token sequences, batches of 16) on the embedded corpus,
mean recurrence {1,2,4,6,8} x budgets {0.5,1,2,4}e12 FLOPs, backprop ceil(recurrence / 2).

Command:  python -m parcae_jax.commands.sweep --action=run --sweep=toy[:ROOT] && \\
          python -m parcae_jax.commands.sweep --action=fit --sweep=toy[:ROOT]
Hardware: a laptop or a 2-core CPU; the 20 points take about a quarter of an hour there.
Expect:   from 46 steps (C = 0.5e12, recurrence 8) to 1,118 (C = 4e12, recurrence 1); the
          report (README) shows what the fit found at this scale.
"""

import ml_collections

MODEL = dict(d_model=64, n_heads=4, n_kv_heads=4, d_mlp=256, d_rec=64, d_rec_mlp=256, n_rec_heads=4,
             seq_len=128, block_size=128)


def get_config(root: str = "sweeps/toy"):
    return ml_collections.ConfigDict(dict(
        base="tiny",
        root=root,
        recurrences=(1, 2, 4, 6, 8),
        budgets=(0.5e12, 1e12, 2e12, 4e12),
        backprop="half",
        set=tuple([(f"model.{k}", v) for k, v in MODEL.items()] + [
            ("train.batch_size", 16), ("train.log_every", 25), ("train.eval_batches", 4), ("train.eval_every", 0),
            ("ckpt.every", 200), ("ckpt.keep", 1)]),
        warmup_fraction=0.05,
    ))
