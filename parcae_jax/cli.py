"""Running an absl program as a console script (`parcae-train`, ...) or with `python -m`.

absl's `--help` prints the docstring of `__main__` and its flags, then exits 1; under a console
script `__main__` is pip's wrapper, so the help would be empty. Here `--help` prints the
program's docstring and every parcae_jax flag it defines to stdout and exits 0.
"""

from __future__ import annotations

import sys
from typing import Callable

from absl import app, flags, logging

HELP = ("-h", "-help", "--help", "-?", "--helpshort")


def run(main: Callable[[list[str]], None], module_name: str, flags_parser: Callable | None = None) -> None:
    """`app.run(main)` for the program in module `module_name` (pass `__name__`)."""
    args = sys.argv[1:sys.argv.index("--")] if "--" in sys.argv else sys.argv[1:]
    if any(a in HELP for a in args):
        print(help_text(module_name))
        sys.exit(0)
    app.run(_quiet(main), flags_parser=flags_parser or parse_flags)


def _quiet(main: Callable[[list[str]], None]) -> Callable[[list[str]], None]:
    """Every command logs at WARNING unless --verbosity is given: orbax, grain and TFDS log each
    open, read and lookup at INFO (hundreds of lines a checkpoint)."""
    def quiet_main(argv: list[str]) -> None:
        if not flags.FLAGS["verbosity"].present:
            logging.set_verbosity(logging.WARNING)
        return main(argv)

    return quiet_main


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing, with a bad flag (unknown, wrong type, missing value) one `error:` line and
    exit 2 like every other user error, instead of absl's FATAL message and exit 1."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        print(f"error: {(str(e).strip().splitlines() or [type(e).__name__])[0]}", file=sys.stderr)
        sys.exit(2)


def help_text(module_name: str) -> str:
    """The module's docstring, then the flags defined by parcae_jax modules (absl's own left out)."""
    doc = (sys.modules[module_name].__doc__ or "").strip()
    # absl files the flags of `python -m` modules under sys.argv[0], the others under their name.
    mine = [m for m in flags.FLAGS.flags_by_module_dict() if "parcae_jax" in m or m == sys.argv[0]]
    return "\n\n".join([doc, *(flags.FLAGS.module_help(m) for m in mine), "--helpfull lists absl's flags too."])
