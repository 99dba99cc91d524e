"""Per-device memory of every published config on the machines people train on, estimated on
a CPU by compiling each point's sharded train step for a fake mesh (bench/memory_table.py).

    python -m parcae_jax.commands.memory_table --output=docs/memory_table.json
    python -m parcae_jax.commands.memory_table --targets=8xH100 --configs=140m,gpt_140m

Finished points are kept in the JSON and skipped on the next run; `--markdown` prints the
README table from it.
"""

from __future__ import annotations

import json
from pathlib import Path

from absl import flags

from parcae_jax.bench.memory_table import CONFIGS, TARGETS, extend, markdown
from parcae_jax.commands import cli
from parcae_jax.errors import UsageError

_OUTPUT = flags.DEFINE_string("output", "docs/memory_table.json", "JSON file of finished points (read, then extended).")
_TARGETS = flags.DEFINE_list("targets", list(TARGETS), f"Machines among {', '.join(TARGETS)}.")
_CONFIGS = flags.DEFINE_list("configs", list(CONFIGS), "Shipped config names.")
_MARKDOWN = flags.DEFINE_bool("markdown", False, "Only print the Markdown table of the finished points.")


def main(argv: list[str]) -> None:
    cli.no_arguments(argv)
    path = Path(_OUTPUT.value)
    if _MARKDOWN.value:
        points = json.loads(path.read_text()) if path.exists() else []
    else:
        unknown = sorted(set(_TARGETS.value) - set(TARGETS))
        if unknown:
            raise UsageError(f"unknown --targets {unknown}; choose among {', '.join(TARGETS)}")
        points = extend(path, _TARGETS.value, _CONFIGS.value)
    print(markdown(points))


def run() -> None:
    """The `parcae-memory-table` command."""
    cli.run(main, __name__)


if __name__ == "__main__":
    run()
