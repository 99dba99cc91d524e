"""The streaming source (data/stream.py) against a NumPy reference: the windows of the
documents concatenated in file order, resumed exactly from a JSON state, bad files in one line."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from parcae_jax.data import stream_files as files_module
from parcae_jax.data.pipeline import PAD_TARGET
from parcae_jax.data.readers import DataError
from parcae_jax.data.stream import make_stream, restore_state
from parcae_jax.data.stream_files import check_file, stream_files
from parcae_jax.data.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
SEQ, BATCH = 15, 2


def encode(text: str) -> np.ndarray:
    return np.append(TOK.encode(text), TOK.eod_id)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Four files of every kind: (paths, their documents in order)."""
    d = tmp_path_factory.mktemp("stream")
    rng = np.random.default_rng(0)
    words = ["loop", "state", "prelude", "coda", "é", "token", "x" * 20]

    def docs(n):
        return [" ".join(rng.choice(words, rng.integers(1, 12))) for _ in range(n)]

    files = {"a.parquet": docs(7), "b.jsonl": docs(5), "c.jsonl.gz": docs(4), "d.parquet": docs(6)}
    for name, texts in files.items():
        path = d / name
        if name.endswith(".parquet"):  # small row groups: the state crosses them
            pq.write_table(pa.table({"id": list(range(len(texts))), "text": texts}), path, row_group_size=3)
        else:
            lines = "".join(json.dumps({"text": t, "n": i}) + "\n" + ("\n" if i == 1 else "")
                            for i, t in enumerate(texts))  # a blank line is skipped
            (gzip.open if name.endswith(".gz") else open)(path, "wt").write(lines)
    return [str(d / n) for n in files], list(files.values())


