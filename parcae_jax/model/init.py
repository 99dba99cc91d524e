"""Initialisers of the official `scaled-zero` scheme (docs/design.md §6).

Kernels are stored Flax-style, inputs first: `[*in_axes, *out_axes]`. A matrix is
orthogonal in either orientation, so `init_orthogonal` draws a scaled semi-orthogonal
`[fan_in, fan_out]` matrix whose singular values all equal std * sqrt(max(rows, cols)).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

Initializer = jax.nn.initializers.Initializer

# softplus^-1(-ln sqrt(1/5)): dt = 0.804719 and the injection decay starts at sqrt(1/5).
DT_BIAS_INIT = float(np.log(np.expm1(-np.log(np.sqrt(1.0 / 5.0)))))


def trunc_normal(std: float) -> Initializer:
    """N(0, std) truncated at +-3 std, as torch's trunc_normal_(std, a=-3std, b=3std)."""

    def init(key, shape, dtype=jnp.float32):
        return (std * jax.random.truncated_normal(key, -3.0, 3.0, shape, jnp.float32)).astype(dtype)

    return init


def scaled_orthogonal(std: float, n_in_axes: int = 1) -> Initializer:
    """Semi-orthogonal [fan_in, fan_out] scaled by std * sqrt(max(fan_in, fan_out))."""

    def init(key, shape, dtype=jnp.float32):
        fan_in = math.prod(shape[:n_in_axes])
        fan_out = math.prod(shape[n_in_axes:])
        gain = std * math.sqrt(max(fan_in, fan_out))
        w = jax.nn.initializers.orthogonal(scale=gain)(key, (fan_in, fan_out), jnp.float32)
        return w.reshape(shape).astype(dtype)

    return init


def matrix_init(std: float, orthogonal: bool, n_in_axes: int = 1) -> Initializer:
    """The scaled-zero rule for one weight: zeros at std 0, else orthogonal or trunc-normal."""
    if std == 0.0:
        return jax.nn.initializers.zeros
    return scaled_orthogonal(std, n_in_axes) if orthogonal else trunc_normal(std)


def torch_linear_default(fan_in: int) -> Initializer:
    """torch.nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (used by ve gates)."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)

    return init


def identity_or_orthogonal(key, shape, dtype=jnp.float32):
    """The diagonal injection's B: identity when square, else orthogonal with gain 1."""
    if shape[0] == shape[1]:
        return jnp.eye(shape[0], dtype=dtype)
    return jax.nn.initializers.orthogonal(scale=1.0)(key, shape, dtype)
