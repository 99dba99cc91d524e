"""matmul.einsum: bfloat16 x bfloat16 -> float32 forward and backward; in float32 the plain
einsum's values, with weight gradients in the layout XLA:CPU runs fast.

The independent reference is NumPy in float64 on the bf16-rounded operands (the products of
two bf16 numbers are exact in float32, so only the accumulation order differs), and the
compiled HLO, which must hold no dot with a float32 operand once the compute dtype is bf16.
"""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from parcae_jax import model as M
from parcae_jax.model import matmul
from parcae_jax.model.recurrence import draw_loop_inputs
from tests.helpers import loss_and_grad


def bf16_round(a) -> np.ndarray:
    return np.asarray(jnp.asarray(a, jnp.float32).astype(jnp.bfloat16).astype(jnp.float32), np.float64)


@pytest.mark.parametrize("spec,x_shape,w_shape", [
    ("btw,wf->btf", (2, 5, 16), (16, 24)),            # projection
    ("btd,vd->btv", (2, 5, 16), (40, 16)),            # tied head
    ("bthd,hdw->btw", (2, 5, 3, 8), (3, 8, 16)),      # output projection
    ("btgrd,bsgd->bgrts", (2, 5, 2, 3, 8), (2, 7, 2, 8)),  # attention scores (GQA)
    ("bgrts,bsgd->bgrtd", (2, 2, 3, 5, 7), (2, 7, 2, 8)),  # attention values
])
def test_bfloat16_values_and_gradients_equal_numpy_on_rounded_operands(spec, x_shape, w_shape):
    rng = np.random.default_rng(0)
    x = rng.normal(size=x_shape).astype(np.float32)
    w = rng.normal(size=w_shape).astype(np.float32)
    y = matmul.einsum(spec, x, w, jnp.bfloat16)
    assert y.dtype == jnp.float32
    xr, wr = bf16_round(x), bf16_round(w)
    np.testing.assert_allclose(y, np.einsum(spec, xr, wr), rtol=1e-5, atol=1e-5)

    g = rng.normal(size=y.shape).astype(np.float32)
    dx, dw = jax.grad(lambda x, w: jnp.sum(matmul.einsum(spec, x, w, jnp.bfloat16) * g), argnums=(0, 1))(x, w)
    assert dx.dtype == dw.dtype == jnp.float32
    dx_spec, dw_spec = matmul.backward_specs(spec)
    gr = bf16_round(g)  # the cotangent is rounded to bf16 too: all three dots are bf16 x bf16
    np.testing.assert_allclose(dx, np.einsum(dx_spec, gr, wr), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, np.einsum(dw_spec, xr, gr), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec,x_shape,w_shape", [
    ("btw,wf->btf", (2, 5, 16), (16, 24)),            # projection: x transposed for dw
    ("btw,wf->btf", (2, 5, 24), (24, 16)),            # narrower output: the cotangent transposed
    ("btd,vd->btv", (2, 5, 16), (40, 16)),            # tied head: dw in natural order, transposed
    ("bthd,hdw->btw", (2, 5, 3, 8), (3, 8, 16)),      # output projection
    ("btgrd,bsgd->bgrts", (2, 5, 2, 3, 8), (2, 7, 2, 8)),  # attention scores: not a weight
])
def test_float32_values_are_the_plain_einsum_and_gradients_equal_numpy(spec, x_shape, w_shape):
    rng = np.random.default_rng(1)
    x = rng.normal(size=x_shape).astype(np.float32)
    w = rng.normal(size=w_shape).astype(np.float32)
    np.testing.assert_array_equal(matmul.einsum(spec, x, w, jnp.float32), jnp.einsum(spec, x, w))
    g = rng.normal(size=jnp.einsum(spec, x, w).shape).astype(np.float32)
    dx, dw = jax.grad(lambda x, w: jnp.sum(matmul.einsum(spec, x, w, jnp.float32) * g), argnums=(0, 1))(x, w)
    dx_spec, dw_spec = matmul.backward_specs(spec)
    x64, w64, g64 = (np.asarray(a, np.float64) for a in (x, w, g))
    np.testing.assert_allclose(dx, np.einsum(dx_spec, g64, w64), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, np.einsum(dw_spec, x64, g64), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec,x_shape,w_shape", [
    ("ijx,xy->ijy", (2, 64, 32), (32, 128)),     # an MLP's fc
    ("ijx,xy->ijy", (2, 64, 128), (128, 32)),    # its proj
])
def test_no_float32_weight_gradient_contracts_a_transposed_operand(spec, x_shape, w_shape):
    """Autodiff's weight gradient contracts both operands over their token axes, and XLA:CPU
    runs that dot in Eigen with the left operand transposed (`lhs_contracting_dims={0}`), at
    a quarter of the float32 roof inside the training step; matmul's float32 VJP contracts
    row-major copies instead (docs/performance_xeon.md, sitting 6)."""
    x, w = jnp.ones(x_shape), jnp.ones(w_shape)

    def compiled(einsum):
        f = lambda x, w: jnp.sum(jnp.sin(einsum(spec, x, w)))  # noqa: E731
        return jax.jit(jax.grad(f, (0, 1))).lower(x, w).compile().as_text()

    transposed = re.compile(r"lhs_contracting_dims=\{0\}")
    assert transposed.search(compiled(jnp.einsum))  # the premise: autodiff's form on this XLA
    assert not transposed.search(compiled(lambda s, x, w: matmul.einsum(s, x, w, jnp.float32)))


