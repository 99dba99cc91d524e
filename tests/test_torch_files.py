"""Official checkpoints as people have them: PyTorch pickles (read without torch, never run),
shards, wrapper prefixes; and the one-line errors for what cannot be read."""

import io
import json
import os
import pickle
import shutil
import zipfile

import jax
import numpy as np
import pytest

from parcae_jax.interop.convert import load_reference
from parcae_jax.interop.reference_config import ConversionError
from parcae_jax.interop.torch_pickle import UnsafeCheckpoint, read_state_dict
from tests.conftest import ROOT
from tests.forkserver import run_module

FIXTURES = ROOT / "tests" / "fixtures"
TORCH = FIXTURES / "torch_files"  # written by real torch 2.13 (tests/fixtures/torch_files/make.py)


@pytest.fixture(scope="module")
def safetensors_params():
    return load_reference(str(FIXTURES / "reference_parcae_tiny"))


@pytest.mark.parametrize("folder", ["parcae_bin", "parcae_pt", "parcae_shards"])
def test_torch_pickles_load_to_the_same_parameters_as_the_safetensors_file(folder, safetensors_params):
    cfg, params = load_reference(str(TORCH / folder))
    want_cfg, want = safetensors_params
    assert cfg == want_cfg
    assert jax.tree.structure(params) == jax.tree.structure(want)
    jax.tree.map(np.testing.assert_array_equal, params, want)  # bit for bit


def _memmapped(a) -> bool:
    while a is not None:
        if isinstance(a, np.memmap):
            return True
        a = a.base
    return False


