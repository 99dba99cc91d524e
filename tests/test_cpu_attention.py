"""model.attention_impl="cpu": the fused CPU kernel (model/cpu_kernels) against the XLA path.

The kernel is built for this machine's CPU on first use; where it cannot be (no AVX-512, no
compiler) these tests skip with the reason, except the ones about that refusal. On an AMX CPU
the bfloat16 cases run twice: on the AMX tiles and on the AVX-512 path every other CPU takes.

Tolerances: float32 agrees with the XLA path to rounding (outputs 1e-5; gradients 1e-5 of the
largest entry). In bfloat16 both paths round the same operands (q scaled first, then rounded;
probabilities rounded before the value product) but sum in different orders, so each is held
to within twice the distance the XLA path itself keeps from the float32 result.
"""

import contextlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from parcae_jax.model import ConfigError, build, init_params
from parcae_jax.model.attention import qk_norm
from parcae_jax.model.attention_kernels import resolve_impl
from parcae_jax.model.cpu_kernels import attention as cpu_attention
from parcae_jax.model.cpu_kernels import library
from parcae_jax.model.rope import apply_rope, rope_angles
from parcae_jax.model.softmax_attention import dot_product_attention
from parcae_jax.training import sharding
from tests.helpers import tiny
from tests.test_attention_impls import assert_matches_xla, attend_and_grads, inputs

LIB = library.load()
needs_kernel = pytest.mark.skipif(isinstance(LIB, str), reason=f"the CPU kernel is unavailable here: {LIB}")
PATHS = ["avx512"] + (["amx"] if not isinstance(LIB, str) and LIB.set_amx(True) & library.AMX else [])


@pytest.fixture(params=PATHS)
def bf16_path(request):
    """Which products the bfloat16 cases run on (AMX tiles, or the AVX-512 path)."""
    LIB.set_amx(request.param == "amx")
    yield request.param
    LIB.set_amx(True)


def attend(impl, q, k, v, ct, seg, dtype, bounded):
    f = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, seg, impl, bounded=bounded, dtype=dtype))
    out, vjp = jax.vjp(f, q, k, v)
    return out, vjp(ct)


CASES = [  # (T, H, G, D, documents per row, dtype, bounded)
    (192, 4, 2, 64, 3, "float32", True),    # three query blocks, documents crossing them, GQA
    (256, 4, 1, 128, 2, "bfloat16", True),  # MQA, head dim 128
    (256, 4, 4, 64, 1, "bfloat16", False),  # the max subtraction; the bench_cpu shape
    (80, 2, 2, 16, 1, "float32", False),    # a partial query block and head dim 16 (the tiny configs)
    (48, 2, 1, 16, 2, "bfloat16", True),
    (32, 2, 2, 256, 2, "bfloat16", False),  # the widest head: the keys' packing needs T*D scratch
]


@needs_kernel
@pytest.mark.parametrize("T,H,G,D,docs,dtype,bounded", CASES)
def test_kernel_matches_the_xla_path(bf16_path, T, H, G, D, docs, dtype, bounded):
    if dtype == "float32" and bf16_path == "amx":
        pytest.skip("float32 products never use the tiles")
    q, k, v, ct, seg = inputs(2, T, H, G, D, docs)
    if not bounded:  # unnormalised scores up to ~30: exp overflows without the max subtraction
        q, k = 4 * q, 4 * k
    want = attend("xla", q, k, v, ct, seg, jnp.dtype(dtype), bounded)
    got = attend("cpu", q, k, v, ct, seg, jnp.dtype(dtype), bounded)
    if dtype == "float32":
        assert_matches_xla(got, want, dtype)
        return
    # bfloat16: about as far from the float32 result as the XLA path (rounding differs per entry)
    truth = attend("xla", q, k, v, ct, seg, jnp.float32, bounded)
    for name, a, b, t in zip(["out", "dq", "dk", "dv"], [got[0], *got[1]], [want[0], *want[1]], [truth[0], *truth[1]]):
        scale = float(jnp.max(jnp.abs(t)))
        mine, xla = (float(jnp.max(jnp.abs(x - t))) / scale for x in (a, b))
        assert mine <= 2 * xla + 1e-6, f"{name}: {mine:.2e} from float32, the XLA path {xla:.2e}"
    assert_matches_xla(got, want, dtype)


PREP_CASES = [  # (T, H, G, D, documents per row, dtype, a RoPE table per row, qk-norm)
    (192, 4, 2, 64, 3, "float32", True, True),    # generation's tables: one per row (left padding)
    (80, 2, 2, 48, 1, "float32", False, True),    # half a head, 24 channels: a partial vector of 8
    (64, 2, 1, 32, 2, "float32", False, False),   # RoPE alone, the max subtraction
    (256, 4, 4, 64, 1, "bfloat16", False, True),  # the bench_cpu shape
]


