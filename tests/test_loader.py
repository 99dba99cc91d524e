"""The loader: exact resume, disjoint process shares, lossless packing, held-out validation."""

import hashlib

import jax
import numpy as np
import pytest
from absl import flags

from parcae_jax.data import corpus
from parcae_jax.data.pipeline import PackedWindows, ProcessShare, make_loader, open_split, to_global
from parcae_jax.data.prepare import prepare
from parcae_jax.data.readers import DataError
from tests.test_prepare import DOCS, held_out, records


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    out = tmp_path_factory.mktemp("small")
    prepare(iter(DOCS), str(out), "bytes", docs_per_shard=40, val_every=10, progress=False)
    return out


@pytest.fixture(scope="module")
def embedded():
    return corpus.embedded_corpus()  # into $PARCAE_JAX_CACHE, a temporary directory (conftest)


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_restored_iterator_continues_with_exactly_the_same_batches(small, workers):
    flags.FLAGS.mark_as_parsed()  # grain's worker processes read absl flags
    data = open_split(str(small), "train")
    loader = make_loader(data, seq_len=31, global_batch=4, seed=3, num_workers=workers)
    it = iter(loader)
    for _ in range(5):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(6)]
    resumed = iter(make_loader(data, seq_len=31, global_batch=4, seed=3, num_workers=workers))
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])
    for i in (it, resumed):
        if hasattr(i, "close"):
            i.close()


def test_two_process_shares_are_disjoint_and_cover_every_window(small):
    windows = PackedWindows(open_split(str(small), "train"), 15, seed=1, num_epochs=2)
    shares = [ProcessShare(windows, 6, p, 2) for p in range(2)]
    taken = [[s.global_index(i) for i in range(len(s))] for s in shares]
    assert not set(taken[0]) & set(taken[1])
    assert sorted(taken[0] + taken[1]) == list(range(len(windows) // 6 * 6))
    for s, idx in zip(shares, taken):  # and a share's item is that global window's content
        for i in (0, 4, len(s) - 1):
            np.testing.assert_array_equal(s[i]["inputs"], windows[idx[i]]["inputs"])


def epoch_stream(windows, e):
    """Independently: the documents of each block, in the epoch's block order, concatenated."""
    docs = records(windows.data_dir, "train")
    order = np.random.default_rng([windows.seed, e]).permutation(len(windows.block_tokens))
    return np.concatenate([d for b in order for d in docs[b * windows.dpb:(b + 1) * windows.dpb]]).astype(np.int32)


def test_packing_keeps_every_token_of_every_document_once_per_epoch(small):
    data = open_split(str(small), "train")
    windows = PackedWindows(data, 23, seed=7, num_epochs=2, docs_per_block=4)
    windows.data_dir = small
    n = windows.windows_per_epoch
    for e in range(2):
        by_position = {}
        for g in range(e * n, (e + 1) * n):
            epoch, j = windows.window_of(g)
            assert epoch == e
            by_position[j] = windows[g]
        assert sorted(by_position) == list(range(n))  # a permutation of the epoch's windows
        stream = []
        for j in range(n):
            w = by_position[j]
            real = w["targets"] != -100
            stream.append(np.concatenate([w["inputs"][:1], w["targets"][real]]))
        stream = np.concatenate(stream)
        np.testing.assert_array_equal(stream, epoch_stream(windows, e))
        assert len(stream) == data.lengths.sum()
    first = [windows[g]["inputs"] for g in range(3)]
    second = [windows[n + g]["inputs"] for g in range(3)]
    assert not all(np.array_equal(a, b) for a, b in zip(first, second))  # epochs are ordered differently


def test_segment_ids_number_the_documents_inside_each_window(small):
    windows = PackedWindows(open_split(str(small), "train"), 63, seed=0)
    for g in range(len(windows)):
        w = windows[g]
        real = w["segment_ids"] > 0
        seg, inputs = w["segment_ids"][real], w["inputs"][real]
        assert seg[0] == 1 and np.all(np.diff(seg) >= 0)
        # a new document starts right after each end-of-document token
        np.testing.assert_array_equal(np.diff(seg) == 1, inputs[:-1] == 256)


def test_validation_never_shares_a_document_with_training(embedded):
    def digests(split):
        data = open_split(embedded, split)
        return [hashlib.sha256(bytes(r[:-1].astype(np.uint8))).hexdigest() for r in records_of(data)]

    train, val = digests("train"), digests("validation")
    assert set(train).isdisjoint(val) and 20 < len(val) < 70
    every = [hashlib.sha256(d.encode()).hexdigest() for d in corpus.documents() if d]  # prepare skips empty ones
    held = [hashlib.sha256(d.encode()).hexdigest() for d in corpus.documents() if held_out(d, corpus.VAL_EVERY)]
    assert sorted(train + val) == sorted(every) and val == held
    assert len(set(every)) < len(every)  # the stdlib does hold identical files: the rule must keep them together


def records_of(data):
    import grain

    src = grain.sources.ArrayRecordDataSource(data.paths)
    return [np.frombuffer(src[i], data.dtype) for i in range(len(src))]


def test_global_batches_on_a_mesh_of_8_devices(small):
    mesh = jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    batch = next(iter(make_loader(open_split(str(small), "train"), 15, 8)))
    arrays = to_global(batch, sharding)
    assert arrays["inputs"].shape == (8, 15) and len(arrays["inputs"].addressable_shards) == 8
    np.testing.assert_array_equal(np.asarray(arrays["targets"]), batch["targets"])


def test_refusals(small, tmp_path):
    with pytest.raises(DataError, match="was tokenized with bytes-v1 .* but data.tokenizer is hf-"):
        open_split(str(small), "train", fingerprint="hf-0123")
    with pytest.raises(DataError, match="no manifest.json; make the data with"):
        open_split(str(tmp_path), "train")
    with pytest.raises(DataError, match="smaller than one global batch"):
        make_loader(open_split(str(small), "validation"), 255, 64, num_epochs=1)
    with pytest.raises(DataError, match="not divisible by the 3 processes"):
        ProcessShare(PackedWindows(open_split(str(small), "train"), 15), 8, 0, 3)


def test_a_token_id_beyond_the_datas_vocabulary_is_one_line_at_its_first_read(small):
    """A shard that prepare did not write could hold ids past the embedding table: the document
    that holds one is refused when read (training and validation alike), never indexed."""
    import dataclasses

    data = open_split(str(small), "train")
    narrow = dataclasses.replace(data, manifest={**data.manifest, "tokenizer": {**data.manifest["tokenizer"],
                                                                                "vocab_size": 100}})
    with pytest.raises(DataError, match=r"document \d+ of the train split holds token id \d+, but the data's "
                                        "tokenizer has 100 ids"):
        PackedWindows(narrow, 31, seed=0)[0]
    PackedWindows(data, 31, seed=0)[0]  # the real bound passes
