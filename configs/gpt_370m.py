"""GPT baseline of Parcae 370m: the same blocks, 12 layers, d=1024, 8 heads, no loop.

Command:  python -m parcae_jax.main --config=configs/gpt_370m.py --workdir=DIR
Hardware: a GPU cluster or TPU pod slice. The official run used micro-batches of 32 x 2048
          per GPU, 256 x 2048 tokens per step, bf16 autocast and 29.6B FineWeb-Edu tokens
          (32768-token BPE).
Expect:   `--mode=describe` reports params_total = 385,903,104.
"""

from parcae_jax.training import defaults


def get_config(arg: str | None = None):
    del arg
    config = defaults.gpt(d_model=1024, n_heads=8, n_layers=12)
    config.train.steps = 56457  # 29.6B tokens at 256 x 2048 per step
    return config
