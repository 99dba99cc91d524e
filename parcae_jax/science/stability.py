"""The stability experiment: one small model trained with diagonal, linear and additive
injection (and diagonal without the prelude norm) over a grid of learning rates.

    python -m parcae_jax.commands.stability --out_dir=DIR [--base=tiny] [--steps=150] \\
        [--lr_multipliers=1,4,16,64] [--variants=diagonal,linear,add,diagonal-no-prelude-norm]

Each run is `base` with the variant's injection, both learning rates (AdamW's and Muon's)
times the multiplier, logging every step. From its metrics.jsonl it records per step the
loss, the recurrent state's norm and rho(A_bar) (the state-to-state map's spectral radius:
max(A_bar) for diagonal, 1 for additive, estimated for linear), and marks

- divergence: the first step whose loss is not finite, that the trainer skipped as
  non-finite, or whose state norm exceeds --state_bound (a run that keeps skipping stops);
- loss spikes: steps before that whose loss exceeds the median of the previous 10 by more
  than --spike_nats.

Writes DIR/stability.json (summary and series), stability.csv (per step) and stability.png
(loss, state norm and rho against step: one column per variant, one line per multiplier).
Finished runs (DIR/runs/<variant>_x<m>/stability_run.json) are not trained again. Bad input
is one line and exit code 2.
"""

from __future__ import annotations

import json
import math
import statistics

from parcae_jax.errors import UserError
from parcae_jax.runtime.run_dir import RunDir
from parcae_jax.science.tables import write_csv

VARIANTS = {  # name -> model overrides
    "diagonal": {"injection": "diagonal"},
    "linear": {"injection": "linear"},
    "add": {"injection": "add"},
    "diagonal-no-prelude-norm": {"injection": "diagonal", "prelude_norm": False},
}
DEFAULT_STEPS = 150
STATE_BOUND, SPIKE_NATS = 1e3, 0.5


class StabilityError(UserError, ValueError):
    """A request the experiment cannot run (one line, names the fix)."""


