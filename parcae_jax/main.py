"""Entry point: flags -> a validated config -> one mode (train | eval | describe | bench).

    python -m parcae_jax.main --config=configs/tiny.py --workdir=DIR            # train (the default mode)
    python -m parcae_jax.main --config=configs/1p3b.py --mode=describe
    python -m parcae_jax.main --config=configs/tiny.py --workdir=DIR --config.model.mean_recurrence=8
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "tiny.py")

# No default here: ml_collections would load it, with the overrides, while this module is
# imported, where a bad override cannot be turned into one line. _parse_flags adds it.
_CONFIG = config_flags.DEFINE_config_file("config", None, "ml_collections config file (path[:arg]); "
                                          "default configs/tiny.py.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and logs.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "describe", "bench"], "What to do.")


def fail(message: str) -> None:
    """One clear line on stderr and exit code 2: bad input is the user's to fix, not a crash."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _unknown_key(e: Exception, argv: list[str]) -> None:
    """An override of a key that no config declares (ml_collections raises KeyError or AttributeError)."""
    lines = str(e).replace("\\n", "\n").splitlines() or ["?"]  # KeyError's str() is a repr
    key, hint = lines[0].strip("'\"\\"), " ".join(lines[1:]).strip("' ")
    bad = [a.split("=")[0] for a in argv if a.startswith("--config.") and key in a.split("=")[0].split(".")]
    fail(f"{bad[0] if bad else key}: no such config key{' (' + hint + ')' if hint else ''}; "
         "every key is declared in configs/base.py")


def _parse_flags(argv: list[str]) -> list[str]:
    if not any(a == "--config" or a.startswith("--config=") for a in argv[1:]):
        argv = [argv[0], f"--config={_DEFAULT_CONFIG}", *argv[1:]]
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        fail(str(e).splitlines()[0])
    except OSError as e:  # a config file that failed to load, met by an override
        _cannot_load(e, argv)
    except SyntaxError as e:  # raised while the --config file is imported
        fail(f"--config={e.filename}: syntax error at line {e.lineno}: {e.msg}")
    except AttributeError as e:
        if "get_config" in str(e):
            config_file = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), "the --config file")
            fail(f"{config_file} has no get_config(); a config file defines get_config(arg=None) returning a "
                 "ConfigDict (see configs/tiny.py)")
        _unknown_key(e, argv)
    except KeyError as e:
        _unknown_key(e, argv)
    except (TypeError, ValueError) as e:
        fail(f"bad config override: {str(e).splitlines()[0]}")
    return []


def load_config():
    """The parsed config, or one line naming the file that failed to load."""
    try:
        config = _CONFIG.value
        config.to_dict()  # a config that failed to load raises on first attribute access
        return config
    except OSError as e:  # ml_collections defers file errors until first use
        _cannot_load(e, [f"--config={flags.FLAGS['config'].config_filename}"])


def _cannot_load(e: OSError, argv: list[str]) -> None:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    config_file = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), "?")
    fail(f"--config={config_file}: cannot load ({lines[-1]})")


def _user_errors() -> tuple[type[Exception], ...]:
    """The error types that mean bad input or a fixable environment (each message is one line).
    Imported only when something failed: the watcher parent of a multi-process run stays small."""
    from parcae_jax.checkpoint import CheckpointError
    from parcae_jax.data.readers import DataError
    from parcae_jax.distributed import DistributedError
    from parcae_jax.model.config import ConfigError
    from parcae_jax.resume import ResumeRefused
    from parcae_jax.storage import StorageError

    return ConfigError, DataError, StorageError, DistributedError, ResumeRefused, CheckpointError


def main(argv: list[str]) -> None:
    """The one error boundary: a user error is one line and exit 2; a run that only skipped
    steps exits 3; one stopped by a signal (after saving) 128 + signal; a bug shows its traceback."""
    from parcae_jax.preemption import Interrupted

    try:
        _main(argv)
    except Interrupted as e:  # saved and stopped: a distinct code, so that schedulers requeue
        sys.exit(128 + e.signum)
    except Exception as e:
        from parcae_jax.train import NonFiniteRun

        if isinstance(e, NonFiniteRun):
            print(f"error: {e}", file=sys.stderr)
            sys.exit(3)
        if isinstance(e, _user_errors()):
            fail(str(e))
        raise


def _main(argv: list[str]) -> None:
    from parcae_jax import distributed, supervise
    from parcae_jax.storage import make_dir
    from parcae_jax.validate import validate

    if len(argv) > 1:
        fail(f"unexpected arguments {argv[1:]}; settings go in flags such as --config.model.d_model=256")
    config = load_config()
    mode = _MODE.value
    if mode in ("train", "eval") and not _WORKDIR.value:
        fail(f"--mode={mode} needs --workdir=DIR (checkpoints, metrics and TensorBoard events go there)")
    logging.set_verbosity(logging.WARNING)  # orbax and grain are chatty at INFO
    if mode != "describe":
        if distributed.wanted(config.dist) and not supervise.is_child():
            explicit = distributed.explicit_coordinator(config.dist)
            who = f"process {explicit[2]} of {explicit[1]}" if explicit else "this process"
            sys.exit(supervise.run_child(sys.argv[1:], who))  # see supervise.py: a line if it dies
        supervise.set_phase("connecting")
        distributed.maybe_initialize(config.dist)
        supervise.set_phase("running")
    run = validate(config, check_data=mode in ("train", "eval"))
    if mode == "train":
        make_dir(_WORKDIR.value)  # after validation (bad input writes nothing), before compiling
    if mode != "describe":
        from parcae_jax import compile_cache

        compile_cache.enable(config.compilation_cache_dir, config.data.cache_dir)
    if mode == "describe":
        from parcae_jax.describe import describe

        print(json.dumps(describe(run.model), indent=1))
    elif mode == "bench":
        from parcae_jax.bench import bench

        print(json.dumps(bench(config, run)))
    elif mode == "eval":
        from parcae_jax.train import evaluate_checkpoint

        print(json.dumps(evaluate_checkpoint(config, _WORKDIR.value, run)))
    else:
        from parcae_jax.train import train

        train(config, _WORKDIR.value, run)


def run() -> None:
    app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    run()
