"""The official-weight readers under mutation: every load of a damaged or crafted `.pt`, `.bin`
or safetensors file either returns exactly what the file holds or is refused with one line.
Never a crash, never bytes from outside the tensor's own storage.

Three fuzzers (hypothesis):
- bytes flipped in the real torch-written archives, aimed at the structure (pickle, zip
  headers, central directory) as often as at the data;
- tensor records rewritten (offset, sizes, strides, storage type, element count, storage
  key), against an independent decoder that indexes the storage's bytes element by element;
- the safetensors header's dtype, shape and data offsets changed.
"""

import functools
import json
import pickle
import re
import shutil
import struct
import tempfile
import zipfile
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from parcae_jax.interop.convert import load_reference
from parcae_jax.interop.reference_config import ConversionError
from parcae_jax.interop.torch_pickle import UnsafeCheckpoint, read_state_dict
from tests.conftest import FIXTURES

TORCH = FIXTURES / "torch_files"
SAFETENSORS = FIXTURES / "reference_parcae_tiny"
FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _load(folder: Path):
    """load_reference's result, or the refusal's message (which must be one line)."""
    try:
        return load_reference(str(folder))
    except ConversionError as e:
        message = str(e)
        assert message and "\n" not in message, message
        return message


def _same(got, want):
    assert not isinstance(got, str)
    assert got[0] == want[0]
    jax.tree.map(np.testing.assert_array_equal, got[1], want[1])


def _copy_folder(source: Path, into: Path) -> Path:
    folder = into / "ckpt"
    shutil.copytree(source, folder)
    return folder


# --- 1. bytes flipped in torch-written archives ------------------------------------------------

def _structure(path: Path) -> list[tuple[int, int]]:
    """Byte ranges of an archive that are not tensor data: each local header, the pickle and
    the small members, and the central directory to the end."""
    ranges = []
    with zipfile.ZipFile(path) as z:
        for info in z.infolist():
            with open(path, "rb") as f:
                f.seek(info.header_offset + 26)
                name_len, extra_len = struct.unpack("<HH", f.read(4))
            data = info.header_offset + 30 + name_len + extra_len
            ranges.append((info.header_offset, data))
            if "/data/" not in info.filename:
                ranges.append((data, data + info.compress_size))
        ranges.append((z.start_dir, path.stat().st_size))
    return ranges


ARCHIVES = {"pt": ("parcae_pt", "model.pt"), "bin": ("parcae_bin", "pytorch_model.bin")}


@functools.lru_cache(maxsize=None)
def _reference(folder: Path):
    """The unchanged fixture folder, loaded once: what an accepted mutation must equal."""
    return load_reference(str(folder))


@st.composite
def _flips(draw):
    name = draw(st.sampled_from(sorted(ARCHIVES)))
    path = TORCH / ARCHIVES[name][0] / ARCHIVES[name][1]
    size, structure = path.stat().st_size, _structure(path)
    flips = []
    for _ in range(draw(st.integers(1, 3))):
        if draw(st.booleans()):
            lo, hi = draw(st.sampled_from(structure))
            at = draw(st.integers(lo, max(lo, hi - 1)))
        else:
            at = draw(st.integers(0, size - 1))
        flips.append((at, draw(st.integers(1, 255))))
    return name, flips


@FUZZ
@given(_flips())
def test_flipped_bytes_in_a_torch_archive_load_unchanged_or_are_refused_in_one_line(case):
    name, flips = case
    with tempfile.TemporaryDirectory() as tmp:
        folder = _copy_folder(TORCH / ARCHIVES[name][0], Path(tmp))
        data = bytearray((folder / ARCHIVES[name][1]).read_bytes())
        for at, xor in flips:
            data[at] ^= xor
        (folder / ARCHIVES[name][1]).write_bytes(bytes(data))
        got = _load(folder)
    if not isinstance(got, str):  # a byte nobody reads (a timestamp, an attribute): same weights
        _same(got, _reference(TORCH / ARCHIVES[name][0]))


# --- 2. tensor records rewritten ----------------------------------------------------------------

STORAGES = {"FloatStorage": np.float32, "HalfStorage": np.float16, "BFloat16Storage": ml_dtypes.bfloat16,
            "DoubleStorage": np.float64, "IntStorage": np.int32, "ByteStorage": np.uint8, "BoolStorage": np.bool_}


