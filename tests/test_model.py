"""Model pieces against NumPy and against each other: GQA, value embeddings, documents, heads."""

import json
import re

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from parcae_jax.model import build, init_params
from parcae_jax.model.layers import MLP, Block, constant_free_mlp
from parcae_jax.model.layout import block_specs, table_widths
from parcae_jax.model.rope import rope_angles
from tests.conftest import FIXTURES
from tests.helpers import tiny


def np_rms(x, eps):
    return x / np.sqrt(np.mean(x**2, -1, keepdims=True) + eps)


def np_rope(x, T):
    D = x.shape[-1]
    inv = 50000.0 ** (-np.arange(0, D, 2) / D)
    ang = np.arange(T)[:, None] * inv
    cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]
    a, b = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = a * cos - b * sin, b * cos + a * sin
    return out


def np_block(p, x, ve, H, G):
    """The official block in NumPy, torch semantics (repeat_interleave for GQA)."""
    B, T, W = x.shape
    D = W // H
    h = np_rms(x, 1e-5) * p["norm_1"]["scale"]
    q = (h @ p["attn"]["q"]["kernel"].reshape(W, -1)).reshape(B, T, H, D)
    k = (h @ p["attn"]["k"]["kernel"].reshape(W, -1)).reshape(B, T, G, D)
    v = (h @ p["attn"]["v"]["kernel"].reshape(W, -1)).reshape(B, T, G, D)
    gate = 2 / (1 + np.exp(-(h[..., :32] @ p["attn"]["ve_gate"])))
    v = v + gate[..., None] * ve.reshape(B, T, G, D)
    q, k = np_rope(q, T), np_rope(k, T)
    eps = np.finfo(np.float32).eps
    q, k = np_rms(q, eps), np_rms(k, eps)
    k, v = np.repeat(k, H // G, axis=2), np.repeat(v, H // G, axis=2)
    s = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(D) + np.triu(np.full((T, T), -np.inf), 1)
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    y = np.einsum("bhts,bshd->bthd", a, v).reshape(B, T, H * D)
    x = x + y @ p["attn"]["o"]["kernel"].reshape(H * D, W)
    h = np_rms(x, 1e-5) * p["norm_2"]["scale"]
    return x + (0.5 * np.maximum(h @ p["mlp"]["fc"]["kernel"], 0) ** 2) @ p["mlp"]["proj"]["kernel"]


@pytest.mark.slow
def test_block_with_gqa_and_value_embedding_matches_numpy():
    cfg = tiny(n_heads=8, n_kv_heads=2)
    spec = next(s for s in block_specs(cfg) if s.segment == "coda")
    assert spec.applies_ve and spec.kv_width == 16
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 12, 64)).astype(np.float32)
    ve = rng.normal(size=(2, 12, 16)).astype(np.float32)
    block = Block(spec, cfg)
    p = nn.unbox(block.init(jax.random.key(0), x, rope_angles(jnp.arange(12), 8, 50000.0, 1.0), ve))["params"]
    p = jax.tree.map(lambda w: np.asarray(w) + 0.1 * rng.normal(size=w.shape).astype(np.float32), p)  # no zeros
    got = block.apply({"params": p}, x, rope_angles(jnp.arange(12), 8, 50000.0, 1.0), ve)
    np.testing.assert_allclose(got, np_block(p, x.astype(np.float64), ve, 8, 2), atol=2e-4, rtol=1e-4)


