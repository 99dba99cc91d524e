"""Tokenise documents into ArrayRecord shards plus a JSON manifest (data/prepare.py).

    python -m parcae_jax.commands.prepare --input=DIR_OR_FILES --output=OUT --tokenizer=bytes|tokenizer.json|x.model

`--output` may be gs://: the shards are prepared on local disk, then uploaded (the manifest
last). Prints each split's documents and tokens as JSON.
"""

from __future__ import annotations

import json
import os

from absl import flags

from parcae_jax import storage
from parcae_jax.commands import cli, corpus_flags
from parcae_jax.data import staging
from parcae_jax.data.corpus import default_cache_dir
from parcae_jax.data.prepare import DOCS_PER_SHARD, SPLITS, VAL_EVERY, prepare
from parcae_jax.data.readers import documents, input_fingerprint

_OUTPUT = flags.DEFINE_string("output", None, "Directory for shards and manifest.json (local or gs://).", required=True)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace a preparation of another input or settings in --output.")
_TOKENIZER = flags.DEFINE_string("tokenizer", "bytes",
                                 "bytes | path to tokenizer.json | path to a SentencePiece .model")
_EOD = flags.DEFINE_string("eod_token", None, "End-of-document token, if not <|endoftext|> (or the SentencePiece EOS).")
_DOCS_PER_SHARD = flags.DEFINE_integer("docs_per_shard", DOCS_PER_SHARD, "Documents per shard.", lower_bound=1)
_VAL_EVERY = flags.DEFINE_integer("val_every", VAL_EVERY, "Hold out about 1 in val_every documents, by a hash of "
                                  "their text (0: none).", lower_bound=0)
_WORKERS = flags.DEFINE_integer("workers", os.cpu_count() or 1, "Tokenizer worker processes (0: in this process).",
                                lower_bound=0)


def main(argv: list[str]) -> None:
    cli.no_arguments(argv)
    inputs = corpus_flags.inputs()
    docs = documents(inputs)
    output = _OUTPUT.value
    if storage.is_remote(output):  # prepared on local disk, then uploaded (manifest last)
        storage.make_dir(output)  # a missing bucket fails now, not after the work
        output = staging.local_for(output, default_cache_dir())
    tokenizer = _TOKENIZER.value
    if storage.is_remote(tokenizer):
        tokenizer = staging.stage_file(tokenizer, default_cache_dir())
    m = prepare(docs, output, tokenizer, eod_token=_EOD.value, docs_per_shard=_DOCS_PER_SHARD.value,
                val_every=_VAL_EVERY.value, workers=_WORKERS.value, description=inputs.description,
                source=input_fingerprint(inputs), overwrite=_OVERWRITE.value)
    if output != _OUTPUT.value:
        staging.upload_prepared(output, _OUTPUT.value)
    print(json.dumps({s: {k: v for k, v in m["splits"][s].items() if k != "shards"} for s in SPLITS}))


def run() -> None:
    """The `parcae-prepare` command."""
    cli.run(main, __name__)


if __name__ == "__main__":
    run()
