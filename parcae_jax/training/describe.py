"""Parameter counts and FLOPs per token of a config, without allocating any weights.

FLOPs count what a training step executes, per token, with a multiply-add as 2 FLOPs:
- every matmul with a weight: 2 x weights forward, 4 x weights backward, the head
  included (the official `cost.py` leaves the tied head out);
- attention scores and values over the keys each query chunk reads: the XLA path cuts
  T into n chunks and chunk i reads keys up to its end, T (n + 1) / 2n per query on
  average (n = 2 at T = 256: 0.75 T); cuDNN's causal kernel is counted as T / 2;
  4 H D x that forward per layer;
- the loop at its nominal depths: n = max(mean_recurrence - mean_backprop_depth, 0)
  iterations forward only, k = min(mean_recurrence, mean_backprop_depth) forward and
  backward, each with its injection (the official count charges B once);
- no embedding or value-embedding lookups (gathers), norms or element-wise work.
`flops_per_token` is model FLOPs, the numerator of MFU; the rematerialised forward of
each gradient iteration is reported apart.
"""

from __future__ import annotations

from typing import Any

from parcae_jax.model import param_counts
from parcae_jax.model.attention_kernels import resolve_impl, splash_block
from parcae_jax.model.config import REMAT_POLICIES, ModelConfig
from parcae_jax.model.cpu_kernels import attention as cpu_attention
from parcae_jax.model.layout import BlockSpec, block_specs
from parcae_jax.model.softmax_attention import query_chunks


def attention_impl(cfg: ModelConfig, seq_len: int) -> str:
    """The attention this backend runs for cfg at seq_len ("auto" resolved)."""
    if cfg.attention_impl != "auto":
        return cfg.attention_impl
    return resolve_impl("auto", cfg.compute_dtype, cfg.head_dim, seq_len, False)


def keys_per_query(cfg: ModelConfig, seq_len: int) -> float:
    """Average number of keys a query's scores and values are computed for, by the attention
    this backend runs ("auto" resolved here): cuDNN skips every masked key (T/2), splash, the
    CPU kernel and the XLA path skip whole blocks above the diagonal (T(n+1)/2n for n blocks)."""
    impl = attention_impl(cfg, seq_len)
    if impl == "cudnn":
        return seq_len / 2
    if impl == "cpu":
        return cpu_attention.keys_per_query(seq_len)
    n = seq_len // (splash_block(seq_len) or seq_len) if impl == "splash" else query_chunks(seq_len)
    return seq_len * (n + 1) / (2 * n)


def injection_flops(cfg: ModelConfig) -> int:
    """Forward FLOPs per token of one injection: e @ B for the diagonal (the elementwise decay
    is not counted), [x, e] @ W for the linear one, nothing for the additive one."""
    r, d = cfg.d_rec, cfg.d_model
    return {"diagonal": 2 * d * r, "linear": 2 * (r + d) * r, "add": 0}[cfg.injection]


def state_readout_flops(cfg: ModelConfig) -> int:
    """Forward FLOPs per token of C, the state's projection to the coda's width."""
    return 2 * cfg.d_rec * cfg.d_model


