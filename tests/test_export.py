"""A trained run written out in the official format and read back: `commands.export`."""

import os

import jax
import numpy as np
import pytest

from parcae_jax import model as M
from parcae_jax.interop.convert import load_reference
from parcae_jax.interop.transfer import restore_params
from parcae_jax.training.train import train
from tests.conftest import ONE_DEVICE_ENV, ROOT
from tests.forkserver import run_module
from tests.test_train import one_device, small_config


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    config = small_config(steps=4)
    config.ckpt.update(every=2, async_save=False)
    trainer, one = one_device(config)  # a checkpoint does not record the device count it came from
    train(config, str(workdir), one, trainer)
    return workdir


def export(*args):
    return run_module("parcae_jax.commands.export", [*map(str, args)], cwd=ROOT, timeout=300)


@pytest.mark.slow
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
    # the run's attention_impl (auto: the CPU kernel) is an execution setting no export carries
    logits = [M.build(c.replace(dtype="float32", attention_impl="xla")).apply({"params": p}, ids, recurrence=3,
                                                                              initial_state=x0)
              for c, p in ((cfg, params), (ref_cfg, ref_params))]
    np.testing.assert_array_equal(*logits)  # the exported config.json builds the same model
    earlier = export(f"--workdir={run}", "--step=2", f"--output={tmp_path / 'step2'}")
    assert earlier.returncode == 0, earlier.stderr[-2000:]
    first = load_reference(str(tmp_path / "step2"))[1]
    assert not np.array_equal(first["embed"]["embedding"], params["embed"]["embedding"])  # another step's weights


@pytest.mark.slow
def test_export_refuses_in_one_line_and_overwrites_nothing(run, tmp_path):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "model.safetensors").write_bytes(b"precious")
    (tmp_path / "a_file").write_text("precious")
    for args, message in (([f"--workdir={run}", f"--output={taken}"], "exists and is not an empty folder"),
                          ([f"--workdir={run}", f"--output={tmp_path / 'a_file'}"],
                           "exists and is not an empty folder"),
                          ([f"--workdir={run}", "--output=gs://bucket/out"], "export writes a local folder"),
                          ([f"--workdir={run}", "--step=3", f"--output={tmp_path / 'x'}"], "no checkpoint at step 3"),
                          ([f"--workdir={tmp_path / 'nowhere'}", f"--output={tmp_path / 'y'}"], "no checkpoints")):
        out = export(*args)
        assert out.returncode == 2 and out.stderr.count("\n") == 1 and message in out.stderr, out.stderr
    assert (taken / "model.safetensors").read_bytes() == b"precious" and (tmp_path / "a_file").read_text() == "precious"
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists() and not (tmp_path / "nowhere").exists()


@pytest.mark.slow
def test_import_makes_checkpoint_0_that_main_resumes_from(run, tmp_path):
    from tests.test_train import SMALL, losses

    exported = tmp_path / "exported"
    assert export(f"--workdir={run}", f"--output={exported}").returncode == 0
    flags = ["--config=configs/tiny.py", *[f"--config.model.{k}={v}" for k, v in SMALL.items()],
             "--config.train.steps=1", "--config.train.batch_size=8", "--config.train.log_every=1",
             "--config.train.eval_every=0", "--config.optim.muon_dtype=float32"]
    new = tmp_path / "finetune"
    cli = lambda module, *a: run_module(module, a, cwd=ROOT, timeout=300,  # noqa: E731
                                        env={**os.environ, **ONE_DEVICE_ENV})
    out = cli("parcae_jax.main", "--mode=import", f"--reference={exported}", f"--workdir={new}", *flags)
    assert out.returncode == 0, out.stderr[-2000:]
    step, _, params = restore_params(str(new), 0)
    jax.tree.map(np.testing.assert_array_equal, params, load_reference(str(exported))[1])
    trained = cli("parcae_jax.main", f"--workdir={new}", *flags)
    assert trained.returncode == 0 and "resumed from checkpoint 0" in trained.stderr, trained.stderr[-2000:]
    # the first step starts from the imported weights: below the loss of step 1 from scratch
    assert losses(new)[1] < losses(run)[1]
    again = cli("parcae_jax.main", "--mode=import", f"--reference={exported}", f"--workdir={new}", *flags)
    assert again.returncode == 2 and "already holds checkpoints" in again.stderr and again.stderr.count("\n") == 1
    wrong = cli("parcae_jax.main", "--mode=import", f"--reference={exported}", f"--workdir={tmp_path / 'w'}", *flags,
                "--config.model.d_mlp=128")
    assert wrong.returncode == 2 and "d_mlp=64 (config has 128)" in wrong.stderr, wrong.stderr
    assert not (tmp_path / "w").exists()


@pytest.mark.slow
def test_generate_reads_a_training_run_with_its_tokenizer(run):
    """`generate --checkpoint=RUN --step=N` restores that step's parameters and the run's tokenizer."""
    import json

    from parcae_jax.data.tokenizer import ByteTokenizer
    from parcae_jax.infer.generator import Generator

    done = run_module("parcae_jax.commands.generate", [f"--checkpoint={run}", "--step=2",
                           "--prompt=def f(x):", "--max_new_tokens=5", "--json"],
                          cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    _, cfg, params = restore_params(str(run), 2)
    tok = ByteTokenizer()
    want = Generator(cfg, params).generate([tok.encode("def f(x):").tolist()], 5, stop_ids=(tok.eod_id,))
    got = json.loads(done.stdout)
    assert got["tokens"] == want.tokens and got["completions"] == [tok.decode(want.tokens[0])]


def test_readers_of_a_run_fall_back_from_a_damaged_newest_checkpoint_as_training_does(run, tmp_path):
    """generate, export and test_time read through transfer.restore_run: a garbage `_METADATA`
    in the newest checkpoint gives the one before (nothing moved), and a damaged step named
    with --step, or a run with none readable, is one line."""
    import shutil

    from parcae_jax.interop.transfer import restore_run
    from parcae_jax.runtime.checkpoint import CheckpointError

    damaged = tmp_path / "run"
    shutil.copytree(run, damaged)
    (damaged / "checkpoints" / "4" / "state" / "_METADATA").write_text("{garbage")
    step, saved, params = restore_run(str(damaged))
    assert step == 2 and saved["train"]["steps"] == 4
    jax.tree.map(np.testing.assert_array_equal, params, restore_run(str(run), 2)[2])
    assert (damaged / "checkpoints" / "4").is_dir() and not (damaged / "checkpoints_unreadable").exists()
    with pytest.raises(CheckpointError, match=r"none of the checkpoints \[4\] .* can be read"):
        restore_run(str(damaged), 4)
    out = export(f"--workdir={damaged}", f"--output={tmp_path / 'out'}")  # the command, end to end
    assert out.returncode == 0 and (tmp_path / "out" / "model.safetensors").exists(), out.stderr[-2000:]
    (damaged / "checkpoints" / "2" / "state" / "_METADATA").write_text("{garbage")
    out = export(f"--workdir={damaged}", f"--output={tmp_path / 'out2'}")
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert out.returncode == 2 and len(errors) == 1 and "none of the checkpoints [4, 2]" in errors[0], \
        out.stderr[-2000:]
    assert not (tmp_path / "out2").exists()
