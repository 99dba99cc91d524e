"""Tokenizers: exact round trips, stable fingerprints, GPT-4 pre-tokenisation, the CLI."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from parcae_jax.data import corpus
from parcae_jax.data.readers import DataError
from parcae_jax.data.tokenizer import ByteTokenizer, load_tokenizer, train_bpe
from tests.conftest import ROOT
from tests.forkserver import run_module

TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=200)  # any valid unicode


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    docs = [d for _, d in zip(range(150), corpus.documents())]
    tok = train_bpe(iter(docs), vocab_size=600)
    path = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    tok.save(str(path))
    return tok, str(path), docs


@settings(max_examples=200, deadline=None)
@given(TEXT)
def test_byte_tokenizer_round_trips(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids.max(initial=0) < 256 and tok.decode(ids) == text


def test_bpe_round_trips_its_corpus_and_keeps_its_fingerprint(bpe):
    tok, path, docs = bpe
    assert tok.vocab_size == 600 and tok.eod_id == 0
    for doc in docs[:40]:
        ids = tok.encode(doc)
        assert tok.decode(ids) == doc and len(ids) < 0.75 * len(doc.encode())  # it compresses, losslessly
    again = load_tokenizer(path)
    assert again.fingerprint == tok.fingerprint and again.eod_id == tok.eod_id
    assert train_bpe(iter(docs), vocab_size=700).fingerprint != tok.fingerprint


@settings(max_examples=300, deadline=None)
@given(TEXT)
def test_bpe_round_trips_any_text(bpe, text):
    tok = bpe[0]
    assert tok.decode(tok.encode(text)) == text


def test_gpt4_pre_tokenisation(bpe):
    split = [p for p, _ in bpe[0].tok.pre_tokenizer.pre_tokenize_str("Hello world's 12345  x\n\ny")]
    # the ByteLevel step shows spaces as 'Ġ' and newlines as 'Ċ'
    assert split == ["Hello", "Ġworld", "'s", "Ġ", "123", "45", "Ġ", "Ġx", "ĊĊ", "y"]


def test_sentencepiece_model(tmp_path):
    import sentencepiece

    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(d for _, d in zip(range(40), corpus.documents())))
    sentencepiece.SentencePieceTrainer.train(input=str(text), model_prefix=str(tmp_path / "sp"), vocab_size=300,
                                            model_type="bpe", minloglevel=2)
    tok = load_tokenizer(str(tmp_path / "sp.model"))
    assert tok.vocab_size == 300 and tok.eod_id == 2 and tok.fingerprint.startswith("spm-")
    # SentencePiece normalises whitespace by default (its choice); plain prose round-trips
    assert tok.decode(tok.encode("Return the value of x, or None.")) == "Return the value of x, or None."


def test_bad_tokenizers(tmp_path, bpe):
    with pytest.raises(DataError, match="neither 'bytes' nor an existing"):
        load_tokenizer(str(tmp_path / "missing.json"))
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(DataError, match="not a tokenizer.json"):
        load_tokenizer(str(tmp_path / "junk.json"))
    with pytest.raises(DataError, match="no end-of-document token '<eos>'"):
        load_tokenizer(bpe[1], eod_token="<eos>")


def test_training_cli(tmp_path):
    src = tmp_path / "docs.jsonl"
    src.write_text("\n".join(json.dumps({"text": d}) for _, d in zip(range(60), corpus.documents())))
    out = run_module("parcae_jax.commands.train_tokenizer", [f"--input={src}",
                          "--vocab_size=400", f"--output={tmp_path / 'tok.json'}"], cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    assert load_tokenizer(str(tmp_path / "tok.json")).vocab_size == 400
