"""Flax models: `build(model_config)` returns a Parcae or GPT module.

    model = build(cfg)
    params = init_params(model, jax.random.key(0))
    logits = model.apply({"params": params}, input_ids, recurrence=R, initial_state=x0)
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from parcae_jax.model.config import ConfigError, ModelConfig
from parcae_jax.model.gpt import GPT
from parcae_jax.model.parcae import Parcae

__all__ = ["ConfigError", "GPT", "ModelConfig", "Parcae", "build", "init_params"]


def build(model_config: ModelConfig | Mapping[str, Any]) -> nn.Module:
    """A Parcae or GPT module for a ModelConfig (or the `config.model` mapping)."""
    cfg = model_config if isinstance(model_config, ModelConfig) else ModelConfig.from_mapping(model_config)
    return GPT(cfg) if cfg.arch == "gpt" else Parcae(cfg)


def init_params(model: nn.Module, key: jax.Array, batch_size: int = 1, seq_len: int = 8) -> dict:
    """Fresh parameters (boxed with their logical axis names; `nn.unbox` strips them).

    The shapes do not depend on batch_size or seq_len; small ones keep init cheap.
    """
    ids = jnp.zeros((batch_size, seq_len), jnp.int32)
    return model.init({"params": key}, ids, recurrence=1)["params"]
