"""Model hyper-parameters: one frozen dataclass, validated before anything is traced.

Field names are ours; `parcae_jax/interop/convert.py` maps them to the official config fields
(`n_embd` -> `d_model`, `recurrent_embedding_dimension` -> `d_rec`, ...).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

from parcae_jax.errors import UserError
from parcae_jax.model.machine import resolve_dtype, resolve_remat_policy, resolve_scan_unroll

ARCHS = ("parcae", "gpt")
INJECTIONS = ("diagonal", "linear", "add")
STATE_INITS = ("like-init", "normal", "embed", "zero", "unit")
SAMPLING_SCHEMES = ("poisson-truncated-full", "fixed")
SAMPLING_UNITS = ("per-sequence", "per-batch")
# What one loop iteration (remat_policy) or one block outside the loop (block_remat) keeps for
# the backward pass: a jax.checkpoint_policies name per choice, or dots_attention, ours
# (model/remat.py); "none": no rematerialisation, everything is saved.
REMAT_POLICIES = {
    "full": "nothing_saveable",
    "dots": "checkpoint_dots",
    "dots_no_batch": "dots_with_no_batch_dims_saveable",
    "dots_attention": "dots_attention",  # dots_no_batch + the CPU attention kernel's outputs (model/remat.py)
    "none": None,
}
# remat_policy "auto" (the default): dots_attention on XLA:CPU, full elsewhere
# (resolve_remat_policy).
LOOP_REMAT_POLICIES = ("auto", *REMAT_POLICIES)
# The gradient iterations' nn.scan: "full" unrolls it (no stacked residuals to fill and read),
# "none" keeps the loop; auto: full on XLA:CPU, none elsewhere (resolve_scan_unroll).
SCAN_UNROLLS = ("auto", "none", "full")
# auto: bfloat16 on accelerators, float32 on CPU (exact and the same on every CPU).
# fast: bfloat16 wherever its matmuls beat float32: accelerators and x86 CPUs with BF16 dot
# instructions (AVX512-BF16 or AMX-BF16); float32 on other CPUs (resolve_dtype).
DTYPES = ("auto", "fast", "float32", "bfloat16", "float16")
# xla: the portable path (default); cudnn: flash attention on NVIDIA GPUs; splash: Pallas kernel
# on TPUs; auto: cudnn on GPU, splash on TPU, xla elsewhere (model/attention_kernels.py).
ATTENTION_IMPLS = ("xla", "cudnn", "splash", "cpu", "auto")
LOSS_IMPLS = ("xla", "cpu", "auto")  # the head's softmax cross-entropy (xent.head_cross_entropy)


class ConfigError(UserError, ValueError):
    """A bad setting. The message is one line that names the field and the fix."""


MAX_SIZE = 1 << 22  # largest accepted vocabulary, context or width: 4M, far above any published model


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a Parcae looped model or of its fixed-depth GPT baseline.

    Defaults are the published 140m Parcae model (docs/design.md §1). This dataclass is the
    one place they are defined: `parcae_jax/training/defaults.py` builds `config.model` from it.
    """

    arch: str = "parcae"
    # Vocabulary and context.
    vocab_size: int = 32768  # tokenizer vocabulary; tables are padded to padding_multiple
    padding_multiple: int = 64
    block_size: int = 2048  # longest context the model is built for (RoPE positions)
    seq_len: int = 2048  # training sequence length, <= block_size
    # Prelude, coda and GPT blocks.
    d_model: int = 768
    n_heads: int = 6
    n_kv_heads: int = 6  # grouped-query attention when < n_heads
    d_mlp: int = 3072
    n_layers: int = 6  # GPT only
    # Parcae: prelude -> (injection + core) x T -> C -> coda.
    n_prelude: int = 2
    n_core: int = 2
    n_coda: int = 2
    d_rec: int = 768  # recurrent state width r
    d_rec_mlp: int = 3072
    n_rec_heads: int = 6  # the core is always full multi-head attention
    injection: str = "diagonal"
    prelude_norm: bool = True
    state_init: str = "like-init"
    mean_recurrence: int = 8
    mean_backprop_depth: int = 4
    sampling_scheme: str = "poisson-truncated-full"
    sampling_unit: str = "per-sequence"
    # Shared details.
    qk_norm: bool = True
    norm_eps: float = 1e-5
    rope_base: float = 50000.0
    rope_condense_ratio: float = 1.0
    value_embeds: bool = True
    ve_gate_channels: int = 32
    tie_embeddings: bool = True
    logit_softcap: float | None = None
    logit_scale: float = 1.0
    emb_scale: float = 1.0
    init_orthogonal: bool = True
    # Execution.
    remat_policy: str = "auto"  # per loop iteration; see LOOP_REMAT_POLICIES
    block_remat: str = "none"  # per prelude, coda and GPT block; see REMAT_POLICIES
    scan_unroll: str = "auto"  # the gradient iterations' scan; see SCAN_UNROLLS
    loss_chunk: int = 0  # positions per cross-entropy chunk in training (0: the whole [B, T, V] logits at once)
    # compute dtype, see DTYPES (auto: bfloat16 on accelerators, float32 on CPU); parameters stay float32
    dtype: str = "auto"
    # attention_impl: see ATTENTION_IMPLS; "xla" everywhere unless asked (the CPU configs ask "auto")
    attention_impl: str = "xla"
    loss_impl: str = "xla"  # see LOSS_IMPLS; "cpu": one-pass CPU kernel (no softcap, loss_chunk 0)
    # The official config this model was converted from (JSON), so that save_reference can
    # write back the fields parcae_jax does not model. Empty for models made here.
    reference_config: str = ""

    # ---- derived -------------------------------------------------------------------
    @property
    def padded_vocab_size(self) -> int:
        m = self.padding_multiple
        return -(-self.vocab_size // m) * m

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def rec_head_dim(self) -> int:
        return self.d_rec // self.n_rec_heads

    @property
    def n_unique_layers(self) -> int:
        return self.n_layers if self.arch == "gpt" else self.n_prelude + self.n_core + self.n_coda

    @property
    def compute_dtype(self) -> str:
        """`dtype` with "auto" / "fast" resolved for the machine JAX runs on."""
        return resolve_dtype(self.dtype)

    @property
    def loop_remat_policy(self) -> str:
        """`remat_policy` with "auto" resolved for the machine JAX runs on."""
        return resolve_remat_policy(self.remat_policy)

    @property
    def unroll_grad_scan(self) -> bool:
        """`scan_unroll` with "auto" resolved for the machine JAX runs on."""
        return resolve_scan_unroll(self.scan_unroll) == "full"

    @property
    def init_std(self) -> float:
        """scaled-zero std of the main-width modules: sqrt(2 / (5 d))."""
        return math.sqrt(2.0 / (5.0 * self.d_model))

    def recurrence_or_mean(self, recurrence: int | None) -> int:
        """The recurrence to run at when scoring or generating: `recurrence` if given, else the
        mean the model was trained around."""
        return self.mean_recurrence if recurrence is None else recurrence

    def replace(self, **changes: Any) -> "ModelConfig":
        return validate(dataclasses.replace(self, **changes))

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], prefix: str = "model") -> "ModelConfig":
        """Builds and validates a config from a dict or ConfigDict (unknown keys fail)."""
        known = {f.name: f for f in dataclasses.fields(cls)}
        kwargs = {}
        values = dict(values)
        if "dtype" in values:  # a run records the dtype it computes in, not "auto" / "fast"
            values["dtype"] = resolve_dtype(values["dtype"])
        for key, value in values.items():
            if key not in known:
                raise ConfigError(f"{prefix}.{key} is not a model setting; known: {', '.join(sorted(known))}")
            kwargs[key] = _coerce(prefix, key, known[key].type, value)
        return validate(cls(**kwargs), prefix)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def __repr__(self) -> str:  # the provenance JSON is long and rarely interesting
        shown = ", ".join(f"{k}={v!r}" for k, v in self.to_dict().items() if k != "reference_config")
        return f"ModelConfig({shown})"


