"""The paper's claims reproduced at a size that fits the machine (science/report.py): a
sweep and its fit, Parcae against its GPT, the test-time curve and the stability
experiment, with a README.md of verdicts.

    python -m parcae_jax.commands.report --preset=toy --out_dir=DIR
"""

from __future__ import annotations

import json

from absl import flags

from parcae_jax.commands import cli, science_flags
from parcae_jax.science.report import PRESETS, report

_PRESET = flags.DEFINE_enum("preset", "toy", list(PRESETS), "Which sizes to run.")


def main(argv: list[str]) -> None:
    cli.no_arguments(argv)
    out_dir = science_flags.out_dir("every stage's folder and the report, README.md,")
    print(json.dumps(report(_PRESET.value, out_dir), indent=1))


def run() -> None:
    """The `parcae-report` command."""
    cli.run(main, __name__)


if __name__ == "__main__":
    run()