def test_an_index_in_one_operand_only_is_refused():
    with pytest.raises(ValueError, match="appears nowhere else"):
        matmul.backward_specs("btz,wf->btf")


def _dot_operand_types(hlo_text: str) -> set[tuple[str, str, str]]:
    """(lhs, rhs, result) element types of every stablehlo.dot_general in lowered text."""
    found = set()
    for m in re.finditer(r"stablehlo\.dot_general[^\n]*?: "
                         r"\(tensor<([^>]*)>, tensor<([^>]*)>\) -> tensor<([^>]*)>", hlo_text):
        found.add(tuple(t.split("x")[-1] for t in m.groups()))
    return found


@pytest.mark.slow
def test_a_bfloat16_training_gradient_has_only_bf16_dots():
    """The whole model's forward and backward (loop, attention, head): every dot multiplies
    two bf16 operands into float32; autodiff alone would leave float32 cotangent dots."""
    cfg = M.ModelConfig(vocab_size=96, padding_multiple=32, block_size=16, seq_len=16, d_model=32, n_heads=4,
                        n_kv_heads=2, d_mlp=64, n_prelude=1, n_core=1, n_coda=1, d_rec=32, d_rec_mlp=64,
                        n_rec_heads=2, mean_recurrence=2, mean_backprop_depth=2, ve_gate_channels=8,
                        dtype="bfloat16")
    model = M.build(cfg)
    params = jax.eval_shape(lambda: nn.unbox(M.init_params(model, jax.random.key(0))))  # lowering needs shapes only
    ids = jnp.zeros((2, 16), jnp.int32)
    li = draw_loop_inputs(jax.random.key(1), 2, 16, cfg)

    def loss(p):
        return jnp.mean(model.apply({"params": p}, ids, num_steps=(li["n"], li["k"]), initial_state=li["x0"]))

    types = _dot_operand_types(jax.jit(jax.grad(loss)).lower(params).as_text())
    assert types == {("bf16", "bf16", "f32")}, types


@pytest.mark.slow
def test_bench_step_gradient_in_bf16_is_within_two_percent_of_float32():
    """One training gradient of the `bench_cpu` model (batch 2 of 128 tokens, weights perturbed
    so that no block is the identity): bf16 matmuls move the whole gradient by < 2% of its
    norm (0.8% measured at the bench's batch 8 x 256) and no tensor's gradient by more than 5%
    (1.6% measured)."""
    from parcae_jax.training.defaults import load_shipped

    base = M.ModelConfig.from_mapping(load_shipped("bench_cpu").model).replace(seq_len=128)
    grads, params = {}, None
    for dtype in ("float32", "bfloat16"):  # the same float32 weights for both
        fn, params = loss_and_grad(base.replace(dtype=dtype), B=2, perturb=0.01, params=params)
        grads[dtype] = fn(params)[1]
    flat32, flat16 = (jax.tree.leaves(grads[d]) for d in ("float32", "bfloat16"))
    a = jnp.concatenate([g.ravel() for g in flat32])
    b = jnp.concatenate([g.ravel() for g in flat16])
    assert float(jnp.linalg.norm(a - b) / jnp.linalg.norm(a)) < 0.02
    worst = max(float(jnp.linalg.norm(x - y) / jnp.linalg.norm(x)) for x, y in zip(flat32, flat16) if jnp.any(x != 0))
    assert worst < 0.05, worst
