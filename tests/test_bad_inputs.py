"""Every mistake a user can make on the command line: one line on stderr naming the problem,
exit code 2, and nothing in the workdir or the data folder changed (hashed before and after)."""

import hashlib
import json
import os
import shutil

import pytest

from parcae_jax.data.prepare import prepare
from parcae_jax.train import train
from parcae_jax.workdir_lock import WorkdirLock
from tests.forkserver import run_module
from tests.conftest import ROOT
from tests.test_train import SMALL, one_device, small_config

SMALL_FLAGS = [f"--config.model.{k}={v}" for k, v in SMALL.items()] + [
    "--config.train.batch_size=8", "--config.train.eval_batches=1", "--config.optim.muon_dtype=float32"]

# (flags, what the one line must say). {W}: a trained workdir, {N}: a path that does not
# exist (and must not afterwards), {F}: a file, {D}: a prepared data folder, {C}: a folder of
# broken config files, {L}: a trained workdir whose lock another trainer holds, {A}: a workdir
# whose checkpoints were all set aside as unreadable, {K}: a workdir whose checkpoints is a file,
# {V}: prepared data whose manifest names a 70000-id tokenizer, {G}: one whose manifest is garbage.
CASES = {
    "unknown key": (["--config.train.stepz=3"], "--config.train.stepz: no such config key"),
    "unknown section": (["--config.trainz.steps=3"], "--config.trainz.steps: no such config key"),
    "unknown key, explicit config": (["--config=configs/tiny.py", "--config.model.nheads=5"],
                                     "--config.model.nheads: no such config key"),
    "wrong type": (["--config.train.steps=abc"], "--config.train.steps=abc: invalid literal for int()"),
    "zero steps": (["--config.train.steps=0"], "train.steps=0 must be >= 1"),
    "micro-batches": (["--config.train.microbatches=3"], "not divisible by train.microbatches=3"),
    "batch vs data parallel": (["--config.train.batch_size=4", "--config.mesh.shape=(8,1,1)"],
                               "not divisible by the data-parallel size 8"),
    "mesh too large": (["--config.mesh.shape=(16,1,1)"], "needs 16 devices but 8 are available"),
    "mesh with two -1": (["--config.mesh.shape=(-1,-1,1)"], "at most one -1"),
    "mesh of two axes": (["--config.mesh.shape=(8,1)"], "must give 3 sizes"),
    "optimizer": (["--config.optim.name=sgd"], "optim.name='sgd' is unknown"),
    "schedule": (["--config.optim.schedule=linear"], "optim.schedule='linear' is unknown"),
    "lr inf": (["--config.optim.lr=inf"], "optim.lr=inf: must be a finite number"),
    "muon lr nan": (["--config.optim.muon_lr=nan"], "optim.muon_lr=nan: must be a finite number"),
    "lr beyond float32": (["--config.optim.lr=1e39"], "optim.lr=1e+39: must be a finite number"),
    "negative lr": (["--config.optim.lr=-0.1"], "optim.lr and optim.muon_lr must be > 0"),
    "beta": (["--config.optim.b1=1.5"], "optim betas and momentum must be in [0, 1)"),
    "warmup": (["--config.optim.warmup_steps=2000"], "optim.warmup_steps=2000 must be in [0, train.steps)"),
    "muon dtype": (["--config.optim.muon_dtype=float16"], "optim.muon_dtype='float16' must be bfloat16 or float32"),
    "eval recurrence": (["--config.train.eval_recurrences=(0,)"], "must be integers >= 1"),
    "keep": (["--config.ckpt.keep=0"], "ckpt.keep=0 must be >= 1"),
    "skips": (["--config.train.max_consecutive_skips=-1"], "train.max_consecutive_skips=-1 must be >= 0"),
    "wandb mode": (["--config.wandb.mode=loud"], "wandb.mode='loud' must be online, offline or disabled"),
    "profile": (["--config.profile.steps=-1"], "profile.start_step and steps must be >= 0"),
    "data source": (["--config.data.source=web"], "data.source='web' is unknown"),
    "prepared without path": (["--config.data.source=prepared"], "data.source=prepared needs data.path"),
    "data path missing": (["--config.data.source=prepared", "--config.data.path={N}"], "no such directory"),
    "data not prepared": (["--config.data.source=prepared", "--config.data.path={C}"], "no manifest.json"),
    "tokenizer missing": (["--config.data.source=prepared", "--config.data.path={D}", "--config.data.tokenizer={N}"],
                          "is neither 'bytes' nor an existing tokenizer.json"),
    "tokenizer garbage": (["--config.data.source=prepared", "--config.data.path={D}",
                           "--config.data.tokenizer={C}/garbage.json"], "not a tokenizer.json"),
    "vocab too small": (["--config.model.vocab_size=100"], "set model.vocab_size to at least 257"),
    "heads": (["--config.model.n_heads=3"], "n_heads"),
    "injection": (["--config.model.injection=mul"], "injection"),
    "seq_len over block": (["--config.model.seq_len=64"], "seq_len"),
    "arch": (["--config.model.arch=rnn"], "arch"),
    "unsupported scheme": (["--workdir=s3://bucket/run"], "unsupported scheme"),
    "workdir is a file": (["--workdir={F}"], "exists and is not a directory"),
    "workdir under a file": (["--workdir={F}/run"], "cannot create it"),
    "train without workdir": (["--workdir="], "--mode=train needs --workdir"),
    "eval without workdir": (["--mode=eval", "--workdir="], "--mode=eval needs --workdir"),
    "eval of a misspelled workdir": (["--mode=eval"], "no checkpoint in"),
    "positional argument": (["train"], "unexpected arguments ['train']"),
    "missing config file": (["--config={N}.py"], "cannot load"),
    "config syntax error": (["--config={C}/syntax.py"], "syntax error at line 1"),
    "config without get_config": (["--config={C}/noget.py"], "has no get_config()"),
    "resume with another seed": (["--workdir={W}", "--config.seed=1"], "seed 0 -> 1"),
    "resume with another batch": (["--workdir={W}", "--config.train.batch_size=16"],
                                  "train.batch_size 8 -> 16; use a new workdir, or accept the change with "
                                  "--config.ckpt.allow_changes=train.batch_size"),
    "resume with another width": (["--workdir={W}", "--config.model.d_model=64", "--config.model.d_rec=64"],
                                  "model.d_model 32 -> 64"),
    "eval with another width": (["--mode=eval", "--workdir={W}", "--config.model.d_model=64",
                                 "--config.model.d_rec=64"], "evaluate with the config the run was trained with"),
    "workdir in use": (["--workdir={L}"], "is in use by another trainer (process "),
    "resume with another width, accepted": (["--workdir={W}", "--config.model.d_model=64", "--config.model.d_rec=64",
                                            "--config.ckpt.allow_changes=model.d_model,model.d_rec"],
                                           "does not fit this config (params/"),
    "every checkpoint set aside": (["--workdir={A}"], "holds the ones set aside as unreadable"),
    "checkpoints is a file": (["--workdir={K}"], "checkpoints: exists and is not a directory"),
    "cache_dir is a file": (["--config.data.cache_dir={F}"], "a_file: exists and is not a directory"),
    "data of a larger vocabulary": (["--config.data.source=prepared", "--config.data.path={V}"],
                                    "was tokenized with 70000 ids but model.vocab_size=257"),
    "manifest not JSON": (["--config.data.source=prepared", "--config.data.path={G}"],
                          "manifest.json: not a manifest prepare wrote"),
    "coordinator without process count": (["--config.dist.coordinator_address=127.0.0.1:1"],
                                          "set config.dist.num_processes and process_id"),
    "process id out of range": (["--config.dist.coordinator_address=127.0.0.1:1", "--config.dist.num_processes=2",
                                 "--config.dist.process_id=2"], "process_id=2 must be in [0, num_processes=2)"),
}