def test_value_embedding_layout_matches_the_reference_rules():
    fixture = json.loads((FIXTURES / "reference_parcae_tiny" / "config.json").read_text())["value_embedding_layout"]
    specs = block_specs(tiny())
    for spec, ref in zip(specs, fixture["blocks"]):
        assert ref["block"] == f"{'core_block' if spec.segment == 'core' else spec.segment}.{spec.index}"
        assert (spec.gate, spec.table is not None, spec.applies_ve) == (
            ref["has_ve_gate"], ref["value_embeds_key_exists"], ref["ve_applied"])
    # 2/1/2 layers with backprop depth 2: the two rules agree only on coda.1 (docs/design.md §3).
    specs = block_specs(tiny(n_prelude=2, n_core=1, n_coda=2, mean_backprop_depth=2))
    assert [(s.segment, s.index) for s in specs if s.applies_ve] == [("coda", 1)]
    params = nn.unbox(init_params(build(tiny(n_prelude=2, n_core=1, n_coda=2, mean_backprop_depth=2)),
                                  jax.random.key(0)))
    gates = sorted(k for k, v in params.items() if isinstance(v, dict) and "ve_gate" in v.get("attn", {}))
    assert set(params["value_embeds"]) == {s.table for s in specs if s.table}  # dead tables kept for interop
    assert gates == sorted(f"{s.segment}_{s.index}" for s in specs if s.gate and s.segment != "core")
    # Published shapes: every second layer of each segment.
    for n in (2, 4, 6, 8):
        cfg = tiny(n_prelude=n, n_core=n, n_coda=n, mean_recurrence=8, mean_backprop_depth=4)
        assert all(s.applies_ve == (s.index % 2 == 1) for s in block_specs(cfg))
        assert all(s.gate == s.applies_ve and (s.table is not None) == s.applies_ve for s in block_specs(cfg))


@pytest.mark.slow
def test_core_of_another_width_and_head_dim_applies_value_embeddings():
    cfg = tiny(d_rec=96, d_rec_mlp=192, n_rec_heads=3)  # head dim 32 in the core, 16 outside
    assert table_widths(cfg)["1"] == 96  # read by core block 0, sized by it
    model = build(cfg)
    ids = jnp.arange(40).reshape(2, 20) % 256

    @jax.jit  # one program: op-by-op, init and apply took 4 s
    def logits_of(key):
        params = nn.unbox(init_params(model, key))
        return model.apply({"params": params}, ids, num_steps=(1, 2), initial_state=jnp.ones((2, 20, 96)) * 0.1)
    logits = logits_of(jax.random.key(0))
    assert logits.shape == (2, 20, 256) and bool(jnp.all(jnp.isfinite(logits)))


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["parcae", "gpt"])
def test_document_masking_equals_running_each_document_alone(arch):
    """Attention is relative (RoPE, then a norm that rotation leaves alone), so a document
    packed after another, masked to itself, gives the logits it gives alone."""
    cfg = tiny(arch=arch, n_layers=2)
    model = build(cfg)
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda w: np.asarray(w) + 0.05 * rng.normal(size=w.shape).astype(np.float32),
                          nn.unbox(init_params(model, jax.random.key(0))))
    ids = rng.integers(0, 256, (1, 24))
    segments = np.array([[1] * 10 + [2] * 14])
    x0 = rng.normal(size=(1, 24, 64)).astype(np.float32) * 0.1
    packed = model.apply({"params": params}, ids, recurrence=3, initial_state=x0, segment_ids_BxT=segments)
    alone = model.apply({"params": params}, ids[:, 10:], recurrence=3, initial_state=x0[:, 10:])
    first = model.apply({"params": params}, ids[:, :10], recurrence=3, initial_state=x0[:, :10])
    np.testing.assert_allclose(packed[:, 10:], alone, atol=2e-5)
    np.testing.assert_allclose(packed[:, :10], first, atol=2e-5)


@pytest.mark.slow
def test_softcap_scale_untied_head_and_bfloat16():
    ids = jnp.arange(32).reshape(2, 16)
    x0 = jnp.zeros((2, 16, 64))
    base = tiny(tie_embeddings=False)
    params = nn.unbox(init_params(build(base), jax.random.key(0)))
    assert params["lm_head"]["kernel"].shape == (64, 256)
    run = lambda cfg: build(cfg).apply({"params": params}, ids, recurrence=2, initial_state=x0)  # noqa: E731
    plain = run(base)
    np.testing.assert_allclose(run(base.replace(logit_softcap=0.5)), 0.5 * np.tanh(plain / 0.5), atol=1e-6)
    np.testing.assert_allclose(run(base.replace(logit_scale=2.0)), 2 * plain, atol=1e-5)
    low = run(base.replace(dtype="bfloat16"))
    assert low.dtype == jnp.float32 and np.abs(low - plain).max() < 0.05 * np.abs(plain).max()


