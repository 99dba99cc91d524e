"""The flags that name a corpus's documents, shared by `prepare` and `train_tokenizer`."""

from __future__ import annotations

from absl import flags

from parcae_jax.data.readers import Inputs

_INPUT = flags.DEFINE_multi_string("input", [], "Input files, directories or glob patterns (repeatable).")
_TEXT_FIELD = flags.DEFINE_string("text_field", "text", "JSON field / parquet column / TFDS feature holding the text.")
_TFDS = flags.DEFINE_string("tfds", None, "Read this TFDS dataset (array_record format) instead of --input.")
_TFDS_SPLIT = flags.DEFINE_string("tfds_split", "train", "TFDS split.")
_TFDS_DATA_DIR = flags.DEFINE_string("tfds_data_dir", None, "TFDS data_dir.")


def inputs() -> Inputs:
    """What the flags name."""
    return Inputs(tuple(_INPUT.value), _TEXT_FIELD.value, _TFDS.value, _TFDS_SPLIT.value, _TFDS_DATA_DIR.value)
