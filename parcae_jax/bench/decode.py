"""Decode benchmark: tokens/s of one-token steps over the cache, by batch and prompt length.

    python -m parcae_jax.commands.generate --bench [--bench_config=bench_cpu] [--dtype=bfloat16]

builds the config's model with random weights (generation speed does not depend on their
values), and for every prompt length and batch generates `new_tokens` greedy tokens: once to
compile, then `repeats` times, keeping the fastest prefill and the fastest decode. Reported
per point: prefill seconds, decode tokens/s (batch x decode steps / decode seconds; the
first new token comes from the prefill), milliseconds per decode step, the
decode FLOPs per token and bytes read per step (weights and the cache apart), that
step's fraction of the memory roof, and the memory, float32 and bf16 roofs measured in the
same process. `cost_ratio_long_vs_short` divides the per-step time
at the longest prompt by that at the shortest, beside the ratios the FLOPs and the bytes read
predict (attention over the cache is the only term of either that grows with the prompt).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from parcae_jax.infer.generator import CACHE_BUCKET, Generator, _round_up
from parcae_jax.model import build, init_params
from parcae_jax.model.config import ModelConfig
from parcae_jax.model.layout import block_specs
from parcae_jax.training.describe import block_forward_flops, injection_flops, state_readout_flops


def decode_flops(cfg: ModelConfig, recurrence: int, cache_len: int) -> dict[str, float]:
    """FLOPs of one decode step per token: matmuls with the weights, and attention, which reads
    all `cache_len` cached positions (masked beyond the current one: shapes are static)."""
    weights = attention = 0.0
    for s in block_specs(cfg):
        times = recurrence if s.segment == "core" else 1
        weights += times * block_forward_flops(s, cfg, 0)  # 0 keys: the projections and MLP only
        attention += times * 4 * cache_len * s.n_heads * s.head_dim
    weights += 2 * cfg.d_model * cfg.padded_vocab_size
    if cfg.arch != "gpt":
        weights += recurrence * injection_flops(cfg) + state_readout_flops(cfg)
    return {"weights": weights, "attention": attention}


def decode_bytes(cfg: ModelConfig, recurrence: int, cache_len: int, batch: int) -> dict[str, float]:
    """Bytes one decode step must read: every matmul weight once (float32; the core's are
    reused across iterations) and, per layer application, the keys and values of its slot for
    the whole batch. With a few tokens per step, decoding is bound by these reads, not FLOPs."""
    unique = sum(block_forward_flops(s, cfg, 0) / 2 for s in block_specs(cfg)) + cfg.d_model * cfg.padded_vocab_size
    if cfg.arch != "gpt":  # the injection's and C's weights: half their FLOPs per token
        unique += (injection_flops(cfg) + state_readout_flops(cfg)) / 2
    item = np.dtype(jnp.dtype(cfg.compute_dtype)).itemsize
    cache = sum((recurrence if s.segment == "core" else 1) * 2 * batch * s.n_kv_heads * cache_len * s.head_dim * item
                for s in block_specs(cfg))
    return {"weights": 4 * unique, "cache": cache}



def bench_decode(cfg: ModelConfig, prompt_lens=(64, 1024), batches=(1, 8), new_tokens: int = 32,
                 recurrence: int | None = None, repeats: int = 3, dtype: str | None = None) -> dict:
    """One JSON-ready dict: the points, the roofs and the machine. dtype: as Generator's
    (default float32 on CPU, the config's on accelerators)."""
    from parcae_jax.bench.roof import cpu_name, measure_roof, memory_bytes_per_sec

    longest = max(prompt_lens) + new_tokens
    cfg = cfg.replace(block_size=max(cfg.block_size, longest))  # the rope has no table to outgrow
    params = jax.jit(lambda k: nn.unbox(init_params(build(cfg), k)))(jax.random.key(0))
    R = cfg.recurrence_or_mean(recurrence)
    gen = Generator(cfg, params, recurrence=R, dtype=dtype)
    cfg = gen.cfg
    rng = np.random.default_rng(0)
    points = []
    for P in prompt_lens:
        for B in batches:
            prompts = rng.integers(0, cfg.vocab_size, (B, P)).tolist()
            gen.generate(prompts, new_tokens)  # compile
            runs = [gen.generate(prompts, new_tokens) for _ in range(repeats)]
            prefill = min(r.prefill_s for r in runs)
            decode_s = min(r.decode_s for r in runs)
            S = _round_up(P + new_tokens, CACHE_BUCKET)
            f, m = decode_flops(cfg, R, S), decode_bytes(cfg, R, S, B)
            points.append({"prompt_len": P, "batch": B, "cache_len": S, "prefill_s": prefill,
                           "decode_tokens_per_s": B * (new_tokens - 1) / decode_s,
                           "ms_per_step": 1e3 * decode_s / (new_tokens - 1),
                           "flops_per_token_weights": f["weights"], "flops_per_token_attention": f["attention"],
                           "bytes_per_step_weights": m["weights"], "bytes_per_step_cache": m["cache"]})
    memory = memory_bytes_per_sec()
    for p in points:
        p["memory_roof_fraction"] = ((p["bytes_per_step_weights"] + p["bytes_per_step_cache"])
                                     / (p["ms_per_step"] / 1e3) / memory)
    ratios = {}
    short, long_ = min(prompt_lens), max(prompt_lens)
    for B in batches:
        a = next(p for p in points if p["prompt_len"] == short and p["batch"] == B)
        b = next(p for p in points if p["prompt_len"] == long_ and p["batch"] == B)
        flops = lambda p: p["flops_per_token_weights"] + p["flops_per_token_attention"]  # noqa: E731
        reads = lambda p: p["bytes_per_step_weights"] + p["bytes_per_step_cache"]  # noqa: E731
        ratios[f"batch_{B}"] = {"measured": b["ms_per_step"] / a["ms_per_step"], "flops_predict": flops(b) / flops(a),
                                "bytes_predict": reads(b) / reads(a)}
    return {"what": "decode", "arch": cfg.arch, "recurrence": R, "dtype": cfg.compute_dtype, "new_tokens": new_tokens,
            "d_model": cfg.d_model,
            "layers": [cfg.n_prelude, cfg.n_core, cfg.n_coda] if cfg.arch != "gpt" else cfg.n_layers,
            "points": points, "cost_ratio_long_vs_short": ratios, "cpu": cpu_name(),
            "backend": jax.default_backend(), "roof_memory_bytes_per_sec": memory, **measure_roof()}
