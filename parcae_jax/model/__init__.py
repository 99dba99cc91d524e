"""Flax models: `build(model_config)` returns a Parcae or GPT module.

    model = build(cfg)
    params = init_params(model, jax.random.key(0))
    logits = model.apply({"params": params}, input_ids, recurrence=R, initial_state=x0)
"""

from __future__ import annotations

import collections
import functools
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from parcae_jax.model.config import ConfigError, ModelConfig
from parcae_jax.model.gpt import GPT
from parcae_jax.model.parcae import Parcae

__all__ = ["ConfigError", "GPT", "ModelConfig", "Parcae", "build", "init_params", "param_counts", "param_shapes"]


def build(model_config: ModelConfig | Mapping[str, Any]) -> nn.Module:
    """A Parcae or GPT module for a ModelConfig (or the `config.model` mapping)."""
    cfg = model_config if isinstance(model_config, ModelConfig) else ModelConfig.from_mapping(model_config)
    return GPT(cfg) if cfg.arch == "gpt" else Parcae(cfg)


def init_params(model: nn.Module, key: jax.Array) -> dict:
    """Fresh parameters, boxed with their logical axis names (`nn.unbox` strips them): the one
    initialisation every caller uses (training, describe, convert, tests). Under
    `jax.eval_shape` it allocates nothing. The shapes do not depend on the dummy input's."""
    return model.init({"params": key}, jnp.zeros((1, 8), jnp.int32), recurrence=1)["params"]


def param_shapes(cfg: ModelConfig) -> Any:
    """The unboxed parameter tree as ShapeDtypeStructs (`jax.eval_shape`: nothing is allocated).
    A fresh tree each call, from one trace per config (tracing the init costs ~0.3 s)."""
    return jax.tree.map(lambda leaf: leaf, _traced_param_shapes(cfg))


@functools.lru_cache(maxsize=16)
def _traced_param_shapes(cfg: ModelConfig) -> Any:
    return jax.eval_shape(lambda: nn.unbox(init_params(build(cfg), jax.random.key(0))))


def _group(path: tuple[str, ...]) -> str:
    """A parameter's segment: embed, value_embeds, prelude, injection, core, C, coda, blocks (GPT), ln_f, ..."""
    top = path[0]
    if top == "core":
        return "injection" if path[1] == "injection" else "core"
    for prefix in ("prelude", "coda", "block"):
        if top.startswith(prefix + "_"):
            return "blocks" if prefix == "block" else prefix
    return top


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    """Unique parameters by group (a tied head is the embedding, counted once)."""
    counts: dict[str, int] = collections.Counter()
    for path, leaf in jax.tree_util.tree_leaves_with_path(param_shapes(cfg)):
        counts[_group(tuple(str(getattr(k, "key", k)) for k in path))] += math.prod(leaf.shape)
    return dict(counts)
