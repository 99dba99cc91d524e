"""Configs: every file loads and validates; bad settings fail early with one clear line."""

import dataclasses
import importlib
import os

import pytest

from parcae_jax.model import build
from parcae_jax.model.config import ConfigError, ModelConfig
from parcae_jax.training import defaults
from tests.conftest import ROOT
from tests.forkserver import run_module
from tests.helpers import TINY

CONFIGS = sorted(p.stem for p in (ROOT / "configs").glob("*.py") if p.stem != "__init__")


def load(name):
    return importlib.import_module(f"parcae_jax.configs.{name}").get_config()


def test_every_model_default_is_the_dataclass_default_field_by_field_and_value_by_value():
    base = defaults.get_config()
    fields = {f.name: f for f in dataclasses.fields(ModelConfig)}
    assert set(base.model.keys()) == set(fields) - {"reference_config"}
    for name, value in base.model.items():
        default = fields[name].default
        assert value == default and type(value) is type(default), (name, value, default)
    # The resolved config is the dataclass's own default, whatever the backend resolves "auto" to.
    assert ModelConfig.from_mapping(base.model) == ModelConfig(dtype=ModelConfig().compute_dtype)
    for key in ("model.mean_recurrence", "model.mean_backprop_depth", "model.sampling_scheme", "model.injection",
                "seed"):
        node = base
        for part in key.split("."):
            node = node[part]


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_validates(name):
    config = load(name)
    cfg = ModelConfig.from_mapping(config.model)
    assert cfg.arch == ("gpt" if name.startswith("gpt") else "parcae")
    assert importlib.import_module(f"parcae_jax.configs.{name}").__doc__.count("Command:") == 1


BAD = [
    (dict(n_heads=5), "model.n_heads=5 does not divide d_model=64"),
    (dict(n_kv_heads=3), "model.n_kv_heads=3 does not divide n_heads=4"),
    (dict(injection="sum"),
     "model.injection='sum' is unknown; set --config.model.injection to one of diagonal|linear|add"),
    (dict(injection="add", d_rec=96, n_rec_heads=6, d_rec_mlp=128), "injection='add' needs d_rec == d_model"),
    (dict(mean_recurrence=0), "model.mean_recurrence=0 must be >= 1"),
    (dict(mean_backprop_depth=0), "model.mean_backprop_depth=0 must be >= 1"),
    (dict(seq_len=128), "model.seq_len=128 exceeds block_size=64"),
    (dict(d_rec=64, n_rec_heads=3), "model.n_rec_heads=3 does not divide d_rec=64"),
    (dict(sampling_scheme="poisson"), "model.sampling_scheme='poisson' is unknown"),
    (dict(remat_policy="some"), "model.remat_policy='some' is unknown"),
    (dict(d_model="64"), "model.d_model='64' must be of type int"),
    (dict(colour="blue"), "model.colour is not a model setting"),
]


@pytest.mark.parametrize("change,message", BAD)
def test_bad_model_config_names_the_field_and_the_fix(change, message):
    with pytest.raises(ConfigError) as err:
        build({**TINY, **change})
    assert message in str(err.value) and "\n" not in str(err.value)


def run_main(*args):
    env = {**os.environ, "JAX_LOG_COMPILES": "1"}  # a compile would add log lines to stderr
    return run_module("parcae_jax.main", [*args], cwd=ROOT, env=env, timeout=120)


@pytest.mark.parametrize("args,message", [
    (["--config.model.n_heads=5"], "model.n_heads=5 does not divide d_model=1536"),
    (["--config.model.injection=sum"], "model.injection='sum' is unknown"),
    (["--config.model.mean_recurrence=0"], "model.mean_recurrence=0 must be >= 1"),
    (["--config.model.injection=add", "--config.model.d_rec=768", "--config.model.n_rec_heads=6"],
     "injection='add' needs d_rec == d_model"),
    (["--config.model.nheads=5"], "--config.model.nheads: no such config key"),
    (["--config.model.nheads", "5"],  # the two-token form, with a suggestion
     "--config.model.nheads: no such config key (did you mean --config.model.n_heads?)"),
    (["--config.trainz.steps", "5"], "--config.trainz.steps: no such config key (did you mean --config.train.steps?)"),
    (["--config.model.d_model=wide"], "--config.model.d_model=wide"),
    (["--config.model.seq_len=4096"], "model.seq_len=4096 exceeds block_size=2048"),
])
def test_cli_rejects_bad_settings_with_one_line_and_exit_code_2(args, message):
    out = run_main("--config=configs/1p3b.py", "--mode=describe", *args)
    assert out.returncode == 2
    assert out.stdout == "" and out.stderr.count("\n") == 1 and message in out.stderr, out.stderr


