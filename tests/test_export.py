"""A trained run written out in the official format and read back: `convert export`."""

import subprocess
import sys

import jax
import numpy as np
import pytest

from parcae_jax import model as M
from parcae_jax.convert import load_reference
from parcae_jax.train import train
from parcae_jax.transfer import restore_params
from parcae_jax.validate import validate
from tests.conftest import ROOT
from tests.test_train import small_config


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    config = small_config(steps=4)
    config.ckpt.update(every=2, async_save=False)
    train(config, str(workdir), validate(config))
    return workdir


def export(*args):
    return subprocess.run([sys.executable, "-m", "parcae_jax.convert", "export", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_an_exported_run_reads_back_bit_equal_with_equal_logits(run, tmp_path):
    out = export(f"--workdir={run}", f"--output={tmp_path / 'out'}")
    assert out.returncode == 0, out.stderr[-2000:]
    step, cfg, params = restore_params(str(run))
    assert step == 4
    ref_cfg, ref_params = load_reference(str(tmp_path / "out"))
    assert jax.tree.structure(ref_params) == jax.tree.structure(params)
    jax.tree.map(np.testing.assert_array_equal, ref_params, params)
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, cfg.seq_len)).astype(np.int32)
    x0 = np.zeros((2, cfg.seq_len, cfg.d_rec), np.float32)
    logits = [M.build(c.replace(dtype="float32")).apply({"params": p}, ids, recurrence=3, initial_state=x0)
              for c, p in ((cfg, params), (ref_cfg, ref_params))]
    np.testing.assert_array_equal(*logits)  # the exported config.json builds the same model
    earlier = export(f"--workdir={run}", "--step=2", f"--output={tmp_path / 'step2'}")
    assert earlier.returncode == 0, earlier.stderr[-2000:]
    first = load_reference(str(tmp_path / "step2"))[1]
    assert not np.array_equal(first["embed"]["embedding"], params["embed"]["embedding"])  # another step's weights


def test_export_refuses_in_one_line_and_overwrites_nothing(run, tmp_path):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "model.safetensors").write_bytes(b"precious")
    for args, message in (([f"--workdir={run}", f"--output={taken}"], "exists and is not empty"),
                          ([f"--workdir={run}", "--step=3", f"--output={tmp_path / 'x'}"], "no checkpoint at step 3"),
                          ([f"--workdir={tmp_path / 'nowhere'}", f"--output={tmp_path / 'y'}"], "no checkpoints")):
        out = export(*args)
        assert out.returncode == 2 and out.stderr.count("\n") == 1 and message in out.stderr, out.stderr
    assert (taken / "model.safetensors").read_bytes() == b"precious"
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists() and not (tmp_path / "nowhere").exists()
