"""The flag every science command shares (absl flags are defined once per process)."""

from absl import flags

OUT_DIR = flags.DEFINE_string("out_dir", None, "Where the command writes its files (each command says its default).")
BASE = flags.DEFINE_string("base", "tiny", "The training config the runs start from (a shipped name or path[:arg]).")
STEPS = flags.DEFINE_integer("steps", None, "Training steps per run (default: each command says).")