def _u(text: str) -> bytes:
    return b"X" + len(text.encode()).to_bytes(4, "little") + text.encode()


def _int(n: int) -> bytes:
    return b"\x8a" + bytes([len(pickle.encode_long(n))]) + pickle.encode_long(n)  # LONG1: any sign and size


def _pickle(records: dict) -> bytes:
    """Protocol-2 opcodes of {name: _rebuild_tensor_v2(storage, offset, size, stride, False)},
    as torch.save lays them out (storages as persistent ids)."""
    out = [b"\x80\x02}("]
    for name, r in records.items():
        out += [_u(name), b"ctorch._utils\n_rebuild_tensor_v2\n(",
                b"(" + _u("storage") + f"ctorch\n{r['type']}\n".encode() + _u(r["key"]) + _u("cpu") + _int(r["numel"])
                + b"tQ", _int(r["offset"]),
                b"(" + b"".join(map(_int, r["size"])) + b"t", b"(" + b"".join(map(_int, r["stride"])) + b"t",
                b"\x89tR"]
    return b"".join(out) + b"u."


def _archive(path: Path, records: dict, storages: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", _pickle(records))
        z.writestr("archive/byteorder", "little")
        for key, data in storages.items():
            z.writestr(f"archive/data/{key}", data)


def _decode(record: dict, storages: dict[str, bytes]):
    """What a record means, independently of torch_pickle: each element read from the storage's
    own bytes by its index, or None where an element lies outside the storage or the storage is
    not the record's element count of its type."""
    if record["key"] not in storages or record["offset"] < 0 or len(record["size"]) != len(record["stride"]) \
            or min(record["size"] + record["stride"], default=0) < 0:
        return None
    dtype = np.dtype(STORAGES[record["type"]])
    raw = storages[record["key"]]
    if record["numel"] < 0 or len(raw) != record["numel"] * dtype.itemsize:
        return None
    flat = np.frombuffer(raw, dtype)
    count = int(np.prod(record["size"], dtype=object))
    if count > flat.size:
        return None
    out = np.empty(record["size"], dtype)
    for index in np.ndindex(*record["size"]):
        at = record["offset"] + sum(i * s for i, s in zip(index, record["stride"]))
        if at >= flat.size:
            return None
        out[index] = flat[at]
    return out


BASE_TENSORS = ("transformer.C.weight", "transformer.adapter.A_log", "transformer.ln_f.weight")


def _base():
    tensors = read_state_dict(str(TORCH / "parcae_bin" / "pytorch_model.bin"))
    tensors = {k.removeprefix("_orig_mod."): v for k, v in tensors.items()}
    records, storages = {}, {}
    for i, name in enumerate(BASE_TENSORS):
        t = np.ascontiguousarray(tensors[name])
        storages[str(i)] = t.tobytes()
        records[name] = dict(type="FloatStorage", key=str(i), numel=t.size, offset=0, size=list(t.shape),
                             stride=[s // t.itemsize for s in t.strides])
    return records, storages


_NEAR = st.one_of(st.integers(-3, 3), st.integers(-2**40, 2**40), st.sampled_from([-2**63, 2**63 - 1, 2**64]))


@st.composite
def _records(draw):
    records, storages = _base()
    record = records[draw(st.sampled_from(BASE_TENSORS))]
    for _ in range(draw(st.integers(1, 2))):
        field = draw(st.sampled_from(["offset", "numel", "size", "stride", "ndim", "type", "key"]))
        if field in ("offset", "numel"):
            record[field] += draw(_NEAR)
        elif field in ("size", "stride") and record[field]:
            axis = draw(st.integers(0, len(record[field]) - 1))
            record[field][axis] = draw(st.one_of(_NEAR, st.integers(0, 70)))
        elif field == "ndim":
            grow = draw(st.booleans())
            for f in ("size", "stride"):
                record[f] = record[f] + [draw(st.integers(0, 3))] if grow else record[f][1:]
        elif field == "type":
            record["type"] = draw(st.sampled_from(sorted(STORAGES)))
        else:
            record["key"] = draw(st.sampled_from(["0", "1", "2", "9"]))
    return records, storages


@FUZZ
@given(_records())
def test_rewritten_tensor_records_read_exactly_their_storage_or_are_refused_in_one_line(case):
    records, storages = case
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.pt"
        _archive(path, records, storages)
        try:
            got = read_state_dict(str(path))
        except UnsafeCheckpoint as e:
            assert str(e) and "\n" not in str(e), str(e)
            return
        for name, record in records.items():  # accepted: each tensor is what its record means
            want = _decode(record, storages)
            assert want is not None, (name, record)  # reaches outside its storage: must have been refused
            assert got[name].dtype == want.dtype and got[name].shape == want.shape
            np.testing.assert_array_equal(got[name], want)


def test_the_record_writer_and_decoder_agree_with_the_reader_on_the_unchanged_records(tmp_path):
    records, storages = _base()
    _archive(tmp_path / "model.pt", records, storages)
    got = read_state_dict(str(tmp_path / "model.pt"))
    fixture = read_state_dict(str(TORCH / "parcae_bin" / "pytorch_model.bin"))
    for name, record in records.items():
        np.testing.assert_array_equal(got[name], _decode(record, storages))
        np.testing.assert_array_equal(got[name], fixture["_orig_mod." + name])
    records["transformer.ln_f.weight"]["offset"] = -1  # the example from the report: read before the storage
    _archive(tmp_path / "negative.pt", records, storages)
    try:
        read_state_dict(str(tmp_path / "negative.pt"))
        raise AssertionError("a negative storage offset was accepted")
    except UnsafeCheckpoint as e:
        assert "malformed" in str(e)


# --- 3. safetensors headers changed ------------------------------------------------------------

def _header(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


SAFE_DTYPES = ["F32", "F16", "BF16", "F64", "I32", "U32", "I64", "I8", "U8", "BOOL"]


@st.composite
def _headers(draw):
    header, _ = _header(SAFETENSORS / "model.safetensors")
    names = sorted(k for k in header if k != "__metadata__")
    entry = header[draw(st.sampled_from(names))]
    for _ in range(draw(st.integers(1, 2))):
        field = draw(st.sampled_from(["dtype", "shape", "permute", "offsets"]))
        if field == "dtype":
            entry["dtype"] = draw(st.sampled_from(SAFE_DTYPES))
        elif field == "shape" and entry["shape"]:
            axis = draw(st.integers(0, len(entry["shape"]) - 1))
            entry["shape"][axis] = draw(st.integers(0, 4 * entry["shape"][axis] + 1))
        elif field == "permute":
            entry["shape"] = draw(st.permutations(entry["shape"]))
        else:
            end = draw(st.integers(0, 1))
            entry["data_offsets"][end] += draw(st.integers(-8, 8))
    return header


@FUZZ
@given(_headers())
def test_a_changed_safetensors_header_loads_unchanged_or_is_refused_in_one_line(header):
    _, body = _header(SAFETENSORS / "model.safetensors")
    text = json.dumps(header).encode()
    with tempfile.TemporaryDirectory() as tmp:
        folder = _copy_folder(SAFETENSORS, Path(tmp))
        (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + body)
        got = _load(folder)
    if not isinstance(got, str):  # a permutation of equal axes: the same tensor
        _same(got, _reference(SAFETENSORS))


def test_a_transposed_or_integer_weight_is_refused(tmp_path):
    """The two silent loads of the report: a 2-D weight with its axes swapped, and F32 relabelled I32."""
    header, body = _header(SAFETENSORS / "model.safetensors")
    for name, change, message in [
            ("transformer.core_block.0.mlp.fc.weight", "transpose", r"is \[64, 256\].*stored as \[256, 64\]"),
            ("transformer.C.weight", "I32", "is int32 in model.safetensors; weights are floating")]:
        h = json.loads(json.dumps(header))
        if change == "transpose":
            h[name]["shape"] = h[name]["shape"][::-1]
        else:
            h[name]["dtype"] = change
        text = json.dumps(h).encode()
        folder = tmp_path / change
        shutil.copytree(SAFETENSORS, folder)
        (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + body)
        got = _load(folder)
        assert isinstance(got, str), f"{change} was accepted"
        assert re.search(message, got), got
