"""Optimizers (AdamW, MuonAdamW) and learning-rate schedules, on optax.

Every schedule is a function of the global step, passed to `update(..., step=step)`, so a
skipped step (non-finite gradient) or a resume never shifts it. The values that differ between
otherwise equal runs (base learning rates, the run's length: what a sweep or a learning-rate
scan varies) arrive at run time too, as `update(..., schedule=schedule_values(...))`, not as
constants of the compiled step: runs that differ only in them share one executable (the
persistent compilation cache then serves a sweep's later points). MuonAdamW follows the
official optimizer (docs/design.md §7); what optax lacks is written here: the
Polar Express orthogonalisation with its 1.02 normalisation, the NorMuon second moment,
the sqrt(max(1, rows/cols)) lr scale and cautious weight decay.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

POLAR_EXPRESS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
SCHEDULES = ("trapezoid", "cosine", "constant")
OPTIMIZERS = ("muon_adamw", "adamw")


def schedule_values(optim, total_steps: int) -> dict[str, np.ndarray]:
    """The run-time schedule arguments of `update`: base learning rates, the run's length and its
    warm-up (a sweep scales the warm-up with the length)."""
    return {"lr": np.float32(optim.lr), "muon_lr": np.float32(optim.muon_lr), "total_steps": np.float32(total_steps),
            "warmup_steps": np.float32(optim.warmup_steps)}


def lr_factor(optim) -> Callable[[jax.Array, dict], jax.Array]:
    """Multiplier of the base lr at a 0-based step, given schedule_values: linear warm-up, then
    trapezoid (warmup-stable-decay: constant, then linear to min_lr_ratio over the last
    cooldown_fraction of the run), cosine (to min_lr_ratio) or constant."""
    floor = optim.min_lr_ratio

    def factor(step, schedule):
        s, total = jnp.asarray(step, jnp.float32), jnp.asarray(schedule["total_steps"], jnp.float32)
        warm = jnp.asarray(schedule["warmup_steps"], jnp.float32)
        up = jnp.where(warm > 0, jnp.minimum(1.0, (s + 1) / jnp.maximum(warm, 1.0)), 1.0)
        if optim.schedule == "trapezoid":  # official: base until max_steps - cd, then base * (max_steps - s) / cd
            cooldown = jnp.maximum(jnp.round(optim.cooldown_fraction * total), 1.0)
            down = jnp.clip((total - s) / cooldown, 0.0, 1.0)
            return up * (floor + (1 - floor) * down)
        if optim.schedule == "cosine":
            t = jnp.clip((s - warm) / jnp.maximum(total - warm, 1.0), 0.0, 1.0)
            return up * (floor + (1 - floor) * 0.5 * (1 + jnp.cos(jnp.pi * t)))
        return up * jnp.ones_like(s)

    return factor


def _path_names(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", k)) for k in path)


def is_muon_leaf(names: tuple[str, ...]) -> bool:
    """The official routing by name, in our tree: attention q/k/v/o and ve_gate, MLP fc/proj
    go to Muon; embeddings, value tables, head, norms, A_log, dt_bias, B, the linear
    adapter and C go to AdamW."""
    return "attn" in names and names[-1] in ("kernel", "ve_gate") or "mlp" in names


def torch_view_shape(names: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(n_in_axes, rows, cols) of a Muon leaf as the official [out, in] matrix."""
    n_in = 2 if "o" in names[-2:] else 1
    fan_in = math.prod(shape[:n_in])
    return n_in, math.prod(shape) // fan_in, fan_in


class MuonState(NamedTuple):
    momentum: Any  # like the params, float32
    second_moment: Any  # [rows, 1] or [1, cols] per leaf, float32


def _orthogonalize(G_RxC: jax.Array, ns_steps: int, dtype) -> jax.Array:
    """Polar Express in `dtype` (bfloat16 officially; f32 accumulation), after X / (1.02 ||X||_F + 1e-6)."""
    X = G_RxC.astype(dtype)
    X = X / (jnp.linalg.norm(X.astype(jnp.float32)).astype(dtype) * 1.02 + 1e-6)
    tall = X.shape[0] > X.shape[1]
    mm = lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32).astype(dtype)  # noqa: E731
    for a, b, c in POLAR_EXPRESS[:ns_steps]:
        if tall:
            A = mm(X.T, X)
            X = a * X + mm(X, b * A + c * mm(A, A))
        else:
            A = mm(X, X.T)
            X = a * X + mm(b * A + c * mm(A, A), X)
    return X


