"""Weights and configs to and from the official PyTorch format.

A reference directory holds `model.safetensors` (official state_dict keys, torch `[out,
in]` weights, a tied head stored once) and `config.json` (official config fields, at top
level or under `config`). `load_reference` gives `(ModelConfig, params)`; `save_reference`
writes the same format back, loadable by the official `from_pretrained`.

    python -m parcae_jax.convert --reference=DIR                 # print the mapped config
    python -m parcae_jax.convert --reference=DIR --out=OUT_DIR   # read, then write back
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import numpy as np

from parcae_jax.model.config import ModelConfig, validate
from parcae_jax.model.layout import block_specs


class ConversionError(ValueError):
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
            raise ConversionError(f"config.json: {key}={fields[key]!r} is not supported (parcae_jax implements {want!r})")
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
        arch="parcae", n_prelude=fields.get("n_layers_in_prelude", 1), n_core=fields.get("n_layers_in_recurrent_block", 4),
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


@dataclasses.dataclass(frozen=True)
class Entry:
    key: str  # official state_dict key
    path: tuple[str, ...]  # our params path
    linear: bool  # torch [out, in] <-> our kernel [*in, *out] (transpose + reshape)
    n_in_axes: int = 1  # leading kernel axes that are inputs ([H, D, d] output projections: 2)


def key_map(cfg: ModelConfig) -> list[Entry]:
    """Every official tensor and where it lives in our params tree."""
    entries = [Entry("transformer.wte.weight", ("embed", "embedding"), False)]
    prefixes = {"prelude": ("transformer.prelude", "prelude_{}"), "core": ("transformer.core_block", "core/block_{}"),
                "coda": ("transformer.coda", "coda_{}"), "gpt": ("transformer.h", "block_{}")}
    for s in block_specs(cfg):
        ref, ours = prefixes[s.segment]
        ref, ours = f"{ref}.{s.index}", tuple(ours.format(s.index).split("/"))
        entries += [Entry(f"{ref}.norm_1.weight", (*ours, "norm_1", "scale"), False),
                    Entry(f"{ref}.norm_2.weight", (*ours, "norm_2", "scale"), False)]
        for a, b in (("c_q", "q"), ("c_k", "k"), ("c_v", "v"), ("c_proj", "o")):
            entries.append(Entry(f"{ref}.attn.{a}.weight", (*ours, "attn", b, "kernel"), True, 2 if b == "o" else 1))
        if s.gate:
            entries.append(Entry(f"{ref}.attn.ve_gate.weight", (*ours, "attn", "ve_gate"), True))
        entries += [Entry(f"{ref}.mlp.fc.weight", (*ours, "mlp", "fc", "kernel"), True),
                    Entry(f"{ref}.mlp.proj.weight", (*ours, "mlp", "proj", "kernel"), True)]
    if cfg.arch == "parcae":
        inj = ("core", "injection")
        if cfg.injection == "diagonal":
            entries += [Entry("transformer.adapter.A_log", (*inj, "A_log"), False),
                        Entry("transformer.adapter.dt_bias", (*inj, "dt_bias"), False),
                        Entry("transformer.adapter.B", (*inj, "B"), True)]
        elif cfg.injection == "linear":
            entries.append(Entry("transformer.adapter.adapter.weight", (*inj, "adapter", "kernel"), True))
        entries.append(Entry("transformer.C.weight", ("C", "kernel"), True))
        if cfg.prelude_norm:
            entries.append(Entry("transformer.ln_prelude.weight", ("ln_prelude", "scale"), False))
    entries.append(Entry("transformer.ln_f.weight", ("ln_f", "scale"), False))
    entries += [Entry(f"value_embeds.{k}.weight", ("value_embeds", k), False)
                for k in sorted({s.table for s in block_specs(cfg) if s.table is not None}, key=int)]
    if not cfg.tie_embeddings:  # the official GPT head (a fused-CE module) stores its weight as [d, V]
        entries.append(Entry("lm_head.weight", ("lm_head", "kernel"), cfg.arch == "parcae"))
    return entries


def rope_table(cfg: ModelConfig) -> np.ndarray:
    """The official `freqs_cis` buffer [1, block_size, 1, D/2, 2] (cos, sin), float32.

    torch's vectorised float32 sin/cos are not correctly rounded, so this differs from a
    torch-made buffer by about 1 ulp (< 1e-6); the official model loads either.
    """
    D = cfg.head_dim
    inv = (1.0 / (float(cfg.rope_base) ** (np.arange(0, D, 2, dtype=np.float32) / np.float32(D)).astype(np.float64)))
    t = np.arange(cfg.block_size, dtype=np.float32) / np.float32(cfg.rope_condense_ratio)
    ang = np.outer(t, inv.astype(np.float32)).astype(np.float32).astype(np.float64)
    return np.stack([np.cos(ang), np.sin(ang)], axis=-1)[None, :, None].astype(np.float32)


def _read_config(path: str) -> dict[str, Any]:
    with open(os.path.join(path, "config.json")) as f:
        raw = json.load(f)
    fields = dict(raw.get("config", raw))
    if "model_class" in raw and "_class_name" not in fields:  # fixture wrappers name the class beside `config`
        fields.setdefault("_class_name", "ParcaeConfig" if raw["model_class"] == "Parcae" else "GPTConfig")
    return fields


def load_reference(path: str) -> tuple[ModelConfig, dict]:
    """(ModelConfig, params as a nested dict of float32 numpy arrays) from an official directory."""
    from safetensors.numpy import load_file

    for name in ("config.json", "model.safetensors"):
        if not os.path.isfile(os.path.join(path, name)):
            raise ConversionError(f"{path}: missing {name} (expected an official checkpoint directory)")
    fields = _read_config(path)
    cfg = dataclasses.replace(config_from_reference(fields), reference_config=json.dumps(fields, sort_keys=True))
    tensors = load_file(os.path.join(path, "model.safetensors"))
    if "freqs_cis" in tensors and tensors["freqs_cis"].shape == rope_table(cfg).shape:
        if np.max(np.abs(tensors["freqs_cis"] - rope_table(cfg))) > 1e-4:
            raise ConversionError(f"{path}: freqs_cis does not match rope_base={cfg.rope_base}; unsupported RoPE table")
    params: dict = {}
    for entry in key_map(cfg):
        if entry.key not in tensors:
            raise ConversionError(f"{path}: model.safetensors lacks {entry.key}")
        w = np.asarray(tensors.pop(entry.key), np.float32)
        node = params
        for p in entry.path[:-1]:
            node = node.setdefault(p, {})
        node[entry.path[-1]] = w.T if entry.linear else w
    tensors.pop("freqs_cis", None)
    tensors.pop("lm_head.weight", None)  # tied: the same tensor as wte
    if tensors:
        raise ConversionError(f"{path}: unexpected tensors {sorted(tensors)[:5]}")
    return cfg, _reshape_like_model(cfg, params)


def _reshape_like_model(cfg: ModelConfig, params: dict) -> dict:
    """Gives the transposed 2-D torch weights our kernels' shapes ([d, H, D], [H, D, d], ...)."""
    import flax.linen as nn
    import jax

    from parcae_jax.model import build, init_params

    shapes = jax.eval_shape(lambda: nn.unbox(init_params(build(cfg), jax.random.key(0))))
    return jax.tree.map(lambda shape, w: np.asarray(w).reshape(shape.shape), shapes, params)


