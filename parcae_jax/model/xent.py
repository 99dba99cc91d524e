"""Cross-entropy of the head's logits against next-token targets: from logits, from the
head's input with the head's matmul under the same custom VJP, or a chunk of positions at a
time so that the [B, T, V] logits never exist in full."""

from __future__ import annotations

import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from parcae_jax.model import matmul
from parcae_jax.model.config import ConfigError
from parcae_jax.model.cpu_kernels import head_xent as cpu_head_xent

IGNORE = -100  # the official ignore_index: targets < 0 carry no loss


def token_cross_entropy(logits_BxTxV: jax.Array, targets_BxT: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(per-token loss [B, T] float32, mask [B, T] of real targets). Every vocab row,
    padded ones included, takes part in the softmax, as in the official model."""
    mask = targets_BxT >= 0
    loss, _ = _loss_and_lse(logits_BxTxV.astype(jnp.float32), jnp.where(mask, targets_BxT, 0))
    return jnp.where(mask, loss, 0.0), mask


def head_logits(z_BxTxV: jax.Array, scale: float = 1.0, softcap: float | None = None):
    """(float32 logits, tanh(z * scale / softcap) or None) from the head's matmul output z: the
    scale, then the optional softcap `softcap * tanh(. / softcap)`, laid out over the vocab."""
    if scale != 1.0:
        z_BxTxV = z_BxTxV * scale
    t = None if softcap is None else jnp.tanh(z_BxTxV / softcap)
    logits = z_BxTxV if t is None else softcap * t
    return nn.with_logical_constraint(logits, ("batch", "length", "vocab")), t


def _loss_and_lse(logits, safe):
    """(lse - the target's logit, lse) per position; `safe` targets are valid indices."""
    lse = jax.nn.logsumexp(logits, axis=-1)
    return lse - jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0], lse


def head_cross_entropy(y_BxTxD: jax.Array, kernel: jax.Array, spec: str, targets_BxT: jax.Array, dtype,
                       scale: float = 1.0, softcap: float | None = None,
                       impl: str = "xla") -> tuple[jax.Array, jax.Array]:
    """token_cross_entropy of the head's logits, `z = einsum(spec, y, kernel) * scale` in
    `dtype` with float32 accumulation (then `softcap * tanh(z / softcap)`), with the head's
    matmul and the loss under one custom VJP.

    Why: autodiff keeps the [B, T, V] float32 exponentials for the backward pass and there
    builds the logits' cotangent in three more passes over [B, T, V] (scale by the cotangent,
    scatter the one-hot, cast to `dtype`). Here the forward pass writes the logits' gradient
    `softmax - onehot` (through the softcap) once, already in `dtype`, and the backward pass
    feeds it to the two matmuls as it is: the per-token cotangent scales their small
    operand and output instead (`dx = g * (d @ W)`, `dW = d^T (g * y)`), which is the same
    product up to where the rounding to `dtype` happens. Values match token_cross_entropy
    of matmul.einsum's logits (tests/test_xent.py). On bench_cpu in bf16: temporaries 270 ->
    253 MB, the step 0.4-1.4% faster on Zen 4 (docs/performance_zen4.md).

    `impl` is model.loss_impl: "cpu" computes the loss and that gradient with the CPU kernel
    (cpu_kernels/head_xent.py; no softcap) when differentiated, "auto" where it can run, "xla"
    never; the loss alone (evaluation) is always XLA's.
    """
    mask = targets_BxT >= 0
    safe = jnp.where(mask, targets_BxT, 0)
    loss = _head_loss(spec, jnp.dtype(dtype), float(scale), softcap, jnp.dtype(y_BxTxD.dtype),
                      jnp.dtype(kernel.dtype), impl, y_BxTxD, kernel, safe)
    return jnp.where(mask, loss, 0.0), mask


def _use_kernel(impl: str, softcap, vocab: int, dtype) -> bool:
    """Whether `impl` runs the head's loss on the CPU kernel; "cpu" where it cannot is a ConfigError."""
    if impl == "xla":
        return False
    why = "has no softcap (logit_softcap is set)" if softcap is not None else cpu_head_xent.unfit(vocab, dtype)
    if why and impl == "cpu":
        raise ConfigError(f"model.loss_impl='cpu': the CPU loss kernel {why}; "
                          "set --config.model.loss_impl=auto (or xla)")
    return why is None


def _head_logits(spec, scale, softcap, xc, wc):
    """head_logits of the operands already in the compute dtype."""
    return head_logits(jnp.einsum(spec, xc, wc, preferred_element_type=jnp.float32), scale, softcap)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3, 4, 5, 6))