def scale_by_muon(lr: Callable, momentum: Callable, weight_decay: Callable, beta2: float = 0.95,
                  ns_steps: int = 5, dtype: str = "bfloat16") -> optax.GradientTransformationExtraArgs:
    """The official Muon update (its sign included: add it to the params), per leaf.

    lr, momentum, weight_decay: functions of the global step and the schedule values. dtype: where the official
    code works in bfloat16 (orthogonalisation, rescaled update, effective lr).
    """
    low = jnp.dtype(dtype)

    def init(params):
        def v0(path, p):
            _, rows, cols = torch_view_shape(_path_names(path), p.shape)
            return jnp.zeros((rows, 1) if rows >= cols else (1, cols), jnp.float32)

        return MuonState(jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params),
                         jax.tree_util.tree_map_with_path(v0, params))

    def update(grads, state, params=None, *, step, schedule, **_):
        mu, lr_t, wd_t = momentum(step, schedule), lr(step, schedule), weight_decay(step, schedule)

        def leaf(path, g, p, m, v):
            n_in, rows, cols = torch_view_shape(_path_names(path), g.shape)
            g = g.astype(jnp.float32)
            m = mu * m + (1 - mu) * g  # Nesterov: the update reads (1 - mu) g + mu m
            G = ((1 - mu) * g + mu * m).reshape(cols, rows).T
            X = _orthogonalize(G, ns_steps, low)
            axis = -1 if rows >= cols else -2
            x2 = jnp.square(X.astype(jnp.float32))
            v_mean = jnp.mean(x2, axis=axis, keepdims=True)
            v = beta2 * v + (1 - beta2) * v_mean
            scale = jax.lax.rsqrt(jnp.maximum(v, 1e-10))
            norm_before = jnp.sqrt(jnp.sum(x2))
            norm_after = jnp.sqrt(jnp.sum(x2 * jnp.square(scale)))
            X = X * (scale * (norm_before / jnp.maximum(norm_after, 1e-10))).astype(low)
            lr_eff = (lr_t * math.sqrt(max(1.0, rows / cols))).astype(low)
            P = p.astype(jnp.float32).reshape(cols, rows).T
            cautious = (X.astype(jnp.float32) * P >= 0).astype(jnp.float32)
            decay = (lr_eff * wd_t.astype(low)).astype(jnp.float32) * P * cautious
            delta = -((lr_eff * X).astype(jnp.float32) + decay)
            return delta.T.reshape(g.shape), m, v

        out = jax.tree_util.tree_map_with_path(leaf, grads, params, state.momentum, state.second_moment)
        is_out = lambda x: isinstance(x, tuple) and len(x) == 3  # noqa: E731
        pick = lambda i: jax.tree.map(lambda t: t[i], out, is_leaf=is_out)  # noqa: E731
        return pick(0), MuonState(pick(1), pick(2))

    return optax.GradientTransformationExtraArgs(init, update)


def scale_by_global_lr(lr: Callable) -> optax.GradientTransformationExtraArgs:
    def update(updates, state, params=None, *, step, schedule, **_):
        return jax.tree.map(lambda u: -lr(step, schedule) * u, updates), state

    return optax.GradientTransformationExtraArgs(lambda _: optax.EmptyState(), update)


def muon_labels(params) -> Any:
    return jax.tree_util.tree_map_with_path(lambda path, _: "muon" if is_muon_leaf(_path_names(path)) else "adamw",
                                            params)


def make_optimizer(optim) -> tuple[optax.GradientTransformationExtraArgs, dict[str, Callable]]:
    """(transformation, {name: lr at (step, schedule)}) for config.optim; update takes `step=`
    and `schedule=` (schedule_values)."""
    factor = lr_factor(optim)
    lrs = {"lr": lambda s, h: h["lr"] * factor(s, h)}
    adamw = optax.chain(optax.scale_by_adam(optim.b1, optim.b2, optim.eps),
                        optax.add_decayed_weights(optim.weight_decay), scale_by_global_lr(lrs["lr"]))
    if optim.name == "adamw":
        return optax.with_extra_args_support(adamw), lrs
    lrs["muon_lr"] = lambda s, h: h["muon_lr"] * factor(s, h)

    def momentum(s, h):
        frac = jnp.minimum(jnp.asarray(s, jnp.float32) / max(optim.muon_momentum_warmup_steps, 1), 1.0)
        return optim.muon_momentum_start + frac * (optim.muon_momentum - optim.muon_momentum_start)

    def weight_decay(s, h):
        return optim.muon_weight_decay * jnp.maximum(0.0, 1.0 - jnp.asarray(s, jnp.float32) / h["total_steps"])

    muon = scale_by_muon(lrs["muon_lr"], momentum, weight_decay, optim.muon_beta2, optim.muon_ns_steps,
                         optim.muon_dtype)
    return optax.multi_transform({"adamw": adamw, "muon": muon}, muon_labels), lrs