@needs_kernel
@pytest.mark.parametrize("T,H,G,D,docs,dtype,per_row,norm", PREP_CASES)
def test_the_kernel_rotates_and_normalises_q_and_k_as_the_xla_path(T, H, G, D, docs, dtype, per_row, norm):
    """Raw q and k in, RoPE and qk-norm inside the kernel (rope_norm.h): the outputs and the raw
    q, k, v gradients of apply_rope, qk_norm and the attention, to the tolerances above."""
    q, k, v, ct, seg = inputs(2, T, H, G, D, docs, seed=T)
    q, k = 3 * q + 0.5, 3 * k - 0.25  # unnormalised rows, as the projections give them
    positions = np.stack([np.arange(T), np.arange(T) - 7]) if per_row else np.arange(T)
    rope = rope_angles(positions, D, 10000.0, 1.0)
    eps = float(np.finfo(np.float32).eps) if norm else None

    def xla(q, k, v, dt):
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        q, k = (qk_norm(q), qk_norm(k)) if norm else (q, k)
        return dot_product_attention(q, k, v, seg, "xla", bounded=norm, dtype=dt)

    def run(f):
        out, vjp = jax.vjp(jax.jit(f), q, k, v)
        return out, vjp(ct)

    kernel = lambda q, k, v: cpu_attention.attention(q, k, v, seg, jnp.dtype(dtype), norm,  # noqa: E731
                                                      rope=rope, norm_eps=eps)
    got, want = run(kernel), run(lambda q, k, v: xla(q, k, v, jnp.dtype(dtype)))
    if dtype == "float32":
        assert_matches_xla(got, want, dtype)
        return
    truth = run(lambda q, k, v: xla(q, k, v, jnp.float32))
    for name, a, b, t in zip(["out", "dq", "dk", "dv"], [got[0], *got[1]], [want[0], *want[1]], [truth[0], *truth[1]]):
        scale = float(jnp.max(jnp.abs(t)))
        mine, xla_err = (float(jnp.max(jnp.abs(x - t))) / scale for x in (a, b))
        assert mine <= 2 * xla_err + 1e-6, f"{name}: {mine:.2e} from float32, the XLA path {xla_err:.2e}"


@needs_kernel
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(T=st.sampled_from([16, 32, 64, 112, 144]), D=st.sampled_from([16, 32, 48]),
       heads=st.sampled_from([(1, 1), (2, 1), (4, 2), (3, 3)]), docs=st.integers(1, 4), seed=st.integers(0, 99))
def test_float32_kernel_matches_the_xla_path_on_any_shape_it_takes(T, D, heads, docs, seed):
    """Partial blocks, odd head counts, head dims that are not multiples of 32, any cuts."""
    H, G = heads
    q, k, v, ct, seg = inputs(1 + seed % 2, T, H, G, D, min(docs, T - 1), seed=seed)
    assert_matches_xla(attend("cpu", q, k, v, ct, seg, jnp.float32, False),
                       attend("xla", q, k, v, ct, seg, jnp.float32, False), "float32")


@needs_kernel
def test_under_a_mesh_it_runs_in_shard_map():
    """Batch over data x fsdp, heads over tensor (8 CPU devices): XLA cannot partition a
    custom call, so each device's kernel gets its rows and its heads."""
    q, k, v, ct, seg = inputs(4, 64, 4, 2, 32, 3, seed=1)
    want = attend_and_grads("xla", q, k, v, ct, seg, jnp.float32)
    mesh = sharding.make_mesh((2, 2, 2))
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
        hlo = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, seg, "cpu", dtype=jnp.float32)).lower(
            q, k, v).as_text()
        got = attend_and_grads("cpu", q, k, v, ct, seg, jnp.float32)
    assert "manual" in hlo and "parcae_attention_fwd" in hlo
    assert_matches_xla(got, want, "float32")


@needs_kernel
def test_a_nan_reaches_every_query_that_reads_it_as_in_the_xla_path():
    q, k, v, ct, seg = inputs(1, 64, 2, 2, 32, 1)
    k[0, 5, 0, 3] = np.nan  # a key of head 0 at position 5: queries 5.. of head 0 read it
    for dtype in (jnp.float32, jnp.bfloat16):
        for bounded in (True, False):
            got, want = (np.isnan(np.asarray(attend(impl, q, k, v, ct, seg, dtype, bounded)[0]))
                         for impl in ("cpu", "xla"))
            np.testing.assert_array_equal(got, want)
            assert got[0, 5:, 0].all() and not got[0, :5].any() and not got[0, :, 1].any()


