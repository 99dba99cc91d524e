"""How the prelude output e enters the recurrent state x at every loop iteration.

- diagonal (Parcae): x <- A_bar x + B_bar e, A_bar = exp(-dt exp(A_log)), B_bar = dt B,
  dt = softplus(dt_bias). Every entry of A_bar lies in (0, 1), so rho(A_bar) < 1.
- linear (Huginn-style): x <- W [x; e]; nothing bounds its spectral radius.
- add: x <- x + e; rho = 1, marginally stable.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from parcae_jax.model import matmul
from parcae_jax.model.config import ModelConfig
from parcae_jax.model.init import DT_BIAS_INIT, identity_or_orthogonal, trunc_normal


def _log_softplus(x: jax.Array) -> jax.Array:
    """log(softplus(x)) without underflow to -inf (softplus(x) ~ exp(x) for x << 0)."""
    small = x < -15.0
    return jnp.where(small, x, jnp.log(jax.nn.softplus(jnp.where(small, 0.0, x))))


def diagonal_coefficients(A_log: jax.Array, dt_bias: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(A_bar, dt) in float32 for any finite A_log, dt_bias.

    A_bar = exp(-exp(log dt + A_log)) equals exp(-dt exp(A_log)) but cannot form
    0 * inf = NaN, and it is clipped to the largest float below 1: in float32 the
    product dt exp(A_log) can round to 0, and rho(A_bar) < 1 must hold exactly.
    """
    A_log = A_log.astype(jnp.float32)
    dt_bias = dt_bias.astype(jnp.float32)
    decay = jnp.exp(-jnp.exp(_log_softplus(dt_bias) + A_log))
    decay = jnp.minimum(decay, jnp.float32(1.0) - jnp.finfo(jnp.float32).epsneg)
    return decay, jax.nn.softplus(dt_bias)


def spectral_radius(params_injection: dict, injection: str, squarings: int = 10) -> jax.Array:
    """rho of the state-to-state map: max(A_bar) (diagonal), 1 (add), or for linear the
    Gelfand limit ||W^(2^n)||^(1/2^n) by repeated squaring (eigvals exist on CPU only;
    with n = 10 the estimate is within r^(1/2^11) of rho: 0.3% at r = 1024)."""
    if injection == "diagonal":
        decay, _ = diagonal_coefficients(params_injection["A_log"], params_injection["dt_bias"])
        return jnp.max(decay)
    if injection == "add":
        return jnp.float32(1.0)
    kernel = params_injection["adapter"]["kernel"]  # [r + d, r], state rows first
    W = kernel[: kernel.shape[1]].astype(jnp.float32).T  # x_new = W x
    log_scale = jnp.float32(0.0)
    for _ in range(squarings):  # keep ||M|| = 1 and carry the scale in log space
        norm = jnp.maximum(jnp.linalg.norm(W), 1e-30)
        W, log_scale = W / norm, 2.0 * (log_scale + jnp.log(norm))
        W = W @ W
    norm = jnp.maximum(jnp.linalg.norm(W), 1e-30)
    return jnp.exp((log_scale + jnp.log(norm)) / 2**squarings)


class Injection(nn.Module):
    """The injection step that opens each loop iteration: the new state from the state x and the
    prelude output e (docs/design.md §4; "h" there and in the Parcae paper is x here).

    cfg.injection picks the variant:

    - "diagonal" (Parcae, the default): x <- A_bar * x + B_bar e, elementwise over the r state
      channels, with dt = softplus(dt_bias) [r], A_bar = exp(-dt * exp(A_log)) [r] (a diagonal
      state matrix, held as its diagonal) and B_bar = dt * B (dt scales B's r columns; computed
      as dt * (e @ B)). The same dt sets the decay and the input scale. Because dt > 0 and
      exp(A_log) > 0, every entry of A_bar is in (0, 1), so the spectral radius of the state map
      max(A_bar) < 1 for any parameter values: the loop is a contraction in x.
      diagonal_coefficients computes A_bar in float32 without 0 * inf and clips it below 1.0, so
      the bound holds exactly in float32 too. Parameters (float32): A_log [r] (init 0), dt_bias
      [r] (init DT_BIAS_INIT: dt = log sqrt(5), A_bar = 1/sqrt(5)), B [d, r] (identity if d == r,
      else orthogonal). e @ B runs in cfg.compute_dtype with float32 accumulation
      (matmul.einsum); A_bar and dt are float32, so the result is float32.
    - "linear" (Huginn-style): x <- [x, e] @ W, one bias-free Dense named "adapter" with kernel
      [r + d, r] (state rows first; upstream stores W as [r, r + d]), init truncated normal with
      std sqrt(2 / (5 d)), a matmul in cfg.compute_dtype. Nothing bounds W's spectral radius.
    - "add": x <- x + e; no parameters, needs r == d (config checks it), spectral radius exactly 1.

    Shapes: x_BxTxR [B, T, r = cfg.d_rec], e_BxTxD [B, T, d = cfg.d_model] -> [B, T, r].
    spectral_radius(params, cfg.injection) gives rho for any of the three, for logging."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BxTxR: jax.Array, e_BxTxD: jax.Array) -> jax.Array:
        cfg = self.cfg
        dtype = jnp.dtype(cfg.compute_dtype)
        r, d = cfg.d_rec, cfg.d_model
        if cfg.injection == "add":
            return x_BxTxR + e_BxTxD
        if cfg.injection == "linear":  # the official W is [r, r + d] applied to concat([x, e])
            std = math.sqrt(2.0 / (5.0 * d))
            return matmul.Dense(r, dtype=dtype, name="adapter",
                         kernel_init=nn.with_logical_partitioning(trunc_normal(std), ("concat_embed", "state")))(
                jnp.concatenate([x_BxTxR, e_BxTxD.astype(x_BxTxR.dtype)], axis=-1))
        A_log = self.param("A_log", nn.with_logical_partitioning(nn.initializers.zeros, ("state",)), (r,), jnp.float32)
        dt_bias = self.param("dt_bias",
                             nn.with_logical_partitioning(nn.initializers.constant(DT_BIAS_INIT), ("state",)),
                             (r,), jnp.float32)
        B = self.param("B", nn.with_logical_partitioning(identity_or_orthogonal, ("embed", "state")), (d, r),
                       jnp.float32)
        decay, dt = diagonal_coefficients(A_log, dt_bias)
        Be = matmul.einsum("btd,dr->btr", e_BxTxD, B, dtype)
        return decay * x_BxTxR + dt * Be