@pytest.mark.slow
def test_every_parameter_carries_logical_axis_names():
    for cfg in (tiny(), tiny(arch="gpt", n_layers=2, tie_embeddings=False), tiny(injection="linear")):
        boxed = init_params(build(cfg), jax.random.key(0))
        leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
        for leaf in leaves:
            assert isinstance(leaf, nn.Partitioned), leaf
            assert len(leaf.names) == leaf.value.ndim
            named = [n for n in leaf.names if n is not None]
            assert len(named) == len(set(named))


@pytest.mark.parametrize("bounded", [True, False])
def test_chunked_causal_attention_matches_numpy(bounded):
    """T=384 runs in 3 query chunks, each reading keys up to its end; with GQA and documents."""
    from parcae_jax.model.softmax_attention import dot_product_attention, query_chunks

    B, T, H, G, D = 2, 384, 4, 2, 8
    assert query_chunks(T) == 3
    rng = np.random.default_rng(0)
    q, k, v = (rng.normal(size=(B, T, n, D)).astype(np.float32) for n in (H, G, G))
    if bounded:  # the bounded path assumes RMS-normalised q and k
        q, k = np_rms(q, 1e-7), np_rms(k, 1e-7)
    seg = np.repeat(np.array([[1, 2, 2, 3]]), T // 4, axis=1).repeat(B, 0)
    got = dot_product_attention(q, k, v, seg, bounded=bounded)
    kk, vv = np.repeat(k, H // G, axis=2), np.repeat(v, H // G, axis=2)
    s = np.einsum("bthd,bshd->bhts", q, kk) / np.sqrt(D)
    allowed = np.tril(np.ones((T, T), bool))[None, None] & (seg[:, None, :, None] == seg[:, None, None, :])
    s = np.where(allowed, s, -np.inf)
    a = np.exp(s - s.max(-1, keepdims=True))
    want = np.einsum("bhts,bshd->bthd", a / a.sum(-1, keepdims=True), vv)
    np.testing.assert_allclose(got, want, atol=2e-5)


def split_projection(x, w, widths):
    from parcae_jax.model import matmul
    from parcae_jax.model.attention import split_last

    return split_last(matmul.einsum("btw,wf->btf", x, w, jnp.float32), widths)


def test_split_projection_gradients_match_numpy():
    """The fused q/k/v projection's hand-written backward (split_last joins the cotangents):
    dx = dy W^T, dW = x^T dy (dy = the pieces' cotangents side by side), checked against
    NumPy for an arbitrary upstream."""

    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, 6)).astype(np.float32)
    w = rng.normal(size=(6, 12)).astype(np.float32)
    up = [rng.normal(size=(2, 5, n)).astype(np.float32) for n in (8, 2, 2)]

    def f(x, w):
        q, k, v = split_projection(x, w, (8, 2, 2))
        return sum(jnp.sum(p * u) for p, u in zip((q, k, v), up))

    pieces = split_projection(x, w, (8, 2, 2))
    assert [p.shape[-1] for p in pieces] == [8, 2, 2]
    np.testing.assert_allclose(np.concatenate(pieces, -1), x @ w, atol=1e-5)
    dx, dw = jax.grad(f, argnums=(0, 1))(x, w)
    dy = np.concatenate(up, -1)
    np.testing.assert_allclose(dx, dy @ w.T, atol=1e-4)
    np.testing.assert_allclose(dw, np.einsum("btw,btf->wf", x, dy), atol=1e-4)


def test_default_rope_tables_are_constants_equal_to_traced_ones():
    np_cos, np_sin = rope_angles(np.arange(300), 16, 50000.0, 1.0)
    assert isinstance(np_cos, np.ndarray) and np_cos.dtype == np.float32
    cos, sin = rope_angles(jnp.arange(300), 16, 50000.0, 1.0)
    np.testing.assert_allclose(np_cos, cos, atol=1e-5)
    np.testing.assert_allclose(np_sin, sin, atol=1e-5)


