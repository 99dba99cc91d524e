"""A CPU-sized Parcae on the embedded corpus: bytes in, width 128, 1/2/1 layers.

Command:  python -m parcae_jax.main --config=configs/tiny.py --workdir=/tmp/parcae_tiny
Hardware: a laptop or this 2-core CI machine; everything published is kept (diagonal
          injection, prelude norm, value embeddings, per-sequence Poisson depths, MuonAdamW,
          trapezoid schedule), only smaller.
Expect:   943,872 parameters (`--mode=describe`); 400 steps in about 4 minutes on 2 CPU
          cores with BF16 instructions (6 in float32), ending at a validation loss of ~1.61
          nats/byte against a unigram baseline of ~3.44 (README shows the log).
dtype "fast": bfloat16 matmuls on CPUs with AVX512-BF16 / AMX-BF16 and on accelerators,
float32 elsewhere; `--config.model.dtype=float32` gives the exact, machine-independent run.
"""

from parcae_jax.training import defaults


def get_config(arg: str | None = None):
    del arg
    config = defaults.get_config()
    config.model.update(
        vocab_size=257, padding_multiple=64,  # 256 bytes + end-of-document
        block_size=256, seq_len=256,
        d_model=128, n_heads=4, n_kv_heads=4, d_mlp=512,
        n_prelude=1, n_core=2, n_coda=1, d_rec=128, d_rec_mlp=512, n_rec_heads=4,
        mean_recurrence=4, mean_backprop_depth=2,
        dtype="fast",  # bf16 matmuls where the CPU has BF16 dot instructions (~1.5x), else float32
        attention_impl="auto",  # on a CPU: our fused attention kernel where it builds (docs/cpu_attention.md)
    )
    config.train.update(steps=400, batch_size=16, log_every=25, eval_every=100, eval_batches=4)
    config.ckpt.update(every=100, keep=2)
    return config
