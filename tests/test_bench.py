"""--mode=bench: tokens/s with its efficiency against matmul roofs timed in the same process."""

import itertools
import math

import jax.numpy as jnp
import pytest

from parcae_jax.bench import breakdown, roof
from parcae_jax.bench.step import bench
from parcae_jax.training.describe import flops_per_token
from parcae_jax.training.validate import validate
from tests.test_train import small_config


def test_a_roof_is_2n3_flops_over_the_best_time(monkeypatch):
    ticks = itertools.count(step=0.5)  # every timed run takes 0.5 s of this clock
    monkeypatch.setattr(roof.time, "perf_counter", lambda: next(ticks))
    assert roof.gemm_flops_per_sec(jnp.bfloat16, 64, repeats=3) == 2 * 64**3 / 0.5


@pytest.mark.slow
def test_bench_reports_executed_flops_as_a_fraction_of_both_roofs_and_where_the_time_went():
    config = small_config()
    config.optim.name = "adamw"  # Muon's orthogonalisation adds matmuls that describe does not count
    config.model.sampling_scheme = "fixed"  # every step runs the mean depth, as describe counts
    config.model.remat_policy = "full"  # recomputes the gradient iterations: counted apart below
    config.bench.update(warmup=1, steps=2, breakdown_steps=2)
    run = validate(config, check_data=False)
    out = bench(config, run)
    flops = flops_per_token(run.model)
    assert out["tokens_per_sec"] > 0 and len(out["step_times_s"]) == 2
    assert set(out["allocator"]) == {"huge_pages", "buffer_reuse"}
    executed = (flops["flops_per_token"] + flops["remat_recompute_flops_per_token"]) * out["tokens_per_sec"]
    assert flops["remat_recompute_flops_per_token"] > 0 and math.isclose(out["executed_flops_per_sec"], executed)
    for kind in ("fp32", "bf16"):
        assert out[f"roof_{kind}_flops_per_sec"] > 0
        assert math.isclose(out[f"executed_fraction_of_{kind}_roof"], executed / out[f"roof_{kind}_flops_per_sec"])
    # The trace's matmuls, their FLOPs read off the compiled HLO's dot shapes (and the CPU
    # attention kernel's calls, where it runs), are the ones describe counts by formula (model
    # plus recomputation), independently.
    b = out["breakdown"]
    per_step = executed / out["tokens_per_sec"] * config.train.batch_size * run.model.seq_len
    traced = sum(k.get("gflop_per_step", 0.0) for k in b["kinds"].values()) * 1e9
    assert traced == pytest.approx(per_step, rel=0.05)
    assert {"matmul", "elementwise", "collective"} <= set(b["kinds"])  # 8 fake devices: the gradient all-reduce
    assert b["unattributed_ms_per_step"] < 0.01 * b["thread_ms_per_step"]
    assert math.isclose(sum(k["share"] for k in b["kinds"].values()), 1.0)
    assert b["matmul_share"] == b["kinds"]["matmul"]["share"]
    assert math.isclose(b["non_matmul_ms_per_step"], b["thread_ms_per_step"] - b["kinds"]["matmul"]["ms_per_step"])
    assert 0 < b["busy_ms_per_step"] <= b["thread_ms_per_step"] * 1.0001
    assert b["top_ops"] and all(op["kind"] in {*b["kinds"], "unattributed"} for op in b["top_ops"])


def test_a_dot_that_eigen_runs_counts_until_its_end_event_and_a_loop_keeps_its_own_span():
    """XLA:CPU traces a dot it hands to Eigen as a short launch and an "end:" event when the
    pool has done its work; a partitioned element-wise loop's "end:" waits for the other thread.
    Synthetic trace (µs) of one step: a 10 µs launch whose work ends at 5,000; a 1,000 µs loop
    whose end comes at 9,000; a YNNPACK dot of 2,000 µs."""
    def event(name, ts, dur):
        return {"ph": "X", "name": name, "ts": ts, "dur": dur}

    events = [event("dot.1", 0, 10), event("end: dot.1", 4_990, 10), event("add_fusion", 5_000, 1_000),
              event("end: add_fusion", 8_990, 10), event("ynn_fusion.2", 10_000, 2_000),
              event("end: ynn_fusion.2", 11_990, 1), event("ThunkExecutor::Execute", 0, 12_000)]
    kinds = {"dot.1": ("matmul", 10**9), "add_fusion": ("elementwise", 0), "ynn_fusion.2": ("matmul", 10**9)}
    out = breakdown.summarise(events, kinds, steps=1)
    assert out["kinds"]["matmul"]["ms_per_step"] == pytest.approx(7.0)  # 5 + 2
    assert out["kinds"]["elementwise"]["ms_per_step"] == pytest.approx(1.0)
    assert out["busy_ms_per_step"] == pytest.approx(8.0)
    assert out["unattributed_ms_per_step"] == 0


