"""Write a checkpoint of a training run as an official folder (config.json +
model.safetensors), loadable by the official `from_pretrained` (interop/transfer.py).

    python -m parcae_jax.commands.export --workdir=RUN [--step=N] --output=DIR
"""

from __future__ import annotations

import json

from absl import flags

from parcae_jax.commands import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "The training run (local or gs://).", required=True)
_STEP = flags.DEFINE_integer("step", None, "The checkpoint to export (default: the newest).", lower_bound=0)
_OUTPUT = flags.DEFINE_string("output", None, "A new or empty folder.", required=True)


def main(argv: list[str]) -> None:
    cli.no_arguments(argv)
    from parcae_jax.interop.transfer import export_run  # orbax and the trainer: after the flags are checked

    print(json.dumps(export_run(_WORKDIR.value, _OUTPUT.value, _STEP.value)))


def run() -> None:
    """The `parcae-export` command."""
    cli.run(main, __name__)


if __name__ == "__main__":
    run()