def tree_hash(*roots) -> str:
    h = hashlib.sha256()
    for root in roots:
        for folder, dirs, files in sorted(os.walk(root)):
            dirs.sort()
            for name in sorted(files):
                path = os.path.join(folder, name)
                h.update(path.encode())
                with open(path, "rb") as f:
                    h.update(f.read())
    return h.hexdigest()


@pytest.fixture(scope="module")
def places(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_inputs")
    config = small_config(steps=2)
    trainer, run = one_device(config)  # a checkpoint restores on any device count
    train(config, str(root / "trained"), run, trainer)
    prepare((f"document {i} " * 30 for i in range(60)), str(root / "data"), docs_per_shard=20, val_every=10,
            progress=False)
    (root / "a_file").write_text("not a folder")
    (root / "doc.txt").write_text("a document to prepare")
    broken = root / "broken"
    broken.mkdir()
    (broken / "syntax.py").write_text("def get_config(:\n")
    (broken / "noget.py").write_text("x = 1\n")
    (broken / "garbage.json").write_text("{not json")
    shutil.copytree(root / "trained", root / "locked")
    shutil.copytree(root / "trained", root / "aside")
    (root / "aside" / "checkpoints").rename(root / "aside" / "checkpoints_unreadable")
    (root / "aside" / "checkpoints").mkdir()
    for name, change in (("big_vocab", lambda m: m.replace('"vocab_size": 257', '"vocab_size": 70000')),
                         ("garbage_manifest", lambda m: "{garbage")):
        shutil.copytree(root / "data", root / name)
        manifest = root / name / "manifest.json"
        manifest.write_text(change(manifest.read_text()))
    (root / "ckpt_file").mkdir()
    (root / "ckpt_file" / "checkpoints").write_text("not a folder")  # once a hang: orbax's save thread failed
    with WorkdirLock(str(root / "locked")):  # another trainer's, for the module's tests
        yield {"W": str(root / "trained"), "N": str(root / "nothing_here"), "F": str(root / "a_file"),
               "D": str(root / "data"), "C": str(broken), "T": str(root / "doc.txt"), "L": str(root / "locked"),
               "A": str(root / "aside"), "K": str(root / "ckpt_file"), "V": str(root / "big_vocab"),
               "G": str(root / "garbage_manifest"), "root": root}


@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_input_is_one_line_exit_2_and_changes_nothing(places, case):
    flags, says = CASES[case]
    new = os.path.join(places["root"], f"new_{list(CASES).index(case)}")  # must still not exist afterwards
    flags = [f.format(**{**places, "N": new}) for f in flags]
    workdir = [] if any(f.startswith("--workdir") for f in flags) else [f"--workdir={new}"]
    files = [f for f in flags if f.startswith("--config=")]  # the config file comes before overrides
    overrides = [f for f in flags if f not in files]
    before = tree_hash(places["root"])
    out = run_module("parcae_jax.main", [*files, *SMALL_FLAGS, *workdir, *overrides],
                         cwd=ROOT, timeout=120)
    lines = [line for line in out.stderr.strip().splitlines() if "] resuming with " not in line]  # accepted changes
    assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), out.stderr[-3000:]
    assert says in lines[0], lines[0]
    assert tree_hash(places["root"]) == before
    assert not os.path.exists(new)


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_a_platform_this_machine_lacks_is_one_line(places, platform, tmp_path):
    out = run_module("parcae_jax.main", [*SMALL_FLAGS, f"--workdir={tmp_path / 'run'}"], cwd=ROOT, timeout=120,
                     env={**os.environ, "JAX_PLATFORMS": platform})
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"error: JAX_PLATFORMS={platform}: "), \
        out.stderr[-3000:]
    assert "unset JAX_PLATFORMS" in lines[0] and not (tmp_path / "run").exists()


