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

What a hostile or damaged file could still try with the admitted names is refused too: a
tensor must view a storage (never another tensor) from a non-negative offset, within its
bounds and with no more elements than the storage (no expanded views); a storage must hold
exactly its element count of its type (as torch writes it), lie inside its own zip entry
(never in the next one's bytes) and match the entry's CRC, since the memory map bypasses
zipfile's check; the objects find_class hands out are fresh and sealed (BUILD cannot retype a
storage for later reads); storages must be stored uncompressed and the pickle small; a dict
met twice or nested deeply is refused. Any damage is one UnsafeCheckpoint line.
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
import zipfile
import zlib

import ml_dtypes
import numpy as np

from parcae_jax.errors import UserError


class UnsafeCheckpoint(UserError, ValueError):
    """The file is not a plain state dict of tensors (or not a torch zip archive)."""


MAX_PICKLE_BYTES = 256 << 20  # the pickle holds names and shapes only; tensors are in the storages
MAX_DEPTH = 8  # nesting of dicts: {"model": state_dict} is 2


_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


class _Sealed:
    """Base of what find_class hands out: no attribute can be set and BUILD is refused, so a
    pickle cannot reconfigure these objects (say, a storage type's dtype) for itself or for
    the next file read in this process."""

    __slots__ = ()

    def __setattr__(self, name, value):
        raise UnsafeCheckpoint("the pickle tries to modify a tensor constructor")

    def __setstate__(self, state):
        raise UnsafeCheckpoint("the pickle tries to modify a tensor constructor")


class _StorageType(_Sealed):
    """What `torch.FloatStorage` (etc.) resolves to: only its element type."""

    __slots__ = ("dtype",)

    def __init__(self, dtype):
        object.__setattr__(self, "dtype", np.dtype(dtype))


class _Storage(_Sealed):
    """A storage as persistent_load returns it: a 1-D array of the archive's bytes. Only
    _rebuild_tensor takes it, so a tensor is always a view of a real storage, never of
    another tensor (whose shape may claim more elements than memory holds)."""

    __slots__ = ("array",)

    def __init__(self, array: np.ndarray):
        object.__setattr__(self, "array", array)


class _Function(_Sealed):
    """An allowed torch function, mapped to ours; sealed like the rest."""

    __slots__ = ("fn",)

    def __init__(self, fn):
        object.__setattr__(self, "fn", fn)

    def __call__(self, *args):
        return self.fn(*args)


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    """torch._utils._rebuild_tensor_v2: a strided view of `storage`, bounds checked."""
    del requires_grad, backward_hooks, metadata
    ints = lambda xs: isinstance(xs, tuple) and all(type(x) is int and x >= 0 for x in xs)  # noqa: E731
    if not isinstance(storage, _Storage) or not ints((offset,)) or not ints(size) or not ints(stride) \
            or len(size) != len(stride):  # a negative offset would make the view start before the storage
        raise UnsafeCheckpoint("a tensor record is malformed")
    array = storage.array
    elements = 1
    for n in size:
        elements *= n
    last = offset + sum((n - 1) * s for n, s in zip(size, stride)) if elements else offset - 1
    if last >= array.size:
        raise UnsafeCheckpoint(f"a tensor reaches element {last} of a storage of {array.size}")
    if elements > array.size:  # an expanded (stride-0) view: never in a state dict, and a copy could be huge
        raise UnsafeCheckpoint(f"a tensor of {elements} elements views a storage of {array.size}")
    item = array.dtype.itemsize
    return np.lib.stride_tricks.as_strided(array[offset:] if elements else array[:0], size,
                                           [s * item for s in stride], writeable=False)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    """torch._utils._rebuild_parameter: an nn.Parameter is its data."""
    del requires_grad, backward_hooks
    if not isinstance(data, np.ndarray):
        raise UnsafeCheckpoint("a parameter record is malformed")
    return data


def _allowed(module: str, name: str):
    """A fresh object for each allowed global (nothing shared between files), else None."""
    if (module, name) == ("collections", "OrderedDict"):
        return collections.OrderedDict  # a built-in type: its attributes cannot be set
    if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_parameter"):
        return _Function(_rebuild_tensor if name == "_rebuild_tensor_v2" else _rebuild_parameter)
    if module == "torch" and name in _STORAGE_DTYPES:
        return _StorageType(_STORAGE_DTYPES[name])
    return None


class _StateDictUnpickler(pickle.Unpickler):
    def __init__(self, file, storages):
        super().__init__(file)
        self._storages = storages

    def find_class(self, module: str, name: str):
        found = _allowed(module, name) if isinstance(module, str) and isinstance(name, str) else None
        if found is None:
            raise UnsafeCheckpoint(f"refused to load {module}.{name}: only a state dict of tensors is read, "
                                   "and this pickle names something else (it could run code)")
        return found

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str) and type(pid[4]) is int
                and pid[4] >= 0):
            raise UnsafeCheckpoint(f"unknown persistent id {str(pid)[:80]}")
        return _Storage(self._storages(pid[2], pid[1].dtype, pid[4]))


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
    try:
        return _flatten(_load(path))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError, struct.error) as e:
        if isinstance(e, UnsafeCheckpoint):
            raise
        raise UnsafeCheckpoint(f"damaged archive ({type(e).__name__}: {e})") from None


