"""Parcae against its GPT at equal parameters and tokens, one command.

    python -m parcae_jax.commands.compare --out_dir=DIR [--base=tiny] [--steps=N]

The GPT is `base` with arch=gpt and n_layers = n_prelude + n_core + n_coda: the same blocks
once each, as the published baselines (configs/gpt_*.py), so the two differ only by the loop
(the injection and the adapter C are Parcae's few extra parameters). Both train on the same
data for the same steps and batch (equal tokens) in DIR/parcae and DIR/gpt; a finished run
is read back, an interrupted one resumes, a folder of other settings is refused. Writes
DIR/compare.csv (parameters, tokens, executed FLOPs, final validation loss), compare.json
(the same, with Parcae's loss at every evaluated recurrence and both curves) and
compare.png (validation loss against step and against training FLOPs). Bad input is one
line and exit code 2.
"""

from __future__ import annotations

import copy
import json

from parcae_jax.runtime.metrics import eval_key, read_rows
from parcae_jax.science import provenance
from parcae_jax.science.tables import write_csv


def gpt_of(parcae_config):
    """The GPT twin of a Parcae training config (module docstring)."""
    config = copy.deepcopy(parcae_config)
    m = config.model
    config.model.update(arch="gpt", n_layers=m.n_prelude + m.n_core + m.n_coda)
    return config


def finished(workdir: str, steps: int) -> bool:
    """Whether the run in workdir logged its evaluation at its final step."""
    return any(r.get("step") == steps and any(k.startswith("eval/loss") for k in r) for r in read_rows(workdir))


def summary(config, workdir: str) -> dict:
    """Parameters, tokens, FLOPs and the validation losses a finished run logged."""
    from parcae_jax.model.config import ModelConfig
    from parcae_jax.training.describe import describe

    info = describe(ModelConfig.from_mapping(config.model))
    steps = config.train.steps
    tokens = steps * config.train.batch_size * config.model.seq_len
    evals = [r for r in read_rows(workdir) if any(k.startswith("eval/loss") for k in r)]
    last = evals[-1] if evals else {}
    arch = config.model.arch
    main_key = eval_key(arch, config.model.mean_recurrence)
    return {"arch": arch, "params": info["params_total"], "tokens": tokens,
            "flops_per_token": info["flops_per_token"], "flops": info["flops_per_token"] * tokens,
            "mean_recurrence": config.model.mean_recurrence if arch == "parcae" else None,
            "val_loss": last.get(main_key), "val_losses": {k: v for k, v in last.items() if k.startswith("eval/loss")},
            "curve": [{"step": r["step"], "val_loss": r[main_key]} for r in evals if main_key in r]}


def compare(config, out_dir: str) -> dict:
    """Trains (or reads back) the Parcae `config` and its GPT in out_dir, then writes the
    JSON, CSV and figure; returns the JSON's content."""
    from parcae_jax import storage
    from parcae_jax.science import plots
    from parcae_jax.training.train import train
    from parcae_jax.training.validate import validate

    config = copy.deepcopy(config)
    config.train.eval_every = config.train.eval_every or config.train.steps
    runs = (("parcae", config), ("gpt", gpt_of(config)))
    for name, c in runs:  # refuse a folder of other settings before training anything
        provenance.refuse_other(f"{out_dir}/{name}", c)
    results = []
    for name, c in runs:
        workdir = f"{out_dir}/{name}"
        run = validate(c)
        if not finished(workdir, c.train.steps):
            train(c, workdir, run)
        results.append(summary(c, workdir))
        print(json.dumps({k: results[-1][k] for k in ("arch", "params", "tokens", "flops", "val_loss")}), flush=True)
    out = storage.resolve(out_dir)
    parcae, gpt = results
    report = {"runs": results, "params_ratio": parcae["params"] / gpt["params"],
              "loss_difference": (parcae["val_loss"] - gpt["val_loss"])
              if None not in (parcae["val_loss"], gpt["val_loss"]) else None}
    (out / "compare.json").write_text(json.dumps(report, indent=1))
    columns = ["arch", "params", "tokens", "flops_per_token", "flops", "val_loss"]
    write_csv(out / "compare.csv", columns, ([r[c] for c in columns] for r in results))
    plots.compare(results, str(out / "compare.png"))
    return report


if __name__ == "__main__":  # an old command line: say where the command went instead of doing nothing
    from parcae_jax.errors import moved

    moved("parcae_jax.commands.compare")
