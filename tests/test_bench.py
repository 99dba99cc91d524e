"""--mode=bench: tokens/s with its efficiency against matmul roofs timed in the same process."""

import itertools
import math

import jax.numpy as jnp

from parcae_jax.bench import bench
from parcae_jax.bench import roof
from parcae_jax.describe import flops_per_token
from parcae_jax.validate import validate
from tests.test_train import small_config


def test_a_roof_is_2n3_flops_over_the_best_time(monkeypatch):
    ticks = itertools.count(step=0.5)  # every timed run takes 0.5 s of this clock
    monkeypatch.setattr(roof.time, "perf_counter", lambda: next(ticks))
    assert roof.gemm_flops_per_sec(jnp.bfloat16, 64, repeats=3) == 2 * 64**3 / 0.5


def test_bench_reports_executed_flops_as_a_fraction_of_both_roofs():
    config = small_config()
    config.bench.update(warmup=1, steps=2)
    run = validate(config, check_data=False)
    out = bench(config, run)
    flops = flops_per_token(run.model)
    assert out["tokens_per_sec"] > 0 and len(out["step_times_s"]) == 2
    executed = (flops["flops_per_token"] + flops["remat_recompute_flops_per_token"]) * out["tokens_per_sec"]
    assert flops["remat_recompute_flops_per_token"] > 0 and math.isclose(out["executed_flops_per_sec"], executed)
    for kind in ("fp32", "bf16"):
        assert out[f"roof_{kind}_flops_per_sec"] > 0
        assert math.isclose(out[f"executed_fraction_of_{kind}_roof"], executed / out[f"roof_{kind}_flops_per_sec"])
