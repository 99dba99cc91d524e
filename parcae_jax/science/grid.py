"""A sweep file turned into its points: one training config per (FLOP budget, mean recurrence).

A sweep file is a Python file whose get_config() returns a ConfigDict with these keys (see
configs/sweeps/ for the paper's grid and the toy one):

    base        a training config, as --config takes it (a shipped name or path[:arg])
    root        the folder (local or gs://) that holds one workdir per point
    recurrences the mean recurrences, e.g. (1, 2, 4, 6, 8, 10, 12)
    budgets     training FLOP budgets, e.g. (1e18, 2e18, 4e18, 8e18, 16e18)
    backprop    "half" (ceil(recurrence / 2), the paper's), "full", or a fixed depth
    set         (("train.batch_size", 64), ...): overrides of `base` for every point
    warmup_fraction  optional: optim.warmup_steps as this fraction of each point's steps
    launcher    a command template with {config}, {workdir} and {flags} (`plan --commands`)

Each budget C becomes steps = floor(C / (F * tokens per step)), F the executed FLOPs per
trained token of that point's model (`describe`: matmuls and attention as they run, the
injection every iteration, the no-gradient and gradient iterations at the mean depths).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import shlex

from ml_collections import config_dict

from parcae_jax.errors import UserError, first_line
from parcae_jax.training import config_files

KEYS = {"base", "root", "recurrences", "budgets", "backprop", "set", "warmup_fraction", "launcher"}
REQUIRED = ("base", "root", "recurrences", "budgets")
LAUNCHER = "python -m parcae_jax.main --config={config} --workdir={workdir} {flags}"


class SweepError(UserError, ValueError):
    """A sweep file or a point that cannot be run (one line, names the key and the fix)."""


@dataclasses.dataclass(frozen=True)
class Point:
    """One grid point: its budget, recurrence, steps and tokens, and the full training config."""

    name: str  # C<budget>_r<recurrence>: the workdir's name under root
    budget: float
    recurrence: int
    backprop: int
    flops_per_token: float
    steps: int
    tokens: int  # trained: steps x batch x sequence length (<= budget / flops_per_token)
    workdir: str
    overrides: tuple[tuple[str, object], ...]  # (dotted key, value) over `base`, in order
    config: config_dict.ConfigDict = dataclasses.field(compare=False, repr=False)

    def flags(self) -> str:
        """The point's overrides as --config.KEY=VALUE flags, shell-quoted (for a launcher line)."""
        return " ".join(shlex.quote(f"--config.{k}={_flag_value(v)}") for k, v in self.overrides)


def _flag_value(v) -> str:
    return f"({','.join(map(str, v))})" if isinstance(v, tuple) else str(v)


def load(value: str) -> config_dict.ConfigDict:
    """The sweep file `value` (path[:arg], or a name under configs/sweeps/), its keys checked."""
    path, sep, arg = value.partition(":")
    if not os.path.exists(path):  # a shipped sweep's name
        from parcae_jax.training.defaults import shipped_config

        found = shipped_config(f"sweeps/{os.path.basename(path).removesuffix('.py')}")
        value = found + sep + arg if found else value
    try:
        sweep = config_files.load(value, flag="sweep")
    except config_files.ConfigFileError as e:
        raise SweepError(str(e)) from None
    unknown = sorted(set(sweep.keys()) - KEYS)
    if unknown:
        raise SweepError(f"sweep key {unknown[0]!r} is unknown; a sweep has {', '.join(sorted(KEYS))}")
    missing = [k for k in REQUIRED if k not in sweep]
    if missing:
        raise SweepError(f"the sweep has no {missing[0]!r}; it needs {', '.join(REQUIRED)}")
    return sweep


def _backprop(rule, recurrence: int) -> int:
    if rule == "half":
        return math.ceil(recurrence / 2)
    if rule == "full":
        return recurrence
    if isinstance(rule, int) and rule >= 1:
        return min(rule, recurrence)
    raise SweepError(f"backprop={rule!r}: use 'half' (ceil(recurrence / 2)), 'full' or a depth >= 1")


def assign(config: config_dict.ConfigDict, key: str, value) -> None:
    """config[key] = value for a dotted key, which must exist (SweepError names a typo)."""
    try:
        config_files.check_key(config, f"set.{key}")
    except config_files.ConfigFileError as e:
        raise SweepError(str(e)) from None
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
        node = node[p]
    try:
        node[leaf] = value
    except (TypeError, ValueError) as e:
        raise SweepError(f"set.{key}={value!r}: {first_line(e)}") from None


