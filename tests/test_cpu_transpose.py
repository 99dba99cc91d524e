"""The CPU transpose kernel (model/cpu_kernels/transpose.cc) behind matmul.py's bf16 weight
gradients: a bitwise copy, where it applies, and weight gradients identical with and without it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from parcae_jax.bench import breakdown
from parcae_jax.model import matmul
from parcae_jax.model.cpu_kernels import library
from parcae_jax.model.cpu_kernels import transpose as cpu_transpose

LIB = library.load()
pytestmark = pytest.mark.skipif(isinstance(LIB, str), reason=f"the fused CPU kernels are unavailable: {LIB}")


@pytest.mark.parametrize("shape", [(32, 16), (64, 48), (96, 1040)])
def test_the_transpose_is_a_bitwise_copy(shape):
    bits = np.random.default_rng(0).integers(0, 1 << 16, shape, dtype=np.uint16)  # NaNs and infinities too
    x = jax.lax.bitcast_convert_type(jnp.asarray(bits), jnp.bfloat16)
    assert cpu_transpose.fits(shape, jnp.bfloat16)
    out = np.asarray(jax.lax.bitcast_convert_type(jax.jit(cpu_transpose.transpose)(x), jnp.uint16))
    np.testing.assert_array_equal(out, bits.T)


def test_it_takes_only_what_it_was_measured_on():
    assert not cpu_transpose.fits((32, 16), jnp.float32)  # float32 copies gained nothing
    assert not cpu_transpose.fits((16, 16), jnp.bfloat16) and not cpu_transpose.fits((32, 8), jnp.bfloat16)
    assert not cpu_transpose.fits((2, 32, 16), jnp.bfloat16)


def test_bf16_weight_gradients_are_identical_with_and_without_it(monkeypatch):
    """The same dot reads the same row-major copy either way, so the gradients agree bit for
    bit; and the kernel's own gradient (the transpose again) is exact."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, 64, 48)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((48, 80)), jnp.float32)

    def grads():
        loss = lambda x, w: jnp.sum(jnp.sin(matmul.einsum("btd,df->btf", x * 1.5, w, jnp.bfloat16)))  # noqa: E731
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, w).compile()  # one compile: read, then run
        kinds = breakdown.classify(compiled.as_text())
        calls = [kind for name, (kind, _) in kinds.items() if name.startswith(("custom-call", "ffi_call"))]
        assert calls in ([], ["layout"])  # the bench breakdown counts the kernel's copy as layout work
        return compiled(x, w), bool(calls)

    (with_kernel, used) = grads()
    monkeypatch.setattr(cpu_transpose, "fits", lambda *a: False)
    (without, unused) = grads()
    assert used and not unused
    jax.tree.map(np.testing.assert_array_equal, with_kernel, without)
    weights = jnp.arange(32.0, dtype=jnp.bfloat16)[:, None]
    g = jax.grad(lambda a: jnp.sum(cpu_transpose.transpose(a) * weights))(jnp.ones((64, 32), jnp.bfloat16))
    np.testing.assert_array_equal(g.astype(jnp.float32), np.broadcast_to(np.arange(32.0), (64, 32)))
