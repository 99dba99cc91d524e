"""The command layer: every command's `--help` exits 0 and lists exactly its own flags, and a
flag of the wrong type and a bad value are each one `error:` line with exit 2 (no traceback).

Each command runs as a real process (through tests/forkserver.py). The values chosen fail before
any model loads, so the whole file costs a few seconds; the bad inputs that need a model, a
corpus or a checkpoint are in tests/test_bad_inputs.py."""

import ast
import pathlib
import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from tests.forkserver import run_module

pytestmark = pytest.mark.xdist_group("commands")

MODEL = {"checkpoint", "step", "tokenizer", "seed", "dtype"}  # commands/trained_model.py
CORPUS = {"input", "text_field", "tfds", "tfds_split", "tfds_data_dir"}  # commands/corpus_flags.py
# Each command: (its flags, a flag of the wrong type (for the two commands whose flags are all
# strings or choices: a flag without its value), a bad value, what the bad value's line says).
# {tmp}: a fresh folder.
COMMANDS = {
    "parcae_jax.main": ({"config", "workdir", "mode", "reference"},
                        "--config.train.steps=many", "--mode=fly", "should be one of <train|eval"),
    "parcae_jax.commands.prepare": (CORPUS | {"output", "overwrite", "tokenizer", "eod_token", "docs_per_shard",
                                              "val_every", "workers"},
                                    "--workers=two", "--val_every=-1", "-1 is not a non-negative integer"),
    "parcae_jax.commands.train_tokenizer": (CORPUS | {"vocab_size", "max_documents", "output"},
                                            "--vocab_size=big", "--max_documents=-3", "not a non-negative integer"),
    "parcae_jax.commands.convert": ({"reference", "out"}, "--reference", "--reference={tmp}/none",
                                    "missing config.json"),
    "parcae_jax.commands.export": ({"workdir", "step", "output"}, "--step=last", "--step=-1",
                                   "not a non-negative integer"),
    "parcae_jax.commands.generate": (MODEL | {"prompt", "max_new_tokens", "temperature", "top_k", "top_p", "stop_ids",
                                              "recurrence", "cache_strategy", "exit_rule", "exit_threshold", "json",
                                              "bench", "bench_config", "bench_prompt_lens", "bench_batches"},
                                     "--max_new_tokens=abc", "--prompt=a --top_p=0", "top_p must be in (0, 1]"),
    "parcae_jax.commands.evaluate": (MODEL | {"recurrences", "tasks", "limit", "num_fewshot", "eval_batch_size",
                                              "output", "bench", "bench_config"},
                                     "--limit=x", "--tasks=t --recurrences=0", "give positive integers"),
    "parcae_jax.commands.recurrence_curve": (MODEL | {"recurrences", "val_batches", "val_batch_size", "data_path",
                                                      "out_dir"},
                                             "--seed=1.5", "--val_batches=0", "0 is not a positive integer"),
    "parcae_jax.commands.sweep": ({"action", "sweep", "commands", "allow_missing", "out_dir"},
                                  "--commands=maybe", "--action=dance", "should be one of <plan|run|status|fit>"),
    "parcae_jax.commands.stability": ({"out_dir", "base", "steps", "lr_multipliers", "variants", "state_bound",
                                       "spike_nats"},
                                      "--state_bound=high", "--out_dir={tmp}/s --lr_multipliers=-1", "must be > 0"),
    "parcae_jax.commands.compare": ({"out_dir", "base", "steps"}, "--steps=many", "--steps=0",
                                    "not a positive integer"),
    "parcae_jax.commands.report": ({"preset", "out_dir"}, "--out_dir", "--preset=huge", "should be one of <toy|smoke>"),
    "parcae_jax.commands.bench_data": ({"out", "batch_size", "loader_batches"}, "--batch_size=x", "--batch_size=0",
                                       "not a positive integer"),
    "parcae_jax.commands.memory_table": ({"output", "targets", "configs", "markdown"},
                                         "--markdown=perhaps", "--targets=9xH100", "unknown --targets"),
}


def run(module: str, args: list[str], cwd=ROOT):
    return run_module(module, args, cwd=cwd, timeout=120)


def test_the_table_holds_every_command():
    """Every module of commands/ with a `run()` (what pyproject's console scripts call) is here."""
    modules = {f"parcae_jax.commands.{p.stem}" for p in (ROOT / "parcae_jax" / "commands").glob("*.py")
               if re.search(r"^def run\(\)", p.read_text(), re.M)}
    assert modules | {"parcae_jax.main"} == set(COMMANDS)
    scripts = set(re.findall(r'= "(parcae_jax[\w.]+):run"', (ROOT / "pyproject.toml").read_text()))
    assert scripts == set(COMMANDS)


SCRIPTS = {module: script for script, module in
           re.findall(r'^([\w-]+) = "(parcae_jax[\w.]+):run"', (ROOT / "pyproject.toml").read_text(), re.M)}


@pytest.mark.parametrize("module", sorted(COMMANDS))
def test_help_lists_exactly_the_commands_own_flags(module, tmp_path):
    """Through the installed console script, from a folder outside the checkout: the script
    works anywhere, and its --help is the module's docstring and exactly its flags."""
    script = pathlib.Path(sys.executable).parent / SCRIPTS[module]
    assert script.exists(), f"{script.name} is not installed: pip install -r requirements.txt -e ."
    out = subprocess.run([str(script), "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stderr == "", out.stderr[-2000:]
    listed = set(re.findall(r"^\s+--(?:\[no\])?(\w+):", out.stdout, re.M))
    assert listed == COMMANDS[module][0]
    assert "python -m" in out.stdout.split("\n\n")[1]  # the docstring's usage comes first
    # read, not imported: a command defines its flags on import
    source = (ROOT / (module.replace(".", "/") + ".py")).read_text()
    assert ast.get_docstring(ast.parse(source)).splitlines()[0] in out.stdout


@pytest.mark.parametrize("module", sorted(COMMANDS))
def test_a_wrong_type_and_a_bad_value_are_one_line_and_exit_2(module, tmp_path):
    _, wrong_type, bad_value, says = COMMANDS[module]
    cases = [(bad_value, says), (wrong_type, wrong_type.split("=")[0])]
    for args, message in cases:
        out = run(module, args.format(tmp=tmp_path).split(), cwd=tmp_path)  # a relative write would land here
        lines = [line for line in out.stderr.splitlines() if line.strip()]
        assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (args, out.stderr[-2000:])
        assert message in lines[0], (args, lines[0])
    assert list(tmp_path.iterdir()) == []  # nothing written


@pytest.mark.parametrize("old,new", [("parcae_jax.data.prepare", "commands.prepare"),
                                     ("parcae_jax.data.tokenizer", "commands.train_tokenizer"),
                                     ("parcae_jax.science.sweep", "commands.sweep"),
                                     ("parcae_jax.bench.data", "commands.bench_data")])
def test_an_old_command_line_says_where_the_command_went(old, new, tmp_path):
    """The library modules that used to be commands: exit 2 and the new name, never a silent 0."""
    out = run(old, ["--input=x", "--output=y", "plan", "toy"], cwd=tmp_path)
    assert out.returncode == 2 and out.stderr.strip() == (f"error: this module is a library now; run python -m "
                                                          f"parcae_jax.{new} (--help lists its flags)")
    assert list(tmp_path.iterdir()) == []
