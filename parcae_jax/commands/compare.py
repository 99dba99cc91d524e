"""Parcae against its GPT at equal parameters and data (science/compare.py).

    python -m parcae_jax.commands.compare --out_dir=DIR [--base=tiny] [--steps=N]

Trains the base config and its derived GPT into DIR and writes compare.json, .csv and .png.
"""

from __future__ import annotations

import json

from parcae_jax.commands import cli, science_flags
from parcae_jax.commands.training_flags import BASE, STEPS, base_config
from parcae_jax.errors import UsageError
from parcae_jax.science.compare import compare


def main(argv: list[str]) -> None:
    cli.no_arguments(argv)
    out_dir = science_flags.out_dir("both runs, compare.json, .csv and .png")
    config = base_config()
    if config.model.arch != "parcae":
        raise UsageError(f"--base={BASE.value} is a {config.model.arch}; give the Parcae config (its GPT is derived)")
    if STEPS.value:
        config.train.steps = STEPS.value
    report = compare(config, out_dir)
    print(json.dumps({k: v for k, v in report.items() if k != "runs"}))


def run() -> None:
    """The `parcae-compare` command."""
    cli.run(main, __name__)


if __name__ == "__main__":
    run()
