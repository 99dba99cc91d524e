"""Official config fields <-> ModelConfig: the mapping, what is refused, what is kept.

`config_from_reference` reads the official fields (as in a checkpoint's config.json);
`config_to_reference` writes the ones a ModelConfig determines. Fields parcae_jax does
not model (names, attention backend, ...) travel in ModelConfig.reference_config and are
written back unchanged by convert.save_reference.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from parcae_jax.errors import UserError
from parcae_jax.model.config import ModelConfig, validate


class ConversionError(UserError, ValueError):
    """A checkpoint parcae_jax cannot represent, or a config the official code cannot load."""


# Official settings our model hard-wires; a checkpoint with other values is refused.
FIXED_ARCH = {
    "block_class_name": "TransformerPreNormBlock", "norm_class_name": "RMSNorm", "mlp_class_name": "BaseMLP",
    "nonlin_name": "ReLU2", "bias": False, "qk_bias": False, "clip_qkv": None, "use_abacus": False,
    "mup_model_scaling_factor": 1,
}
# Written for models that were not converted from an official checkpoint (published values).
FRESH_DEFAULTS = {
    "name": "", "hf_config": {}, "attn_impl": "flash", "skip_initialization": False, "use_fused_head": "pytorch",
    "debias_attention": False, "center_attention": False, "activation_checkpoint_impl": "per-iteration",
    "simple_ops": False, "strategy": "single", "randomize_positions_from": None, **FIXED_ARCH,
}
PARCAE_FRESH_DEFAULTS = {"lockstep_n": False, "lockstep_k": False, "curriculum_target": "forward",
                         "_is_recurrent_block_config": False}
# (embedding scale, logit scale) of the official init strategies that define them, by width d.
INIT_SCALES = {
    "scaled-zero": lambda d: (1.0, 1.0),
    "takase": lambda d: (math.sqrt(d), 1.0),
    "takase-scaled": lambda d: (math.sqrt(d), math.sqrt(2 / 5) / math.sqrt(d)),
    "scaled-and-logit-scale": lambda d: (1.0, 1 / math.sqrt(d)),
}
LOGIT_SCALED = ("llama-by-dim-ls", "noci-anagnostidis", "shaped", "deep-scale-simple", "deep-scale-full")


def _init_scales(strategy: str, d: int) -> tuple[float, float]:
    if strategy in LOGIT_SCALED:
        return 1.0, 1 / math.sqrt(d)
    return INIT_SCALES.get(strategy, INIT_SCALES["scaled-zero"])(d)


def _is_parcae(fields: dict) -> bool:
    return (fields.get("_class_name") == "ParcaeConfig" or fields.get("model_class_name") == "Parcae"
            or "n_layers_in_recurrent_block" in fields)


def config_from_reference(fields: dict[str, Any]) -> ModelConfig:
    """Maps official config fields (as in config.json) onto a validated ModelConfig."""
    for key, want in FIXED_ARCH.items():
        if fields.get(key, want) != want:
            raise ConversionError(f"config.json: {key}={fields[key]!r} is not supported "
                                  f"(parcae_jax implements {want!r})")
    rope = fields.get("rope_settings") or {}
    if not rope.get("use_rope", True):
        raise ConversionError("config.json: rope_settings.use_rope=false is not supported")
    d = fields["n_embd"]
    heads = fields["num_attention_heads"]
    vocab, multiple = fields["vocab_size"], fields.get("padding_multiple", 512)
    padded = fields.get("padded_vocab_size")
    if padded is not None and padded != -(-min(vocab, padded) // multiple) * multiple:
        raise ConversionError(f"config.json: padded_vocab_size={padded} is not vocab_size rounded up to "
                              f"padding_multiple={multiple}; parcae_jax derives it that way")
    emb_scale, logit_scale = _init_scales(fields.get("init_strategy", "scaled-zero"), d)
    common = dict(
        vocab_size=min(vocab, padded) if padded else vocab, padding_multiple=multiple,
        block_size=fields["block_size"], seq_len=fields["block_size"], d_model=d, n_heads=heads,
        n_kv_heads=fields.get("num_key_value_heads") or heads, d_mlp=fields.get("intermediate_size") or 4 * d,
        qk_norm=bool(fields.get("qk_norm", False)), norm_eps=float(fields.get("norm_eps", 1e-5)),
        rope_base=float(rope.get("rope_base", 50000)), rope_condense_ratio=float(rope.get("rope_condense_ratio", 1)),
        tie_embeddings=bool(fields.get("tie_embeddings", False)), logit_softcap=fields.get("logit_softcap"),
        init_orthogonal=bool(fields.get("init_orthogonal", False)), emb_scale=emb_scale, logit_scale=logit_scale,
    )
    if not _is_parcae(fields):
        return validate(ModelConfig(arch="gpt", n_layers=fields["n_layer"], **common))
    scheme = fields.get("sampling_scheme", "poisson-truncated-full")
    unit = fields.get("recurrent_iteration_method", "per-batch")
    return validate(ModelConfig(
        arch="parcae", n_prelude=fields.get("n_layers_in_prelude", 1),
        n_core=fields.get("n_layers_in_recurrent_block", 4),
        n_coda=fields.get("n_layers_in_coda", 1), d_rec=fields.get("recurrent_embedding_dimension", 1024),
        d_rec_mlp=fields.get("recurrent_intermediation_embedding_dimension", 3520),
        n_rec_heads=fields.get("recurrent_num_attention_heads") or heads,
        injection=fields.get("injection_type", "diagonal"), prelude_norm=bool(fields.get("prelude_norm", False)),
        state_init=fields.get("state_init", "like-init"), mean_recurrence=fields.get("mean_recurrence", 32),
        mean_backprop_depth=fields.get("mean_backprop_depth", 8),
        # Schemes we do not train with load anyway (they only matter for training); the
        # original value is written back by save_reference.
        sampling_scheme=scheme if scheme in ("poisson-truncated-full", "fixed") else "poisson-truncated-full",
        sampling_unit=unit if unit in ("per-sequence", "per-batch") else "per-sequence",
        **common))


def _number(x: float) -> float | int:
    return int(x) if float(x).is_integer() else x


def config_to_reference(cfg: ModelConfig) -> dict[str, Any]:
    """The official config fields that a ModelConfig determines."""
    strategy = next((s for s in ["scaled-zero", *INIT_SCALES, *LOGIT_SCALED]
                     if np.allclose(_init_scales(s, cfg.d_model), (cfg.emb_scale, cfg.logit_scale))), None)
    if strategy is None or not cfg.value_embeds:
        raise ConversionError("the official model cannot express emb_scale/logit_scale "
                              f"({cfg.emb_scale}, {cfg.logit_scale}) or value_embeds=False")
    out = dict(
        block_size=cfg.block_size, n_embd=cfg.d_model, intermediate_size=cfg.d_mlp, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads, vocab_size=cfg.vocab_size, padding_multiple=cfg.padding_multiple,
        padded_vocab_size=cfg.padded_vocab_size, norm_eps=cfg.norm_eps, qk_norm=cfg.qk_norm,
        rope_settings={"use_rope": True, "rope_condense_ratio": _number(cfg.rope_condense_ratio),
                       "rope_base": _number(cfg.rope_base)},
        logit_softcap=cfg.logit_softcap, init_strategy=strategy, init_orthogonal=cfg.init_orthogonal,
        tie_embeddings=cfg.tie_embeddings,
    )
    if cfg.arch == "gpt":
        return {**out, "n_layer": cfg.n_layers}
    if cfg.rec_head_dim != cfg.head_dim:
        raise ConversionError(f"the official model has one RoPE table: d_rec/n_rec_heads={cfg.rec_head_dim} "
                              f"must equal d_model/n_heads={cfg.head_dim}")
    return {**out, "injection_type": cfg.injection, "n_layers_in_recurrent_block": cfg.n_core,
            "n_layers_in_prelude": cfg.n_prelude, "n_layers_in_coda": cfg.n_coda, "state_init": cfg.state_init,
            "recurrent_embedding_dimension": cfg.d_rec, "recurrent_intermediation_embedding_dimension": cfg.d_rec_mlp,
            "recurrent_num_attention_heads": cfg.n_rec_heads, "prelude_norm": cfg.prelude_norm,
            "sampling_scheme": cfg.sampling_scheme, "mean_recurrence": cfg.mean_recurrence,
            "mean_backprop_depth": cfg.mean_backprop_depth, "recurrent_iteration_method": cfg.sampling_unit,
            "model_class_name": "Parcae"}