def test_tensors_are_read_only_views_of_the_mapped_file_with_their_strides():
    tensors = read_state_dict(str(TORCH / "parcae_pt" / "model.pt"))
    assert all(_memmapped(t) and not t.flags.writeable for t in tensors.values())
    fc = tensors["module.transformer.coda.0.mlp.fc.weight"]  # saved as a transposed view
    assert fc.flags.f_contiguous and not fc.flags.c_contiguous
    plain = read_state_dict(str(TORCH / "parcae_bin" / "pytorch_model.bin"))[
        "_orig_mod.transformer.coda.0.mlp.fc.weight"]
    np.testing.assert_array_equal(fc, plain)


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _torch_like_archive(path, obj, protocol=2):
    """A zip laid out as torch.save lays it out, holding pickle.dumps(obj) as data.pkl."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pickle.dumps(obj, protocol=protocol))
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/version", "3\n")


@pytest.mark.parametrize("protocol", [2, 4])  # GLOBAL and STACK_GLOBAL
def test_a_pickle_that_would_run_code_is_refused_without_running_it(tmp_path, protocol):
    marker = tmp_path / "ran"
    folder = tmp_path / "evil"
    folder.mkdir()
    shutil.copy(TORCH / "parcae_bin" / "config.json", folder / "config.json")
    _torch_like_archive(folder / "pytorch_model.bin", {"transformer.wte.weight": _RunsCode(marker)}, protocol)
    with pytest.raises(UnsafeCheckpoint, match=r"refused to load (posix|os)\.system"):
        read_state_dict(str(folder / "pytorch_model.bin"))
    out = run_module("parcae_jax.commands.convert", [f"--reference={folder}"], cwd=ROOT, timeout=120)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "refused to load" in out.stderr, out.stderr
    assert not marker.exists()  # nothing ran, in this process or the CLI's


def test_what_is_not_a_state_dict_of_tensors_is_named(tmp_path):
    _torch_like_archive(tmp_path / "a.pt", {"step": 3})
    with pytest.raises(UnsafeCheckpoint, match="step is int, not a tensor"):
        read_state_dict(str(tmp_path / "a.pt"))
    _torch_like_archive(tmp_path / "b.pt", {"rng": np.random.default_rng(0).bit_generator.state["state"]["state"]})
    with pytest.raises(UnsafeCheckpoint, match="rng is int"):
        read_state_dict(str(tmp_path / "b.pt"))
    _torch_like_archive(tmp_path / "c.pt", {"x": np.zeros(2)})  # numpy's own reconstruct: refused too
    with pytest.raises(UnsafeCheckpoint, match="refused to load numpy"):
        read_state_dict(str(tmp_path / "c.pt"))
    (tmp_path / "legacy.bin").write_bytes(pickle.dumps({"a": 1}))  # torch < 1.6 wrote raw pickles
    with pytest.raises(UnsafeCheckpoint, match="not a torch zip archive"):
        read_state_dict(str(tmp_path / "legacy.bin"))
    archive = io.BytesIO((TORCH / "parcae_bin" / "pytorch_model.bin").read_bytes())
    truncated = tmp_path / "truncated.bin"  # the pickle names a storage the archive lacks
    with zipfile.ZipFile(archive) as src, zipfile.ZipFile(truncated, "w") as dst:
        for info in src.infolist():
            if not info.filename.endswith("/data/0"):
                dst.writestr(info, src.read(info))
    with pytest.raises(UnsafeCheckpoint, match="storage '0' is missing"):
        read_state_dict(str(truncated))


def _folder_with(tmp_path, source, change=None, drop=()):
    folder = tmp_path / "ckpt"
    shutil.copytree(TORCH / source, folder)
    for name in drop:
        (folder / name).unlink()
    if change:
        cfg = json.loads((folder / "config.json").read_text())
        change(cfg.get("config", cfg))
        (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def _cli_error(folder) -> str:
    out = run_module("parcae_jax.commands.convert", [f"--reference={folder}"], cwd=ROOT, timeout=120)
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    return out.stderr


def test_bad_folders_fail_with_one_line(tmp_path):
    folder = _folder_with(tmp_path, "parcae_bin", drop=["pytorch_model.bin"])
    (folder / "weights.ckpt").write_bytes(b"\0" * 8)
    assert ("no weights; expected one of model.safetensors" in _cli_error(folder)
            and "weights.ckpt" in _cli_error(folder))
    shutil.rmtree(folder)
    folder = _folder_with(tmp_path, "parcae_shards", drop=["pytorch_model-00002-of-00002.bin"])
    assert "names shards that are not there" in _cli_error(folder)
    shutil.rmtree(folder)

    def wider(cfg):
        cfg["intermediate_size"] = 2 * cfg["intermediate_size"]
    folder = _folder_with(tmp_path, "parcae_pt", change=wider)
    with pytest.raises(ConversionError, match=r"mlp\.fc\.weight is \[\d+, \d+\] in model\.pt, but config\.json"):
        load_reference(str(folder))


def _crafted(path, opcodes: bytes, storages: dict[str, bytes] | None = None, compress=zipfile.ZIP_STORED):
    """An archive whose data.pkl is the given raw pickle opcodes."""
    with zipfile.ZipFile(path, "w", compress) as z:
        z.writestr("archive/data.pkl", opcodes)
        for key, data in (storages or {}).items():
            z.writestr(f"archive/data/{key}", data)


def _u(text: str) -> bytes:  # BINUNICODE
    return b"X" + len(text.encode()).to_bytes(4, "little") + text.encode()


def _tensor(storage: bytes, size: int, stride: int) -> bytes:
    """Opcodes of _rebuild_tensor_v2(storage, 0, (size,), (stride,)), `storage` already on the stack."""
    return (b"ctorch._utils\n_rebuild_tensor_v2\n" + b"(" + storage + b"K\x00" + b"J" + size.to_bytes(4, "little")
            + b"\x85" + b"J" + stride.to_bytes(4, "little", signed=True) + b"\x85" + b"tR")


STORAGE = b"(" + _u("storage") + b"ctorch\nFloatStorage\n" + _u("0") + _u("cpu") + b"K\x01tQ"  # 1 float


def test_hostile_tensor_records_are_refused_before_any_memory_is_touched(tmp_path):
    one = np.float32(1.5).tobytes()
    cases = {  # name: (data.pkl, compression, expected message)
        # a tensor whose storage is another tensor: with a stride-0 inner view claiming 2**20
        # elements of a 1-element storage, as_strided would walk 4 MB past the mapping
        "view of a view": (b"\x80\x02}" + _u("w") + _tensor(_tensor(STORAGE, 1, 1), 1, 1) + b"s.",
                           zipfile.ZIP_STORED, "malformed"),
        "expanded": (b"\x80\x02}" + _u("w") + _tensor(STORAGE, 2**20, 0) + b"s.", zipfile.ZIP_STORED,
                     "views a storage of 1"),
        "compressed storage": (b"\x80\x02}" + _u("w") + _tensor(STORAGE, 1, 1) + b"s.", zipfile.ZIP_DEFLATED,
                               "is compressed"),
        # BUILD on what find_class returned: would turn every later FloatStorage into float16
        "poisoning": (b"\x80\x02ctorch\nFloatStorage\n}" + _u("dtype") + _u("f2") + b"sb0}.", zipfile.ZIP_STORED,
                      "modify a tensor constructor"),
        "self-reference": (b"\x80\x02}q\x00" + _u("a") + b"h\x00s.", zipfile.ZIP_STORED, "shared or nested"),
    }
    for name, (opcodes, compress, message) in cases.items():
        path = tmp_path / f"{name}.pt"
        _crafted(path, opcodes, {"0": one}, compress)
        with pytest.raises(UnsafeCheckpoint, match=message):
            read_state_dict(str(path))
    fixture = read_state_dict(str(TORCH / "parcae_pt" / "model.pt"))  # nothing leaked into later reads
    assert {t.dtype for t in fixture.values()} == {np.dtype(np.float32)}