# The other command-line tools: (module, arguments, what the one line must say). {R}: an
# official-format folder whose config.json / model.safetensors are damaged in the named way.
TOOLS = {
    "prepare: garbage SentencePiece model": ("parcae_jax.data.prepare", ["--input={T}", "--output={N}",
                                             "--tokenizer={C}/garbage.model"], "not a SentencePiece model"),
    "prepare: output is a file": ("parcae_jax.data.prepare", ["--input={T}", "--output={F}"],
                                  "exists and is not a directory"),
    "prepare: missing input": ("parcae_jax.data.prepare", ["--input={N}.txt", "--output={N}"],
                               "no such file or directory"),
    "convert: missing folder": ("parcae_jax.convert", ["--reference={N}"], "missing config.json"),
    "convert: config.json not JSON": ("parcae_jax.convert", ["--reference={C}/bad_json"], "config.json: not JSON"),
    "convert: config.json without a field": ("parcae_jax.convert", ["--reference={C}/no_field"], "no field"),
    "convert: garbage safetensors": ("parcae_jax.convert", ["--reference={C}/bad_tensors"],
                                     "not a readable safetensors file"),
    **{f"{m.rsplit('.', 1)[-1]}: flag of the wrong type": (m, [flag], f"flag {flag}: invalid literal")
       for m, flag in (("parcae_jax.generate", "--max_new_tokens=abc"), ("parcae_jax.evaluate", "--limit=x"),
                       ("parcae_jax.science.test_time", "--seed=1.5"))},
    **{f"{m.rsplit('.', 1)[-1]}: unknown flag": (m, ["--no_such_flag=1"], "Unknown command line flag 'no_such_flag'")
       for m in ("parcae_jax.science.sweep", "parcae_jax.science.stability", "parcae_jax.science.compare",
                 "parcae_jax.science.report", "parcae_jax.data.prepare", "parcae_jax.data.tokenizer",
                 "parcae_jax.bench.memory_table")},
    "convert: a context of 10**12 positions": ("parcae_jax.convert", ["--reference={C}/huge_block"],
                                               "is beyond any model here"),
}


@pytest.mark.parametrize("case", list(TOOLS))
def test_the_other_tools_answer_bad_input_in_one_line_too(places, case):
    from tests.conftest import FIXTURES

    module, args, says = TOOLS[case]
    broken = places["root"] / "broken"
    if not (broken / "bad_tensors").exists():  # official-format folders, each damaged one way
        for name in ("bad_json", "no_field", "bad_tensors", "huge_block"):
            shutil.copytree(FIXTURES / "reference_parcae_tiny", broken / name, ignore=shutil.ignore_patterns("*.npz"))
        fields = json.loads((broken / "huge_block" / "config.json").read_text())
        fields.get("config", fields)["block_size"] = 10**12
        (broken / "huge_block" / "config.json").write_text(json.dumps(fields))
        (broken / "bad_json" / "config.json").write_text("{bad")
        (broken / "no_field" / "config.json").write_text('{"n_embd": 64}')
        (broken / "bad_tensors" / "model.safetensors").write_bytes(b"garbage")
        (broken / "garbage.model").write_bytes(b"garbage")
    new = os.path.join(places["root"], f"new_tool_{list(TOOLS).index(case)}")
    args = [a.format(**{**places, "N": new}) for a in args]
    before = tree_hash(places["root"])
    out = run_module(module, [*args], cwd=ROOT, timeout=120)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), out.stderr[-3000:]
    assert says in lines[0], lines[0]
    assert tree_hash(places["root"]) == before and not os.path.exists(new)