def save_reference(path: str, model_config: ModelConfig, params: dict) -> None:
    """Writes `config.json` (top-level official fields) and `model.safetensors`."""
    from safetensors.numpy import save_file

    fields = config_to_reference(model_config)
    if model_config.reference_config:  # keep what the original said wherever it still holds
        original = json.loads(model_config.reference_config)
        canonical = config_to_reference(config_from_reference(original))
        fields = {**original, **{k: original[k] if k in original and canonical.get(k) == v else v
                                 for k, v in fields.items()}}
    else:
        fields = {**FRESH_DEFAULTS, **(PARCAE_FRESH_DEFAULTS if model_config.arch == "parcae" else {}), **fields}
    fields["_class_name"] = "ParcaeConfig" if model_config.arch == "parcae" else "GPTConfig"
    tensors = {"freqs_cis": rope_table(model_config)}
    for entry in key_map(model_config):
        node = params
        for p in entry.path:
            node = node[p]
        w = np.asarray(node, np.float32)
        if entry.linear:
            w = w.reshape(math.prod(w.shape[:entry.n_in_axes]), -1).T
        tensors[entry.key] = np.ascontiguousarray(w)
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(fields, f, indent=1)


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m parcae_jax.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference", required=True, help="official checkpoint directory to read")
    parser.add_argument("--out", help="write the weights back in the official format to this directory")
    args = parser.parse_args(argv)
    try:
        cfg, params = load_reference(args.reference)
        if args.out:
            save_reference(args.out, cfg, params)
    except ConversionError as e:
        raise SystemExit(f"error: {e}")
    summary = {k: v for k, v in cfg.to_dict().items() if k != "reference_config"}
    print(json.dumps({"model": summary, "written": args.out}, indent=1))


if __name__ == "__main__":
    main()
