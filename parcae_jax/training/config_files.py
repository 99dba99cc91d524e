"""Loading an ml_collections config file (`path[:arg]` or a shipped config's name) and
checking an override's key path, each failure one ConfigFileError line naming the fix.
Used by `main` (--config) and by the science sweeps (their base configs)."""

from __future__ import annotations

import os
import sys

from ml_collections import config_dict

from parcae_jax.errors import UserError, first_line


class ConfigFileError(UserError, ValueError):
    """A config file that cannot be loaded, or an override naming no key (one line)."""


def shipped(value: str) -> str:
    """`NAME[:ARG]`, `NAME.py` or `configs/NAME.py` that is not a file here: the shipped config
    of that name (parcae_jax.training.defaults.shipped_config), so configs are found from any folder."""
    path, sep, arg = value.partition(":")
    name = os.path.basename(path).removesuffix(".py")
    if os.path.exists(path) or path not in (name, f"{name}.py", f"configs/{name}.py"):
        return value
    from parcae_jax.training.defaults import shipped_config

    shipped = shipped_config(name)
    return shipped + sep + arg if shipped else value


def load(value: str, flag: str = "--config") -> config_dict.ConfigDict:
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
        raise ConfigFileError(f"{flag}={value}: syntax error at line {e.lineno}{where}: {e.msg}") from None
    except (OSError, ValueError) as e:  # missing, unreadable, a folder; ValueError: NUL bytes
        raise ConfigFileError(f"{flag}={value}: cannot load ({getattr(e, 'strerror', None) or e})") from None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses defined in a config file look their module up there
    try:
        try:
            exec(code, module.__dict__)
        except Exception as e:
            raise ConfigFileError(f"{flag}={value}: loading it raised {_raised(e, path)}") from None
        get_config = getattr(module, "get_config", None)
        if not callable(get_config):
            raise ConfigFileError(f"{flag}={value} has no get_config(); a config file defines get_config(arg=None) "
                                  "returning a ConfigDict (see configs/tiny.py)")
        try:
            config = get_config(*arg)
        except Exception as e:
            raise ConfigFileError(f"{flag}={value}: get_config({', '.join(map(repr, arg))}) "
                                  f"raised {_raised(e, path)}") from None
    finally:
        sys.modules.pop(name, None)
    if not isinstance(config, config_dict.ConfigDict):
        raise ConfigFileError(f"{flag}={value}: get_config() returned {type(config).__name__}, not a ConfigDict")
    return config


def _raised(e: Exception, path: str) -> str:
    """'ValueError at line 12: ...', the line being the config file's last in the traceback."""
    import traceback

    lines = [frame.lineno for frame in traceback.extract_tb(e.__traceback__) if frame.filename == path]
    return f"{type(e).__name__}{f' at line {lines[-1]}' if lines else ''}: {first_line(e)}"


def check_key(config: config_dict.ConfigDict, flag: str) -> None:
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
    raise ConfigFileError(f"{flag}: no such config key{hint}; every key is declared in parcae_jax/training/defaults.py")


def _has(node: object, key: object) -> bool:
    return isinstance(node, config_dict.ConfigDict) and isinstance(key, str) and key in node
