"""The science commands end to end on a tiny trained run (fits themselves: test_fits.py)."""

import json
import subprocess
import sys

import pytest

from parcae_jax.science import test_time
from parcae_jax.train import train
from parcae_jax.validate import validate
from tests.conftest import FIXTURES, ROOT
from tests.test_train import small_config


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    config = small_config(steps=4, eval_every=4, eval_batches=2)
    config.ckpt.update(every=4, async_save=False)
    train(config, str(workdir), validate(config))
    return workdir, config


def science(module, *args):
    return subprocess.run([sys.executable, "-m", f"parcae_jax.science.{module}", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


def test_test_time_reproduces_the_runs_own_evaluations_and_writes_its_files(run, tmp_path):
    workdir, config = run
    out = science("test_time", f"--checkpoint={workdir}", "--val_batches=2", f"--val_batch_size={config.train.batch_size}",
                  f"--dtype={config.model.dtype}", f"--out_dir={tmp_path}")
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / "test_time.json").read_text())
    logged = [json.loads(line) for line in open(workdir / "metrics.jsonl")][-1]
    mean = config.model.mean_recurrence
    assert [p["T"] for p in result["points"]] == list(range(1, 2 * mean + 1)) and result["step"] == 4
    for p in result["points"]:  # the run's evaluations at T = 1, 2, mean: same batches, same x0
        if f"eval/loss_r{p['T']}" in logged:
            assert p["loss"] == pytest.approx(logged[f"eval/loss_r{p['T']}"], abs=1e-5)
    byte_tokens = result["tokens"]  # bytes: every target is a byte or an end-of-document
    assert 0.95 * byte_tokens <= result["bytes"] <= byte_tokens
    assert (result["fit"] is None) != (result["fit_error"] is None)
    rows = (tmp_path / "test_time.csv").read_text().splitlines()
    assert rows[0] == "T,loss,bits_per_byte,fit" and len(rows) == 2 * mean + 1
    png = tmp_path / "test_time.png"
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size < 200_000


def test_a_gpt_curve_is_one_flat_point(tmp_path):
    result = test_time.curve([(1, 2.5, 100)], 100, "gpt", 4)
    assert [p["T"] for p in result["points"]] == [1] and result["fit"] is None and "GPT" in result["fit_error"]
    test_time.write(result, str(tmp_path))
    assert (tmp_path / "test_time.png").stat().st_size > 1000


def test_a_synthetic_curve_is_fitted_and_drawn(tmp_path):
    import math

    points = [(T, 2.0 + 1.5 * math.exp(-0.6 * T) + 0.002 * (-1) ** T, 1000) for T in range(1, 9)]
    result = test_time.curve(points, 4000, "parcae", 4)
    assert result["fit"]["values"]["kappa"] == pytest.approx(0.6, abs=0.05)
    assert result["points"][0]["bits_per_byte"] == pytest.approx(points[0][1] * 1000 / math.log(2) / 4000)
    paths = test_time.write(result, str(tmp_path))
    assert all((tmp_path / f"test_time.{e}").exists() for e in ("json", "csv", "png")) and len(paths) == 3


@pytest.mark.parametrize("args,message", [
    (["--recurrences=0,2"], "every T must be >= 1"),
    (["--recurrences=a"], "give integers"),
    ([f"--checkpoint={FIXTURES / 'reference_parcae_tiny'}", "--tokenizer=bytes"], "pass --data_path"),
    (["--checkpoint=/nonexistent/run"], "no checkpoints"),
])
def test_bad_test_time_requests_are_one_line_and_exit_2(args, message, tmp_path):
    if not any(a.startswith("--checkpoint") for a in args):
        args = [f"--checkpoint={tmp_path}", *args]
    out = science("test_time", *args)
    assert out.returncode == 2 and message in out.stderr and out.stderr.count("\n") == 1, out.stderr[-2000:]
