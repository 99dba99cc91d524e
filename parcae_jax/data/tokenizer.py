"""Tokenizers behind one interface: bytes, BPE (HF `tokenizers`), SentencePiece.

    python -m parcae_jax.commands.train_tokenizer --input=corpus/ --vocab_size=32768 --output=tokenizer.json

trains a byte-level BPE with GPT-4-style pre-tokenisation on the documents of the inputs
(any format `prepare` reads). `load_tokenizer(spec)` takes "bytes", a `tokenizer.json` or
a SentencePiece `.model`. A tokenizer's `fingerprint` names its exact vocabulary and
rules; prepared data records it, and the loader refuses data made with another one.
"""

from __future__ import annotations

import hashlib
import os
from typing import Iterable, Protocol

import numpy as np

from parcae_jax.data.readers import DataError

EOD_TOKEN = "<|endoftext|>"
# GPT-4 (cl100k) pre-tokenisation: contractions, letter runs, 1-3 digit groups, punctuation
# runs, newlines, and spaces kept in front of the word that follows them.
GPT4_SPLIT = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
              r"""|\s*[\r\n]|\s+(?!\S)|\s+""")


class Tokenizer(Protocol):
    vocab_size: int  # ids are < vocab_size
    eod_id: int  # appended to every document
    fingerprint: str

    def encode(self, text: str) -> np.ndarray: ...

    def decode(self, ids: Iterable[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes 0-255 and end-of-document 256: nothing to train, nothing to download."""

    vocab_size = 257
    eod_id = 256
    fingerprint = "bytes-v1"

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(int(i) for i in ids if i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A `tokenizers` tokenizer (tokenizer.json); its fingerprint hashes the whole JSON."""

    def __init__(self, tok, eod_token: str | None = None):
        self.tok = tok
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        eod = eod_token or EOD_TOKEN
        self.eod_id = tok.token_to_id(eod)
        if self.eod_id is None:
            raise DataError(f"the tokenizer has no end-of-document token {eod!r}; set data.eod_token to one it has")
        self.fingerprint = "hf-" + hashlib.sha256(tok.to_str().encode()).hexdigest()[:16] + f"-eod{self.eod_id}"

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.tok.encode(text, add_special_tokens=False).ids, np.int32)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(e.ids, np.int32) for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def save(self, path: str) -> None:
        self.tok.save(path)


class SentencePieceTokenizer:
    """A SentencePiece `.model`; end-of-document is its EOS id unless data.eod_token names one."""

    def __init__(self, path: str, eod_token: str | None = None):
        import sentencepiece

        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_file=path)
        except (RuntimeError, OSError) as e:  # sentencepiece raises RuntimeError for a file it cannot parse
            raise DataError(f"{path}: not a SentencePiece model ({str(e).splitlines()[0]})") from None
        self.vocab_size = self.sp.get_piece_size()
        self.eod_id = self.sp.piece_to_id(eod_token) if eod_token else self.sp.eos_id()
        if self.eod_id < 0 or (eod_token and self.sp.id_to_piece(self.eod_id) != eod_token):
            raise DataError(f"{path}: no end-of-document token; set data.eod_token to a piece it has")
        with open(path, "rb") as f:
            self.fingerprint = "spm-" + hashlib.sha256(f.read()).hexdigest()[:16] + f"-eod{self.eod_id}"

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.sp.encode(text), np.int32)

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([int(i) for i in ids])


def load_tokenizer(spec: str, eod_token: str | None = None) -> Tokenizer:
    """"bytes", a path to a tokenizer.json, or a path to a SentencePiece .model."""
    if spec == "bytes":
        return ByteTokenizer()
    if not os.path.isfile(spec):
        raise DataError(f"tokenizer {spec!r} is neither 'bytes' nor an existing tokenizer.json / .model file")
    if spec.endswith(".model"):
        return SentencePieceTokenizer(spec, eod_token)
    from tokenizers import Tokenizer as HFTok

    try:
        return HFTokenizer(HFTok.from_file(spec), eod_token)
    except Exception as e:  # tokenizers raises plain Exceptions for malformed JSON
        if isinstance(e, DataError):
            raise
        raise DataError(f"{spec}: not a tokenizer.json ({str(e).splitlines()[0]})") from None


def train_bpe(texts: Iterable[str], vocab_size: int = 32768) -> HFTokenizer:
    """Byte-level BPE with GPT-4 pre-tokenisation; id 0 is <|endoftext|>."""
    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTok

    tok = HFTok(models.BPE(byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(GPT4_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOD_TOKEN], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=2)
    tok.train_from_iterator(texts, trainer=trainer)
    return HFTokenizer(tok)


if __name__ == "__main__":  # an old command line: say where the command went instead of doing nothing
    from parcae_jax.errors import moved

    moved("parcae_jax.commands.train_tokenizer")
