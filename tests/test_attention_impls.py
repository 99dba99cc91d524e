"""model.attention_impl: the fused kernels against the XLA path, values and gradients, on CPU.

Neither kernel runs on CPU, so `attention_kernels.emulated_kernels()` swaps the backend under
the same wrappers: "cudnn" runs our call (q scaled and cast, GQA passed as kv heads, the
segment-id mask, is_causal) through jax.nn.dot_product_attention with implementation="xla"
instead of "cudnn"; "splash" runs the Pallas TPU splash kernel in interpret mode (block
sizes, causal mask, segment ids, GQA through its MHA form, the vmap over the batch, and the
shard_map under a mesh). What stays untested here is cuDNN's and Mosaic's own compilation.

Tolerances: float32 paths agree to rounding (1e-5). In bfloat16 each path rounds its
probabilities differently before the value product; all of them lie about 0.015 (outputs up to
~3.6) and 0.6% (gradients, relative to their largest entry) from the float32 result, so
kernel-vs-XLA is held to 3e-2 and 2e-2.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from parcae_jax.model import ConfigError, attention_kernels, build, init_params
from parcae_jax.model.attention_kernels import emulated_kernels, resolve_impl
from parcae_jax.model.softmax_attention import dot_product_attention
from parcae_jax.training import sharding
from tests.helpers import tiny

TOL = {"float32": (1e-5, 1e-5), "bfloat16": (3e-2, 2e-2)}  # (outputs atol, gradients / max |gradient|)


def inputs(B, T, H, G, D, docs, seed=0):
    """qk-normed q, k (as the model feeds them), v, a cotangent, and segment ids of `docs`
    documents per row at different cuts in each row (None for docs=1: no document masking)."""
    rng = np.random.default_rng(seed)
    rms = lambda x: (x / np.sqrt(np.mean(x * x, -1, keepdims=True) + 1e-7)).astype(np.float32)  # noqa: E731
    q, k = rms(rng.normal(size=(B, T, H, D))), rms(rng.normal(size=(B, T, G, D)))
    v, ct = (rng.normal(size=s).astype(np.float32) for s in ((B, T, G, D), (B, T, H, D)))
    seg = None
    if docs > 1:
        cuts = [np.sort(rng.choice(np.arange(1, T), docs - 1, replace=False)) for _ in range(B)]
        seg = np.stack([np.searchsorted(c, np.arange(T), side="right") + 1 for c in cuts]).astype(np.int32)
    return q, k, v, ct, seg


def attend_and_grads(impl, q, k, v, ct, seg, dtype):
    f = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, seg, impl, bounded=True, dtype=dtype))
    out, vjp = jax.vjp(f, q, k, v)
    return out, vjp(ct)


def assert_matches_xla(got, want, dtype):
    (out, grads), (out_x, grads_x) = got, want
    atol, gtol = TOL[dtype]
    assert out.dtype == jnp.float32 and out.shape == out_x.shape
    np.testing.assert_allclose(out, out_x, atol=atol, rtol=0)
    for name, g, gx in zip("qkv", grads, grads_x):
        err = float(jnp.max(jnp.abs(g - gx)) / jnp.max(jnp.abs(gx)))
        assert err < gtol, f"d{name}: {err:.2e} relative to the largest entry"


# T=384 gives splash three 128-tiles (documents cross tile edges); T=256 one 256-tile.
CASES = [  # (T, H, G, D, documents per row, dtype)
    (384, 4, 2, 64, 3, "float32"),
    (256, 4, 1, 128, 2, "bfloat16"),
    (256, 4, 2, 128, 1, "bfloat16"),
]


@pytest.mark.parametrize("impl", ["cudnn", "splash"])
@pytest.mark.parametrize("T,H,G,D,docs,dtype", CASES)
def test_kernel_matches_xla_path(impl, T, H, G, D, docs, dtype):
    q, k, v, ct, seg = inputs(2, T, H, G, D, docs)
    want = attend_and_grads("xla", q, k, v, ct, seg, jnp.dtype(dtype))
    with emulated_kernels():
        got = attend_and_grads(impl, q, k, v, ct, seg, jnp.dtype(dtype))
    assert_matches_xla(got, want, dtype)


def test_splash_under_a_mesh_runs_in_shard_map():
    """Batch over data x fsdp, heads over tensor (8 CPU devices): each device's kernel sees its
    rows and its heads, and query head h still reads kv head h // (H/G)."""
    q, k, v, ct, seg = inputs(4, 256, 4, 2, 64, 3, seed=1)
    want = attend_and_grads("xla", q, k, v, ct, seg, jnp.float32)
    mesh = sharding.make_mesh((2, 2, 2))
    with emulated_kernels(), jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
        hlo = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, seg, "splash", dtype=jnp.float32)).lower(
            q, k, v).as_text()
        got = attend_and_grads("splash", q, k, v, ct, seg, jnp.float32)
    assert "manual" in hlo  # a shard_map (manual_computation) around the kernel
    assert_matches_xla(got, want, "float32")


