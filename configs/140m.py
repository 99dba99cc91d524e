"""Parcae 140m as published: d=768, 6 heads, 2/2/2 prelude/core/coda layers,
mean recurrence 8, backprop depth 4, diagonal injection, per-sequence Poisson depths.

Command:  python -m parcae_jax.main --config=configs/140m.py --workdir=DIR
Hardware: a GPU cluster or TPU pod slice. The official run used micro-batches of 32 x 2048
          per GPU, 256 x 2048 tokens per step and bf16 autocast on FineWeb-Edu with a
          32768-token BPE (its budget is commented out in the official YAML; the GPT
          baseline's is 11.2B tokens).
Expect:   `--mode=describe` reports params_total = 144,323,136 (its GPT baseline,
          configs/gpt_140m.py: 143,141,184).
"""

from parcae_jax.training import defaults


def get_config(arg: str | None = None):
    del arg
    config = defaults.parcae(d_model=768, n_heads=6, n_layers_each=2)
    config.train.steps = 21362  # 11.2B tokens at 256 x 2048 per step
    return config
