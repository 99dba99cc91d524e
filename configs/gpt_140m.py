"""GPT baseline of Parcae 140m: the same blocks, 6 layers, d=768, 6 heads, no loop.

Command:  python -m parcae_jax.main --config=configs/gpt_140m.py --workdir=DIR
Hardware: a GPU cluster or TPU pod slice. The official run used micro-batches of 32 x 2048
          per GPU, 256 x 2048 tokens per step, bf16 autocast and 11.2B FineWeb-Edu tokens
          (32768-token BPE).
Expect:   `--mode=describe` reports params_total = 143,141,184.
"""

from parcae_jax.training import defaults


def get_config(arg: str | None = None):
    del arg
    config = defaults.gpt(d_model=768, n_heads=6, n_layers=6)
    config.train.steps = 21362  # 11.2B tokens at 256 x 2048 per step
    return config
