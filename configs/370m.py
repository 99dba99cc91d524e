"""Parcae 370m as published: d=1024, 8 heads, 4/4/4 prelude/core/coda layers,
mean recurrence 8, backprop depth 4, diagonal injection, per-sequence Poisson depths.

Command:  python -m parcae_jax.main --config=configs/370m.py --workdir=DIR
Hardware: a GPU cluster or TPU pod slice. The official run used micro-batches of 16 x 2048
          per GPU, 256 x 2048 tokens per step and bf16 autocast on FineWeb-Edu with a
          32768-token BPE (its budget is commented out in the official YAML; the GPT
          baseline's is 29.6B tokens).
Expect:   `--mode=describe` reports params_total = 388,003,328 (its GPT baseline,
          configs/gpt_370m.py: 385,903,104).
"""

from parcae_jax.training import defaults


def get_config(arg: str | None = None):
    del arg
    config = defaults.parcae(d_model=1024, n_heads=8, n_layers_each=4)
    config.train.steps = 56457  # 29.6B tokens at 256 x 2048 per step
    return config
