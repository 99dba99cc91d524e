"""The science commands end to end on a tiny trained run (fits themselves: test_fits.py)."""

import json
import math
import os
import subprocess
import sys
import time

import pytest

from parcae_jax.science import test_time
from parcae_jax.train import train
from parcae_jax.validate import validate
from tests.conftest import FIXTURES, ROOT
from tests.test_train import SMALL, small_config


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
    compared = [p for p in result["points"] if f"eval/loss_r{p['T']}" in logged]
    assert [p["T"] for p in compared] == [1, 2, 3, 4]  # the run's evaluations: 1, 2, 4 and its mean 3
    for p in compared:  # same batches, same x0
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


# A sweep over the small test model: base tiny, overrides as a sweep file's `set`.
SWEEP = '''
import ml_collections

def get_config(arg=None):
    return ml_collections.ConfigDict(dict(
        base="tiny", root={root!r}, recurrences={recurrences!r}, budgets={budgets!r}, backprop="half",
        set=tuple({overrides!r}),
    ))
'''
SMALL_SET = [(f"model.{k}", v) for k, v in SMALL.items()] + [
    ("train.batch_size", 8), ("train.log_every", 1), ("train.eval_batches", 1), ("train.eval_every", 0),
    ("ckpt.every", 4), ("ckpt.keep", 2), ("ckpt.async_save", False), ("optim.muon_dtype", "float32")]


def write_sweep(path, root, recurrences, budgets, overrides=SMALL_SET, extra=""):
    path.write_text(SWEEP.format(root=str(root), recurrences=tuple(recurrences), budgets=tuple(budgets),
                                 overrides=list(overrides)) + extra)
    return path


