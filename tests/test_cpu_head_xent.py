"""The CPU loss kernel (model/cpu_kernels/head_xent.cc) behind model.loss_impl: the per-token
softmax cross-entropy and its logits' gradient against float64 NumPy, the head's loss and
gradients against the XLA path, and where it refuses."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from parcae_jax.model import xent
from parcae_jax.model.config import ConfigError, ModelConfig, validate
from parcae_jax.model.cpu_kernels import head_xent as cpu_head_xent
from parcae_jax.model.cpu_kernels import library

LIB = library.load()
pytestmark = pytest.mark.skipif(isinstance(LIB, str), reason=f"the fused CPU kernels are unavailable: {LIB}")


def _reference(z, t, scale):
    x = z.astype(np.float64) * scale
    m = x.max(-1, keepdims=True)
    lse = np.log(np.exp(x - m).sum(-1)) + m[..., 0]
    onehot = np.arange(z.shape[-1]) == t[..., None]
    return lse - np.take_along_axis(x, t[..., None], -1)[..., 0], (np.exp(x - lse[..., None]) - onehot) * scale


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_loss_and_gradient_match_float64(dtype):
    """13 rows (tasks of 8 end part-way), a vocab of 48 (a multiple of 16, not of 64), targets
    at both ends of the row, a scale; a NaN logit and a target outside the vocab give NaN rows."""
    rng = np.random.default_rng(0)
    z = (rng.standard_normal((13, 48)) * 4).astype(np.float32)
    t = rng.integers(0, 48, 13).astype(np.int32)
    t[:2] = 0, 47
    loss, d = jax.jit(lambda z, t: cpu_head_xent.loss_and_gradient(z, t, 0.7, dtype))(z, t)
    ref_loss, ref_d = _reference(z, t, 0.7)
    np.testing.assert_allclose(np.asarray(loss), ref_loss, rtol=1e-6, atol=1e-6)
    assert d.dtype == dtype
    ulp = 2.0**-8 if dtype == jnp.bfloat16 else 2.0**-22  # one rounding to the result's dtype, and ulps before it
    np.testing.assert_allclose(np.asarray(d, np.float32), ref_d, rtol=ulp, atol=1e-7)

    z[3, 5], t[7] = np.nan, 48
    loss, d = jax.jit(lambda z, t: cpu_head_xent.loss_and_gradient(z, t, 1.0, dtype))(z, t)
    bad = np.isnan(np.asarray(loss))
    assert bad[3] and bad[7] and not bad[[0, 1, 2, 4, 5, 6, 8]].any()
    assert np.isnan(np.asarray(d, np.float32)[[3, 7]]).all()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_the_heads_loss_and_gradients_match_the_xla_path(dtype):
    rng = np.random.default_rng(1)
    y = jnp.asarray(rng.standard_normal((2, 24, 32)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((32, 64)) * 0.3, jnp.float32)  # an untied head, "btd,dv->btv"
    t = jnp.asarray(rng.integers(-1, 64, (2, 24)), jnp.int32).at[0, 0].set(xent.IGNORE)

    def run(impl):
        def loss(y, w):
            per_token, mask = xent.head_cross_entropy(y, w, "btd,dv->btv", t, dtype, 0.5, None, impl)
            return per_token.sum() / mask.sum()
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(y, w)

    (l_cpu, g_cpu), (l_xla, g_xla) = run("cpu"), run("xla")
    tol = 2e-2 if dtype == jnp.bfloat16 else 1e-5  # bf16: a gradient element may round to the other neighbour
    np.testing.assert_allclose(l_cpu, l_xla, rtol=1e-6)
    for a, b in zip(g_cpu, g_xla):
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol * float(jnp.abs(b).max()))


def test_where_it_refuses():
    """Where the gradient is wanted: a loss alone (evaluation) is always XLA's."""
    y, w, t = jnp.ones((1, 4, 8)), jnp.ones((40, 8)), jnp.zeros((1, 4), jnp.int32)

    def grad(w, **kw):
        return jax.grad(lambda w: xent.head_cross_entropy(y, w, "btd,vd->btv", t, jnp.float32, **kw)[0].sum())(w)

    with pytest.raises(ConfigError, match="loss_impl='cpu'.*no softcap"):
        grad(w, softcap=30.0, impl="cpu")
    with pytest.raises(ConfigError, match="multiple of 16 .got 40"):
        grad(w, impl="cpu")
    per_token, _ = xent.head_cross_entropy(y, w, "btd,vd->btv", t, jnp.float32, impl="cpu")  # no gradient: XLA
    np.testing.assert_allclose(per_token, np.log(40.0), rtol=1e-6)
    np.testing.assert_allclose(grad(w, impl="auto"), grad(w, impl="xla"), rtol=1e-6)  # XLA instead
    assert cpu_head_xent.unfit(48, jnp.float16) == "computes in bfloat16 or float32 (got float16)"
    with pytest.raises(ConfigError, match="loss_impl='cpu' needs loss_chunk=0 .got 64."):
        validate(ModelConfig(d_model=64, n_heads=2, n_kv_heads=2, d_rec=64, n_rec_heads=2, loss_impl="cpu",
                             loss_chunk=64))