def _member_ends(archive: zipfile.ZipFile) -> dict[int, int]:
    """Local header offset -> where that member's room ends (the next member's header, or the
    central directory): a member whose size claims more would read its neighbour's bytes."""
    offsets = sorted({i.header_offset for i in archive.infolist()} | {archive.start_dir})
    if offsets[0] < 0:
        raise UnsafeCheckpoint("a zip entry starts before the archive")
    return dict(zip(offsets, offsets[1:]))


def _crc32(data: np.ndarray, chunk: int = 64 << 20) -> int:
    crc = 0
    for i in range(0, data.size, chunk):
        crc = zlib.crc32(data[i:i + chunk], crc)
    return crc


def _load(path: str):
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise UnsafeCheckpoint("no single <root>/data.pkl in the archive")
        root = pickles[0][: -len("data.pkl")]
        byteorder = archive.read(root + "byteorder").decode(errors="replace").strip() \
            if root + "byteorder" in archive.namelist() else "little"
        if byteorder not in ("little", "big"):
            raise UnsafeCheckpoint(f"byteorder says {byteorder[:20]!r}, neither little nor big")
        order = "<" if byteorder == "little" else ">"
        whole = np.memmap(path, np.uint8, mode="r")  # one read-only mapping; storages are views of it
        ends = _member_ends(archive)

        def storage(key: str, dtype: np.dtype, numel: int) -> np.ndarray:
            try:
                info = archive.getinfo(f"{root}data/{key}")
            except KeyError:
                raise UnsafeCheckpoint(f"storage {key!r} is missing from the archive") from None
            dtype = np.dtype(dtype).newbyteorder(order) if np.dtype(dtype).itemsize > 1 else np.dtype(dtype)
            if info.compress_type != zipfile.ZIP_STORED:  # torch stores storages; inflating could be unbounded
                raise UnsafeCheckpoint(f"storage {key!r} is compressed; torch.save writes storages uncompressed")
            if info.file_size != numel * dtype.itemsize:  # torch writes exactly numel elements: a storage
                # typed or sized otherwise than it was saved would read its bytes as something else
                raise UnsafeCheckpoint(f"storage {key!r} holds {info.file_size} bytes, not {numel} x "
                                       f"{dtype.itemsize}-byte elements")
            start = _member_offset(archive, info)
            if start + info.file_size > ends[info.header_offset]:
                raise UnsafeCheckpoint(f"storage {key!r} runs past its place in the archive")
            data = whole[start:start + info.file_size]
            if _crc32(data) != info.CRC:  # memory-mapped bytes bypass zipfile's own check
                raise UnsafeCheckpoint(f"storage {key!r} is damaged (CRC mismatch)")
            return data.view(dtype)

        info = archive.getinfo(pickles[0])
        if info.file_size > MAX_PICKLE_BYTES:
            raise UnsafeCheckpoint(f"data.pkl is {info.file_size} bytes; a state dict's is far smaller")
        data = io.BytesIO(archive.read(info))
        try:
            obj = _StateDictUnpickler(data, storage).load()
        except UnsafeCheckpoint:
            raise
        except Exception as e:  # a damaged or hostile pickle: never half-loaded
            raise UnsafeCheckpoint(f"unreadable pickle ({type(e).__name__}: {e})") from None
    return obj


def _flatten(obj, prefix: str = "", seen: set | None = None) -> dict[str, np.ndarray]:
    """{key: tensor}; nested dicts (e.g. {"model": state_dict}) give dotted keys. A dict met
    twice (shared or self-referencing through the pickle's memo) or nested too deep is refused:
    either could expand a small file into an enormous key set."""
    seen = set() if seen is None else seen
    if not isinstance(obj, dict):
        raise UnsafeCheckpoint(f"expected a dict of tensors, found {type(obj).__name__}")
    if id(obj) in seen or prefix.count(".") >= MAX_DEPTH:
        raise UnsafeCheckpoint(f"{prefix or 'the top-level dict'} is shared or nested too deep")
    seen.add(id(obj))
    out = {}
    for key, value in obj.items():
        if not isinstance(key, str):
            raise UnsafeCheckpoint(f"a key is {type(key).__name__}, not a name")
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}.", seen))
        elif isinstance(value, np.ndarray):
            out[prefix + key] = value
        else:
            raise UnsafeCheckpoint(f"{prefix}{key} is {type(value).__name__}, not a tensor")
    return out