def _budget_for(steps, recurrence):
    """The FLOPs that buy `steps` steps of the small model at `recurrence` (+ a little)."""
    from parcae_jax.describe import flops_per_token
    from parcae_jax.model.config import ModelConfig

    cfg = ModelConfig.from_mapping({**small_config().model.to_dict(), "mean_recurrence": recurrence,
                                    "mean_backprop_depth": -(-recurrence // 2)})
    return flops_per_token(cfg)["flops_per_token"] * 8 * SMALL["seq_len"] * (steps + 0.5)


@pytest.mark.slow
def test_a_killed_sweep_resumes_without_redoing_finished_points_and_gives_the_same_table(tmp_path):
    import os
    import signal

    from parcae_jax.science import grid, sweep

    budget = _budget_for(14, 1)  # 14 steps at recurrence 1, fewer at 2
    files = {name: write_sweep(tmp_path / f"{name}.py", tmp_path / name, (1, 2), (budget,)) for name in ("a", "b")}
    whole = grid.points(grid.load(str(files["a"])))
    assert [p.steps for p in whole][0] == 14 and 1 <= whole[1].steps < 14
    sweep.run_all(whole)  # uninterrupted
    cut = grid.points(grid.load(str(files["b"])))
    proc = subprocess.Popen([sys.executable, "-m", "parcae_jax.science.sweep", "run", str(files["b"])], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    second = cut[1].workdir
    while not (os.path.isdir(os.path.join(second, "checkpoints", "4"))):  # the second point is under way
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert sweep.state(cut[0]) == "done" and sweep.state(cut[1]).startswith("checkpoint at step")
    first_metrics = os.path.getmtime(os.path.join(cut[0].workdir, "metrics.jsonl"))
    again = science("sweep", "run", files["b"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{cut[0].name}: done, skipped" in again.stdout and f"{cut[1].name}: training" in again.stdout
    assert os.path.getmtime(os.path.join(cut[0].workdir, "metrics.jsonl")) == first_metrics
    cut_rows, whole_rows = sweep.table(cut, False), sweep.table(whole, False)
    assert [r["point"] for r in cut_rows] == [r["point"] for r in whole_rows]  # the same names in both roots
    assert cut_rows == whole_rows  # and the same losses, bit for bit
    status = science("sweep", "status", files["b"])
    assert status.returncode == 0 and status.stdout.count("| done |") == 2


def test_fit_recovers_the_exponent_a_synthetic_sweep_was_drawn_from(tmp_path):
    """Final losses written where a run logs them, from isoFLOP curves whose minimum moves
    as 2 * (C / C0)^0.4: `sweep fit` must find 0.4 within its interval."""
    import numpy as np

    from parcae_jax.science import grid

    C0 = _budget_for(4, 12)
    budgets = [C0 * 2 ** i for i in range(5)]
    file = write_sweep(tmp_path / "s.py", tmp_path / "root", (1, 2, 4, 6, 8, 10, 12), budgets)
    rng = np.random.default_rng(0)
    for p in grid.points(grid.load(str(file))):
        opt = 2.0 * (p.budget / C0) ** 0.4
        loss = 3.0 - 0.1 * math.log(p.budget / C0) + 0.08 * (math.log(p.recurrence) - math.log(opt)) ** 2
        os.makedirs(p.workdir)
        with open(os.path.join(p.workdir, "metrics.jsonl"), "w") as f:
            f.write(json.dumps({"step": p.steps - 1, "loss": 9.0}) + "\n")
            f.write(json.dumps({"step": p.steps, f"eval/loss_r{p.recurrence}": loss + rng.normal(0, 1e-3)}) + "\n")
    out = science("sweep", "fit", file)
    assert out.returncode == 0, out.stderr[-3000:]
    fitted = json.loads((tmp_path / "root" / "fit" / "sweep_fit.json").read_text())
    law = fitted["laws"]["recurrence"]
    lo, hi = law["ci95"]["a"]
    assert lo <= 0.4 <= hi and hi - lo < 0.1, law
    assert all(b["inside"] for b in fitted["budgets"]) and fitted["comparison"]["better"] in ("parabolas", "additive")
    assert "tokens" in fitted["laws"] and len(fitted["rows"]) == 35
    for name in ("isoflop.png", "optimum.png"):
        assert 1000 < (tmp_path / "root" / "fit" / name).stat().st_size < 200_000
    assert (tmp_path / "root" / "fit" / "sweep.csv").read_text().startswith("point,budget,recurrence")


def test_the_papers_grid_plans_its_35_points():
    out = science("sweep", "plan", "recurrence_140m", "--commands")
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| C")]
    assert len(rows) == 35 and rows[0].startswith("| C1e18_r1 | 1e+18 | 1 | 1 |")
    commands = [line for line in out.stdout.splitlines() if line.startswith("python -m parcae_jax.main")]
    assert len(commands) == 35 and "--config.model.mean_recurrence=12" in commands[-1]
    assert "--config.model.mean_backprop_depth=6" in commands[-1]


@pytest.mark.parametrize("change,message", [
    (dict(extra="\n_get = get_config\ndef get_config(arg=None):\n    c = _get(arg)\n    c.budgetz = 1.0\n    return c\n"),
     "sweep key 'budgetz' is unknown"),
    (dict(overrides=[("train.batchsize", 8)]), "set.train.batchsize: no such config key (did you mean set.train.batch_size?)"),
    (dict(budgets=(1e3,)), "less than one step"),
    (dict(), "no point has a final evaluation yet"),
])
def test_bad_sweeps_are_one_line_and_exit_2(tmp_path, change, message):
    kwargs = {"recurrences": (1, 2), "budgets": (_budget_for(3, 2),), **change}
    file = write_sweep(tmp_path / "s.py", tmp_path / "root", **kwargs)
    out = science("sweep", "fit", file)
    assert out.returncode == 2 and message in out.stderr and out.stderr.count("\n") == 1, out.stderr[-2000:]


SMALL_BASE = '''
from parcae_jax import defaults

def get_config(arg=None):
    config = defaults.load_shipped("tiny")
    config.model.update({small!r})
    config.train.update(batch_size=8)
    config.optim.muon_dtype = "float32"
    return config
'''


def test_divergence_and_spikes_are_marked_where_the_series_says():
    from parcae_jax.science.stability import marks

    rows = [{"step": s, "loss": 3.0 - 0.01 * s, "state_norm": 10.0} for s in range(1, 31)]
    rows[14]["loss"] = 4.0  # step 15: a spike (1 nat above the median of the 10 before)
    assert marks(rows, 1e3, 0.5) == {"diverged_at": None, "spikes": [15]}
    rows[20]["state_norm"] = 2e3  # step 21: the state left the bound
    rows[25]["loss"] = float("nan")
    rows[22]["loss"] = 9.0  # after divergence: not a spike
    assert marks(rows, 1e3, 0.5) == {"diverged_at": 21, "spikes": [15]}
    rows[5]["skipped"] = 1.0  # the trainer skipped step 6 as non-finite
    assert marks(rows, 1e3, 0.5)["diverged_at"] == 6


def test_the_stability_command_trains_every_variant_and_rate_and_reads_finished_runs_back(tmp_path):
    base = tmp_path / "small.py"
    base.write_text(SMALL_BASE.format(small=SMALL))
    args = [f"--out_dir={tmp_path / 'out'}", f"--base={base}", "--steps=12", "--lr_multipliers=1,8",
            "--variants=diagonal,linear"]
    out = science("stability", *args)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "stability.json").read_text())
    assert [(r["variant"], r["lr_multiplier"]) for r in result["runs"]] == [
        ("diagonal", 1.0), ("diagonal", 8.0), ("linear", 1.0), ("linear", 8.0)]
    for r in result["runs"]:
        assert [s["step"] for s in r["series"]][:3] == [1, 2, 3] and len(r["series"]) <= 12
        assert r["lr"] == pytest.approx(small_config().optim.lr * r["lr_multiplier"])
        if r["variant"] == "diagonal":  # rho(A_bar) = max(A_bar) < 1 by construction
            assert all(s["rho"] < 1 for s in r["series"])
    csv_rows = (tmp_path / "out" / "stability.csv").read_text().splitlines()
    assert csv_rows[0] == "variant,lr_multiplier,step,loss,state_norm,rho,skipped" and len(csv_rows) > 4 * 11
    assert (tmp_path / "out" / "stability.png").stat().st_size < 200_000
    metrics = sorted((tmp_path / "out" / "runs").glob("*/metrics.jsonl"))
    stamps = [m.stat().st_mtime_ns for m in metrics]
    again = science("stability", *args)  # every run finished: read back, nothing trained
    assert again.returncode == 0 and len(metrics) == 4 and [m.stat().st_mtime_ns for m in metrics] == stamps
    assert json.loads((tmp_path / "out" / "stability.json").read_text())["runs"] == result["runs"]


@pytest.mark.parametrize("args,message", [
    ([], "pass --out_dir"),
    (["--out_dir=/tmp/x", "--variants=diagonal,concat"], "'concat' is unknown"),
    (["--out_dir=/tmp/x", "--lr_multipliers=1,-2"], "must be > 0"),
    (["--out_dir=/tmp/x", "--base=/nonexistent.py"], "cannot load"),
])
def test_bad_stability_requests_are_one_line_and_exit_2(args, message):
    out = science("stability", *args)
    assert out.returncode == 2 and message in out.stderr and out.stderr.count("\n") == 1, out.stderr[-2000:]


def test_parcae_and_its_gpt_train_on_equal_tokens_with_nearly_equal_parameters(tmp_path):
    base = tmp_path / "small.py"
    base.write_text(SMALL_BASE.format(small=SMALL) + "\n_get = get_config\n\ndef get_config(arg=None):\n"
                    "    c = _get(arg)\n    c.train.update(eval_every=3, eval_batches=1, log_every=1)\n    return c\n")
    out = science("compare", f"--out_dir={tmp_path / 'out'}", f"--base={base}", "--steps=6")
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "compare.json").read_text())
    parcae, gpt = report["runs"]
    assert (parcae["arch"], gpt["arch"]) == ("parcae", "gpt") and parcae["tokens"] == gpt["tokens"] == 6 * 8 * 32
    assert 1.0 < report["params_ratio"] < 1.1  # the injection and C: Parcae's few extra parameters
    assert parcae["flops_per_token"] > gpt["flops_per_token"]  # the loop runs the core R times
    for r in (parcae, gpt):
        assert [c["step"] for c in r["curve"]] == [3, 6] and r["val_loss"] == r["curve"][-1]["val_loss"]
    assert set(parcae["val_losses"]) >= {"eval/loss_r1", "eval/loss_r3"}
    assert report["loss_difference"] == pytest.approx(parcae["val_loss"] - gpt["val_loss"])
    assert (tmp_path / "out" / "compare.csv").read_text().startswith("arch,params,tokens")
    assert (tmp_path / "out" / "compare.png").stat().st_size < 200_000
    bad = science("compare", f"--out_dir={tmp_path / 'x'}", "--base=gpt_140m")  # a GPT base is refused
    assert bad.returncode == 2 and "give the Parcae config" in bad.stderr and bad.stderr.count("\n") == 1


def _stability_runs(diverged: dict) -> dict:
    """Stability results where (variant, multiplier) -> the step it diverged at (absent: never)."""
    runs = []
    for v in ("diagonal", "linear", "add"):
        for m in (1.0, 64.0):
            runs.append({"name": f"{v}_x{m:g}", "variant": v, "lr_multiplier": m, "diverged_at": diverged.get((v, m)),
                         "spikes": [], "max_state_norm": 10.0 if m == 1 else 1e6, "max_rho": 0.5, "final_loss": 3.0})
    return {"runs": runs}


@pytest.mark.parametrize("diverged,verdict", [
    ({("linear", 64.0): 3, ("add", 64.0): 5}, "reproduced: at learning-rate multipliers [64.0] linear or additive"),
    ({}, "not shown at this scale: no variant diverged"),
    ({("diagonal", 64.0): 4, ("linear", 64.0): 3}, "not reproduced at this scale: diagonal diverged at [64.0]"),
])
def test_the_report_says_what_the_stability_runs_show(diverged, verdict):
    from parcae_jax.science.report import verdicts

    compare = {"loss_difference": -0.01, "params_ratio": 1.03}
    got = verdicts(compare, {"fit": None, "fit_error": "flat"}, {"laws": {}}, _stability_runs(diverged))
    assert got["stability"].startswith(verdict)
    assert got["parcae_vs_gpt"].startswith("Parcae lower by 0.0100") and "no fit: flat" == got["test_time"]


def test_the_report_holds_every_figure_and_fitted_number(tmp_path):
    from parcae_jax.science import report, scaling, test_time

    tt = test_time.curve([(T, 2.0 + math.exp(-0.7 * T), 100) for T in range(1, 9)], 100, "parcae", 4)
    rows = [{"budget": C, "recurrence": r, "tokens": C / (1e6 * r), "flops_per_token": 1e6 * r,
             "loss": 3 - 0.1 * math.log(C) + 0.1 * (math.log(r) - math.log(2 * (C / 1e12) ** 0.4)) ** 2}
            for C in (1e12, 2e12, 4e12, 8e12) for r in (1, 2, 4, 6, 8)]
    fit = {**scaling.analyse(rows), "rows": rows}
    compare = {"runs": [{"arch": a, "params": 1000, "tokens": 500, "flops_per_token": 1e6, "val_loss": 3.0}
                        for a in ("parcae", "gpt")], "loss_difference": 0.0, "params_ratio": 1.0}
    stages = {"compare": compare, "test_time": tt, "fit": fit, "stability": _stability_runs({})}
    verdict = report.verdicts(compare, tt, fit, stages["stability"])
    assert verdict["scaling"].startswith("the compute-optimal recurrence grows with compute: exponent 0.40")
    assert verdict["test_time"].startswith("reproduced: L(T) = 2.000 + 1.000 exp(-0.70 T)")
    text = report.markdown("toy", stages, {"compare": 60.0, "sweep": 600.0}, verdict)
    for figure in ("compare/compare.png", "test_time/test_time.png", "sweep/fit/isoflop.png", "sweep/fit/optimum.png",
                   "stability/stability.png"):
        assert f"]({figure})" in text
    assert "total 11.0 min" in text and "recurrence* ∝ C^0.400" in text and "| diagonal_x64 | - | 0 |" in text
    assert f"kappa = {tt['fit']['values']['kappa']:.4f}" in text


def test_minima_outside_the_grid_are_reported_but_left_out_of_the_power_law():
    from parcae_jax.science import scaling

    rows = [{"budget": C, "recurrence": r, "tokens": C / (1e6 * r), "flops_per_token": 1e6 * r,
             "loss": 3 + 0.1 * (math.log(r) - math.log(opt)) ** 2}
            for C, opt in ((1e12, 0.2), (2e12, 3.0), (4e12, 5.0), (8e12, 7.0)) for r in (1, 2, 4, 6, 8)]
    analysis = scaling.analyse(rows)
    assert [b["inside"] for b in analysis["budgets"]] == [False, True, True, True]
    assert analysis["budgets"][0]["recurrence_opt"] == pytest.approx(0.2, rel=1e-6)
    law = analysis["laws"]["recurrence"]
    assert law["n"] == 3  # the three measured optima only
    del rows[-5:]  # two inside minima: no law, and the reason
    assert "2 of 3 budgets have a minimum inside the swept recurrences" in scaling.analyse(rows)["laws"]["recurrence"]["error"]
