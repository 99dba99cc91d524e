"""What every command shares: flag parsing, `--help`, logging and the one error boundary.

    def main(argv): ...
    if __name__ == "__main__":
        cli.run(main, __name__)

- Flags are absl's (ml_collections' for a config); a bad flag (unknown, wrong type, missing
  value, out of range) is one `error:` line and exit 2, not absl's FATAL message and exit 1.
- `--help` prints the command's docstring and the flags its module defined (absl's own left
  out) to stdout and exits 0; absl would print `__main__`'s, which under a console script is
  pip's wrapper, and exit 1.
- Past `--help`, a command on a CPU host re-executes itself once with glibc's malloc asking for
  transparent huge pages and our big-buffer allocator preloaded (runtime/huge_pages.py,
  runtime/buffer_reuse.py: XLA:CPU's per-call buffers then fault 2 MiB at a time, and are
  kept mapped between calls rather than zeroed afresh).
- Every command logs at WARNING unless --verbosity is given: orbax, grain and TFDS log each
  open, read and lookup at INFO (hundreds of lines a checkpoint).
- The error boundary: a `UserError` (errors.py; every user-facing error derives from it) is
  its first line after `error:` and its exit code (2; 3 for a run stopped by non-finite steps);
  a run stopped by a signal after saving exits 128 + the signal, so that a scheduler requeues
  it; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Callable, Iterator

from absl import app, flags, logging

from parcae_jax.errors import UsageError, UserError, first_line
from parcae_jax.runtime import huge_pages

HELP = ("-h", "-help", "--help", "-?", "--helpshort")


def run(main: Callable[[list[str]], None], module_name: str, flags_parser: Callable | None = None) -> None:
    """`app.run(main)` for the command in module `module_name` (pass `__name__`)."""
    args = sys.argv[1:sys.argv.index("--")] if "--" in sys.argv else sys.argv[1:]
    if any(a in HELP for a in args):
        print(help_text(module_name))
        sys.exit(0)
    # before the command computes; only when it is this process's program (`python -m`, a script
    # or a parcae-* console script), not a run() another program calls in its own process
    huge_pages.reexec_if_wanted(module_name == "__main__" or os.path.basename(sys.argv[0]).startswith("parcae-"))

    def bounded_main(argv: list[str]) -> None:
        if not flags.FLAGS["verbosity"].present:
            logging.set_verbosity(logging.WARNING)
        with error_boundary():
            main(argv)

    app.run(bounded_main, flags_parser=flags_parser or parse_flags)


@contextlib.contextmanager
def error_boundary() -> Iterator[None]:
    """A UserError becomes one line on stderr and its exit code; Interrupted (a run saved and
    stopped by a signal) exits 128 + the signal; anything else propagates with its traceback."""
    from parcae_jax.runtime.preemption import Interrupted

    try:
        yield
    except Interrupted as e:
        sys.exit(128 + e.signum)
    except UserError as e:
        print(f"error: {first_line(e)}", file=sys.stderr)
        sys.exit(e.exit_code)


def no_arguments(argv: list[str]) -> None:
    """Commands take flags only: a stray word is one line naming the flag form."""
    if len(argv) > 1:
        raise UsageError(f"unexpected arguments {argv[1:]}; this command takes flags only (see --help)")


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing, with a bad flag one `error:` line and exit 2 like every other user error."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        print(f"error: {first_line(e)}", file=sys.stderr)
        sys.exit(2)


def help_text(module_name: str) -> str:
    """The module's docstring, then the flags defined by parcae_jax modules (absl's own left out)."""
    doc = (sys.modules[module_name].__doc__ or "").strip()
    # absl files the flags of `python -m` modules under sys.argv[0], the others under their name.
    mine = [m for m in flags.FLAGS.flags_by_module_dict() if "parcae_jax" in m or m == sys.argv[0]]
    return "\n\n".join([doc, *(flags.FLAGS.module_help(m) for m in mine), "--helpfull lists absl's flags too."])
