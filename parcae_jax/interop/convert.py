"""Weights and configs to and from the official PyTorch format.

A reference directory holds the weights (official state_dict keys, torch `[out, in]`
weights, a tied head stored once) as `model.safetensors`, `pytorch_model.bin` or `model.pt`,
or shards of either (weight_files.py), and `config.json` (official config fields, at top
level or under `config`). `load_reference` gives `(ModelConfig, params)`; `save_reference`
writes the same format back, loadable by the official `from_pretrained`.

The commands: `python -m parcae_jax.commands.convert` (read an official folder, print the
mapped config, optionally write it back), `python -m parcae_jax.commands.export` (a run's
checkpoint out, transfer.py) and `python -m parcae_jax.main --mode=import --reference=DIR`
(official weights in, as step 0 of a run).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import ml_dtypes
import numpy as np

from parcae_jax.interop.reference_config import (
    FRESH_DEFAULTS,
    PARCAE_FRESH_DEFAULTS,
    ConversionError,
    config_from_reference,
    config_to_reference,
)
from parcae_jax.interop.weight_files import open_weights
from parcae_jax.model.config import ModelConfig
from parcae_jax.model.layout import block_specs


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


WEIGHT_DTYPES = frozenset(np.dtype(d) for d in (np.float16, np.float32, np.float64, ml_dtypes.bfloat16))


def torch_shape(entry: Entry, shape) -> tuple[int, ...]:
    """The official tensor's shape for our parameter `shape`: linear weights are torch's
    [out, in], with our kernel's leading `n_in_axes` axes flattened into `in`."""
    if not entry.linear:
        return tuple(shape)
    return math.prod(shape[entry.n_in_axes:]), math.prod(shape[:entry.n_in_axes])


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
    try:
        with open(os.path.join(path, "config.json")) as f:
            raw = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path}/config.json: not JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ConversionError(f"{path}/config.json: expected a JSON object of config fields")
    fields = dict(raw.get("config", raw))
    if "model_class" in raw and "_class_name" not in fields:  # fixture wrappers name the class beside `config`
        fields.setdefault("_class_name", "ParcaeConfig" if raw["model_class"] == "Parcae" else "GPTConfig")
    return fields


def load_reference(path: str) -> tuple[ModelConfig, dict]:
    """(ModelConfig, params as a nested dict of float32 numpy arrays) from an official folder:
    config.json plus safetensors, a PyTorch pickle (read without torch) or shards of either."""
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ConversionError(f"{path}: missing config.json (expected an official checkpoint directory)")
    fields = _read_config(path)
    try:
        cfg = config_from_reference(fields)
    except (KeyError, TypeError, ValueError) as e:  # ConfigError (a ValueError) names the field already
        raise ConversionError(f"{path}/config.json: {e if not isinstance(e, KeyError) else f'no field {e}'}") from None
    cfg = dataclasses.replace(cfg, reference_config=json.dumps(fields, sort_keys=True))
    source, tensors = open_weights(path)
    from parcae_jax.model import param_shapes

    shapes = param_shapes(cfg)
    if "freqs_cis" in tensors:
        freqs = tensors.pop("freqs_cis")()
        if freqs.shape == rope_table(cfg).shape and np.max(np.abs(freqs - rope_table(cfg))) > 1e-4:
            raise ConversionError(f"{path}: freqs_cis does not match rope_base={cfg.rope_base}; unsupported RoPE table")
    params: dict = {}
    for entry in key_map(cfg):
        if entry.key not in tensors:
            raise ConversionError(f"{path}: {source} lacks {entry.key}; does config.json describe these weights?")
        view = tensors.pop(entry.key)()  # a view into the file until copied below
        want = shapes
        for p in entry.path:
            want = want[p]
        if view.shape != torch_shape(entry, want.shape):  # exactly: a transposed [in, out] would scramble
            raise ConversionError(f"{path}: {entry.key} is {list(view.shape)} in {source}, but config.json gives a "
                                  f"model whose {'/'.join(entry.path)} is {list(want.shape)} "
                                  f"(stored as {list(torch_shape(entry, want.shape))})")
        if view.dtype not in WEIGHT_DTYPES:  # what load_state_dict copies into a float parameter
            raise ConversionError(f"{path}: {entry.key} is {view.dtype} in {source}; weights are floating point "
                                  f"({', '.join(sorted(str(d) for d in WEIGHT_DTYPES))})")
        w = np.array(view, np.float32)  # one tensor at a time, checked before it is copied
        if not np.isfinite(w).all():
            raise ConversionError(f"{path}: {entry.key} in {source} holds {int((~np.isfinite(w)).sum())} "
                                  "non-finite values (NaN or inf)")
        node = params
        for p in entry.path[:-1]:
            node = node.setdefault(p, {})
        node[entry.path[-1]] = w.T if entry.linear else w
    tensors.pop("lm_head.weight", None)  # tied: the same tensor as wte
    if tensors:
        raise ConversionError(f"{path}: unexpected tensors {sorted(tensors)[:5]}")
    return cfg, _reshape_like_model(cfg, params)


def _reshape_like_model(cfg: ModelConfig, params: dict) -> dict:
    """Gives the transposed 2-D torch weights our kernels' shapes ([d, H, D], [H, D, d], ...)."""
    import jax

    from parcae_jax.model import param_shapes

    shapes = param_shapes(cfg)
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
            w = w.reshape(torch_shape(entry, w.shape)[::-1]).T  # [*in, *out] -> [in, out] -> torch's [out, in]
        tensors[entry.key] = np.ascontiguousarray(w)
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(fields, f, indent=1)
