"""Parcae 770m as published: d=1280, 10 heads, 6/6/6 prelude/core/coda layers,
mean recurrence 8, backprop depth 4, diagonal injection, per-sequence Poisson depths.

Command:  python -m parcae_jax.main --config=configs/770m.py --workdir=DIR
Hardware: a GPU cluster or TPU pod slice. The official run used micro-batches of 8 x 2048
          per GPU, 256 x 2048 tokens per step, bf16 autocast and 61.6B FineWeb-Edu tokens
          (32768-token BPE).
Expect:   `--mode=describe` reports params_total = 776,655,680 (its GPT baseline,
          configs/gpt_770m.py: 773,375,040).
"""

from parcae_jax.training import defaults


def get_config(arg: str | None = None):
    del arg
    config = defaults.parcae(d_model=1280, n_heads=10, n_layers_each=6)
    config.train.steps = 117492  # 61.6B tokens at 256 x 2048 per step
    config.optim.lr = 0.006  # the official AdamW lr at this size
    return config
