"""The flag every science command shares (absl flags are defined once per process)."""

from absl import flags

OUT_DIR = flags.DEFINE_string("out_dir", None, "Where the command writes its files (each command says its default).")
