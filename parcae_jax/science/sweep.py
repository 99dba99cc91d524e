"""Recurrence x FLOP-budget sweeps: plan, run, follow and fit them.

    python -m parcae_jax.science.sweep plan   SWEEP [--commands]   # tokens and steps per point
    python -m parcae_jax.science.sweep run    SWEEP                # train unfinished points here
    python -m parcae_jax.science.sweep status SWEEP
    python -m parcae_jax.science.sweep fit    SWEEP [--allow_missing] [--out_dir=DIR (default ROOT/fit)]

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

from absl import flags

from parcae_jax import cli
from parcae_jax.science.cli_flags import OUT_DIR
from parcae_jax.model_flags import fail
from parcae_jax.science.grid import SweepError
from parcae_jax.science.tables import write_csv

_COMMANDS = flags.DEFINE_bool("commands", False, "plan: print one launcher command per point.")
_ALLOW_MISSING = flags.DEFINE_bool("allow_missing", False, "fit: fit the finished points, skipping the others.")
ACTIONS = ("plan", "run", "status", "fit")
DIVERGED = "sweep_point.json"  # written in a point's workdir when its training diverged


def _read(path) -> str | None:
    return path.read_text() if path.exists() else None


def final_loss(point) -> float | None:
    """The point's validation loss at its mean recurrence, logged at its last step, or None."""
    from parcae_jax import storage

    text = _read(storage.resolve(point.workdir) / "metrics.jsonl")
    key = f"eval/loss_r{point.recurrence}"
    rows = [json.loads(line) for line in (text or "").splitlines() if line.strip().startswith("{")]
    done = [r for r in rows if r.get("step") == point.steps and key in r]
    return float(done[-1][key]) if done else None


def state(point) -> str:
    """done | diverged | at step k of N | not started."""
    from parcae_jax import storage

    if final_loss(point) is not None:
        return "done"
    directory = storage.resolve(point.workdir)
    if (directory / DIVERGED).exists():
        return "diverged"
    ckpts = directory / "checkpoints"
    steps = [int(p.name) for p in ckpts.iterdir() if p.name.isdigit()] if ckpts.exists() else []
    return f"checkpoint at step {max(steps)} of {point.steps}" if steps else "not started"


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(str, r)) + " |" for r in rows])


def plan(sweep, points) -> str:
    from parcae_jax.science import grid

    rows = [[p.name, f"{p.budget:.3g}", p.recurrence, p.backprop, f"{p.flops_per_token:.4g}", p.steps,
             f"{p.tokens:,}"] for p in points]
    out = _table(["point", "FLOPs", "recurrence", "backprop", "FLOPs/token", "steps", "tokens"], rows)
    if _COMMANDS.value:
        out += "\n\n" + "\n".join(grid.command(sweep, p) for p in points)
    return out


def run_all(points) -> None:
    """Trains every point that is not finished, in order; interrupted points resume."""
    from parcae_jax import storage
    from parcae_jax.train import NonFiniteRun, train
    from parcae_jax.validate import validate

    for p in points:
        s = state(p)
        if s in ("done", "diverged"):
            print(f"{p.name}: {s}, skipped", flush=True)
            continue
        print(f"{p.name}: training {p.steps} steps ({s})", flush=True)
        try:
            train(p.config, p.workdir, validate(p.config))
        except NonFiniteRun as e:
            (storage.resolve(p.workdir) / DIVERGED).write_text(json.dumps({"status": "diverged", "error": str(e)}))
            print(f"{p.name}: diverged ({e})", flush=True)


def table(points, allow_missing: bool) -> list[dict]:
    """One row per finished point; a point without its final evaluation is a SweepError (or,
    with allow_missing, left out)."""
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
        raise SweepError(f"no point has a final evaluation yet (e.g. {points[0].workdir}); run `sweep run` first")
    if missing and not allow_missing:
        p = missing[0]
        raise SweepError(f"point {p.name} has no evaluation at its final step {p.steps} in {p.workdir} ({state(p)}); "
                         f"run `sweep run` or pass --allow_missing to fit the {len(rows)} finished points")
    return rows


def fit(sweep, points, out_dir: str | None = None, allow_missing: bool = False) -> dict:
    """The table, the laws and the figures in out_dir (default ROOT/fit); returns a summary."""
    from parcae_jax import storage
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


def main(argv) -> None:
    from parcae_jax.errors import one_line_errors
    from parcae_jax.science import grid

    if len(argv) != 3 or argv[1] not in ACTIONS:
        fail(f"usage: python -m parcae_jax.science.sweep {{{'|'.join(ACTIONS)}}} SWEEP (a sweep file or a shipped "
             "sweep's name)")
    action, value = argv[1], argv[2]
    with one_line_errors(grid.SweepError):
        sweep = grid.load(value)
        points = grid.points(sweep)
        if action == "plan":
            print(plan(sweep, points))
        elif action == "status":
            print(_table(["point", "steps", "state", "loss"],
                         [[p.name, p.steps, state(p), f"{final_loss(p):.4f}" if final_loss(p) is not None else ""]
                          for p in points]))
        elif action == "run":
            run_all(points)
        else:
            print(json.dumps(fit(sweep, points, OUT_DIR.value, _ALLOW_MISSING.value)))


def run() -> None:
    cli.run(main, __name__)


if __name__ == "__main__":
    run()
