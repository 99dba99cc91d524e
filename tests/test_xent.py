"""Cross-entropy (model/xent.py): the head's fused loss equals autodiff of the plain one in value
and gradient; the chunked one equals the full one, and the [B, T, V] logits are really gone
from the compiled step (XLA's memory analysis)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from parcae_jax.model import matmul
from parcae_jax.model.xent import IGNORE, chunked_token_cross_entropy, head_cross_entropy, token_cross_entropy
from tests.helpers import loss_and_grad, tiny


def _head(W_DxV, cap=None):
    def logits_fn(y):
        z = jnp.einsum("btd,dv->btv", y, W_DxV) * 1.5
        return z if cap is None else cap * jnp.tanh(z / cap)
    return logits_fn


@pytest.mark.parametrize("dtype, spec, scale, cap", [("float32", "btd,dv->btv", 1.5, 3.0),
                                                     ("bfloat16", "btd,vd->btv", 1.0, None)])
def test_head_loss_equals_autodiff_of_the_plain_loss(dtype, spec, scale, cap):
    """head_cross_entropy's custom VJP (the logits' gradient formed in the forward pass, in the
    compute dtype; the per-token cotangent applied to the matmuls' small side) against autodiff
    of token_cross_entropy over matmul.einsum's logits, with ignored targets and a weighted
    sum. Same loss exactly (one forward computation); float32 gradients to 1e-5, bfloat16 ones
    to 2% of their largest entry (where each rounds the logits' gradient to bfloat16 differs)."""
    rng = np.random.default_rng(0)
    B, T, D, V = 2, 12, 16, 40
    y = jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32)
    W = jnp.asarray(rng.normal(size=(D, V) if spec.endswith("dv->btv") else (V, D)) * 0.5, jnp.float32)
    t = rng.integers(0, V, (B, T)).astype(np.int32)
    t[rng.random((B, T)) < 0.2] = IGNORE
    weight = jnp.asarray(rng.uniform(0.5, 2.0, (B, T)), jnp.float32)

    def plain(y, W):
        z = matmul.einsum(spec, y, W, dtype) * scale
        return token_cross_entropy(z if cap is None else cap * jnp.tanh(z / cap), t)

    def total(fn, y, W):
        loss, mask = fn(y, W)
        return (loss * weight).sum(), (loss, mask)

    fused = lambda y, W: head_cross_entropy(y, W, spec, t, dtype, scale, cap)  # noqa: E731
    both = jax.jit(lambda y, W: [jax.value_and_grad(functools.partial(total, fn), (0, 1), has_aux=True)(y, W)
                                 for fn in (plain, fused)])  # one compile for both
    ((_, (l1, m1)), g1), ((_, (l2, m2)), g2) = both(y, W)
    np.testing.assert_array_equal(m1, m2)
    np.testing.assert_array_equal(l1, l2)
    for a, b in zip(g1, g2):
        tol = 1e-5 if dtype == "float32" else 2e-2 * float(jnp.abs(a).max())
        np.testing.assert_allclose(b, a, rtol=1e-5 if dtype == "float32" else 0, atol=tol)


@pytest.mark.slow
@settings(max_examples=12, deadline=None)
@given(T=st.integers(1, 23), chunk=st.integers(1, 9), cap=st.sampled_from([None, 3.0]), seed=st.integers(0, 99))
def test_chunked_equals_full_in_value_and_gradient(T, chunk, cap, seed):
    rng = np.random.default_rng(seed)
    B, D, V = 2, 8, 13
    y = rng.normal(size=(B, T, D)).astype(np.float32)
    W = rng.normal(size=(D, V)).astype(np.float32)
    t = rng.integers(0, V, (B, T)).astype(np.int32)
    t[rng.random((B, T)) < 0.2] = IGNORE

    def total(fn, y, W):
        loss, mask = fn(y, W)
        return loss.sum(), (loss, mask)

    full = lambda y, W: token_cross_entropy(_head(W, cap)(y), t)  # noqa: E731
    chunked = lambda y, W: chunked_token_cross_entropy(y, _head(W, cap), t, chunk)  # noqa: E731
    # jitted: op by op, the chunked scan's dispatch cost ~1 s an example
    (_, (l1, m1)), g1 = jax.jit(jax.value_and_grad(lambda y, W: total(full, y, W), (0, 1), has_aux=True))(y, W)
    (_, (l2, m2)), g2 = jax.jit(jax.value_and_grad(lambda y, W: total(chunked, y, W), (0, 1), has_aux=True))(y, W)
    np.testing.assert_array_equal(m1, m2)
    np.testing.assert_allclose(l1, l2, rtol=1e-6, atol=1e-6)
    for a, b in zip(g1, g2):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_model_loss_is_the_same_chunked_or_not_and_the_logits_are_never_whole():
    """The model's training loss and gradient with loss_chunk=16 equal the unchunked ones; the
    compiled gradient's temporaries shrink by at least the [B, T, V] float32 logits less the
    one chunk it still holds (a vocabulary large enough that the logits dominate)."""
    base = tiny(vocab_size=8192, seq_len=64, block_size=64)
    results, temp, params = {}, {}, None
    for chunk in (0, 16):
        fn, params = loss_and_grad(base.replace(loss_chunk=chunk), params=params)
        results[chunk] = fn(params)
        temp[chunk] = fn.lower(params).compile().memory_analysis().temp_size_in_bytes
    (l0, g0), (l1, g1) = results[0], results[16]
    np.testing.assert_allclose(l0, l1, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
    logits_bytes = 2 * 64 * base.padded_vocab_size * 4
    assert temp[0] - temp[16] >= logits_bytes * (1 - 16 / 64), (temp, logits_bytes)
