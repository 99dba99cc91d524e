"""Parcae 1p3b as published: d=1536, 12 heads, 8/8/8 prelude/core/coda layers,
mean recurrence 8, backprop depth 4, diagonal injection, per-sequence Poisson depths.

Command:  python -m parcae_jax.main --config=configs/1p3b.py --workdir=DIR
Hardware: a GPU cluster or TPU pod slice. The official run used micro-batches of 8 x 2048
          per GPU, 256 x 2048 tokens per step, bf16 autocast and 104B FineWeb-Edu tokens
          (32768-token BPE).
Expect:   `--mode=describe` reports params_total = 1,338,591,744 (its GPT baseline,
          configs/gpt_1p3b.py: 1,333,868,544).
"""

from parcae_jax.training import defaults


def get_config(arg: str | None = None):
    del arg
    config = defaults.parcae(d_model=1536, n_heads=12, n_layers_each=8)
    config.train.steps = 198364  # 104B tokens at 256 x 2048 per step
    config.optim.lr = 0.006  # the official AdamW lr at this size
    return config
