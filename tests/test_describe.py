"""describe: published parameter counts, FLOPs against a count of the traced matmuls."""

import json
import math
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from parcae_jax.model import build
from parcae_jax.model.config import ModelConfig
from parcae_jax.model.cpu_kernels import attention as cpu_attention
from parcae_jax.training.describe import describe, flops_per_token
from tests.conftest import FIXTURES, ROOT
from tests.test_config import load

PUBLISHED = {"140m": 144_323_136, "370m": 388_003_328, "770m": 776_655_680, "1p3b": 1_338_591_744,
             "gpt_140m": 143_141_184, "gpt_370m": 385_903_104, "gpt_770m": 773_375_040, "gpt_1p3b": 1_333_868_544}
OFFICIAL_GROUPS = {"wte": "embed", "prelude": "prelude", "adapter": "injection", "core_block": "core", "C": "C",
                   "coda": "coda", "ln_f": "ln_f", "ln_prelude": "ln_prelude", "value_embeds": "value_embeds"}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_parameter_counts(name):
    info = describe(ModelConfig.from_mapping(load(name).model))
    assert info["params_total"] == PUBLISHED[name]
    if not name.startswith("gpt"):
        official = json.loads((FIXTURES / "published_param_counts.json").read_text())
        entry = next(v for k, v in official.items()
                     if k.startswith("parcae") and v["num_parameters"] == PUBLISHED[name])
        assert {OFFICIAL_GROUPS[k]: v for k, v in entry["by_group"].items()} == info["params_by_group"]
        assert info["params_unrolled_at_mean_recurrence"] == entry["unrolled_params_at_mean_recurrence"]


@pytest.mark.slow
def test_describe_cli_for_1p3b_is_one_json_object_and_allocates_no_weights(tmp_path):
    # The child's own peak is VmHWM of its process image, read as it exits: ru_maxrss would
    # also count the pre-exec copy of this pytest process, which grows with the tests before.
    launcher = ("import runpy, sys\n"
                "sys.argv = ['parcae_jax.main', '--config=configs/1p3b.py', '--mode=describe']\n"
                "try:\n    runpy.run_module('parcae_jax.main', run_name='__main__', alter_sys=True)\n"
                "finally:\n    sys.stderr.write(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')))\n")
    done = subprocess.run([sys.executable, "-c", launcher], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    assert info["params_total"] == PUBLISHED["1p3b"] and info["flops_per_token"] > 0
    peak_kib = int(done.stderr.strip().splitlines()[-1].split()[1])
    assert peak_kib * 1024 < 2e9  # the float32 weights alone would take 5.4 GB


def _dot_flops(jaxpr, in_loop=False, acc=None):
    """2 x MACs of every dot_general, split into outside / inside while-loop bodies; those in
    the loop with batch dimensions (the attention products) also under "loop_batched"."""
    acc = acc if acc is not None else {"outside": 0, "loop": 0, "loop_batched": 0}
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (lhs_contract, _), (lhs_batch, _) = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            flops = 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[i] for i in lhs_contract)
            acc["loop" if in_loop else "outside"] += flops
            acc["loop_batched"] += flops if in_loop and lhs_batch else 0
        for name, sub in eqn.params.items():
            subs = sub if isinstance(sub, (tuple, list)) else [sub]
            if eqn.primitive.name == "cond" and name == "branches":
                subs = subs[:1]  # the loop's row buckets: branch 0 runs every row (the nominal work)
            for s in subs:
                inner = getattr(s, "jaxpr", s)
                if hasattr(inner, "eqns") and name != "cond_jaxpr":
                    _dot_flops(inner, in_loop or eqn.primitive.name == "while", acc)
    return acc


@pytest.mark.parametrize("arch,T", [("parcae", 32), ("gpt", 32), ("parcae", 256)])
def test_flops_match_the_traced_matmuls(arch, T):
    cfg = ModelConfig(arch=arch, vocab_size=300, block_size=T, seq_len=T, d_model=64, n_heads=4, n_kv_heads=2,
                      d_mlp=160, n_layers=3, n_prelude=2, n_core=2, n_coda=1, d_rec=96, d_rec_mlp=128,
                      n_rec_heads=3, mean_recurrence=5, mean_backprop_depth=2, tie_embeddings=False,
                      attention_impl="xla")  # the path whose products the trace shows
    model = build(cfg)
    B = 2
    ids = jnp.zeros((B, T), jnp.int32)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), ids, recurrence=1))["params"]
    jaxpr = jax.make_jaxpr(lambda p: model.apply({"params": p}, ids, recurrence=3,
                                                 initial_state=jnp.zeros((B, T, cfg.d_rec))))(params)
    counted = {k: v / (B * T) for k, v in _dot_flops(jaxpr.jaxpr).items()}
    got = flops_per_token(cfg)
    if arch == "gpt":
        assert counted == {"outside": got["forward_flops_per_token"], "loop": 0, "loop_batched": 0}
        assert got["flops_per_token"] == 3 * counted["outside"]
        return
    assert counted["loop"] == got["forward_flops_per_token_per_iteration"]
    n, k = 3, 2  # nominal depths: max(5 - 2, 0) without and min(5, 2) with gradient
    assert got["flops_per_token"] == 3 * counted["outside"] + counted["loop"] * (n + 3 * k)
    assert got["forward_flops_per_token"] == counted["outside"] + 5 * counted["loop"]
    # What the backward computes again: the whole iteration under "full", its attention
    # products under "dots_no_batch" (the projections' and MLP's outputs are kept) and under
    # "dots_attention" where XLA's attention runs (with the CPU kernel its outputs are kept too).
    recompute = {p: flops_per_token(cfg.replace(remat_policy=p))["remat_recompute_flops_per_token"]
                 for p in ("full", "dots_no_batch", "dots", "dots_attention", "none", "auto")}
    assert recompute["dots_attention"] == recompute["dots_no_batch"]
    kernel = cfg.replace(attention_impl="cpu")
    assert flops_per_token(kernel.replace(remat_policy="dots_attention"))["remat_recompute_flops_per_token"] == 0
    assert flops_per_token(kernel.replace(remat_policy="dots"))["remat_recompute_flops_per_token"] > 0
    assert np.isclose(recompute["full"], k * counted["loop"])
    assert 0 < counted["loop_batched"] < counted["loop"]
    assert np.isclose(recompute["dots_no_batch"], k * counted["loop_batched"])
    assert recompute["dots"] == recompute["none"] == 0  # XLA's attention products are dots: kept
    assert recompute["auto"] == recompute[cfg.loop_remat_policy]


def test_keys_per_query_follows_the_attention_that_runs():
    from parcae_jax.model.config import ModelConfig
    from parcae_jax.training.describe import keys_per_query

    cfg = ModelConfig(seq_len=2048)
    assert keys_per_query(cfg.replace(attention_impl="cudnn"), 2048) == 1024
    assert keys_per_query(cfg.replace(attention_impl="splash"), 2048) == 2048 * 5 / 8  # 4 tiles of 512
    xla = keys_per_query(cfg.replace(attention_impl="xla"), 2048)
    assert xla == 2048 * 9 / 16  # 8 query chunks
    assert keys_per_query(cfg.replace(attention_impl="cpu"), 2048) == 2048 * 33 / 64  # 32 blocks of 64
    auto = "cpu" if cpu_attention.unfit(128, 2048) is None else "xla"  # auto: the CPU kernel where it builds
    assert keys_per_query(cfg.replace(attention_impl="auto"), 2048) == keys_per_query(
        cfg.replace(attention_impl=auto), 2048)
