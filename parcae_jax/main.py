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
from typing import NoReturn

from absl import flags, logging
from ml_collections import config_dict, config_flags

_DEFAULT_CONFIG = "tiny"  # a shipped config (see _shipped)

# No default here: ml_collections would load it, with the overrides, while this module is
# imported, where a bad override cannot be turned into one line. _parse_flags adds it.
_CONFIG = config_flags.DEFINE_config_file("config", None, "ml_collections config file (path[:arg]) or a shipped "
                                          "config's name (tiny, 1p3b, ...); default tiny.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and logs.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "describe", "bench", "import"], "What to do.")
_REFERENCE = flags.DEFINE_string("reference", None, "--mode=import: an official checkpoint folder to start the run from.")


def fail(message: str) -> NoReturn:
    """One clear line on stderr and exit code 2: bad input is the user's to fix, not a crash."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


# How ml_collections recognises the config file flag and its overrides in argv (config_flags.py):
# --config=PATH[:ARG] or --config PATH, and --config.a.b[=V] or --noconfig.a.b (a boolean).
_CONFIG_FLAG = re.compile(r"-{1,2}config(=|$)")
_OVERRIDE = re.compile(r"-{1,2}(no)?config\.")


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing for app.run, with every mistake in --config and its overrides one line.

    The config file is loaded and each --config.a.b override's key looked up here, before absl
    and ml_collections parse: what went wrong is then known from where it failed, never guessed
    from the text of an exception ml_collections raised."""
    try:  # ml_collections reads overrides in --flagfile files too: check those as well
        args = flags.FLAGS.read_flags_from_files(argv[1:], force_gnu=False)
    except flags.Error as e:
        fail(_first_line(e))
    given = _config_values(args)
    if not given:  # the default, added here rather than by DEFINE_config_file (see _CONFIG)
        given = [_shipped(_DEFAULT_CONFIG)]
        args = [f"--config={given[-1]}", *args]
    elif given[-1] is not None and (path := _shipped(given[-1])) != given[-1]:  # a shipped config's name
        args, given[-1] = _with_config(args, path), path
    if given[-1] is not None:  # absl keeps the last; a bare --config at the end is absl's to report
        config = _load_config(given[-1])
        for arg in args:  # all, even after '--': ml_collections reads every one
            if _OVERRIDE.match(arg):
                _check_key(config, arg.split("=", 1)[0])
    try:
        return flags.FLAGS([argv[0], *args])
    except flags.Error as e:  # absl's own: a missing or malformed value, an unknown flag
        fail(_first_line(e))
    except (TypeError, ValueError) as e:  # a value ml_collections cannot use for its key
        fail(f"bad config override: {_first_line(e)}")


def _with_config(args: list[str], value: str) -> list[str]:
    """args with the value of the last --config (the one absl keeps) replaced, in place: the
    overrides after it must apply to the file it names."""
    end = args.index("--") if "--" in args else len(args)
    i = max(j for j in range(end) if _CONFIG_FLAG.match(args[j]))
    if "=" in args[i]:
        return [*args[:i], f"{args[i].split('=', 1)[0]}={value}", *args[i + 1:]]
    return [*args[:i + 1], value, *args[i + 2:]]


def _shipped(value: str) -> str:
    """`NAME[:ARG]`, `NAME.py` or `configs/NAME.py` that is not a file here: the shipped config
    of that name (parcae_jax.defaults.shipped_config), so configs are found from any folder."""
    path, sep, arg = value.partition(":")
    name = os.path.basename(path).removesuffix(".py")
    if os.path.exists(path) or path not in (name, f"{name}.py", f"configs/{name}.py"):
        return value
    from parcae_jax.defaults import shipped_config

    shipped = shipped_config(name)
    return shipped + sep + arg if shipped else value


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _config_values(args: list[str]) -> list[str | None]:
    """Each value given to --config, in order (None: a bare --config with nothing after it)."""
    values = []
    for i, arg in enumerate(args):
        if arg == "--":  # absl takes nothing after it as a flag
            break
        if _CONFIG_FLAG.match(arg):
            values.append(arg.split("=", 1)[1] if "=" in arg else (args[i + 1] if i + 1 < len(args) else None))
    return values


def _load_config(value: str) -> config_dict.ConfigDict:
    """The config that --config=PATH[:ARG] names, loaded as ml_collections does (the file as a
    module, then get_config(ARG), or get_config() without a colon), or one line saying why not."""
    import importlib.machinery
    import importlib.util

    path, *arg = value.split(":", 1)
    name = "_parcae_config_file"
    spec = importlib.util.spec_from_file_location(name, path, loader=importlib.machinery.SourceFileLoader(name, path))
    try:
        code = spec.loader.get_code(name)
    except SyntaxError as e:
        where = "" if e.filename == path else f" of {e.filename}"
        fail(f"--config={value}: syntax error at line {e.lineno}{where}: {e.msg}")
    except (OSError, ValueError) as e:  # missing, unreadable, a folder; ValueError: NUL bytes
        fail(f"--config={value}: cannot load ({getattr(e, 'strerror', None) or e})")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses defined in a config file look their module up there
    try:
        try:
            exec(code, module.__dict__)
        except Exception as e:
            fail(f"--config={value}: loading it raised {_raised(e, path)}")
        get_config = getattr(module, "get_config", None)
        if not callable(get_config):
            fail(f"--config={value} has no get_config(); a config file defines get_config(arg=None) "
                 "returning a ConfigDict (see configs/tiny.py)")
        try:
            config = get_config(*arg)
        except Exception as e:
            fail(f"--config={value}: get_config({', '.join(map(repr, arg))}) raised {_raised(e, path)}")
    finally:
        sys.modules.pop(name, None)
    if not isinstance(config, config_dict.ConfigDict):
        fail(f"--config={value}: get_config() returned {type(config).__name__}, not a ConfigDict")
    return config


def _raised(e: Exception, path: str) -> str:
    """'ValueError at line 12: ...', the line being the config file's last in the traceback."""
    import traceback

    lines = [frame.lineno for frame in traceback.extract_tb(e.__traceback__) if frame.filename == path]
    return f"{type(e).__name__}{f' at line {lines[-1]}' if lines else ''}: {_first_line(e)}"


def _check_key(config: config_dict.ConfigDict, flag: str) -> None:
    """Fails unless the key path of an override (flag: --config.a.b, no value) is in the config."""
    from ml_collections.config_flags import config_path

    try:  # split as ml_collections will: a.b, or a["b"]
        parts = config_path.split(flag.split(".", 1)[1])
    except ValueError:  # not a key path at all, e.g. --config.model.1x
        parts = ()
    node, depth = config, 0
    while depth < len(parts) and _has(node, parts[depth]):
        node, depth = node[parts[depth]], depth + 1
    if parts and depth == len(parts):
        return
    hint = ""
    if depth < len(parts) and isinstance(node, config_dict.ConfigDict) and all(isinstance(p, str) for p in parts):
        import difflib

        close = difflib.get_close_matches(parts[depth], list(node.keys()), n=1)
        if close:  # the same flag with the one mistyped key replaced
            hint = f" (did you mean {'.'.join([flag.split('.', 1)[0], *parts[:depth], close[0], *parts[depth + 1:]])}?)"
    fail(f"{flag}: no such config key{hint}; every key is declared in parcae_jax/defaults.py")


def _has(node: object, key: object) -> bool:
    return isinstance(node, config_dict.ConfigDict) and isinstance(key, str) and key in node


def load_config():
    """The parsed config, or one line naming the file that failed to load."""
    try:
        config = _CONFIG.value
        config.to_dict()  # a config that failed to load raises on first attribute access
        return config
    except OSError as e:  # ml_collections defers file errors until first use
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        fail(f"--config={flags.FLAGS['config'].config_filename}: cannot load ({lines[-1]})")


def _user_errors() -> tuple[type[Exception], ...]:
    """The error types that mean bad input or a fixable environment (each message is one line).
    Imported only when something failed: the watcher parent of a multi-process run stays small."""
    from parcae_jax.checkpoint import CheckpointError
    from parcae_jax.data.readers import DataError
    from parcae_jax.distributed import DistributedError
    from parcae_jax.model.config import ConfigError
    from parcae_jax.reference_config import ConversionError
    from parcae_jax.resume import ResumeRefused
    from parcae_jax.storage import StorageError

    return ConfigError, DataError, StorageError, DistributedError, ResumeRefused, CheckpointError, ConversionError


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
    if mode in ("train", "eval", "import") and not _WORKDIR.value:
        fail(f"--mode={mode} needs --workdir=DIR (checkpoints, metrics and TensorBoard events go there)")
    if (mode == "import") != bool(_REFERENCE.value):
        fail("--reference=DIR goes with --mode=import (python -m parcae_jax.convert import ...), and it needs one")
    logging.set_verbosity(logging.WARNING)  # orbax and grain are chatty at INFO
    if mode != "describe":
        if distributed.wanted(config.dist) and not supervise.is_child():
            explicit = distributed.explicit_coordinator(config.dist)
            who = f"process {explicit[2]} of {explicit[1]}" if explicit else "this process"
            sys.exit(supervise.run_child(sys.argv[1:], who))  # see supervise.py: a line if it dies
        supervise.set_phase("connecting")
        distributed.maybe_initialize(config.dist)
        supervise.set_phase("running")
    run = validate(config, check_data=mode in ("train", "eval", "import"))
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
    elif mode == "import":
        from parcae_jax.transfer import import_reference

        print(json.dumps(import_reference(config, _WORKDIR.value, run, _REFERENCE.value)))
    elif mode == "eval":
        from parcae_jax.train import evaluate_checkpoint

        print(json.dumps(evaluate_checkpoint(config, _WORKDIR.value, run)))
    else:
        from parcae_jax.train import train

        train(config, _WORKDIR.value, run)


def run() -> None:
    """The `parcae-train` command (also `python -m parcae_jax.main`)."""
    from parcae_jax import cli

    cli.run(main, __name__, flags_parser=_parse_flags)


if __name__ == "__main__":
    run()
