"""Small configs and tools shared by the tests."""

import subprocess

import flax.linen as nn
import jax
import numpy as np

from parcae_jax.model.config import ModelConfig
from tests.forkserver import run_module

# The shape of the reference fixture: width 64, 4 heads, 1/2/1 layers, vocab 256.
TINY = dict(vocab_size=256, block_size=64, seq_len=64, d_model=64, n_heads=4, n_kv_heads=4, d_mlp=256,
            n_prelude=1, n_core=2, n_coda=1, d_rec=64, d_rec_mlp=256, n_rec_heads=4,
            mean_recurrence=4, mean_backprop_depth=2,
            attention_impl="auto")  # as the CPU configs: the fused CPU kernel where it builds (head dim 16)


def tiny(**changes) -> ModelConfig:
    return ModelConfig(**{**TINY, **changes}).replace()  # replace() validates


def shifted_labels(ids: np.ndarray) -> np.ndarray:
    """labels[:, t] = ids[:, t + 1]; the last position is ignored (-100), as the fixtures."""
    return np.concatenate([ids[:, 1:], np.full((ids.shape[0], 1), -100, ids.dtype)], axis=1)


def get(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def loss_and_grad(cfg: ModelConfig, B: int = 2, perturb: float = 0.0, params=None):
    """(jitted value_and_grad of the mean training loss, params) for a model of `cfg` on random
    tokens, with loop inputs drawn as training draws them. `perturb` adds that much noise to
    every weight (the zero-initialised output projections otherwise make blocks identities).
    `params`: those of an earlier call whose config differs only in how it computes (dtype,
    remat, loss_chunk: every weight is created float32 with the same names), so that their
    initialisation is not compiled again; `perturb` is then already in them."""
    from parcae_jax import model as M
    from parcae_jax.model.recurrence import draw_loop_inputs

    model = M.build(cfg)
    if params is None:
        params = nn.unbox(M.init_params(model, jax.random.key(0)))
        if perturb:
            params = jax.tree.map(lambda p: p + perturb * jax.random.normal(jax.random.key(3), p.shape), params)
    ids = jax.random.randint(jax.random.key(1), (B, cfg.seq_len + 1), 0, cfg.vocab_size)
    extra = {}
    if cfg.arch == "parcae":
        li = draw_loop_inputs(jax.random.key(2), B, cfg.seq_len, cfg)
        extra = {"num_steps": (li["n"], li["k"]), "initial_state": li["x0"]}

    def loss(p):
        losses, mask = model.apply({"params": p}, ids[:, :-1], targets_BxT=ids[:, 1:], **extra)
        return losses.sum() / mask.sum()

    return jax.jit(jax.value_and_grad(loss)), params


def science(module: str, *args) -> subprocess.CompletedProcess:
    """`python -m parcae_jax.commands.<module> args` from the repository root on one device,
    output captured."""
    import os

    from tests.conftest import ONE_DEVICE_ENV, ROOT

    return run_module(f"parcae_jax.commands.{module}", [*map(str, args)], cwd=ROOT, timeout=600,
                      env={**os.environ, **ONE_DEVICE_ENV})


# A base config file for the science commands: the tests' small model (tests/test_train.py SMALL).
SMALL_BASE = '''
from parcae_jax.training import defaults

def get_config(arg=None):
    config = defaults.load_shipped("tiny")
    config.model.update({small!r})
    config.train.update(batch_size=8)
    config.optim.muon_dtype = "float32"
    return config
'''


def eqn_params(jaxpr, primitive: str, key: str) -> list:
    """params[key] of every `primitive` equation in a jaxpr, nested ones included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == primitive:
            found.append(eqn.params[key])
        for v in eqn.params.values():
            for sub in v if isinstance(v, (tuple, list)) else [v]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    found += eqn_params(inner, primitive, key)
    return found
