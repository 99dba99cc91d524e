"""prepare: every input format, parallel = serial, resume after interruption, TFDS, bad input."""

import functools
import gzip
import hashlib
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from parcae_jax.data.prepare import prepare
from parcae_jax.data.readers import DataError, expand_inputs, read_documents
from tests.conftest import ROOT
from tests.forkserver import run_module

DOCS = [f"document {i}: " + "héllo wörld " * (i % 7) + "\n" * (i % 3) for i in range(230)]


def held_out(text, val_every):
    """The documented split rule, written out independently."""
    h = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(h, "little") % val_every == 0


def records(directory, split):
    from array_record.python.array_record_module import ArrayRecordReader

    manifest = json.loads((directory / "manifest.json").read_text())
    out = []
    for shard in manifest["splits"][split]["shards"]:
        reader = ArrayRecordReader(str(directory / shard["path"]))
        out += [np.frombuffer(r, np.uint16) for r in reader.read(list(range(reader.num_records())))]
        reader.close()
    return out


def write_inputs(root):
    root.mkdir(parents=True, exist_ok=True)
    (root / "a.txt").write_text(DOCS[0])
    with open(root / "b.jsonl", "w") as f:
        f.writelines(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(DOCS[1:100]))
    with gzip.open(root / "c.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in DOCS[100:150])
    pq.write_table(pa.table({"text": DOCS[150:]}), root / "d.parquet")
    return root


def test_every_format_is_read_in_order_and_every_document_survives(tmp_path):
    src = write_inputs(tmp_path / "in")
    assert list(read_documents(expand_inputs([str(src)]))) == DOCS
    prepare(read_documents(expand_inputs([str(src)])), str(tmp_path / "out"), "bytes", docs_per_shard=40,
            val_every=10, progress=False)
    out = tmp_path / "out"
    train, val = records(out, "train"), records(out, "validation")
    assert [bytes(r[:-1].astype(np.uint8)).decode() for r in val] == [d for d in DOCS if held_out(d, 10)]
    assert [bytes(r[:-1].astype(np.uint8)).decode() for r in train] == [d for d in DOCS if not held_out(d, 10)]
    assert 10 < len(val) < 40
    assert all(r[-1] == 256 for r in train + val)
    manifest = json.loads((out / "manifest.json").read_text())
    n_train = len(train)
    assert manifest["splits"]["train"]["documents"] == n_train
    assert len(manifest["splits"]["train"]["shards"]) == -(-n_train // 40)
    assert manifest["tokenizer"]["fingerprint"] == "bytes-v1" and "% 10 == 0" in manifest["split_rule"]


def test_worker_processes_write_the_same_shards(tmp_path):
    kwargs = dict(docs_per_shard=50, val_every=7, progress=False)
    prepare(iter(DOCS), str(tmp_path / "serial"), "bytes", workers=0, **kwargs)
    prepare(iter(DOCS), str(tmp_path / "parallel"), "bytes", workers=2, **kwargs)
    for split in ("train", "validation"):
        a, b = records(tmp_path / "serial", split), records(tmp_path / "parallel", split)
        assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


def interrupted(docs, after):
    for i, d in enumerate(docs):
        if i == after:
            raise KeyboardInterrupt  # as if the process were stopped here, mid-shard
        yield d


def test_interrupted_prepare_resumes_to_the_same_shards(tmp_path):
    kwargs = dict(docs_per_shard=30, val_every=9, progress=False)
    prepare(iter(DOCS), str(tmp_path / "whole"), "bytes", **kwargs)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        prepare(interrupted(DOCS, 140), str(out), "bytes", **kwargs)
    assert not (out / "manifest.json").exists()
    assert any(n.endswith(".tmp") for n in os.listdir(out))  # a half-written shard, not taken as complete
    with pytest.raises(DataError, match="preparation did not finish"):
        from parcae_jax.data.pipeline import open_split
        open_split(str(out), "train")
    with pytest.raises(KeyboardInterrupt):  # a second interruption, later on
        prepare(interrupted(DOCS, 200), str(out), "bytes", **kwargs)
    prepare(iter(DOCS), str(out), "bytes", **kwargs)
    for split in ("train", "validation"):
        a, b = records(tmp_path / "whole", split), records(out, split)
        assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))
    assert sorted(os.listdir(out)) == sorted(os.listdir(tmp_path / "whole"))
    with pytest.raises(DataError, match="other settings"):
        prepare(iter(DOCS), str(out), "bytes", docs_per_shard=31, val_every=9, progress=False)


@functools.cache
def _builder_class():
    import tensorflow_datasets as tfds

    class ParcaeTestText(tfds.core.GeneratorBasedBuilder):  # registers the name once per process
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, disable_shuffling=True,
                                         features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i, d in enumerate(DOCS[:60]):
                yield i, {"text": d}

    return ParcaeTestText


