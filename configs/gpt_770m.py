"""GPT baseline of Parcae 770m: the same blocks, 18 layers, d=1280, 10 heads, no loop.

Command:  python -m parcae_jax.main --config=configs/gpt_770m.py --workdir=DIR
Hardware: a GPU cluster or TPU pod slice. The official run used micro-batches of 32 x 2048
          per GPU, 256 x 2048 tokens per step, bf16 autocast and 61.6B FineWeb-Edu tokens
          (32768-token BPE).
Expect:   `--mode=describe` reports params_total = 773,375,040.
"""

from parcae_jax.training import defaults


def get_config(arg: str | None = None):
    del arg
    config = defaults.gpt(d_model=1280, n_heads=10, n_layers=18)
    config.train.steps = 117492  # 61.6B tokens at 256 x 2048 per step
    config.optim.lr = 0.006  # the official AdamW lr at this size
    return config