def run_config(base, variant: str, multiplier: float, steps: int):
    """The config of one run (a copy of `base`)."""
    import copy

    config = copy.deepcopy(base)
    config.model.update(VARIANTS[variant])
    config.optim.lr = base.optim.lr * multiplier
    config.optim.muon_lr = base.optim.muon_lr * multiplier
    config.optim.warmup_steps = min(base.optim.warmup_steps, steps // 10)
    config.train.update(steps=steps, log_every=1, eval_every=0, max_consecutive_skips=3)
    config.ckpt.update(every=0, async_save=False)
    return config


def marks(rows: list[dict], bound: float, spike_nats: float) -> dict:
    """Divergence step (or None) and spike steps of one run's per-step rows."""
    diverged = next((r["step"] for r in rows if not math.isfinite(r["loss"]) or r.get("skipped", 0) > 0
                     or r.get("state_norm", 0.0) > bound), None)
    spikes = []
    for i, r in enumerate(rows):
        if diverged is not None and r["step"] >= diverged:
            break
        if i >= 10 and r["loss"] > statistics.median(x["loss"] for x in rows[i - 10:i]) + spike_nats:
            spikes.append(r["step"])
    return {"diverged_at": diverged, "spikes": spikes}


def summary(record: dict, bound: float, spike_nats: float) -> dict:
    """A run's marks and extremes from its stored series, under these thresholds."""
    series, stopped = record["series"], record["stopped"]
    finite = [r["loss"] for r in series if math.isfinite(r["loss"])]
    out = {"stopped": stopped, **marks(series, bound, spike_nats),
           "final_loss": statistics.fmean(finite[-10:]) if finite else None,
           "max_state_norm": max((r.get("state_norm", 0.0) for r in series), default=None),
           "max_rho": max((r.get("rho", 0.0) for r in series), default=None), "series": series}
    if out["diverged_at"] is None and stopped:  # the trainer gave up on non-finite steps
        out["diverged_at"] = series[-1]["step"] if series else 0
    return out


def _finished(config, workdir: str) -> dict | None:
    """The stored record of a run finished with `config`, None if there is none; StabilityError
    if the folder holds a run of other settings (never mixed, never overwritten)."""
    from parcae_jax.science import provenance

    path = RunDir(workdir).stability_run
    record = json.loads(path.read_text()) if path.exists() else None
    saved = (record or {}).get("config") or provenance.saved_config(workdir)
    differ = provenance.differences(saved, config.to_dict()) if saved is not None else None
    if record is not None and saved is None:
        differ = "a record without its config (an earlier version's) and no checkpoint to check it by"
    if differ:
        raise StabilityError(f"{workdir} holds a run of other settings ({differ}); use another --out_dir, "
                             "or delete that folder to train it again")
    if record is not None and "config" not in record:  # an earlier version's record, checked by its checkpoint
        record["config"] = config.to_dict()
        path.write_text(json.dumps(record))
    return record


def train_one(config, workdir: str, bound: float, spike_nats: float) -> dict:
    """Trains one run, or reads it back when it finished with this config, and returns its
    summary and series (marks recomputed, so changed thresholds need no training)."""
    from parcae_jax.runtime.metrics import read_rows
    from parcae_jax.training.train import NonFiniteRun, train
    from parcae_jax.training.validate import validate

    record = _finished(config, workdir)
    if record is None:
        stopped = None
        try:
            train(config, workdir, validate(config))
        except NonFiniteRun as e:
            stopped = str(e).splitlines()[0]
        rows = read_rows(workdir)
        keep = ("step", "loss", "state_norm", "rho", "skipped")
        series = [{k: (float(r[k]) if k != "step" else r[k]) for k in keep if k in r} for r in rows if "loss" in r]
        record = {"config": config.to_dict(), "stopped": stopped, "series": series}
        RunDir(workdir).stability_run.write_text(json.dumps(record))
    return summary(record, bound, spike_nats)


def experiment(base, out_dir: str, *, variants: list[str], multipliers: list[float], steps: int,
               state_bound: float = STATE_BOUND, spike_nats: float = SPIKE_NATS) -> dict:
    """Every (variant, multiplier) run from the ConfigDict `base`, then the JSON, CSV and
    figure in out_dir; returns the JSON's content."""
    from parcae_jax import storage
    from parcae_jax.science import plots

    if base.model.arch != "parcae":
        raise StabilityError(f"the base is a {base.model.arch}, which has no injection; give a Parcae config")
    plan = [(v, m, f"{v}_x{m:g}", run_config(base, v, m, steps)) for v in variants for m in multipliers]
    for _, _, name, config in plan:  # refuse a folder of other settings before training anything
        _finished(config, f"{out_dir}/runs/{name}")
    runs = []
    for variant, m, name, config in plan:
        result = train_one(config, f"{out_dir}/runs/{name}", state_bound, spike_nats)
        runs.append({"name": name, "variant": variant, "lr_multiplier": m, "lr": config.optim.lr,
                     "muon_lr": config.optim.muon_lr, **result})
        print(json.dumps({k: runs[-1][k] for k in ("name", "diverged_at", "spikes", "final_loss",
                                                    "max_state_norm", "max_rho")}), flush=True)
    out = storage.resolve(out_dir)
    report = {"steps": steps, "state_bound": state_bound, "spike_nats": spike_nats, "runs": runs}
    (out / "stability.json").write_text(json.dumps(report, indent=1))
    write_csv(out / "stability.csv", ["variant", "lr_multiplier", "step", "loss", "state_norm", "rho", "skipped"],
              ([r["variant"], r["lr_multiplier"], s["step"], s["loss"], s.get("state_norm", ""), s.get("rho", ""),
                s.get("skipped", "")] for r in runs for s in r["series"]))
    plots.stability(runs, str(out / "stability.png"))
    return report


if __name__ == "__main__":  # an old command line: say where the command went instead of doing nothing
    from parcae_jax.errors import moved

    moved("parcae_jax.commands.stability")