def _head_loss(spec, dtype, scale, softcap, x_dtype, w_dtype, impl, y, kernel, safe):
    logits, _ = _head_logits(spec, scale, softcap, y.astype(dtype), kernel.astype(dtype))
    return _loss_and_lse(logits, safe)[0]


def _head_loss_fwd(spec, dtype, scale, softcap, x_dtype, w_dtype, impl, y, kernel, safe):
    xc, wc = y.astype(dtype), kernel.astype(dtype)
    z = jnp.einsum(spec, xc, wc, preferred_element_type=jnp.float32)
    # Decided here, where the gradient is wanted: a forward-only pass (evaluation) keeps XLA's.
    if _use_kernel(impl, softcap, z.shape[-1], dtype):  # one pass over each row, every thread
        loss, d = cpu_head_xent.loss_and_gradient(z, safe, scale, dtype)
        return loss, (xc, wc, d)
    logits, t = head_logits(z, scale, softcap)
    loss, lse = _loss_and_lse(logits, safe)
    onehot = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1) == safe[..., None]
    d = jnp.exp(logits - lse[..., None]) - onehot  # d loss / d logits
    if t is not None:
        d = d * (1.0 - t * t)
    if scale != 1.0:
        d = d * scale
    return loss, (xc, wc, d.astype(dtype))


def _head_loss_bwd(spec, dtype, scale, softcap, x_dtype, w_dtype, impl, residuals, g_BxT):
    xc, wc, dc = residuals
    g = g_BxT[..., None]
    dx = matmul.input_cotangent(spec, dc, wc) * g
    dw = matmul.weight_cotangent(spec, (xc.astype(jnp.float32) * g).astype(dtype), dc)
    return dx.astype(x_dtype), dw.astype(w_dtype), None  # the targets are integers


_head_loss.defvjp(_head_loss_fwd, _head_loss_bwd)


def chunked_token_cross_entropy(y_BxTxD: jax.Array, logits_fn: Callable[[jax.Array], jax.Array],
                                targets_BxT: jax.Array, chunk: int) -> tuple[jax.Array, jax.Array]:
    """token_cross_entropy(logits_fn(y), targets), `chunk` positions at a time.

    A `scan` over chunks of the length axis (the batch axis keeps its sharding); each chunk's
    body is rematerialised, so the forward keeps only per-token losses and the backward
    recomputes one chunk's logits at a time: peak logits memory is B x chunk x V instead of
    B x T x V (twice that with the gradient). A length that `chunk` does not divide is padded
    with ignored targets. The head's weight gradient is summed over chunks in float32.
    """
    B, T, D = y_BxTxD.shape
    n = -(-T // chunk)
    pad = n * chunk - T
    if pad:
        y_BxTxD = jnp.pad(y_BxTxD, ((0, 0), (0, pad), (0, 0)))
        targets_BxT = jnp.pad(targets_BxT, ((0, 0), (0, pad)), constant_values=IGNORE)
    y_NxBxCxD = y_BxTxD.reshape(B, n, chunk, D).transpose(1, 0, 2, 3)
    t_NxBxC = targets_BxT.reshape(B, n, chunk).transpose(1, 0, 2)

    @jax.checkpoint
    def one(y_BxCxD, t_BxC):
        return token_cross_entropy(logits_fn(y_BxCxD), t_BxC)

    _, (loss_NxBxC, mask_NxBxC) = jax.lax.scan(lambda c, xs: (c, one(*xs)), None, (y_NxBxCxD, t_NxBxC))
    unchunk = lambda a: a.transpose(1, 0, 2).reshape(B, n * chunk)[:, :T]  # noqa: E731
    return unchunk(loss_NxBxC), unchunk(mask_NxBxC)


def mean_cross_entropy(logits_BxTxV: jax.Array, targets_BxT: jax.Array) -> jax.Array:
    """Mean over real targets (0 when there are none)."""
    loss, mask = token_cross_entropy(logits_BxTxV, targets_BxT)
    return loss.sum() / jnp.maximum(mask.sum(), 1)
