"""MuonAdamW against a NumPy implementation of docs/design.md §7; schedules."""

import sys

import jax
import ml_dtypes
import numpy as np
import pytest

from parcae_jax.training import defaults
from parcae_jax.training.optim import lr_factor, make_optimizer, muon_labels, schedule_values

COEFFS = [(8.156554524902461, -22.48329292557795, 15.878769915207462),
          (4.042929935166739, -2.808917465908714, 0.5000178451051316),
          (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
          (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
          (2.3465413258596377, -1.7097828382687081, 0.42323551169305323)]


def bf(x):
    """Round to bfloat16 and back: one bf16 operation."""
    return np.asarray(x, np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)


def np_muon(P, G, M, V, mu, lr, wd, beta2=0.95):
    """One official Muon step on a torch-layout [rows, cols] matrix (float32 state)."""
    rows, cols = P.shape
    M = mu * M + (1 - mu) * G
    X = bf((1 - mu) * G + mu * M)
    X = bf(X / bf(bf(bf(np.linalg.norm(X)) * 1.02) + 1e-6))
    for a, b, c in COEFFS:
        if rows > cols:
            A = bf(X.T @ X)
            X = bf(bf(a * X) + bf(X @ bf(bf(b * A) + bf(c * bf(A @ A)))))
        else:
            A = bf(X @ X.T)
            X = bf(bf(a * X) + bf(bf(bf(b * A) + bf(c * bf(A @ A))) @ X))
    axis = -1 if rows >= cols else -2
    v_mean = np.mean(X ** 2, axis=axis, keepdims=True)
    V = beta2 * V + (1 - beta2) * v_mean
    S = 1 / np.sqrt(np.maximum(V, 1e-10))
    X = bf(X * bf(S * np.linalg.norm(X) / max(np.linalg.norm(X * S), 1e-10)))
    lr_eff = bf(lr * np.sqrt(max(1.0, rows / cols)))
    mask = (X * P) >= 0
    P = P - (bf(lr_eff * X) + bf(lr_eff * bf(wd)) * P * mask)
    return P, M, V


def np_adamw(p, g, m, v, t, lr, b1=0.8, b2=0.95, eps=1e-10, wd=0.0):
    p = p * (1 - lr * wd)
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    return p - lr * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps), m, v


def torch_view(path, w):
    """Our kernel [*in, *out] as the official [out, in] matrix."""
    n_in = 2 if path[-2] == "o" else 1
    return w.reshape(int(np.prod(w.shape[:n_in])), -1).T


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_muon_adamw_matches_numpy_for_several_steps(dtype, monkeypatch):
    """float32: every step of the logic, to 1e-4. bfloat16 (official): rounding alone moves
    the update by 5-7% (up to ~20% on a 2 x 32 matrix) and XLA, like torch.compile, keeps
    fused element-wise work in f32 where this NumPy rounds every op; so direction and size only."""
    if dtype == "float32":
        monkeypatch.setattr(sys.modules[__name__], "bf", lambda x: np.asarray(x, np.float32))
    optim = defaults.get_config().optim
    optim.muon_dtype = dtype
    steps_total = 100
    tx, lrs = make_optimizer(optim)
    hp = schedule_values(optim, steps_total)
    rng = np.random.default_rng(0)
    shapes = {("blk", "mlp", "fc", "kernel"): (16, 64),  # official [64, 16]: tall, lr x 2, per-row statistics
              ("blk", "attn", "o", "kernel"): (2, 8, 16),  # [16, 16]: square
              ("blk", "attn", "q", "kernel"): (16, 2, 4),  # [8, 16]: wide, per-column statistics
              ("blk", "attn", "ve_gate"): (32, 2),  # [2, 32]: wide
              ("blk", "norm_1", "scale"): (16,),  # AdamW from here on
              ("embed", "embedding"): (32, 16)}
    params = {}
    for path, shape in shapes.items():
        node = params
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = rng.normal(size=shape).astype(np.float32) * 0.1
    labels = muon_labels(params)
    assert labels["blk"]["mlp"]["fc"]["kernel"] == "muon" and labels["embed"]["embedding"] == "adamw"
    assert labels["blk"]["norm_1"]["scale"] == "adamw" and labels["blk"]["attn"]["ve_gate"] == "muon"
    state = tx.init(params)
    ref = {p: {"P": None, "M": None, "V": None} for p in shapes}
    get = lambda tree, path: tree[path[0]] if len(path) == 1 else get(tree[path[0]], path[1:])  # noqa: E731
    update = jax.jit(lambda g, s, p, step: tx.update(g, s, p, step=step, schedule=hp))
    for step in range(4):
        grads = jax.tree.map(lambda w: rng.normal(size=w.shape).astype(np.float32), params)
        updates, state = update(grads, state, params, step)
        new = jax.tree.map(lambda p, u: np.asarray(p + u), params, updates)
        mu = 0.85 + min(step / 300, 1) * (0.95 - 0.85)
        wd = 0.2 * max(0.0, 1 - step / steps_total)
        lr = float(lrs["lr"](step, hp))
        for path in shapes:
            p0, g = get(params, path), get(grads, path)
            r = ref[path]
            if labels_of(labels, path) == "muon":
                P, G = torch_view(path, p0), torch_view(path, g)
                r["M"] = np.zeros_like(P) if r["M"] is None else r["M"]
                r["V"] = (np.zeros((P.shape[0], 1) if P.shape[0] >= P.shape[1] else (1, P.shape[1]), np.float32)
                          if r["V"] is None else r["V"])
                want, r["M"], r["V"] = np_muon(P, G, r["M"], r["V"], mu, float(lrs["muon_lr"](step, hp)), wd)
                got = torch_view(path, get(new, path))
                delta_want, delta_got = want - P, got - P
                if dtype == "float32":
                    assert np.linalg.norm(delta_got - delta_want) <= 1e-4 * np.linalg.norm(delta_want), (path, step)
                else:
                    cosine = np.sum(delta_got * delta_want) / np.linalg.norm(delta_got) / np.linalg.norm(delta_want)
                    ratio = np.linalg.norm(delta_got) / np.linalg.norm(delta_want)
                    assert cosine > 0.95 and abs(ratio - 1) < 0.2, (path, step, cosine, ratio)
            else:
                r["M"] = np.zeros_like(p0) if r["M"] is None else r["M"]
                r["V"] = np.zeros_like(p0) if r["V"] is None else r["V"]
                want, r["M"], r["V"] = np_adamw(p0, g, r["M"], r["V"], step + 1, lr)
                np.testing.assert_allclose(get(new, path), want, rtol=1e-5, atol=1e-7)
        params = new


def labels_of(labels, path):
    for k in path:
        labels = labels[k]
    return labels


@pytest.mark.parametrize("schedule", ["trapezoid", "cosine", "constant"])
def test_schedules(schedule):
    optim = defaults.get_config().optim
    optim.update(schedule=schedule, warmup_steps=10, cooldown_fraction=0.5, min_lr_ratio=0.1)
    f = lambda s: float(lr_factor(optim)(s, schedule_values(optim, 100)))  # noqa: E731
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    if schedule == "trapezoid":  # official: flat until max_steps - cooldown, then linear to the floor
        assert f(50) == pytest.approx(1.0) and f(75) == pytest.approx(0.1 + 0.9 * 0.5) and f(100) == pytest.approx(0.1)
    elif schedule == "cosine":
        assert f(55) == pytest.approx(0.1 + 0.9 * 0.5, abs=1e-6) and f(100) == pytest.approx(0.1)
    else:
        assert f(99) == 1.0


def test_official_trapezoid_has_no_warmup_and_decays_to_zero():
    optim = defaults.get_config().optim
    f = lambda s: float(lr_factor(optim)(s, schedule_values(optim, 1000)))  # noqa: E731
    assert [f(0), f(500), f(750), f(1000)] == pytest.approx([1.0, 1.0, 0.5, 0.0])
