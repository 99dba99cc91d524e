"""`commands.sweep`, `science.sweep` and `science.grid`: plans, resumable runs, stale workdirs, the fit's
recovery of a known exponent, and bad sweep files."""

import json
import math
import os
import re
import subprocess
import sys
import time

import pytest

from parcae_jax.runtime import run_dir
from tests.conftest import ONE_DEVICE_ENV, ROOT, XLA_CACHE
from tests.helpers import science
from tests.test_train import SMALL, small_config

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
    ("ckpt.every", 4), ("ckpt.keep", 2), ("ckpt.async_save", False), ("optim.muon_dtype", "float32"),
    ("compilation_cache_dir", XLA_CACHE)]  # the runs are on one device (helpers.science): a resume loads its steps


def write_sweep(path, root, recurrences, budgets, overrides=SMALL_SET, extra=""):
    as_given = lambda v: v if isinstance(v, str) else tuple(v)  # noqa: E731 - a string: a wrong type, as written
    path.write_text(SWEEP.format(root=str(root), recurrences=as_given(recurrences), budgets=as_given(budgets),
                                 overrides=list(overrides)) + extra)
    return path


def _budget_for(steps, recurrence):
    """The FLOPs that buy `steps` steps of the small model at `recurrence` (+ a little)."""
    from parcae_jax.model.config import ModelConfig
    from parcae_jax.training.describe import flops_per_token

    cfg = ModelConfig.from_mapping({**small_config().model.to_dict(), "mean_recurrence": recurrence,
                                    "mean_backprop_depth": -(-recurrence // 2)})
    return flops_per_token(cfg)["flops_per_token"] * 8 * SMALL["seq_len"] * (steps + 0.5)


@pytest.mark.slow
@pytest.mark.long
def test_a_killed_sweep_resumes_without_redoing_finished_points_and_gives_the_same_table(tmp_path):
    import signal

    from parcae_jax.science import grid, sweep

    budget = _budget_for(14, 1)  # 14 steps at recurrence 1, fewer at 2
    files = {name: write_sweep(tmp_path / f"{name}.py", tmp_path / name, (1, 2), (budget,)) for name in ("a", "b")}
    whole = grid.points(grid.load(str(files["a"])))
    assert [p.steps for p in whole][0] == 14 and 1 <= whole[1].steps < 14
    assert science("sweep", "--action=run", f"--sweep={files['a']}").returncode == 0  # uninterrupted
    cut = grid.points(grid.load(str(files["b"])))
    log = open(tmp_path / "killed.log", "w+")  # a file, not a pipe no one drains: a full pipe would block the run
    proc = subprocess.Popen([sys.executable, "-m", "parcae_jax.commands.sweep", "--action=run",
                             f"--sweep={files['b']}"],
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **ONE_DEVICE_ENV})
    second = cut[1].workdir
    while not (os.path.isdir(os.path.join(second, "checkpoints", "4"))):  # the second point is under way
        assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert sweep.state(cut[0]) == "done" and sweep.state(cut[1]).startswith("checkpoint at step")
    first_metrics = os.path.getmtime(os.path.join(cut[0].workdir, "metrics.jsonl"))
    again = science("sweep", "--action=run", f"--sweep={files['b']}")
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{cut[0].name}: done, skipped" in again.stdout and f"{cut[1].name}: training" in again.stdout
    assert os.path.getmtime(os.path.join(cut[0].workdir, "metrics.jsonl")) == first_metrics
    cut_rows, whole_rows = sweep.table(cut, False), sweep.table(whole, False)
    assert [r["point"] for r in cut_rows] == [r["point"] for r in whole_rows]  # the same names in both roots
    assert cut_rows == whole_rows  # and the same losses, bit for bit
    status = science("sweep", "--action=status", f"--sweep={files['b']}")
    assert status.returncode == 0 and status.stdout.count("| done |") == 2


@pytest.mark.slow
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
    out = science("sweep", "--action=fit", f"--sweep={file}")
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
    out = science("sweep", "--action=plan", "--sweep=recurrence_140m", "--commands")
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| C")]
    assert len(rows) == 35 and rows[0].startswith("| C1e18_r1 | 1e+18 | 1 | 1 |")
    commands = [line for line in out.stdout.splitlines() if line.startswith("python -m parcae_jax.main")]
    assert len(commands) == 35 and "--config.model.mean_recurrence=12" in commands[-1]
    assert "--config.model.mean_backprop_depth=6" in commands[-1]


@pytest.mark.parametrize("change,message", [
    (dict(extra="\n_get = get_config\ndef get_config(arg=None):\n"
                "    c = _get(arg)\n    c.budgetz = 1.0\n    return c\n"),
     "sweep key 'budgetz' is unknown"),
    (dict(overrides=[("train.batchsize", 8)]),
     "set.train.batchsize: no such config key (did you mean set.train.batch_size?)"),
    (dict(budgets=(1e3,)), "less than one step"),
    (dict(recurrences="1,2"), "recurrences='1,2': give a tuple of integers >= 1"),
    (dict(budgets=("1e18",)), "give a tuple of FLOP counts > 0"),
    (dict(overrides=[("train.batch_size",)]), "give (\"dotted.key\", value) pairs"),
    (dict(extra="\n_get = get_config\ndef get_config(arg=None):\n    c = _get(arg)\n    c.launcher = 'run {cfg}'\n"
                "    return c\n"), "it may use {config}, {workdir} and {flags}"),
    (dict(), "no point has a final evaluation yet"),
])
def test_bad_sweeps_are_one_line_and_exit_2(tmp_path, change, message):
    kwargs = {"recurrences": (1, 2), "budgets": (_budget_for(3, 2),), **change}
    file = write_sweep(tmp_path / "s.py", tmp_path / "root", **kwargs)
    out = science("sweep", "--action=fit", f"--sweep={file}")
    assert out.returncode == 2 and message in out.stderr and out.stderr.count("\n") == 1, out.stderr[-2000:]


@pytest.fixture(scope="module")
def trained_point(tmp_path_factory):
    """A one-point sweep (6 steps at recurrence 2) trained by `run`; its file and point."""
    from parcae_jax.science import grid, sweep

    tmp = tmp_path_factory.mktemp("point")
    file = write_sweep(tmp / "s.py", tmp / "root", (2,), (_budget_for(6, 2),))
    (point,) = grid.points(grid.load(str(file)))
    trained = science("sweep", "--action=run", f"--sweep={file}")
    assert trained.returncode == 0 and sweep.state(point) == "done", trained.stderr[-3000:]
    return file, point


@pytest.mark.slow
def test_a_final_checkpoint_without_its_evaluation_is_evaluated_not_trained_again(trained_point):
    from parcae_jax.science import sweep

    file, point = trained_point
    metrics = os.path.join(point.workdir, "metrics.jsonl")
    text = open(metrics).read()
    loss = sweep.final_loss(point)
    key = f"eval/loss_r{point.recurrence}"
    try:  # as after a kill between the final checkpoint and the metrics upload
        with open(metrics, "w") as f:
            f.writelines(line for line in text.splitlines(keepends=True) if key not in line)
        assert sweep.state(point) == sweep.FINAL_UNEVALUATED
        status = science("sweep", "--action=status", f"--sweep={file}")
        assert status.returncode == 0 and sweep.FINAL_UNEVALUATED in status.stdout
        ckpt = os.path.join(point.workdir, "checkpoints", str(point.steps))
        stamp = os.path.getmtime(ckpt)
        again = science("sweep", "--action=run", f"--sweep={file}")
        assert again.returncode == 0 and "evaluating its final checkpoint" in again.stdout, again.stderr[-3000:]
        assert "training" not in again.stdout and os.path.getmtime(ckpt) == stamp
        assert sweep.state(point) == "done" and sweep.final_loss(point) == pytest.approx(loss, abs=1e-5)
    finally:
        with open(metrics, "w") as f:
            f.write(text)


@pytest.mark.slow
def test_a_workdir_trained_with_other_settings_is_refused_not_reused(trained_point, tmp_path):
    from parcae_jax.science import grid, sweep

    file, point = trained_point
    changed = file.read_text().replace("('train.batch_size', 8)", "('train.batch_size', 8), ('optim.lr', 0.5)")
    other = tmp_path / "other.py"
    other.write_text(changed)
    (moved,) = grid.points(grid.load(str(other)))
    assert "optim.lr" in sweep.state(moved) and sweep.state(moved).startswith("trained with other settings")
    for action in ("run", "fit"):
        out = science("sweep", f"--action={action}", f"--sweep={other}")
        assert out.returncode == 2 and "was trained with other settings (optim.lr" in out.stderr, out.stderr[-2000:]
        assert out.stderr.count("\n") == 1
    record = os.path.join(point.workdir, run_dir.SWEEP_POINT)
    saved = open(record).read()
    os.remove(record)  # as a point trained by a launcher: the checkpoint's config is checked
    try:
        assert "optim.lr" in sweep.state(moved) and sweep.state(point) == "done"
    finally:
        with open(record, "w") as f:
            f.write(saved)


def test_each_point_is_evaluated_at_its_own_mean_recurrence(tmp_path):
    from parcae_jax.science import grid

    overrides = [*SMALL_SET, ("train.eval_recurrences", (1, 2))]
    file = write_sweep(tmp_path / "s.py", tmp_path / "root", (2, 4), (_budget_for(3, 4),), overrides=overrides)
    got = [tuple(p.config.train.eval_recurrences) for p in grid.points(grid.load(str(file)))]
    assert got == [(1, 2), (1, 2, 4)]


@pytest.mark.parametrize("key,value,message", [
    ("base", 5, "base=5: give a string"), ("root", 5, "root=5: give a string"),
    ("warmup_fraction", "x", "give a number in [0, 1)"), ("launcher", 5, "give a command template string"),
    ("launcher", "{config.x}", "it may use {config}, {workdir} and {flags}"), ("set", 5, "give a tuple of"),
    ("budgets", (float("inf"),), "give a tuple of FLOP counts > 0"),
])
def test_values_of_the_wrong_type_are_one_sweep_error_line(key, value, message):
    from ml_collections import config_dict

    from parcae_jax.science import grid

    sweep = config_dict.ConfigDict({"base": "tiny", "root": "/tmp/r", "recurrences": (1, 2), "budgets": (1e12,),
                                    key: value})
    with pytest.raises(grid.SweepError, match=re.escape(message)) as e:
        grid.points(sweep)
    assert "\n" not in str(e.value)


def test_a_point_marked_diverged_by_an_earlier_version_stays_diverged(tmp_path):
    from parcae_jax.science import grid, sweep

    file = write_sweep(tmp_path / "s.py", tmp_path / "root", (1, 2), (_budget_for(3, 2),))
    first, second = grid.points(grid.load(str(file)))
    os.makedirs(first.workdir)
    with open(os.path.join(first.workdir, run_dir.SWEEP_POINT), "w") as f:
        json.dump({"status": "diverged", "error": "3 steps in a row were skipped"}, f)
    assert sweep.state(first) == "diverged" and sweep.state(second) == "not started"
