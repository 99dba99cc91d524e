"""Recurrence x FLOP-budget sweeps: plan, run, follow and fit them.

    python -m parcae_jax.commands.sweep --action=plan   --sweep=SWEEP [--commands]   # tokens and steps per point
    python -m parcae_jax.commands.sweep --action=run    --sweep=SWEEP                # train unfinished points here
    python -m parcae_jax.commands.sweep --action=status --sweep=SWEEP
    python -m parcae_jax.commands.sweep --action=fit    --sweep=SWEEP [--allow_missing]
                                                        [--out_dir=DIR (default ROOT/fit)]

SWEEP is a sweep file (science/grid.py says what it holds) or the name of a shipped one
(configs/sweeps/: recurrence_140m, the paper's grid; toy). `plan --commands` prints one
launcher line per point, for a pod or a cluster (each point is an ordinary training run in
ROOT/<point>). `run` trains the points one after another in this process; a finished point
(its final evaluation logged) is skipped and an interrupted one resumes from its last
checkpoint, so `run` can be killed and started again. A point whose training diverges is
recorded as diverged and left out of the fit. `fit` gathers every point's final validation
loss at its own mean recurrence into ROOT/fit/sweep.csv and fits the laws (science/scaling.py)
into sweep_fit.json, isoflop.png and optimum.png. Bad input is one line and exit code 2.
"""

from __future__ import annotations

import json

from parcae_jax import storage
from parcae_jax.runtime.metrics import append_row, eval_key, read_rows
from parcae_jax.runtime.run_dir import RunDir
from parcae_jax.science import provenance
from parcae_jax.science.grid import SweepError
from parcae_jax.science.tables import write_csv

ACTIONS = ("plan", "run", "status", "fit")
FINAL_UNEVALUATED = "final checkpoint, not evaluated"


def _read(path) -> str | None:
    return path.read_text() if path.exists() else None


def _record(point) -> dict | None:
    text = _read(RunDir(point.workdir).sweep_point)  # the config `run` trained it with; did it diverge
    return json.loads(text) if text else None


def _write_record(point, diverged: str | None = None) -> None:
    storage.make_dir(point.workdir)
    record = {"config": point.config.to_dict(), "diverged": diverged}
    RunDir(point.workdir).sweep_point.write_text(json.dumps(record))


def other_settings(point) -> str | None:
    """'key old -> new, ...' when the point's workdir was trained with settings that change its
    result (read from `run`'s record, else from the newest checkpoint, so launcher-trained points
    are checked too); None when it matches or holds nothing yet."""
    record = _record(point)
    recorded = provenance.differences(record["config"], point.config.to_dict()) if "config" in (record or {}) else None
    return recorded or provenance.mismatch(point.workdir, point.config)  # a launcher may have resumed it since


def final_loss(point) -> float | None:
    """The point's validation loss at its mean recurrence, logged at its last step, or None."""
    key = eval_key("parcae", point.recurrence)
    done = [r for r in read_rows(point.workdir) if r.get("step") == point.steps and key in r]
    return float(done[-1][key]) if done else None


def state(point) -> str:
    """done | diverged | final checkpoint, not evaluated | checkpoint at step k of N | not started,
    or 'trained with other settings (...)' when the workdir does not match the sweep."""
    differ = other_settings(point)
    return f"trained with other settings ({differ})" if differ else _progress(point)


def _progress(point) -> str:
    """state() of a point whose workdir is known to match the sweep."""
    if final_loss(point) is not None:
        return "done"
    record = _record(point) or {}
    if record.get("diverged") or record.get("status") == "diverged":  # the second: written by earlier versions
        return "diverged"
    steps = provenance.checkpoint_steps(point.workdir)
    if steps and steps[-1] >= point.steps:
        return FINAL_UNEVALUATED
    return f"checkpoint at step {steps[-1]} of {point.steps}" if steps else "not started"


def _stale(points) -> None:
    """Raises SweepError for the first point whose workdir holds a run of other settings."""
    for p in points:
        differ = other_settings(p)
        if differ:
            raise SweepError(f"point {p.name}: {p.workdir} was trained with other settings ({differ}); use another "
                             "sweep root, or delete that folder to train the point again")


def evaluate_final(point) -> float:
    """Evaluates a final checkpoint whose evaluation was not logged (e.g. a kill between the
    checkpoint and the metrics upload) and appends the row to its metrics.jsonl."""
    from parcae_jax.training.train import evaluate_checkpoint
    from parcae_jax.training.validate import validate

    row = evaluate_checkpoint(point.config, point.workdir, validate(point.config))
    if row["step"] != point.steps:  # the final checkpoint could not be read: an older one was evaluated
        raise SweepError(f"point {point.name}: its final checkpoint {point.steps} cannot be restored (step "
                         f"{row['step']} was the newest readable); delete checkpoints/{point.steps} in {point.workdir} "
                         "and run again to train the last steps")
    append_row(point.workdir, row)
    return final_loss(point)


