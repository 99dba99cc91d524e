"""`science.stability`: divergence and spike marks, the command end to end, runs read back
(marks recomputed under new thresholds), folders of other settings refused, bad requests."""

import json

import pytest

from tests.helpers import SMALL_BASE, science
from tests.test_train import SMALL, small_config


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


@pytest.mark.slow
@pytest.mark.long
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
    tight = science("stability", *args, "--state_bound=1e-6")  # new thresholds: marks recomputed, nothing trained
    assert tight.returncode == 0 and [m.stat().st_mtime_ns for m in metrics] == stamps, tight.stderr[-2000:]
    assert all(r["diverged_at"] == 1 for r in json.loads((tmp_path / "out" / "stability.json").read_text())["runs"])
    other = science("stability", *args[:-1], "--variants=linear,diagonal", "--steps=13")
    assert other.returncode == 2 and "holds a run of other settings (train.steps 12 -> 13)" in other.stderr
    assert other.stderr.count("\n") == 1 and [m.stat().st_mtime_ns for m in metrics] == stamps