def test_auto_resolves_to_the_cpu_kernel_or_xla_on_cpu_and_accelerator_kernels_refuse_cpu():
    assert jax.default_backend() == "cpu"
    cpu = "cpu" if attention_kernels.cpu_unfit(jnp.bfloat16, 128, 2048) is None else "xla"  # where it builds
    assert resolve_impl("auto", jnp.bfloat16, 128, 2048, True) == cpu
    assert resolve_impl("xla", jnp.float32, 16, 7, True) == "xla"
    for impl in ("cudnn", "splash"):
        with pytest.raises(ConfigError) as e:
            resolve_impl(impl, jnp.bfloat16, 128, 2048, False)
        msg = str(e.value)
        assert "\n" not in msg and f"model.attention_impl='{impl}'" in msg and "--config.model.attention_impl" in msg
        with emulated_kernels():  # the test route is asked for explicitly
            assert resolve_impl(impl, jnp.float32, 64, 256, True) == impl
    with emulated_kernels(), pytest.raises(ConfigError, match="multiple of 128"):
        resolve_impl("splash", jnp.float32, 64, 200, False)  # the kernel's tiles, on any backend


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_resolution_on_accelerators(monkeypatch, backend):
    """The choice alone (no kernel runs): backends faked, an H100-like GPU (head dims <= 256)."""
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    monkeypatch.setattr(attention_kernels, "_nvidia", lambda: backend == "gpu")
    monkeypatch.setattr(attention_kernels, "_cudnn_max_head_dim", lambda: 256)
    mine, other = ("cudnn", "splash") if backend == "gpu" else ("splash", "cudnn")
    assert resolve_impl("auto", jnp.bfloat16, 128, 2048, True) == mine
    assert resolve_impl(mine, jnp.bfloat16, 128, 2048, True) == mine
    with pytest.raises(ConfigError, match=f"model.attention_impl='{other}' runs on"):
        resolve_impl(other, jnp.bfloat16, 128, 2048, True)
    if backend == "gpu":  # cuDNN has no float32 kernel and a head-dim limit: auto falls back, cudnn says why
        assert resolve_impl("auto", jnp.float32, 128, 2048, True) == "xla"
        assert resolve_impl("auto", jnp.bfloat16, 12, 2048, True) == "xla"
        with pytest.raises(ConfigError, match="model.dtype=bfloat16"):
            resolve_impl("cudnn", jnp.float32, 128, 2048, True)
    else:  # splash tiles are multiples of 128 keys
        assert resolve_impl("auto", jnp.float32, 128, 200, True) == "xla"
        with pytest.raises(ConfigError, match="seq_len"):
            resolve_impl("splash", jnp.float32, 128, 200, True)


@pytest.mark.slow
def test_model_logits_agree_across_implementations():
    """The whole model (init traces the XLA path at its dummy length) with GQA and packed
    documents: every implementation that runs on CPU gives the XLA path's logits."""
    cfg = tiny(block_size=128, seq_len=128, n_kv_heads=2, n_core=1, mean_recurrence=2, mean_backprop_depth=1)
    rng = np.random.default_rng(2)
    # init traces the XLA path whatever the setting; jit: 4x faster than eager
    fresh = jax.jit(lambda key: nn.unbox(init_params(build(cfg.replace(attention_impl="splash")), key)))
    params = jax.tree.map(lambda w: np.asarray(w) + 0.05 * rng.normal(size=w.shape).astype(np.float32),
                          fresh(jax.random.key(0)))
    ids = rng.integers(0, 256, (1, 128))
    seg = jnp.array([[1] * 20 + [2] * 60 + [3] * 48], jnp.int32)  # jnp: the loop permutes rows with it
    x0 = rng.normal(size=(1, 128, 64)).astype(np.float32) * 0.1

    def logits(impl):
        model = build(cfg.replace(attention_impl=impl))
        return jax.jit(lambda p: model.apply({"params": p}, ids, recurrence=2, initial_state=x0,
                                             segment_ids_BxT=seg))(params)

    want = logits("xla")
    auto = "cpu" if attention_kernels.cpu_unfit(jnp.float32, 16, 128) is None else "xla"
    np.testing.assert_array_equal(logits("auto"), logits(auto))
    np.testing.assert_allclose(logits(auto), want, atol=2e-5, rtol=0)
    with emulated_kernels():
        for impl in ("cudnn", "splash"):
            np.testing.assert_allclose(logits(impl), want, atol=2e-5, rtol=0, err_msg=impl)
    with pytest.raises(ConfigError, match="model.attention_impl='cudnn'"):
        logits("cudnn")  # for real, on CPU: refused while tracing, before anything compiles
