"""The CPU benchmark shape: the published Parcae architecture options at width 256.

Width 256, 4 heads, MLP 1024, vocab 4096, seq_len 256, batch 8, 2/2/2 layers, mean
recurrence 4, backprop depth 2, per-sequence Poisson depths, AdamW; dtype "fast": bf16
matmuls on a CPU with BF16 dot instructions, else float32 (`--config.model.dtype=float32`
for the float32 step); attention_impl and loss_impl "auto": the fused CPU attention and loss
kernels where they build.

Command:  python -m parcae_jax.main --config=configs/bench_cpu.py --mode=bench
Hardware: this 2-core CPU machine (the comparison with the official PyTorch code).
Expect:   one JSON object; see docs/performance.md for the measured tokens/s.
"""

from parcae_jax.training import defaults


def get_config(arg: str | None = None):
    del arg
    config = defaults.parcae(d_model=256, n_heads=4, n_layers_each=2)
    config.data.source = "embedded"
    config.model.update(vocab_size=4096, padding_multiple=64, block_size=256, seq_len=256,
                        mean_recurrence=4, mean_backprop_depth=2, dtype="fast", attention_impl="auto", loss_impl="auto")
    config.train.update(batch_size=8, steps=100)
    config.optim.update(name="adamw", lr=1e-3)
    return config
