"""Recurrence x FLOP-budget sweeps: plan, run, follow and fit them (science/sweep.py).

    python -m parcae_jax.commands.sweep --action=plan   --sweep=SWEEP [--commands]   # tokens and steps per point
    python -m parcae_jax.commands.sweep --action=run    --sweep=SWEEP                # train unfinished points here
    python -m parcae_jax.commands.sweep --action=status --sweep=SWEEP
    python -m parcae_jax.commands.sweep --action=fit    --sweep=SWEEP [--allow_missing] [--out_dir=DIR]

SWEEP is a sweep file (science/grid.py says what it holds) or the name of a shipped one
(configs/sweeps/: recurrence_140m, the paper's grid; toy). `plan --commands` prints one
launcher line per point; `run` trains the points one after another in this process, skipping
finished ones and resuming interrupted ones; `fit` writes ROOT/fit (default) with sweep.csv,
sweep_fit.json, isoflop.png and optimum.png.
"""

from __future__ import annotations

import json

from absl import flags

from parcae_jax.commands import cli
from parcae_jax.commands.science_flags import OUT_DIR
from parcae_jax.errors import UsageError
from parcae_jax.science import grid, sweep

_ACTION = flags.DEFINE_enum("action", None, list(sweep.ACTIONS), "What to do with the sweep.")
_SWEEP = flags.DEFINE_string("sweep", None, "A sweep file or a shipped sweep's name (recurrence_140m, toy, ...).")
_COMMANDS = flags.DEFINE_bool("commands", False, "plan: print one launcher command per point.")
_ALLOW_MISSING = flags.DEFINE_bool("allow_missing", False, "fit: fit the finished points, skipping the others.")


def main(argv: list[str]) -> None:
    cli.no_arguments(argv)
    if not (_ACTION.value and _SWEEP.value):
        raise UsageError(f"pass --action={{{'|'.join(sweep.ACTIONS)}}} and --sweep=SWEEP (a sweep file or a shipped "
                         "sweep's name)")
    spec = grid.load(_SWEEP.value)
    points = grid.points(spec)
    if _ACTION.value == "plan":
        print(sweep.plan(spec, points, _COMMANDS.value))
    elif _ACTION.value == "status":
        print(sweep.status(points))
    elif _ACTION.value == "run":
        sweep.run_all(points)
    else:
        print(json.dumps(sweep.fit(spec, points, OUT_DIR.value, _ALLOW_MISSING.value)))


def run() -> None:
    """The `parcae-sweep` command."""
    cli.run(main, __name__)


if __name__ == "__main__":
    run()