def test_published_peaks_name_the_chip_or_nothing():
    assert roof.published_bf16_peak("NVIDIA H100 80GB HBM3") == 989e12
    assert roof.published_bf16_peak("NVIDIA H100 PCIe") == 756e12
    assert roof.published_bf16_peak("TPU v5 lite") == 197e12
    assert roof.published_bf16_peak("TPU v5p") == 459e12
    assert roof.published_bf16_peak("cpu") is None


@pytest.mark.slow
@pytest.mark.long
def test_accelerator_check_runs_end_to_end_at_toy_shapes(tmp_path):
    """launch/bench_accelerator.sh --smoke: the same commands as on a GPU, at toy shapes; one
    JSON line per model, appended to $OUT; on CPU there is no published peak or allocator."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    from tests.conftest import COMPILE_FAST

    env = {**os.environ, "XLA_FLAGS": COMPILE_FAST}  # one device, as on the accelerator
    env.update(OUT=str(tmp_path / "out.jsonl"), PYTHON=sys.executable)
    done = subprocess.run(["bash", str(repo / "launch/bench_accelerator.sh"), "--smoke"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [x["config"] for x in lines] == ["140m", "370m"]
    for x in lines:
        assert x["tokens_per_sec"] > 0 and x["compile_s"] > 0 and x["dtype"] == "bfloat16"
        assert x["mfu"] is None and x["peak_bytes_in_use"] is None
    bad = subprocess.run(["bash", str(repo / "launch/bench_accelerator.sh"), "--fast"], env=env,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "usage" in bad.stderr


@pytest.mark.slow
def test_compile_only_estimate_equals_the_real_compiled_steps_temp_bytes():
    """The memory table's numbers come from compile_only (abstract shapes, cheap compile
    options); for a 2-layer model on a 1x4x2 mesh they equal XLA's analysis of the step
    compiled for real arrays, as the training loop compiles it."""
    import jax

    from parcae_jax.bench.step import compile_only
    from parcae_jax.training.train import Trainer
    from tests.test_train import batch

    config = small_config()
    config.model.update(n_prelude=1, n_core=1, n_coda=1, loss_chunk=16)
    config.mesh.shape = (1, 4, 2)
    config.bench.compile_only = True
    run = validate(config, check_data=False)
    estimate = compile_only(config, run)
    trainer = Trainer(config, run)
    with trainer.context():
        state = trainer.fresh_state()
        lowered = trainer.train_step.lower(state, batch(trainer, T=run.model.seq_len), trainer.schedule)
        real = lowered.compile().memory_analysis()
    assert estimate["device_count"] == jax.device_count() == 8
    assert estimate["temp_bytes"] == real.temp_size_in_bytes
    assert estimate["argument_bytes"] == real.argument_size_in_bytes


@pytest.mark.slow
def test_memory_table_compiles_each_point_once_and_prints_the_table(tmp_path):
    """One point (the tiny config on the 8xH100 layout) through the real subprocess path; the
    second run finds it in the JSON and compiles nothing."""
    import json
    import subprocess
    import sys

    out = tmp_path / "table.json"
    cmd = [sys.executable, "-m", "parcae_jax.commands.memory_table", "--targets=8xH100", "--configs=tiny",
           f"--output={out}"]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    (point,) = json.loads(out.read_text())
    assert point["device_count"] == 8 and point["mesh"] == [1, 8, 1] and point["microbatches"] == 4
    assert point["per_device_batch"] == 32 and point["temp_bytes"] > 0
    assert "| tiny | 8xH100 | (1, 8, 1) | 32 (4) |" in first.stdout
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and json.loads(out.read_text()) == [point]
    assert not any(line.startswith("{") for line in again.stdout.splitlines())  # nothing recompiled
    bad = subprocess.run([*cmd[:3], "--targets=v9"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown --targets" in bad.stderr
