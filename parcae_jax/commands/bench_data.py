"""Input-pipeline benchmark (bench/data.py): preparation MB/s, loader tokens/s, and the tiny
model's appetite, as one JSON object.

    python -m parcae_jax.commands.bench_data [--out=bench_data.json]
"""

from __future__ import annotations

import json

from absl import flags

from parcae_jax.bench.data import measure
from parcae_jax.commands import cli

_OUT = flags.DEFINE_string("out", None, "Also write the JSON here.")
_BATCH = flags.DEFINE_integer("batch_size", 16, "Global batch (sequences) for the loader and the step.", lower_bound=1)
_STEPS = flags.DEFINE_integer("loader_batches", 200, "Batches timed per loader setting.", lower_bound=1)


def main(argv: list[str]) -> None:
    cli.no_arguments(argv)
    text = json.dumps(measure(_BATCH.value, _STEPS.value), indent=1)
    print(text)
    if _OUT.value:
        with open(_OUT.value, "w") as f:
            f.write(text)


def run() -> None:
    """The `parcae-bench-data` command."""
    cli.run(main, __name__)


if __name__ == "__main__":
    run()
