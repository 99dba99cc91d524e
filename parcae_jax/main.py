"""Entry point: flags -> a validated config -> one mode (train | eval | describe | bench | import).

    python -m parcae_jax.main --config=configs/tiny.py --workdir=DIR            # train (the default mode)
    python -m parcae_jax.main --config=configs/1p3b.py --mode=describe
    python -m parcae_jax.main --config=configs/tiny.py --workdir=DIR --config.model.mean_recurrence=8

`parcae-train` is the same command once the package is installed. --config takes a config
file, or the name of a shipped one (`tiny`, `1p3b`, `gpt_370m`, ...) from any folder.
"""

from __future__ import annotations

import json
import os
import re
import sys

from absl import flags
from ml_collections import config_flags

from parcae_jax.commands import cli
from parcae_jax.errors import UsageError, first_line
from parcae_jax.training import config_files

_DEFAULT_CONFIG = "tiny"  # a shipped config (see config_files.shipped)

# No default here: ml_collections would load it, with the overrides, while this module is
# imported, where a bad override cannot be turned into one line. _parse_flags adds it.
_CONFIG = config_flags.DEFINE_config_file("config", None, "ml_collections config file (path[:arg]) or a shipped "
                                          "config's name (tiny, 1p3b, ...); default tiny.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and logs.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "describe", "bench", "import"], "What to do.")
_REFERENCE = flags.DEFINE_string("reference", None,
                                 "--mode=import: an official checkpoint folder to start the run from.")


# How ml_collections recognises the config file flag and its overrides in argv (config_flags.py):
# --config=PATH[:ARG] or --config PATH, and --config.a.b[=V] or --noconfig.a.b (a boolean).
_CONFIG_FLAG = re.compile(r"-{1,2}config(=|$)")
_OVERRIDE = re.compile(r"-{1,2}(no)?config\.")


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing for app.run, with every mistake in --config and its overrides one line.

    The config file is loaded and each --config.a.b override's key looked up here, before absl
    and ml_collections parse: what went wrong is then known from where it failed, never guessed
    from the text of an exception ml_collections raised."""
    with cli.error_boundary():  # app.run parses before it calls main, outside main's boundary
        return _parse(argv)


def _parse(argv: list[str]) -> list[str]:
    try:  # ml_collections reads overrides in --flagfile files too: check those as well
        args = flags.FLAGS.read_flags_from_files(argv[1:], force_gnu=False)
    except flags.Error as e:
        raise UsageError(first_line(e)) from None
    given = _config_values(args)
    if not given:  # the default, added here rather than by DEFINE_config_file (see _CONFIG)
        given = [config_files.shipped(_DEFAULT_CONFIG)]
        args = [f"--config={given[-1]}", *args]
    elif given[-1] is not None and (path := config_files.shipped(given[-1])) != given[-1]:  # a shipped config's name
        args, given[-1] = _with_config(args, path), path
    if given[-1] is not None:  # absl keeps the last; a bare --config at the end is absl's to report
        config = config_files.load(given[-1])
        for arg in args:  # all, even after '--': ml_collections reads every one
            if _OVERRIDE.match(arg):
                config_files.check_key(config, arg.split("=", 1)[0])
    try:
        return flags.FLAGS([argv[0], *args])
    except flags.Error as e:  # absl's own: a missing or malformed value, an unknown flag
        raise UsageError(first_line(e)) from None
    except (TypeError, ValueError) as e:  # a value ml_collections cannot use for its key
        raise UsageError(f"bad config override: {first_line(e)}") from None


def _with_config(args: list[str], value: str) -> list[str]:
    """args with the value of the last --config (the one absl keeps) replaced, in place: the
    overrides after it must apply to the file it names."""
    end = args.index("--") if "--" in args else len(args)
    i = max(j for j in range(end) if _CONFIG_FLAG.match(args[j]))
    if "=" in args[i]:
        return [*args[:i], f"{args[i].split('=', 1)[0]}={value}", *args[i + 1:]]
    return [*args[:i + 1], value, *args[i + 2:]]


def _config_values(args: list[str]) -> list[str | None]:
    """Each value given to --config, in order (None: a bare --config with nothing after it)."""
    values = []
    for i, arg in enumerate(args):
        if arg == "--":  # absl takes nothing after it as a flag
            break
        if _CONFIG_FLAG.match(arg):
            values.append(arg.split("=", 1)[1] if "=" in arg else (args[i + 1] if i + 1 < len(args) else None))
    return values


def load_config():
    """The parsed config, or one line naming the file that failed to load."""
    try:
        config = _CONFIG.value
        config.to_dict()  # a config that failed to load raises on first attribute access
        return config
    except OSError as e:  # ml_collections defers file errors until first use
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        raise UsageError(f"--config={flags.FLAGS['config'].config_filename}: cannot load ({lines[-1]})") from None


def main(argv: list[str]) -> None:
    """Runs one mode (inside cli's error boundary: a user error is one line and exit 2; a run
    that only skipped steps exits 3; one stopped by a signal after saving, 128 + signal)."""
    from parcae_jax.runtime import distributed, supervise
    from parcae_jax.storage import make_dir
    from parcae_jax.training.validate import validate

    if len(argv) > 1:
        raise UsageError(f"unexpected arguments {argv[1:]}; settings go in flags such as --config.model.d_model=256")
    config = load_config()
    mode = _MODE.value
    if mode in ("train", "eval", "import") and not _WORKDIR.value:
        raise UsageError(f"--mode={mode} needs --workdir=DIR (checkpoints, metrics and TensorBoard events go there)")
    if (mode == "import") != bool(_REFERENCE.value):
        raise UsageError("--reference=DIR goes with --mode=import, and --mode=import needs one")
    if mode != "describe":
        if distributed.wanted(config.dist) and not supervise.is_child():
            explicit = distributed.explicit_coordinator(config.dist)
            who = f"process {explicit[2]} of {explicit[1]}" if explicit else "this process"
            sys.exit(supervise.run_child(sys.argv[1:], who))  # see supervise.py: a line if it dies
        supervise.set_phase("connecting")
        distributed.maybe_initialize(config.dist)
        supervise.set_phase("running")
    _check_backend()
    run = validate(config, check_data=mode in ("train", "eval", "import"))
    if mode == "train":
        make_dir(_WORKDIR.value)  # after validation (bad input writes nothing), before compiling
    if mode != "describe":
        from parcae_jax.runtime import compile_cache

        compile_cache.enable(config.compilation_cache_dir, config.data.cache_dir)
    if mode == "describe":
        from parcae_jax.training.describe import describe

        print(json.dumps(describe(run.model), indent=1))
    elif mode == "bench":
        from parcae_jax.bench.step import bench

        print(json.dumps(bench(config, run)))
    elif mode == "import":
        from parcae_jax.interop.transfer import import_reference

        print(json.dumps(import_reference(config, _WORKDIR.value, run, _REFERENCE.value)))
    elif mode == "eval":
        from parcae_jax.training.train import evaluate_checkpoint

        print(json.dumps(evaluate_checkpoint(config, _WORKDIR.value, run)))
    else:
        from parcae_jax.training.train import train

        train(config, _WORKDIR.value, run)


def _check_backend() -> None:
    """One line when the platform asked for is not on this machine (JAX_PLATFORMS=tpu on a
    CPU host raises from deep inside jax's backend start-up)."""
    import jax

    try:
        jax.devices()
    except (RuntimeError, AssertionError) as e:  # a platform without its plugin fails an assert in jax
        if not os.environ.get("JAX_PLATFORMS") or (isinstance(e, RuntimeError)
                                                   and "Unable to initialize backend" not in str(e)):
            raise
        why = (first_line(e) if str(e) else "no backend for it is installed").split(
            " (set JAX_PLATFORMS")[0]
        raise UsageError(f"JAX_PLATFORMS={os.environ.get('JAX_PLATFORMS', '')}: {why}; unset JAX_PLATFORMS to use "
                         "what this machine has, or install the matching jax extra (jax[tpu], jax[cuda12])") from None


def run() -> None:
    """The `parcae-train` command (also `python -m parcae_jax.main`)."""
    cli.run(main, __name__, flags_parser=_parse_flags)


if __name__ == "__main__":
    run()
