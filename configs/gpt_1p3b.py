"""GPT baseline of Parcae 1p3b: the same blocks, 24 layers, d=1536, 12 heads, no loop.

Command:  python -m parcae_jax.main --config=configs/gpt_1p3b.py --workdir=DIR
Hardware: a GPU cluster or TPU pod slice. The official run used micro-batches of 16 x 2048
          per GPU, 256 x 2048 tokens per step, bf16 autocast and 104B FineWeb-Edu tokens
          (32768-token BPE).
Expect:   `--mode=describe` reports params_total = 1,333,868,544.
"""

from parcae_jax.training import defaults


def get_config(arg: str | None = None):
    del arg
    config = defaults.gpt(d_model=1536, n_heads=12, n_layers=24)
    config.train.steps = 198364  # 104B tokens at 256 x 2048 per step
    config.optim.lr = 0.006  # the official AdamW lr at this size
    return config
