"""The flags of the science commands that train from a base config (compare, stability);
defined here once, and only in the commands that use them."""

from absl import flags

BASE = flags.DEFINE_string("base", "tiny", "The training config the runs start from (a shipped name or path[:arg]).")
STEPS = flags.DEFINE_integer("steps", None, "Training steps per run (default: each command says).")
