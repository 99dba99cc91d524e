"""The smallest sweep of the report's stages (`report --preset=smoke`): it checks that an
install runs every science command end to end, in minutes; its numbers mean nothing.

Command:  python -m parcae_jax.commands.report --preset=smoke --out_dir=DIR
Hardware: any CPU.
Expect:   a report (README.md in DIR) with every section; 4 recurrences x 3 budgets of a few steps each.
"""

import ml_collections

MODEL = dict(d_model=32, n_heads=2, n_kv_heads=2, d_mlp=64, d_rec=32, d_rec_mlp=64, n_rec_heads=2,
             seq_len=32, block_size=32)


def get_config(root: str = "sweeps/smoke"):
    return ml_collections.ConfigDict(dict(
        base="tiny",
        root=root,
        recurrences=(1, 2, 3, 4),
        budgets=(1e9, 2e9, 4e9),
        backprop="half",
        set=tuple([(f"model.{k}", v) for k, v in MODEL.items()] + [
            ("train.batch_size", 8), ("train.log_every", 5), ("train.eval_batches", 1), ("train.eval_every", 0),
            ("ckpt.every", 0), ("ckpt.keep", 1)]),
        warmup_fraction=0.05,
    ))