@needs_kernel
def test_a_mesh_that_splits_heads_unevenly_falls_back_or_refuses():
    """Tensor parallelism over 2 devices with one kv head: auto runs the XLA path, an explicit
    cpu is one ConfigError line; neither reaches shard_map's own error."""
    q, k, v, ct, seg = inputs(4, 64, 4, 1, 32, 1, seed=2)
    want = attend_and_grads("xla", q, k, v, ct, seg, jnp.float32)
    with jax.set_mesh(sharding.make_mesh((4, 1, 2))), nn.logical_axis_rules(sharding.RULES):
        assert_matches_xla(attend_and_grads("auto", q, k, v, ct, seg, jnp.float32), want, "float32")
        with pytest.raises(ConfigError, match="attention_impl='cpu': the fused CPU kernel needs kv_heads=1 to divide"):
            attend_and_grads("cpu", q, k, v, ct, seg, jnp.float32)


@needs_kernel
def test_auto_picks_the_kernel_on_cpu_where_it_fits():
    assert resolve_impl("auto", jnp.float32, 64, 256, True) == "cpu"
    assert resolve_impl("auto", jnp.bfloat16, 16, 64, False) == "cpu"
    assert resolve_impl("auto", jnp.float32, 24, 256, True) == "xla"  # head dim not a multiple of 16
    assert resolve_impl("auto", jnp.float32, 64, 100, True) == "xla"  # length not a multiple of 16
    assert resolve_impl("auto", jnp.float16, 64, 256, True) == "xla"
    with pytest.raises(ConfigError) as e:
        resolve_impl("cpu", jnp.float32, 64, 100, True)
    msg = str(e.value)
    assert "\n" not in msg and "model.attention_impl='cpu'" in msg and "T=100" in msg


@contextlib.contextmanager
def library_reloaded(monkeypatch, tmp_path):
    """library.load() afresh with its cache in tmp_path and the caller's patches (yielded);
    afterwards the real library again, for the tests after this one."""
    try:
        with monkeypatch.context() as m:
            m.setenv("PARCAE_JAX_KERNEL_CACHE", str(tmp_path))
            library.load.cache_clear()
            yield m
    finally:
        library.load.cache_clear()
    assert isinstance(library.load(), str) == isinstance(LIB, str)


def test_no_kernel_is_a_reason_not_a_crash(monkeypatch, tmp_path):
    """A compiler that fails: load() gives the reason, auto falls back, "cpu" refuses."""
    with library_reloaded(monkeypatch, tmp_path) as m:
        m.setenv("CXX", "false")
        m.setattr(library.shutil, "which", lambda name: "/bin/false" if name == "false" else None)
        why = library.load()
        assert isinstance(why, str) and "\n" not in why
        if "avx512f" in library.cpu_flags():
            assert why.startswith("did not compile (/bin/false ")
        assert list(tmp_path.iterdir()) == []  # no half-written library left behind
        assert resolve_impl("auto", jnp.float32, 64, 256, False) == "xla"
        with pytest.raises(ConfigError, match="model.attention_impl='cpu': the fused CPU kernel"):
            resolve_impl("cpu", jnp.float32, 64, 256, False)


def test_a_damaged_cached_library_is_a_reason_not_a_crash(monkeypatch, tmp_path):
    def build_garbage(cxx, path):
        path.write_bytes(b"not a shared library")

    with library_reloaded(monkeypatch, tmp_path) as m:
        m.setattr(library, "_build", build_garbage)
        why = library.load()
        if "avx512f" in library.cpu_flags() and library._compiler():
            assert why.startswith(f"cannot load {tmp_path}") and "delete it to rebuild" in why
        assert isinstance(why, str) and "\n" not in why


@needs_kernel
def test_keys_per_query_counts_the_kernels_blocks():
    b = LIB.query_block
    assert cpu_attention.keys_per_query(0) == 0.0  # describe asks for decoding shapes too
    assert cpu_attention.keys_per_query(b) == b / 2 + b / 2  # one block reads all b keys
    assert cpu_attention.keys_per_query(4 * b) == 4 * b * 5 / 8
    assert cpu_attention.keys_per_query(b + 16) == (b * b + (b + 16) * 16) / (b + 16)


