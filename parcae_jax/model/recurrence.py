"""The loop: depth sampling, the initial state, and the recurrent core run T times.

One training forward runs, per sequence b, n_b iterations without gradient followed by
k_b iterations with gradient (truncated BPTT). The batch pays for max(n) + max(k)
iterations; row b takes an update only while its own counter runs (REFERENCE_SPEC
section 6). The no-gradient phase is a `while_loop` over stop-gradient parameters and
inputs, so it keeps no activations and one compiled function serves every count; the
gradient phase is a rematerialised `scan` of static length `mean_backprop_depth`.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from parcae_jax.model.attention import Rope
from parcae_jax.model.config import ModelConfig
from parcae_jax.model.injection import Injection
from parcae_jax.model.layers import Block
from parcae_jax.model.layout import block_specs

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def sample_depths(key: jax.Array, batch_size: int, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """(n_B, k_B): iterations without and with gradient for every sequence, int32.

    poisson-truncated-full: total = max(Poisson(mean_recurrence), 1), k = min(total,
    mean_backprop_depth), n = total - k. fixed: n = max(mean_recurrence - s, 0), k = s.
    per-batch draws once and shares the draw (unlike the official per-batch mode,
    which runs n + k iterations, the total here is the Poisson draw itself).
    """
    s = cfg.mean_backprop_depth
    t = max(cfg.mean_recurrence - s, 0)
    shape = (batch_size,) if cfg.sampling_unit == "per-sequence" else ()
    if cfg.sampling_scheme == "fixed":
        n, k = jnp.full(shape, t, jnp.int32), jnp.full(shape, s, jnp.int32)
    else:
        total = jnp.maximum(jax.random.poisson(key, float(t + s), shape, dtype=jnp.int32), 1)
        k = jnp.minimum(total, s)
        n = total - k
    return jnp.broadcast_to(n, (batch_size,)), jnp.broadcast_to(k, (batch_size,))


def draw_initial_state(key: jax.Array | None, shape: tuple[int, ...], cfg: ModelConfig) -> jax.Array:
    """x0 as the official `state_init` options; like-init uses the main width d, not r."""
    if cfg.state_init == "zero":
        return jnp.zeros(shape, jnp.float32)
    if key is None:
        raise ValueError("the initial state is random: pass initial_state=x0 or rngs={'state': key} to apply()")
    if cfg.state_init == "like-init":
        std = math.sqrt(2.0 / (5.0 * cfg.d_model))
        return std * cfg.emb_scale * jax.random.truncated_normal(key, -3.0, 3.0, shape, jnp.float32)
    z = jax.random.normal(key, shape, jnp.float32)
    if cfg.state_init == "embed":
        return z / math.sqrt(cfg.d_model)
    if cfg.state_init == "unit":  # torch.std is the unbiased estimate
        return (z - z.mean(-1, keepdims=True)) / (z.std(-1, ddof=1, keepdims=True) + 1e-8)
    return z  # normal


class CoreStep(nn.Module):
    """One loop iteration: injection, then the core blocks (one shared set of weights)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BxTxR, e_BxTxD, rope: Rope, ves: tuple, segment_ids_BxT=None):
        u = Injection(self.cfg, name="injection")(x_BxTxR, e_BxTxD)
        specs = [s for s in block_specs(self.cfg) if s.segment == "core"]
        for j, spec in enumerate(specs):
            u = Block(spec, self.cfg, name=f"block_{j}")(u, rope, ves[j], segment_ids_BxT)
        return u


def _stop_gradient_tree(tree):
    return jax.tree.map(jax.lax.stop_gradient, tree)


def _masked(active_B: jax.Array, new, old):
    return jnp.where(active_B[:, None, None], new, old)


def recur(core: CoreStep, x_BxTxR, e_BxTxD, rope: Rope, ves: tuple, segment_ids_BxT,
          n_B: jax.Array, k_B: jax.Array, grad_steps: int, remat_policy: str) -> jax.Array:
    """Runs n_B no-gradient then k_B gradient iterations per row (k_B <= grad_steps)."""
    sg = _stop_gradient_tree
    e_sg, ves_sg = sg(e_BxTxD), sg(ves)
    n_max = jnp.max(n_B)

    def nograd_body(mdl, carry):
        x, i = carry
        return _masked(i < n_B, mdl(x, e_sg, rope, ves_sg, segment_ids_BxT), x), i + 1

    def nograd_loop(mdl, x):
        return nn.while_loop(lambda _, c: c[1] < n_max, nograd_body, mdl, (x, jnp.int32(0)),
                             broadcast_variables="params", split_rngs={"params": False})[0]

    nograd_loop = nn.map_variables(nograd_loop, "params", trans_in_fn=sg, mutable=False)
    x = sg(nograd_loop(core, sg(x_BxTxR)))
    if grad_steps == 0:
        return x

    def grad_body(mdl, carry, _):
        x, i = carry
        return (_masked(i < k_B, mdl(x, e_BxTxD, rope, ves, segment_ids_BxT), x), i + 1), None

    if remat_policy != "none":
        grad_body = nn.remat(grad_body, prevent_cse=False, policy=REMAT_POLICIES[remat_policy])
    scan = nn.scan(grad_body, variable_broadcast="params", split_rngs={"params": False}, length=grad_steps)
    (x, _), _ = scan(core, (x, jnp.int32(0)), None)
    return x
