"""The flags of the science commands that train from a base config (compare, stability)."""

from absl import flags

BASE = flags.DEFINE_string("base", "tiny", "The training config the runs start from (a shipped name or path[:arg]).")
STEPS = flags.DEFINE_integer("steps", None, "Training steps per run (default: each command says).", lower_bound=1)


def base_config():
    """The --base config, loaded (ConfigFileError names what failed)."""
    from parcae_jax.training import config_files

    return config_files.load(config_files.shipped(BASE.value), flag="--base")