def _coerce(prefix: str, key: str, type_name: str, value: Any) -> Any:
    want = {"int": int, "float": float, "bool": bool, "str": str, "float | None": float}[type_name]
    if value is None and type_name.endswith("None"):
        return None
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, want) or (want is int and isinstance(value, bool)):
        raise ConfigError(f"{prefix}.{key}={value!r} must be of type {type_name}")
    return value


def _choice(prefix: str, cfg: ModelConfig, field: str, options: tuple[str, ...]) -> None:
    value = getattr(cfg, field)
    if value not in options:
        raise ConfigError(
            f"{prefix}.{field}={value!r} is unknown; set --config.{prefix}.{field} to one of {'|'.join(options)}"
        )


def validate(cfg: ModelConfig, prefix: str = "model") -> ModelConfig:
    """Raises ConfigError (one line: the field and the fix) on the first bad setting."""

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(f"{prefix}.{msg}")

    for field, options in (
        ("arch", ARCHS),
        ("injection", INJECTIONS),
        ("state_init", STATE_INITS),
        ("sampling_scheme", SAMPLING_SCHEMES),
        ("sampling_unit", SAMPLING_UNITS),
        ("remat_policy", LOOP_REMAT_POLICIES),
        ("block_remat", REMAT_POLICIES),
        ("scan_unroll", SCAN_UNROLLS),
        ("dtype", DTYPES),
        ("attention_impl", ATTENTION_IMPLS),
        ("loss_impl", LOSS_IMPLS),
    ):
        _choice(prefix, cfg, field, options)
    for field in ("vocab_size", "padding_multiple", "block_size", "seq_len", "d_model", "n_heads", "n_kv_heads",
                  "d_mlp"):
        need(getattr(cfg, field) >= 1, f"{field}={getattr(cfg, field)} must be >= 1")
        # a size from a hostile config.json must not reach an allocation (block_size=10**12: a 3.6 TiB RoPE table)
        need(getattr(cfg, field) <= MAX_SIZE, f"{field}={getattr(cfg, field)} is beyond any model here (> {MAX_SIZE})")
    need(cfg.seq_len <= cfg.block_size,
         f"seq_len={cfg.seq_len} exceeds block_size={cfg.block_size}; lower seq_len or raise block_size")
    need(cfg.d_model % cfg.n_heads == 0,
         f"n_heads={cfg.n_heads} does not divide d_model={cfg.d_model}; pick n_heads among the divisors of d_model")
    need(cfg.n_heads % cfg.n_kv_heads == 0,
         f"n_kv_heads={cfg.n_kv_heads} does not divide n_heads={cfg.n_heads}; "
         "pick n_kv_heads among the divisors of n_heads")
    need(cfg.head_dim % 2 == 0,
         f"n_heads={cfg.n_heads} gives an odd head_dim={cfg.head_dim}; RoPE needs an even head_dim")
    need(cfg.norm_eps > 0, f"norm_eps={cfg.norm_eps} must be > 0")
    need(cfg.rope_base > 1, f"rope_base={cfg.rope_base} must be > 1")
    need(cfg.rope_condense_ratio > 0, f"rope_condense_ratio={cfg.rope_condense_ratio} must be > 0")
    need(cfg.logit_softcap is None or cfg.logit_softcap > 0,
         f"logit_softcap={cfg.logit_softcap} must be > 0, or None to disable it")
    need(cfg.logit_scale > 0 and cfg.emb_scale > 0, "logit_scale and emb_scale must be > 0")
    need(cfg.loss_chunk >= 0, f"loss_chunk={cfg.loss_chunk} must be >= 0 (0: no chunking)")
    need(cfg.loss_impl != "cpu" or (cfg.loss_chunk == 0 and cfg.logit_softcap is None),
         f"loss_impl='cpu' needs loss_chunk=0 (got {cfg.loss_chunk}) and logit_softcap=None (got "
         f"{cfg.logit_softcap}); change those, or set loss_impl=auto (or xla)")
    need(cfg.ve_gate_channels >= 1, f"ve_gate_channels={cfg.ve_gate_channels} must be >= 1")
    if cfg.arch == "gpt":
        need(cfg.n_layers >= 1, f"n_layers={cfg.n_layers} must be >= 1")
        if cfg.value_embeds:
            need(cfg.d_model >= cfg.ve_gate_channels,
                 f"d_model={cfg.d_model} is narrower than ve_gate_channels={cfg.ve_gate_channels}; "
                 "widen it or set value_embeds=False")
        return cfg
    for field in ("n_prelude", "n_coda"):
        need(getattr(cfg, field) >= 0, f"{field}={getattr(cfg, field)} must be >= 0")
    for field in ("n_core", "d_rec", "d_rec_mlp", "n_rec_heads"):
        need(getattr(cfg, field) >= 1, f"{field}={getattr(cfg, field)} must be >= 1")
    need(cfg.d_rec % cfg.n_rec_heads == 0,
         f"n_rec_heads={cfg.n_rec_heads} does not divide d_rec={cfg.d_rec}; "
         "pick n_rec_heads among the divisors of d_rec")
    need(cfg.rec_head_dim % 2 == 0,
         f"n_rec_heads={cfg.n_rec_heads} gives an odd recurrent head_dim={cfg.rec_head_dim}; RoPE needs it even")
    need(cfg.injection != "add" or cfg.d_rec == cfg.d_model,
         f"injection='add' needs d_rec == d_model (got {cfg.d_rec} vs {cfg.d_model}); set d_rec={cfg.d_model} "
         "or use injection=diagonal")
    need(cfg.mean_recurrence >= 1, f"mean_recurrence={cfg.mean_recurrence} must be >= 1 (the core runs at least once)")
    need(cfg.mean_backprop_depth >= 1,
         f"mean_backprop_depth={cfg.mean_backprop_depth} must be >= 1, or the core never receives a gradient")
    if cfg.value_embeds:
        need(min(cfg.d_model, cfg.d_rec) >= cfg.ve_gate_channels,
             f"ve_gate_channels={cfg.ve_gate_channels} exceeds the block width; narrow it or set value_embeds=False")
    return cfg