@pytest.fixture(scope="module")
def mlp_pair():
    """Loss and gradients of the MLP in each form, jitted once per dtype (hypothesis varies values only)."""
    def make(dtype):
        cfg = tiny(dtype=dtype)
        forms = [MLP(8, 16, cfg, constant_free=free) for free in (False, True)]
        params = forms[0].init(jax.random.key(0), jnp.zeros((2, 3, 8)))["params"]

        def run(mlp, params, x):
            def loss(p, x):
                y = mlp.apply({"params": p}, x)
                return jnp.sum(y * jnp.arange(y.size).reshape(y.shape)), y
            (_, y), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)
            return y, grads
        return params, [jax.jit(lambda p, x, m=m: run(m, p, x)) for m in forms]
    return {dtype: make(dtype) for dtype in ("float32", "bfloat16")}


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), x_exp=st.integers(-8, 8), w_exp=st.integers(-6, 6),
       dtype=st.sampled_from(["float32", "bfloat16"]))
def test_constant_free_mlp_gives_the_same_values_and_gradients(mlp_pair, seed, x_exp, w_exp, dtype):
    """(x + |x|)^2 with the proj kernel / 8 is 0.5 * relu(x)^2 with the kernel, value for value
    (powers of two round alike), gradients too, in both compute dtypes; h = 0 and negatives included."""
    params, (plain, free) = mlp_pair[dtype]
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, 3, 8)).astype(np.float32) * 2.0**x_exp
    x[0, 0, :] = 0.0  # h = 0 in that row: relu's kink
    params = jax.tree.map(lambda w: jnp.asarray(rng.standard_normal(w.shape), jnp.float32) * 2.0**w_exp, params)
    (y0, g0), (y1, g1) = plain(params, x), free(params, x)
    assert np.array_equal(y0, y1)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        assert np.array_equal(a, b)


def test_constant_free_mlp_holds_no_constant_at_the_activation_width():
    """No literal meets a [.., d_mlp] array in the forward, nested jaxprs included: XLA:CPU
    would pass it into the matmul fusion as a full-size broadcast array (docs/design.md §10)."""
    cfg = tiny()
    params = MLP(8, 16, cfg).init(jax.random.key(0), jnp.zeros((2, 3, 8)))["params"]

    def literals_at_width(jaxpr):
        found = [e.primitive.name for e in jaxpr.eqns
                 if any(isinstance(v, jax.extend.core.Literal) for v in e.invars)
                 and any(getattr(v.aval, "shape", ())[-1:] == (16,) for v in e.outvars)]
        for e in jaxpr.eqns:
            for p in e.params.values():
                inner = getattr(p, "jaxpr", p)  # a ClosedJaxpr holds its Jaxpr
                if isinstance(inner, jax.extend.core.Jaxpr):
                    found += literals_at_width(inner)
        return found

    def form(free):
        return jax.make_jaxpr(lambda x: MLP(8, 16, cfg, constant_free=free).apply({"params": params}, x))(
            jnp.ones((2, 3, 8))).jaxpr
    assert sorted(set(literals_at_width(form(False)))) == ["max", "mul"]  # 0.5 and relu's 0: the check sees both
    assert literals_at_width(form(True)) == []


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_constant_free_mlp_keeps_its_activation_out_of_the_matmul_fusions(dtype):
    """XLA keeps the no-op reduce_precision between fc and proj (its simplifier could drop
    one), so a YNNPACK fusion cannot join the two matmuls: matmul.own_precision."""
    cfg = tiny(dtype=dtype)
    mlp = MLP(8, 16, cfg, constant_free=True)
    params = mlp.init(jax.random.key(0), jnp.zeros((2, 3, 8)))["params"]
    hlo = jax.jit(lambda p, x: mlp.apply({"params": p}, x)).lower(params, jnp.ones((2, 3, 8))).compile().as_text()
    assert len(re.findall(r"= f32\[[\d,]*\]\S* reduce-precision\(", hlo)) == 1


def test_the_constant_free_mlp_is_chosen_where_it_was_measured_faster():
    """CPU: a prefill in float32 or bfloat16, and bfloat16 training; not float32 training, not a
    one-token decode in float32, never float16 (not exact there)."""
    f32, bf16, f16 = tiny(dtype="float32"), tiny(dtype="bfloat16"), tiny(dtype="float16")
    assert constant_free_mlp(f32, prefill=True) and constant_free_mlp(bf16, prefill=True)
    assert constant_free_mlp(bf16, prefill=False)
    assert not constant_free_mlp(f32, prefill=False)
    assert not constant_free_mlp(f16, prefill=True) and not constant_free_mlp(f16, prefill=False)