def attention_product_flops(spec: BlockSpec, cfg: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs per token of one block's scores and values (the matmuls with no weight)."""
    return 4 * keys_per_query(cfg, seq_len) * spec.n_heads * spec.head_dim


def block_forward_flops(spec: BlockSpec, cfg: ModelConfig, seq_len: int) -> float:
    W, H, G, D, d_mlp = spec.width, spec.n_heads, spec.n_kv_heads, spec.head_dim, spec.d_mlp
    projections = 2 * W * (H + 2 * G) * D + 2 * H * D * W
    gate = 2 * cfg.ve_gate_channels * G if spec.applies_ve else 0
    return projections + gate + 2 * 2 * W * d_mlp + attention_product_flops(spec, cfg, seq_len)


def flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> dict[str, float]:
    """Model FLOPs per trained token at `seq_len` (default cfg.seq_len), docs/design.md §9.

    `flops_per_token` (the MFU numerator) counts a forward and backward (3x the forward) of
    everything outside the loop and, inside it, the expected n no-gradient iterations (1x)
    and k gradient ones (3x) at the mean depths; rematerialisation is not model FLOPs and is
    reported apart (`remat_recompute_flops_per_token`). Also: the forward alone and one
    iteration's forward. Attention counts the causal half at the chunked width the code runs.
    """
    T = seq_len or cfg.seq_len
    specs = block_specs(cfg)
    outside = sum(block_forward_flops(s, cfg, T) for s in specs if s.segment != "core")
    outside += 2 * cfg.d_model * cfg.padded_vocab_size  # head
    out: dict[str, float] = {}
    if cfg.arch == "gpt":
        out["flops_per_token"] = 3 * outside
        out["forward_flops_per_token"] = outside
        out["remat_recompute_flops_per_token"] = _block_recompute(cfg, T)
        return out
    outside += state_readout_flops(cfg)  # C
    iteration = injection_flops(cfg) + sum(block_forward_flops(s, cfg, T) for s in specs if s.segment == "core")
    n = max(cfg.mean_recurrence - cfg.mean_backprop_depth, 0)
    k = min(cfg.mean_recurrence, cfg.mean_backprop_depth)
    out["flops_per_token"] = 3 * outside + iteration * (n + 3 * k)
    out["forward_flops_per_token"] = outside + iteration * cfg.mean_recurrence
    out["forward_flops_per_token_per_iteration"] = iteration
    out["remat_recompute_flops_per_token"] = k * _loop_recompute(cfg, T, iteration) + _block_recompute(cfg, T)
    return out


def _loop_recompute(cfg: ModelConfig, T: int, iteration: float) -> float:
    """What the backward of one gradient iteration computes again: everything under "full";
    the attention products under "dots_no_batch" (batched dots, or the CPU kernel's call),
    under "dots" where the CPU kernel runs them (a custom call, not a dot) and under
    "dots_attention" where XLA's attention does (batched dots); nothing under "none"."""
    policy = cfg.loop_remat_policy
    if policy == "full":
        return iteration
    kernel = attention_impl(cfg, T) == "cpu"
    keeps_attention = {"none": True, "dots": not kernel, "dots_attention": kernel, "dots_no_batch": False}[policy]
    return 0 if keeps_attention else sum(attention_product_flops(s, cfg, T) for s in block_specs(cfg)
                                         if s.segment == "core")


def _block_recompute(cfg: ModelConfig, T: int) -> float:
    """The forward of every prelude, coda or GPT block again in the backward under block_remat
    (an upper bound for the dots policies, which keep the matmul outputs)."""
    if REMAT_POLICIES[cfg.block_remat] is None:
        return 0
    return sum(block_forward_flops(s, cfg, T) for s in block_specs(cfg) if s.segment != "core")


def describe(cfg: ModelConfig) -> dict[str, Any]:
    """One JSON-able summary: parameters (total, by group, looped) and FLOPs per token."""
    groups = param_counts(cfg)
    total = sum(groups.values())
    info: dict[str, Any] = {"arch": cfg.arch, "params_total": total, "params_by_group": groups}
    if cfg.arch == "parcae":
        info["params_looped_core"] = groups["core"]
        info["params_unrolled_at_mean_recurrence"] = total + (cfg.mean_recurrence - 1) * groups["core"]
        info["mean_recurrence"] = cfg.mean_recurrence
        info["mean_backprop_depth"] = cfg.mean_backprop_depth
    info["seq_len"] = cfg.seq_len
    info.update(flops_per_token(cfg))
    info["flops_counting"] = ("matmuls incl. head, attention over the keys each query chunk reads, "
                              "injection every iteration, no lookups; see parcae_jax/training/describe.py")
    return info