def reference(texts: list[str]) -> list[dict]:
    """Concatenate, cut into windows of SEQ + 1, number documents per window, batch."""
    ids = [encode(t) for t in texts]
    stream = np.concatenate(ids)
    doc = np.concatenate([np.full(len(x), i) for i, x in enumerate(ids)])
    W = SEQ + 1
    rows = []
    for start in range(0, len(stream), W):
        toks, owner = stream[start:start + W], doc[start:start + W]
        seg = np.searchsorted(np.unique(owner), owner) + 1
        n = len(toks)
        inputs, targets, segs = np.full(SEQ, TOK.eod_id), np.full(SEQ, PAD_TARGET), np.zeros(SEQ, int)
        inputs[:n - 1], segs[:n - 1], targets[:n - 1] = toks[:-1], seg[:-1], toks[1:]
        rows.append((inputs, targets, segs))
    batches = []
    for b in range(len(rows) // BATCH):
        chunk = rows[b * BATCH:(b + 1) * BATCH]
        batches.append({k: np.stack([r[i] for r in chunk]) for i, k in enumerate(("inputs", "targets", "segment_ids"))})
    return batches


def batches_of(it, n=None) -> list[dict]:
    out = []
    for b in it:
        out.append(b)
        if n is not None and len(out) == n:
            break
    return out


def assert_equal(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        for k in w:
            np.testing.assert_array_equal(g[k], w[k], err_msg=k)


@pytest.mark.parametrize("process", [(0, 1), (0, 2), (1, 2)])
def test_the_stream_is_the_concatenated_documents_cut_into_windows(corpus, process):
    files, texts = corpus
    p, c = process
    got = batches_of(make_stream(files, encode, TOK.eod_id, SEQ, BATCH, process_index=p, process_count=c))
    assert_equal(got, reference([t for ts in texts[p::c] for t in ts]))  # files p, p + c, ...


def test_jsonl_files_read_in_byte_ranges_give_the_same_windows(corpus, monkeypatch):
    """Ranges of 37 bytes: most lines start in one range and end in another."""
    files, texts = corpus
    monkeypatch.setattr(files_module, "JSONL_CHUNK_BYTES", 37)
    assert len(files_module.chunks_of(files[1])) > 5
    assert_equal(batches_of(make_stream(files, encode, TOK.eod_id, SEQ, BATCH)), reference(sum(texts, [])))


@pytest.mark.parametrize("workers", [0, 2])
def test_a_stream_resumed_from_its_json_state_continues_with_the_next_batch(corpus, workers):
    """Also read and tokenised in two worker processes: the same batches, the same resume."""
    from absl import flags

    flags.FLAGS.mark_as_parsed()  # Grain's workers read absl flags
    files, texts = corpus
    whole = batches_of(make_stream(files, encode, TOK.eod_id, SEQ, BATCH, workers=workers))
    assert len(whole) > 8
    assert_equal(whole, reference(sum(texts, [])))
    for k in (5,) if workers else (1, 3, 5, 8):  # each resume with workers starts two processes
        it = iter(make_stream(files, encode, TOK.eod_id, SEQ, BATCH, workers=workers))
        batches_of(it, k)
        state = json.dumps(it.get_state())
        it.close()
        resumed = iter(make_stream(files, encode, TOK.eod_id, SEQ, BATCH, workers=workers))
        resumed.set_state(restore_state(json.loads(state)))
        assert_equal(batches_of(resumed), whole[k:])
        resumed.close()


def test_bad_stream_files_are_one_line_naming_the_file(tmp_path):
    pq.write_table(pa.table({"body": ["a"]}), tmp_path / "nocol.parquet")
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "ints.parquet")
    (tmp_path / "nofield.jsonl").write_text('{"body": "a"}\n')
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\nnot json\n')
    (tmp_path / "junk.parquet").write_bytes(b"PAR1 not really")
    gz = gzip.compress(b'{"text": "a"}\n' * 200)
    (tmp_path / "cut.jsonl.gz").write_bytes(gz[: len(gz) // 2])
    cases = {"nocol.parquet": "no column 'text'", "ints.parquet": "not text", "nofield.jsonl": "no field 'text'",
             "bad.jsonl": "bad.jsonl:2: a line is not a JSON object", "junk.parquet": "not a readable Parquet file",
             "cut.jsonl.gz": "the file is damaged"}
    early = {"nocol.parquet", "ints.parquet", "nofield.jsonl", "junk.parquet"}  # found before training starts
    for name, words in cases.items():
        path = str(tmp_path / name)
        checks = [lambda p=path: batches_of(make_stream([p], encode, TOK.eod_id, 3, 1))]
        if name in early:
            checks.append(lambda p=path: check_file(p))
        for check in checks:
            with pytest.raises(DataError) as e:
                check()
            message = str(e.value)
            assert name in message and words in message and "\n" not in message, message
    with pytest.raises(DataError, match=r"data.path: .*nothing\*.parquet: the pattern matches no file"):
        stream_files(f"{tmp_path}/nothing*.parquet", "data.path")
    with pytest.raises(DataError, match=r"data.val_path: .*notes.txt is not a"):
        (tmp_path / "notes.txt").write_text("a")
        stream_files(f"{tmp_path}/notes.txt", "data.val_path")


def test_a_file_that_vanishes_mid_run_is_one_line_naming_it(corpus, tmp_path):
    files = []
    for i in range(12):  # more chunks than the stream reads ahead
        files.append(str(tmp_path / f"{i}.parquet"))
        pq.write_table(pa.table({"text": ["some words " * 20] * 8}), files[-1], row_group_size=4)
    it = iter(make_stream(files, encode, TOK.eod_id, SEQ, BATCH))
    next(it)
    (tmp_path / "11.parquet").unlink()
    with pytest.raises(DataError, match=r"11\.parquet: (not a readable Parquet file|row group 0 unreadable)"):
        batches_of(it)


def test_the_stream_gives_the_prepared_loaders_windows_in_file_order(corpus, tmp_path):
    """The same files prepared (nothing held out) and read unshuffled: equal windows. Training
    orders differ by design: the prepared loader shuffles, a stream is read in file order."""
    from parcae_jax.data.pipeline import PackedWindows, open_split
    from parcae_jax.data.prepare import prepare
    from parcae_jax.data.readers import Inputs, documents

    files, _ = corpus
    prepare(documents(Inputs(tuple(files))), str(tmp_path / "prep"), "bytes", val_every=0, workers=0, progress=False)
    windows = PackedWindows(open_split(str(tmp_path / "prep"), "train"), SEQ, shuffle=False)
    prepared = [windows[i] for i in range(len(windows))]
    streamed = [dict(zip(b, row)) for b in batches_of(make_stream(files, encode, TOK.eod_id, SEQ, 1))
                for row in zip(*b.values())]
    assert len(streamed) == len(prepared)
    assert_equal(streamed, prepared)


@pytest.mark.slow
def test_a_streamed_run_killed_with_sigkill_resumes_with_the_uninterrupted_losses(corpus, tmp_path):
    """Trained from Parquet and JSONL(.gz) files, evaluated on others; killed with SIGKILL after
    checkpoint 3 and resumed from it (the stream's saved position), the run logs the losses of
    the uninterrupted one."""
    import signal

    from parcae_jax.training.train import train
    from tests.test_train import losses, one_device, run_main, small_config, wait_for_step

    files, _ = corpus
    stream = dict(source="stream", path=",".join(files[:3]), val_path=files[3])
    config = small_config(steps=8)
    config.data.update(stream)
    trainer, run = one_device(config)
    train(config, str(tmp_path / "whole"), run, trainer)
    flags = [f"--config.data.{k}={v}" for k, v in stream.items()] + ["--config.train.steps=8", "--config.ckpt.every=3"]
    killed = run_main(tmp_path / "cut", *flags)
    wait_for_step(tmp_path / "cut", 5, killed)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    resumed = run_main(tmp_path / "cut", *flags)
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]
    whole, cut = losses(tmp_path / "whole"), losses(tmp_path / "cut")
    assert sorted(whole) == list(range(1, 9)) and cut == whole
