"""The science commands test_time, compare and report end to end on tiny trained runs
(sweeps: test_sweep.py; stability: test_stability.py; the fits: test_fits.py)."""

import json
import math

import numpy as np
import pytest

from parcae_jax.science import recurrence_curve
from parcae_jax.training.train import train
from tests.helpers import SMALL_BASE, science
from tests.test_train import SMALL, one_device, small_config


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    config = small_config(steps=4, eval_every=4, eval_batches=2)
    config.ckpt.update(every=4, async_save=False)
    trainer, run = one_device(config)  # as the science commands here evaluate (helpers.science)
    train(config, str(workdir), run, trainer)
    return workdir, config, trainer, run


@pytest.mark.slow
def test_test_time_reproduces_the_runs_own_evaluations_and_writes_its_files(run, tmp_path):
    workdir, config, _, _ = run
    out = science("recurrence_curve", f"--checkpoint={workdir}", f"--dtype={config.model.dtype}",
                  f"--out_dir={tmp_path}")
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / "test_time.json").read_text())
    logged = [json.loads(line) for line in open(workdir / "metrics.jsonl")][-1]
    mean = config.model.mean_recurrence
    assert [p["T"] for p in result["points"]] == list(range(1, 2 * mean + 1)) and result["step"] == 4
    assert (result["eval_batches"], result["batch_size"]) == (2, config.train.batch_size)  # the run's own, by default
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


class _RowTokenizer:
    """For the lm-eval adapter: the text "i" is validation row i's tokens after its first, and the
    first is the end-of-document token lm-eval puts before a rolling window, so the adapter's
    one window per row reads exactly the row the evaluation reads."""

    def __init__(self, rows):
        self.rows, self.eod_id = rows, None

    def encode(self, text):
        return self.rows[int(text)][1:]


@pytest.mark.slow
def test_one_checkpoint_gives_one_loss_through_every_door(run, tmp_path):
    """--mode=eval, test_time and the lm-eval adapter's rolling log-likelihood score the same
    validation tokens of one checkpoint at R with the same initial states
    (recurrence.evaluation_state), so all three give the same loss."""
    from lm_eval.api.instance import Instance

    from parcae_jax.data import dataset
    from parcae_jax.infer.harness import HarnessLM
    from parcae_jax.interop import transfer
    from parcae_jax.training.train import evaluate_checkpoint

    workdir, config, trainer, run_ = run
    R = 2
    by_mode_eval = evaluate_checkpoint(config, str(workdir), run_, trainer)[f"eval/loss_r{R}"]
    result, _ = recurrence_curve.measure(str(workdir), str(tmp_path), recurrences=[R], dtype="float32")
    by_test_time = result["points"][0]["loss"]

    val_data = dataset.open_data(config.data, run_.tokenizer)
    rows = [np.append(b["inputs"][i], b["targets"][i][-1]) for b in trainer.local_eval_batches(val_data)
            for i in range(len(b["inputs"]))]
    assert all(b >= 0 for r in rows for b in r) and len(rows) == 2 * config.train.batch_size  # no padded target
    cfg, params, _, seed = transfer.load_model(str(workdir))
    tokenizer = _RowTokenizer(rows)
    lm = HarnessLM(cfg.replace(dtype="float32"), params, tokenizer, recurrence=R, batch_size=4, seed=seed)
    total = 0.0
    for i, row in enumerate(rows):
        tokenizer.eod_id = int(row[0])
        total += lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (str(i),), 0)])[0]
    by_harness = -total / sum(len(r) - 1 for r in rows)

    assert by_test_time == pytest.approx(by_mode_eval, abs=2e-6)
    assert by_harness == pytest.approx(by_mode_eval, abs=2e-6)
    # generation takes the same states, by each row's own position (a row padded by 3 starts later)
    from parcae_jax.infer.generator import initial_states
    from parcae_jax.model.recurrence import evaluation_state

    T = len(rows[0]) - 1
    states = np.asarray(initial_states(seed, np.array([0, 3]), T, cfg))
    drawn = np.asarray(evaluation_state(cfg, seed, T))
    np.testing.assert_array_equal(states[0], drawn[0])
    np.testing.assert_array_equal(states[1, 3:], drawn[0, :T - 3])


def test_a_gpt_curve_is_one_flat_point(tmp_path):
    result = recurrence_curve.curve([(1, 2.5, 100)], 100, "gpt", 4)
    assert [p["T"] for p in result["points"]] == [1] and result["fit"] is None and "GPT" in result["fit_error"]
    recurrence_curve.write(result, str(tmp_path))
    assert (tmp_path / "test_time.png").stat().st_size > 1000


def test_a_synthetic_curve_is_fitted_and_drawn(tmp_path):
    points = [(T, 2.0 + 1.5 * math.exp(-0.6 * T) + 0.002 * (-1) ** T, 1000) for T in range(1, 9)]
    result = recurrence_curve.curve(points, 4000, "parcae", 4)
    assert result["fit"]["values"]["kappa"] == pytest.approx(0.6, abs=0.05)
    assert result["points"][0]["bits_per_byte"] == pytest.approx(points[0][1] * 1000 / math.log(2) / 4000)
    paths = recurrence_curve.write(result, str(tmp_path))
    assert all((tmp_path / f"test_time.{e}").exists() for e in ("json", "csv", "png")) and len(paths) == 3


@pytest.mark.slow
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
    stamps = sorted(p.stat().st_mtime_ns for p in (tmp_path / "out").glob("*/metrics.jsonl"))
    other = science("compare", f"--out_dir={tmp_path / 'out'}", f"--base={base}", "--steps=7")
    assert other.returncode == 2 and "holds a run of other settings (train.steps 6 -> 7)" in other.stderr
    assert other.stderr.count("\n") == 1 and stamps == sorted(
        p.stat().st_mtime_ns for p in (tmp_path / "out").glob("*/metrics.jsonl"))  # nothing trained
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
    from parcae_jax.science import report, scaling

    tt = recurrence_curve.curve([(T, 2.0 + math.exp(-0.7 * T), 100) for T in range(1, 9)], 100, "parcae", 4)
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
    assert ("2 of 3 budgets have a minimum inside the swept recurrences"
            in scaling.analyse(rows)["laws"]["recurrence"]["error"])
