"""PyTorch checkpoints (`pytorch_model.bin`, `model.pt`) read without torch and without running them.

`torch.save` writes a zip archive: `<root>/data.pkl`, a pickle of the saved object in which
every tensor is a call `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`
and every storage a persistent id `("storage", torch.FloatStorage, key, location, numel)`,
and `<root>/data/<key>`, each storage's raw bytes, stored uncompressed.

A pickle runs code only through the globals it names: `pickle.Unpickler.find_class` resolves
every one of them (GLOBAL, STACK_GLOBAL, INST, OBJ and the copyreg extension codes all go
through it), and REDUCE can call only what was resolved. `_StateDictUnpickler.find_class`
admits the few names a state dict of tensors needs and maps each to a function of ours; any
other name (`os.system`, `builtins.eval`, a class of someone's training code) is refused
before anything is called.

Storages are memory-mapped from the archive, so a tensor is a read-only NumPy view into the
file: reading a 5 GB checkpoint costs no memory until a tensor is copied.
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
import zipfile

import ml_dtypes
import numpy as np


class UnsafeCheckpoint(ValueError):
    """The file is not a plain state dict of tensors (or not a torch zip archive)."""


_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


class _StorageType:
    """What the pickle's `torch.FloatStorage` (etc.) resolves to: only its element type."""

    def __init__(self, dtype):
        self.dtype = np.dtype(dtype)


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    """torch._utils._rebuild_tensor_v2: a strided view of `storage`, bounds checked."""
    del requires_grad, backward_hooks, metadata
    ints = lambda xs: isinstance(xs, tuple) and all(type(x) is int and x >= 0 for x in xs)  # noqa: E731
    if not isinstance(storage, np.ndarray) or type(offset) is not int or not ints(size) or not ints(stride) \
            or len(size) != len(stride) or offset < 0:
        raise UnsafeCheckpoint("a tensor record is malformed")
    last = offset + sum((n - 1) * s for n, s in zip(size, stride)) if all(size) else offset - 1
    if last >= storage.size:
        raise UnsafeCheckpoint(f"a tensor reaches element {last} of a storage of {storage.size}")
    item = storage.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(storage[offset:] if all(size) else storage[:0], size,
                                           [s * item for s in stride], writeable=False)
    return view


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    """torch._utils._rebuild_parameter: an nn.Parameter is its data."""
    del requires_grad, backward_hooks
    if not isinstance(data, np.ndarray):
        raise UnsafeCheckpoint("a parameter record is malformed")
    return data


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _StorageType(dtype) for name, dtype in _STORAGE_DTYPES.items()},
}


class _StateDictUnpickler(pickle.Unpickler):
    def __init__(self, file, storages):
        super().__init__(file)
        self._storages = storages

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED[(module, name)]
        except (KeyError, TypeError):
            raise UnsafeCheckpoint(f"refused to load {module}.{name}: only a state dict of tensors is read, "
                                   "and this pickle names something else (it could run code)") from None

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str) and type(pid[4]) is int):
            raise UnsafeCheckpoint(f"unknown persistent id {str(pid)[:80]}")
        return self._storages(pid[2], pid[1].dtype, pid[4])


def _member_offset(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> int:
    """Where a stored (uncompressed) member's bytes start in the archive file."""
    archive.fp.seek(info.header_offset)
    header = archive.fp.read(30)
    if header[:4] != b"PK\x03\x04":
        raise UnsafeCheckpoint(f"{info.filename}: damaged zip entry")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_len + extra_len


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """The tensors of a torch.save'd state dict as read-only NumPy arrays (memory-mapped where
    the archive stores them uncompressed, as torch does). Raises UnsafeCheckpoint for anything
    that is not a (possibly nested) dict of tensors, without running any of it."""
    if not zipfile.is_zipfile(path):
        raise UnsafeCheckpoint("not a torch zip archive (files saved by torch < 1.6 are not read; "
                               "re-save it with a current torch, or convert it to safetensors)")
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise UnsafeCheckpoint("no single <root>/data.pkl in the archive")
        root = pickles[0][: -len("data.pkl")]
        byteorder = archive.read(root + "byteorder").decode().strip() if root + "byteorder" in archive.namelist() else "little"
        order = "<" if byteorder == "little" else ">"
        whole = np.memmap(path, np.uint8, mode="r")  # one read-only mapping; storages are views of it

        def storage(key: str, dtype: np.dtype, numel: int) -> np.ndarray:
            try:
                info = archive.getinfo(f"{root}data/{key}")
            except KeyError:
                raise UnsafeCheckpoint(f"storage {key!r} is missing from the archive") from None
            dtype = np.dtype(dtype).newbyteorder(order) if np.dtype(dtype).itemsize > 1 else np.dtype(dtype)
            if info.file_size < numel * dtype.itemsize:
                raise UnsafeCheckpoint(f"storage {key!r} holds {info.file_size} bytes, fewer than {numel} elements")
            if info.compress_type == zipfile.ZIP_STORED:
                start = _member_offset(archive, info)
                return whole[start:start + numel * dtype.itemsize].view(dtype)
            return np.frombuffer(archive.read(info), dtype, count=numel)

        data = io.BytesIO(archive.read(pickles[0]))
        try:
            obj = _StateDictUnpickler(data, storage).load()
        except UnsafeCheckpoint:
            raise
        except Exception as e:  # a damaged or hostile pickle: never half-loaded
            raise UnsafeCheckpoint(f"unreadable pickle ({type(e).__name__}: {e})") from None
    return _flatten(obj)


def _flatten(obj, prefix: str = "") -> dict[str, np.ndarray]:
    """{key: tensor}; nested dicts (e.g. {"model": state_dict}) give dotted keys."""
    if not isinstance(obj, dict):
        raise UnsafeCheckpoint(f"expected a dict of tensors, found {type(obj).__name__}")
    out = {}
    for key, value in obj.items():
        if not isinstance(key, str):
            raise UnsafeCheckpoint(f"a key is {type(key).__name__}, not a name")
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        elif isinstance(value, np.ndarray):
            out[prefix + key] = value
        else:
            raise UnsafeCheckpoint(f"{prefix}{key} is {type(value).__name__}, not a tensor")
    return out
