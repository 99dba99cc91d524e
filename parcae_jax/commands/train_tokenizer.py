"""Train a byte-level BPE tokenizer (GPT-4 pre-tokenisation, id 0 <|endoftext|>) on documents.

    python -m parcae_jax.commands.train_tokenizer --input=DIR_OR_FILES --output=tokenizer.json [--vocab_size=32768]
"""

from __future__ import annotations

import os

from absl import flags

from parcae_jax.commands import cli, corpus_flags
from parcae_jax.data.readers import documents
from parcae_jax.data.tokenizer import train_bpe

_VOCAB = flags.DEFINE_integer("vocab_size", 32768, "Vocabulary size, special tokens included.", lower_bound=1)
_MAX_DOCS = flags.DEFINE_integer("max_documents", 0, "Train on at most this many documents (0: all).", lower_bound=0)
_OUTPUT = flags.DEFINE_string("output", None, "Where to write tokenizer.json.", required=True)


def main(argv: list[str]) -> None:
    cli.no_arguments(argv)
    docs = documents(corpus_flags.inputs())
    if _MAX_DOCS.value:
        docs = (d for _, d in zip(range(_MAX_DOCS.value), docs))
    tok = train_bpe(docs, _VOCAB.value)
    os.makedirs(os.path.dirname(os.path.abspath(_OUTPUT.value)), exist_ok=True)
    tok.save(_OUTPUT.value)
    print(f"wrote {_OUTPUT.value}: vocab {tok.vocab_size}, fingerprint {tok.fingerprint}")


def run() -> None:
    """The `parcae-tokenizer` command."""
    cli.run(main, __name__)


if __name__ == "__main__":
    run()