@needs_kernel
def test_model_loss_and_gradients_agree_with_the_xla_path():
    """The tiny model (head dim 16) end to end: the same logits and parameter gradients, without
    a mesh and under a data-parallel one, where the kernel still reads q, k and v in place from
    the fused projection (inside shard_map, each device its rows)."""
    cfg = tiny(n_kv_heads=2, mean_recurrence=2, mean_backprop_depth=1)
    rng = np.random.default_rng(3)
    fresh = jax.jit(lambda key: nn.unbox(init_params(build(cfg.replace(attention_impl="xla")), key)))
    params = jax.tree.map(lambda w: np.asarray(w) + 0.05 * rng.normal(size=w.shape).astype(np.float32),
                          fresh(jax.random.key(0)))
    ids = rng.integers(0, 256, (2, 64))
    x0 = rng.normal(size=(2, 64, 64)).astype(np.float32) * 0.1

    def loss_and_grads(impl):
        model = build(cfg.replace(attention_impl=impl))
        f = lambda p: jnp.mean(model.apply({"params": p}, ids, recurrence=2, initial_state=x0) ** 2)  # noqa: E731
        return jax.jit(jax.value_and_grad(f))

    loss_x, grads_x = loss_and_grads("xla")(params)
    with jax.set_mesh(sharding.make_mesh((2, 1, 1), jax.devices()[:2])), nn.logical_axis_rules(sharding.RULES):
        lowered = loss_and_grads("cpu").lower(params)  # lowered once: checked, then compiled and run
        assert "packed = true" in lowered.as_text()
        under_mesh = lowered.compile()(params)
    for loss, grads in (loss_and_grads("cpu")(params), under_mesh):
        np.testing.assert_allclose(loss, loss_x, rtol=1e-6)
        for g, gx in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_x)):
            np.testing.assert_allclose(g, gx, atol=1e-6 * float(np.max(np.abs(gx))) + 1e-9, rtol=1e-4)


@needs_kernel
def test_a_left_padded_prefill_through_the_kernel_generates_what_the_xla_path_does():
    """Generation's prefill runs the kernel (its padding passed as documents): rows of 32 and
    19 prompt tokens, padded to 32, give the XLA path's logits at every step."""
    from parcae_jax.infer import generator
    from parcae_jax.infer.generator import Generator

    cfg = tiny(block_size=64, mean_recurrence=2)
    params = jax.jit(lambda key: nn.unbox(init_params(build(cfg), key)))(jax.random.key(4))
    params = jax.tree.map(lambda w: w + 0.05 * jax.random.normal(jax.random.key(5), w.shape), params)
    rng = np.random.default_rng(6)
    prompts = [rng.integers(0, 256, 32).tolist(), rng.integers(0, 256, 19).tolist()]

    def logits(impl):
        gen = Generator(cfg.replace(attention_impl=impl), params, recurrence=2)
        return np.asarray(gen.generate(prompts, 4, return_logits=True).step_logits)

    np.testing.assert_allclose(logits("cpu"), logits("xla"), atol=2e-5, rtol=0)
    # the float32 prefill ran whole in the kernel (RoPE, qk-norm, cache writes) but for the last
    # block's one query; the decode steps above read the slots it wrote
    gen = Generator(cfg.replace(attention_impl="cpu"), params, recurrence=2)
    plan = gen._plan(max_len=64)
    prefill, _ = generator._compiled(plan, generator.Sampling())
    x0_all = generator.initial_states(0, np.zeros(2, np.int32), 64, gen.cfg)
    text = prefill.lower(gen.params, jnp.ones((2, 32), jnp.int32), jnp.zeros((2,), jnp.int32), x0_all,
                         jax.random.key(0)).as_text()
    assert text.count("parcae_attention_prefill") == cfg.n_prelude + 2 * cfg.n_core + cfg.n_coda - 1
    x0 = np.zeros((2, 19, cfg.d_rec), np.float32)  # with x0 the prompt is not padded to 16: XLA, no error
    gen = Generator(cfg.replace(attention_impl="cpu"), params, recurrence=2)
    assert len(gen.generate([p[:19] for p in prompts], 2, x0=x0).tokens[0]) == 2


@needs_kernel
def test_the_breakdown_names_the_kernels_calls_with_their_flops():
    """bench/breakdown.py: each custom call is "fused_attention", its FLOPs the products it
    executes (forward: scores and values; backward: 5 with the recomputed scores)."""
    from parcae_jax.bench.breakdown import classify

    B, T, H, D = 2, 128, 2, 32
    q, k, v, ct, seg = inputs(B, T, H, H, D, 1)
    f = lambda q, k, v: jnp.sum(dot_product_attention(q, k, v, None, "cpu", dtype=jnp.float32) * ct)  # noqa: E731
    kinds = classify(jax.jit(jax.grad(f, argnums=(0, 1, 2))).lower(q, k, v).compile().as_text())
    fused = sorted(flops for kind, flops in kinds.values() if kind == "fused_attention")
    one = 2 * B * H * T * cpu_attention.keys_per_query(T) * D
    assert fused == [2 * one, 5 * one]
    assert not any(kind == "matmul" for kind, _ in kinds.values())  # no attention dot left to XLA