def _check_shapes(sweep: config_dict.ConfigDict) -> None:
    """The sweep's values have the types the grid needs (one SweepError line each)."""
    for key, what in (("base", "a config's name or path[:arg]"), ("root", "a folder, local or gs://")):
        if not isinstance(sweep[key], str) or not sweep[key]:
            raise SweepError(f"{key}={sweep[key]!r}: give a string, {what}")
    recurrences, budgets = sweep.recurrences, sweep.budgets
    if not isinstance(recurrences, (tuple, list)) or not recurrences or not all(
            isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in recurrences):
        raise SweepError(f"recurrences={recurrences!r}: give a tuple of integers >= 1, e.g. (1, 2, 4, 8)")
    if not isinstance(budgets, (tuple, list)) or not budgets or not all(
            isinstance(b, (int, float)) and not isinstance(b, bool) and math.isfinite(b) and b > 0 for b in budgets):
        raise SweepError(f"budgets={budgets!r}: give a tuple of FLOP counts > 0, e.g. (1e18, 2e18)")
    if not isinstance(sweep.get("set") or (), (tuple, list)):
        raise SweepError(f"set={sweep.set!r}: give a tuple of (\"dotted.key\", value) pairs")
    fraction = sweep.get("warmup_fraction")
    if fraction is not None and not (isinstance(fraction, (int, float)) and not isinstance(fraction, bool)
                                     and 0 <= fraction < 1):
        raise SweepError(f"warmup_fraction={fraction!r}: give a number in [0, 1), e.g. 0.05")
    for entry in sweep.get("set") or ():
        if not (isinstance(entry, (tuple, list)) and len(entry) == 2 and isinstance(entry[0], str)):
            raise SweepError(f"set entry {entry!r}: give (\"dotted.key\", value) pairs")
    template = sweep.get("launcher") or LAUNCHER
    if not isinstance(template, str):
        raise SweepError(f"launcher={template!r}: give a command template string with {{config}}, {{workdir}} "
                         "and {flags}")
    try:
        template.format(config="", workdir="", flags="")
    except (KeyError, IndexError, ValueError, AttributeError) as e:
        raise SweepError(f"launcher {template!r}: {first_line(e)}; it may use {{config}}, "
                         "{workdir} and {flags}") from None


def points(sweep: config_dict.ConfigDict) -> list[Point]:
    """Every point of the grid, budgets then recurrences ascending; raises SweepError for a bad
    key or value, or a budget too small for one step, naming the point."""
    from parcae_jax.model.config import ConfigError, ModelConfig
    from parcae_jax.training.describe import flops_per_token
    from parcae_jax.training.validate import validate

    _check_shapes(sweep)
    try:
        base = config_files.load(config_files.shipped(sweep.base), flag="base")
    except config_files.ConfigFileError as e:
        raise SweepError(str(e)) from None
    recurrences, budgets = sorted(set(sweep.recurrences)), sorted(set(sweep.budgets))
    fraction = sweep.get("warmup_fraction")
    out = []
    for budget in budgets:
        for rec in recurrences:
            config = copy.deepcopy(base)
            overrides = [tuple(kv) for kv in sweep.get("set") or ()]
            for key, value in overrides:
                assign(config, key, value)
            bp = _backprop(sweep.get("backprop", "half"), rec)
            name = f"C{budget:.3g}_r{rec}".replace("+", "")
            pinned = [("model.mean_recurrence", rec), ("model.mean_backprop_depth", bp)]
            for key, value in pinned:
                assign(config, key, value)
            try:
                fpt = flops_per_token(ModelConfig.from_mapping(config.model))["flops_per_token"]
            except ConfigError as e:
                raise SweepError(f"point {name}: {e}") from None
            per_step = config.train.batch_size * config.model.seq_len
            steps = int(budget // (fpt * per_step))
            if steps < 1:
                raise SweepError(f"point {name}: a budget of {budget:.3g} FLOPs is {budget / fpt:.3g} tokens, "
                                 f"less than one step of {per_step} tokens; raise the budget or lower train.batch_size")
            more = [("train.steps", steps), ("train.eval_every", config.train.eval_every or steps)]
            evaluated = config.train.eval_recurrences
            if evaluated and rec not in evaluated:  # the point is finished by its evaluation at its own mean
                more.append(("train.eval_recurrences", tuple(sorted({*evaluated, rec}))))
            if fraction is not None:
                more.append(("optim.warmup_steps", min(int(round(fraction * steps)), steps - 1)))
            for key, value in more:
                assign(config, key, value)
            try:
                validate(config, check_data=False)
            except ConfigError as e:
                raise SweepError(f"point {name}: {e}") from None
            workdir = os.path.join(sweep.root, name)
            out.append(Point(name, float(budget), rec, bp, float(fpt), steps, steps * per_step, workdir,
                             tuple(overrides + pinned + more), config))
    return out


def command(sweep: config_dict.ConfigDict, point: Point) -> str:
    """The launcher line that trains `point` (the sweep's template, default a local `main`)."""
    template = sweep.get("launcher") or LAUNCHER
    return template.format(config=shlex.quote(sweep.base), workdir=shlex.quote(point.workdir), flags=point.flags())