def status(points: list) -> str:
    """Each point's steps, state and final loss, as a Markdown table."""
    return _table(["point", "steps", "state", "loss"],
                  [[p.name, p.steps, state(p), f"{final_loss(p):.4f}" if final_loss(p) is not None else ""]
                   for p in points])


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(str, r)) + " |" for r in rows])


def plan(sweep, points: list, commands: bool = False) -> str:
    """The plan as a Markdown table (and, with `commands`, one launcher line per point)."""
    from parcae_jax.science import grid

    rows = [[p.name, f"{p.budget:.3g}", p.recurrence, p.backprop, f"{p.flops_per_token:.4g}", p.steps,
             f"{p.tokens:,}"] for p in points]
    out = _table(["point", "FLOPs", "recurrence", "backprop", "FLOPs/token", "steps", "tokens"], rows)
    if commands:
        out += "\n\n" + "\n".join(grid.command(sweep, p) for p in points)
    return out


def run_all(points: list) -> None:
    """Trains every point that is not finished, in order; interrupted points resume, a final
    checkpoint without its evaluation is evaluated. Refuses (SweepError) before training
    anything when a workdir holds a run of other settings."""
    from parcae_jax.training.train import NonFiniteRun, train
    from parcae_jax.training.validate import validate

    _stale(points)
    for p in points:
        s = _progress(p)  # _stale has checked every workdir's settings
        if s in ("done", "diverged"):
            print(f"{p.name}: {s}, skipped", flush=True)
            continue
        if s == FINAL_UNEVALUATED:
            print(f"{p.name}: evaluating its final checkpoint: loss {evaluate_final(p):.4f}", flush=True)
            continue
        print(f"{p.name}: training {p.steps} steps ({s})", flush=True)
        try:  # the record is written once training ran: a point that failed to start can still be changed
            train(p.config, p.workdir, validate(p.config))
            _write_record(p)
        except NonFiniteRun as e:
            _write_record(p, diverged=str(e))
            print(f"{p.name}: diverged ({e})", flush=True)


def table(points: list, allow_missing: bool) -> list[dict]:
    """One row per finished point; a point without its final evaluation is a SweepError (or,
    with allow_missing, left out), and so is a workdir trained with other settings."""
    _stale(points)
    rows, missing = [], []
    for p in points:
        loss = final_loss(p)
        if loss is None:
            if state(p) != "diverged":  # a diverged point has no loss to fit: left out, as documented
                missing.append(p)
            continue
        rows.append({"point": p.name, "budget": p.budget, "recurrence": p.recurrence, "backprop": p.backprop,
                     "flops_per_token": p.flops_per_token, "steps": p.steps, "tokens": p.tokens, "loss": loss})
    if not rows:
        raise SweepError(f"no point has a final evaluation yet (e.g. {points[0].workdir}); run `--action=run` first")
    if missing and not allow_missing:
        p = missing[0]
        raise SweepError(f"point {p.name} has no evaluation at its final step {p.steps} in {p.workdir} ({state(p)}); "
                         f"run `--action=run` or pass --allow_missing to fit the {len(rows)} finished points")
    return rows


def fit(sweep, points: list, out_dir: str | None = None, allow_missing: bool = False) -> dict:
    """The table, the laws and the figures in out_dir (default ROOT/fit); returns a summary."""
    from parcae_jax.science import plots, scaling

    rows = table(points, allow_missing)
    analysis = scaling.analyse(rows)
    out = storage.resolve(out_dir or f"{sweep.root}/fit")
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "sweep.csv", list(rows[0]), (list(r.values()) for r in rows))
    (out / "sweep_fit.json").write_text(json.dumps({"rows": rows, **analysis}, indent=1))
    plots.isoflop(rows, analysis, str(out / "isoflop.png"))
    plots.optimum(analysis, str(out / "optimum.png"))
    summary = {what: law.get("values", {}).get("a", law.get("error")) for what, law in analysis["laws"].items()}
    return {"points": len(rows), "exponents": summary, "paper": scaling.PAPER,
            "better": (analysis.get("comparison") or {}).get("better"), "out": str(out)}


if __name__ == "__main__":  # an old command line: say where the command went instead of doing nothing
    from parcae_jax.errors import moved

    moved("parcae_jax.commands.sweep")
