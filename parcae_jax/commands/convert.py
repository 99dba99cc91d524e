"""Read an official checkpoint folder (config.json + model.safetensors / pytorch_model.bin /
model.pt, interop/convert.py): print the config it maps to, and with --out write it back in
the official format (a round trip through our parameter tree).

    python -m parcae_jax.commands.convert --reference=DIR                 # print the mapped config
    python -m parcae_jax.commands.convert --reference=DIR --out=OUT_DIR   # read, then write back

A run's checkpoint goes out with `python -m parcae_jax.commands.export`; official weights come
in as step 0 of a run with `python -m parcae_jax.main --mode=import --reference=DIR`.
"""

from __future__ import annotations

import json

from absl import flags

from parcae_jax.commands import cli
from parcae_jax.interop.convert import load_reference, save_reference

_REFERENCE = flags.DEFINE_string("reference", None, "Official checkpoint folder to read.", required=True)
_OUT = flags.DEFINE_string("out", None, "Write the weights back in the official format to this folder.")


def main(argv: list[str]) -> None:
    cli.no_arguments(argv)
    cfg, params = load_reference(_REFERENCE.value)
    if _OUT.value:
        save_reference(_OUT.value, cfg, params)
    summary = {k: v for k, v in cfg.to_dict().items() if k != "reference_config"}
    print(json.dumps({"model": summary, "written": _OUT.value}, indent=1))


def run() -> None:
    """The `parcae-convert` command."""
    cli.run(main, __name__)


if __name__ == "__main__":
    run()