def test_cli_rejects_a_missing_config_file():
    out = run_main("--config=configs/no_such.py", "--mode=describe")
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "configs/no_such.py" in out.stderr


@pytest.mark.parametrize("source,arg,message", [
    ("def get_config(arg=None):\n    raise ValueError(f'no variant {arg!r}')\n", "",
     "get_config() raised ValueError at line 2: no variant None"),
    ("def get_config(arg=None):\n    raise ValueError(f'no variant {arg!r}')\n", ":wide",
     "get_config('wide') raised ValueError at line 2: no variant 'wide'"),
    ("import no_such_module\n", "", "loading it raised ModuleNotFoundError at line 1"),
    ("def get_config(arg=None):\n    return None\n", "", "get_config() returned NoneType, not a ConfigDict"),
])
def test_cli_rejects_a_config_file_that_fails_in_python_with_one_line(tmp_path, source, arg, message):
    (tmp_path / "broken.py").write_text(source)
    out = run_main(f"--config={tmp_path / 'broken.py'}{arg}", "--mode=describe")
    assert out.returncode == 2
    assert out.stdout == "" and out.stderr.count("\n") == 1 and message in out.stderr, out.stderr


def test_dtype_fast_is_bf16_exactly_where_the_cpu_has_bf16_dot_instructions(tmp_path):
    from parcae_jax.model.machine import cpu_has_bf16_dots, resolve_dtype

    flags = "fpu vme sse2 avx2 avx512f avx512bw avx512_vnni"
    for extra, expected in (("", False), (" avx512_bf16", True), (" amx_bf16 amx_tile", True)):
        info = tmp_path / f"cpuinfo{len(extra)}"
        info.write_text(f"processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: {flags}{extra}\n\n")
        assert cpu_has_bf16_dots(str(info)) is expected, extra
    assert cpu_has_bf16_dots(str(tmp_path / "missing")) is False  # macOS: no /proc/cpuinfo
    # on this machine (CPU backend): "fast" follows the flags, "auto" stays float32, and a run
    # records the resolved dtype
    fast = "bfloat16" if cpu_has_bf16_dots() else "float32"
    assert (resolve_dtype("fast"), resolve_dtype("auto"), resolve_dtype("float16")) == (fast, "float32", "float16")
    assert ModelConfig.from_mapping({**TINY, "dtype": "fast"}).dtype == fast
    assert load("tiny").model.dtype == load("bench_cpu").model.dtype == "fast"


def test_remat_auto_keeps_the_dots_and_the_attention_kernel_outputs_on_cpu_only():
    from parcae_jax.model.machine import resolve_remat_policy, resolve_scan_unroll

    # this suite runs on the CPU backend
    assert resolve_remat_policy("auto") == "dots_attention"
    assert resolve_scan_unroll("auto") == "full" and ModelConfig().unroll_grad_scan
    assert not ModelConfig(scan_unroll="none").unroll_grad_scan
    assert resolve_remat_policy("none") == "none"
    for dtype in ("float32", "bfloat16"):
        assert ModelConfig(dtype=dtype).loop_remat_policy == "dots_attention"
    assert ModelConfig(dtype="bfloat16", remat_policy="dots").loop_remat_policy == "dots"


def test_every_config_key_has_one_kind_for_resume_and_for_science():
    """runtime/config_keys.py is the one table: each default key matches an entry, each entry
    governs some key, and resume and the science provenance read their answers from it."""
    from parcae_jax.runtime import config_keys, resume
    from parcae_jax.science import provenance

    keys = resume._flat(defaults.get_config().to_dict())
    assert [k for k in keys if config_keys.entry(k) is None] == []
    assert {config_keys.entry(k) for k in keys} == set(config_keys.KINDS)
    saved = defaults.get_config().to_dict()
    for key, kind in ((("model", "d_model"), config_keys.IDENTITY), (("optim", "lr"), config_keys.SCHEDULE),
                      (("model", "loss_chunk"), config_keys.EXECUTION)):
        now = defaults.get_config().to_dict()
        now[key[0]][key[1]] = 7
        refused = kind == config_keys.IDENTITY
        if refused:
            with pytest.raises(resume.ResumeRefused, match=".".join(key)):
                resume.check(saved, now, 10, None)
        else:
            assert resume.check(saved, now, 10, None) is None
        assert (provenance.differences(saved, now) is None) == (kind == config_keys.EXECUTION)
