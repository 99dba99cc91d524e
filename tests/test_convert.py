"""Checkpoint interop: round trips, the CLI, and refusals with a clear message."""

import json
import shutil

import flax.linen as nn
import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from parcae_jax.interop.convert import ConversionError, _read_config, load_reference, save_reference
from parcae_jax.interop.reference_config import config_to_reference
from parcae_jax.model import build, init_params
from tests.conftest import FIXTURES, ROOT
from tests.forkserver import run_module
from tests.helpers import tiny


@pytest.mark.parametrize("name", ["reference_parcae_tiny", "reference_gpt_tiny"])
def test_save_of_load_reproduces_every_tensor_and_config_field(tmp_path, name):
    src = FIXTURES / name
    cfg, params = load_reference(str(src))
    save_reference(str(tmp_path), cfg, params)
    before, after = load_file(src / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    assert set(before) == set(after)
    for key in before:
        if key == "freqs_cis":  # regenerated: torch's float32 sin/cos differ by ~1 ulp
            np.testing.assert_allclose(after[key], before[key], atol=1e-6, rtol=0)
        else:
            np.testing.assert_array_equal(after[key], before[key], err_msg=key)
    original, written = _read_config(str(src)), json.loads((tmp_path / "config.json").read_text())
    for key, value in original.items():
        assert written[key] == value, key
    assert load_reference(str(tmp_path))[0].replace(reference_config="") == cfg.replace(reference_config="")


def test_fresh_model_saves_and_loads_back(tmp_path):
    for cfg in (tiny(), tiny(arch="gpt", n_layers=3, tie_embeddings=False),
                tiny(injection="linear", tie_embeddings=False)):
        params = nn.unbox(init_params(build(cfg), jax.random.key(1)))
        save_reference(str(tmp_path / cfg.arch), cfg, params)
        cfg2, params2 = load_reference(str(tmp_path / cfg.arch))
        assert config_to_reference(cfg2) == config_to_reference(cfg)
        jax.tree.map(np.testing.assert_array_equal, params2, jax.tree.map(np.asarray, params))
        fields = json.loads((tmp_path / cfg.arch / "config.json").read_text())
        assert fields["_class_name"] == ("GPTConfig" if cfg.arch == "gpt" else "ParcaeConfig")
        assert fields["nonlin_name"] == "ReLU2" and fields["init_strategy"] == "scaled-zero"


def test_gpt_untied_head_is_stored_transposed_as_the_official_fused_head(tmp_path):
    cfg = tiny(arch="gpt", n_layers=2, tie_embeddings=False)
    params = nn.unbox(init_params(build(cfg), jax.random.key(0)))
    save_reference(str(tmp_path), cfg, params)
    assert load_file(tmp_path / "model.safetensors")["lm_head.weight"].shape == (64, 256)  # [d, V]
    cfg = tiny(tie_embeddings=False)
    save_reference(str(tmp_path / "p"), cfg, nn.unbox(init_params(build(cfg), jax.random.key(0))))
    assert load_file(tmp_path / "p" / "model.safetensors")["lm_head.weight"].shape == (256, 64)  # [V, d]


def _copy(tmp_path, name="reference_parcae_tiny"):
    dst = tmp_path / name
    shutil.copytree(FIXTURES / name, dst)
    return dst


@pytest.mark.slow
def test_refuses_what_it_cannot_represent(tmp_path):
    with pytest.raises(ConversionError, match="missing config.json"):
        load_reference(str(tmp_path))
    dst = _copy(tmp_path)
    raw = json.loads((dst / "config.json").read_text())
    raw["config"]["nonlin_name"] = "GELU"
    (dst / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConversionError, match="nonlin_name='GELU' is not supported"):
        load_reference(str(dst))
    dst = _copy(tmp_path / "b")
    tensors = load_file(dst / "model.safetensors")
    del tensors["transformer.adapter.B"]
    save_file(tensors, dst / "model.safetensors")
    with pytest.raises(ConversionError, match="lacks transformer.adapter.B"):
        load_reference(str(dst))
    with pytest.raises(ConversionError, match="one RoPE table"):
        cfg = tiny(d_rec=96, d_rec_mlp=128, n_rec_heads=4)
        save_reference(str(tmp_path / "c"), cfg, nn.unbox(init_params(build(cfg), jax.random.key(0))))


def test_unsupported_training_options_load_and_are_written_back(tmp_path):
    dst = _copy(tmp_path)
    raw = json.loads((dst / "config.json").read_text())
    raw["config"].update(sampling_scheme="poisson-unbounded", recurrent_iteration_method="per-token")
    (dst / "config.json").write_text(json.dumps(raw))
    cfg, params = load_reference(str(dst))
    assert (cfg.sampling_scheme, cfg.sampling_unit) == ("poisson-truncated-full", "per-sequence")
    save_reference(str(tmp_path / "out"), cfg, params)
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (written["sampling_scheme"], written["recurrent_iteration_method"]) == ("poisson-unbounded", "per-token")
    changed = cfg.replace(mean_recurrence=16)  # a changed field is written as changed
    save_reference(str(tmp_path / "out2"), changed, params)
    assert json.loads((tmp_path / "out2" / "config.json").read_text())["mean_recurrence"] == 16


def test_cli(tmp_path):
    run = lambda *a: run_module("parcae_jax.commands.convert", a, cwd=ROOT, timeout=300)  # noqa: E731
    assert run("--help").returncode == 0
    out = run(f"--reference={FIXTURES / 'reference_parcae_tiny'}", f"--out={tmp_path / 'x'}")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["model"]["mean_recurrence"] == 4
    assert (tmp_path / "x" / "model.safetensors").exists()
    bad = run(f"--reference={tmp_path / 'nothing'}")
    assert bad.returncode != 0 and bad.stderr.strip().count("\n") == 0 and "missing config.json" in bad.stderr