def make_tfds(data_dir):
    """A small TFDS dataset in array_record format, built here, offline."""
    _builder_class()(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
    return "parcae_test_text"


def test_tfds_source_through_data_source(tmp_path):
    name = make_tfds(tmp_path / "tfds")
    out = run_module("parcae_jax.commands.prepare", [f"--tfds={name}",
                          f"--tfds_data_dir={tmp_path / 'tfds'}", f"--output={tmp_path / 'out'}", "--val_every=0",
                          "--workers=0"], cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    got = [bytes(r[:-1].astype(np.uint8)).decode() for r in records(tmp_path / "out", "train")]
    assert got == DOCS[:60]


def run_prepare(*args):
    return run_module("parcae_jax.commands.prepare", [*args], cwd=ROOT, timeout=300)


def test_config_sources_resolve_to_prepared_data(tmp_path):
    """data.source = tfds | prepared | embedded, as the training job resolves them."""
    from parcae_jax.data import dataset
    from parcae_jax.training import defaults

    data = defaults.data_config()
    data.update(source="tfds", tfds_name=make_tfds(tmp_path / "tfds2"), tfds_data_dir=str(tmp_path / "tfds2"),
                val_every=5, cache_dir=str(tmp_path / "cache"))
    tok = dataset.check(data, model_vocab_size=257)
    train, val = dataset.open_splits(data, tok, progress=False)
    assert train.lengths.size + val.lengths.size == 60 and val.lengths.size > 0
    data.update(source="prepared", path=train.directory)
    assert dataset.open_splits(data, tok)[0].paths == train.paths
    with pytest.raises(DataError, match="has 257 ids but model.vocab_size=256"):
        dataset.check(data, model_vocab_size=256)
    data.update(path=str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="no such directory"):
        dataset.check(data, model_vocab_size=257)
    data.update(source="s3")
    with pytest.raises(DataError, match="data.source='s3' is unknown"):
        dataset.check(data, model_vocab_size=257)


@pytest.mark.slow
def test_another_input_into_a_prepared_output_is_refused_unless_overwrite(tmp_path):
    from tests.test_bad_inputs import tree_hash

    (tmp_path / "a.txt").write_text("the first corpus " * 100)
    (tmp_path / "b.txt").write_text("a second, different corpus " * 100)
    out = tmp_path / "out"
    first = run_prepare(f"--input={tmp_path / 'a.txt'}", f"--output={out}", "--val_every=0")
    assert first.returncode == 0, first.stderr
    assert run_prepare(f"--input={tmp_path / 'a.txt'}", f"--output={out}", "--val_every=0").stdout == first.stdout
    before = tree_hash(out)
    again = run_prepare(f"--input={tmp_path / 'b.txt'}", f"--output={out}", "--val_every=0")
    assert again.returncode == 2 and again.stderr.count("\n") == 1, again.stderr
    assert "holds a preparation of another input; use another --output, or --overwrite" in again.stderr
    assert tree_hash(out) == before  # the old preparation is untouched
    replaced = run_prepare(f"--input={tmp_path / 'b.txt'}", f"--output={out}", "--val_every=0", "--overwrite")
    assert replaced.returncode == 0, replaced.stderr
    assert json.loads(replaced.stdout)["train"]["tokens"] == len("a second, different corpus " * 100) + 1


def test_a_shard_whose_length_table_disagrees_is_refused_at_open(tmp_path):
    from parcae_jax.data.pipeline import open_split

    prepare((f"document {i} " * 20 for i in range(30)), str(tmp_path), docs_per_shard=10, val_every=0,
            progress=False)
    table = tmp_path / "train-00001.arrayrecord.lengths.npy"
    original = np.load(table)
    np.save(open(table, "wb"), original[:-1])
    with pytest.raises(DataError, match="train-00001.arrayrecord holds 10 documents but its .lengths.npy lists 9"):
        open_split(str(tmp_path), "train")
    (tmp_path / "train-00002.arrayrecord").write_bytes(b"garbage")
    np.save(open(table, "wb"), original)
    with pytest.raises(DataError, match="train-00002.arrayrecord: not a readable shard"):
        open_split(str(tmp_path), "train")


def test_a_manifest_whose_token_dtype_lies_is_refused_at_open(tmp_path):
    from parcae_jax.data.pipeline import open_split

    prepare((f"document {i} " * 20 for i in range(30)), str(tmp_path), docs_per_shard=10, val_every=0,
            progress=False)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["token_dtype"] == "uint16"
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "token_dtype": "uint32"}))
    with pytest.raises(DataError, match="not .* tokens of uint32 as manifest.json says"):
        open_split(str(tmp_path), "train")
