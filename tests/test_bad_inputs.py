"""Every mistake a user can make on the command line: one line on stderr naming the problem,
exit code 2, and nothing in the workdir or the data folder changed (hashed before and after)."""

import hashlib
import json
import os
import shutil

import pytest

from parcae_jax.data.prepare import prepare
from parcae_jax.data.tokenizer import EOD_TOKEN
from parcae_jax.runtime.workdir_lock import WorkdirLock
from parcae_jax.training.train import train
from tests.conftest import FIXTURES, ROOT
from tests.forkserver import run_module
from tests.test_train import SMALL, one_device, small_config

SMALL_FLAGS = [f"--config.model.{k}={v}" for k, v in SMALL.items()] + [
    "--config.train.batch_size=8", "--config.train.eval_batches=1", "--config.optim.muon_dtype=float32"]

# (flags, what the one line must say). {W}: a trained workdir, {N}: a path that does not
# exist (and must not afterwards), {F}: a file, {D}: a prepared data folder, {C}: a folder of
# broken config files, {L}: a trained workdir whose lock another trainer holds, {A}: a workdir
# whose checkpoints were all set aside as unreadable, {K}: a workdir whose checkpoints is a file,
# {B}: a trained workdir whose tensorboard is a file,
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
    # /sys/kernel: a folder no process can make a file in, root included
    "workdir not writable": (["--workdir=/sys/kernel"], "/sys/kernel: cannot write there"),
    "cache_dir not writable": (["--config.data.cache_dir=/sys/kernel"],
                               "data.cache_dir=/sys/kernel: cannot write there"),
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
    "tensorboard is a file": (["--workdir={B}"], "tensorboard: exists and is not a directory"),
    "cache_dir is a file": (["--config.data.cache_dir={F}"], "a_file: exists and is not a directory"),
    "data of a larger vocabulary": (["--config.data.source=prepared", "--config.data.path={V}"],
                                    "was tokenized with 70000 ids but model.vocab_size=257"),
    "manifest not JSON": (["--config.data.source=prepared", "--config.data.path={G}"],
                          "manifest.json: not a manifest prepare wrote"),
    "stream without files": (["--config.data.source=stream"], "data.source=stream needs data.path"),
    "stream glob matching nothing": (["--config.data.source=stream", "--config.data.path={N}/*.parquet",
                                      "--config.data.val_path={X}/latin1.jsonl"], "the pattern matches no file"),
    "stream without validation": (["--config.data.source=stream", "--config.data.path={X}/latin1.jsonl"],
                                  "data.source=stream needs data.val_path"),
    "stream column missing": (["--config.data.source=stream", "--config.data.path={X}/nocol.parquet",
                               "--config.data.val_path={X}/latin1.jsonl"], "nocol.parquet: no column 'text'"),
    "stream field missing": (["--config.data.source=stream", "--config.data.path={X}/latin1.jsonl",
                              "--config.data.val_path={X}/nofield.jsonl"], "nofield.jsonl:1: no field 'text'"),
    "stream of a text file": (["--config.data.source=stream", "--config.data.path={X}/empty.txt",
                               "--config.data.val_path={X}/latin1.jsonl"], "empty.txt is not a .parquet/.jsonl"),
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


def _bad_files(folder) -> None:
    """Inputs for prepare and evaluate, each bad in one way."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder.mkdir()
    (folder / "empty").mkdir()
    (folder / "empty.txt").write_text("")
    (folder / "nofield.jsonl").write_text('{"body": "x"}\n')
    (folder / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (folder / "latin1.jsonl").write_bytes(b'{"text": "ok"}\n' + '{"text": "caf\xe9"}\n'.encode("latin-1"))
    pq.write_table(pa.table({"body": ["x"]}), folder / "nocol.parquet")
    for name, words in (("words", ["hello"]),
                        ("many_words", [f"w{i}" for i in range(300)] + ["Question", "Answer", ":"])):
        tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate([*words, EOD_TOKEN])}))  # no [UNK]
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        tok.save(str(folder / f"{name}.json"))
    task = (FIXTURES / "eval" / "sample_mc.yaml").read_text()
    good = (FIXTURES / "eval" / "sample_mc.jsonl").read_text()
    (folder / "bad.yaml").write_text("task: [unclosed\n")
    (folder / "nameless.yaml").write_text(task.replace("task: parcae_sample_mc", ""))
    (folder / "notext.yaml").write_text(task.replace("doc_to_text:", "# doc_to_text:"))
    (folder / "words.jsonl").write_text('{"question": "w299", "choices": [" w1", " w2"], "answer": 0}\n')
    for name, data in (("words", None), ("badline", good.splitlines()[0] + '\n{"question": oops}\n'),
                       ("listline", "[1, 2]\n")):
        if data is not None:
            (folder / f"{name}.jsonl").write_text(data)
        (folder / f"{name}.yaml").write_text(task.replace("sample_mc.jsonl", f"{name}.jsonl"))


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
    shutil.copytree(root / "trained", root / "tb_file")
    shutil.rmtree(root / "tb_file" / "tensorboard")
    (root / "tb_file" / "tensorboard").write_text("not a folder")
    (root / "ckpt_file").mkdir()
    (root / "ckpt_file" / "checkpoints").write_text("not a folder")  # once a hang: orbax's save thread failed
    for name in ("bad_json", "no_field", "bad_tensors", "huge_block"):  # official-format folders, damaged
        shutil.copytree(FIXTURES / "reference_parcae_tiny", root / "damaged" / name,
                        ignore=shutil.ignore_patterns("*.npz"))
    fields = json.loads((root / "damaged" / "huge_block" / "config.json").read_text())
    fields.get("config", fields)["block_size"] = 10**12
    (root / "damaged" / "huge_block" / "config.json").write_text(json.dumps(fields))
    (root / "damaged" / "bad_json" / "config.json").write_text("{bad")
    (root / "damaged" / "no_field" / "config.json").write_text('{"n_embd": 64}')
    (root / "damaged" / "bad_tensors" / "model.safetensors").write_bytes(b"garbage")
    (broken / "garbage.model").write_bytes(b"garbage")
    _bad_files(root / "inputs")
    with WorkdirLock(str(root / "locked")):  # another trainer's, for the module's tests
        yield {"W": str(root / "trained"), "N": str(root / "nothing_here"), "F": str(root / "a_file"),
               "D": str(root / "data"), "C": str(broken), "T": str(root / "doc.txt"), "L": str(root / "locked"),
               "A": str(root / "aside"), "K": str(root / "ckpt_file"), "B": str(root / "tb_file"),
               "V": str(root / "big_vocab"), "G": str(root / "garbage_manifest"), "R": str(root / "damaged"),
               "X": str(root / "inputs"),
               "P": str(FIXTURES / "reference_parcae_tiny"), "E": str(FIXTURES / "eval" / "sample_mc.yaml"),
               "root": root}


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


# The other commands: (module, arguments, what the one line must say). {P}: an official-format
# checkpoint folder (tests/fixtures), {E}: the sample evaluation task, {R}: official-format
# folders damaged as named, {X}: files for prepare and tasks for evaluate, each bad one way.
GEN = ("parcae_jax.commands.generate", "--checkpoint={P}", "--tokenizer=bytes")
EVAL = ("parcae_jax.commands.evaluate", "--checkpoint={P}", "--tokenizer=bytes")
PREP = "parcae_jax.commands.prepare"
TOOLS = {
    "prepare: garbage SentencePiece model": (PREP, ["--input={T}", "--output={N}", "--tokenizer={C}/garbage.model"],
                                             "not a SentencePiece model"),
    "prepare: output is a file": (PREP, ["--input={T}", "--output={F}"], "exists and is not a directory"),
    "prepare: missing input": (PREP, ["--input={N}.txt", "--output={N}"], "no such file or directory"),
    "prepare: a folder without text": (PREP, ["--input={X}/empty", "--output={N}"], "holds no .txt"),
    "prepare: an empty file": (PREP, ["--input={X}/empty.txt", "--output={N}"], "holds no documents"),
    "prepare: JSON lines without the field": (PREP, ["--input={X}/nofield.jsonl", "--output={N}"],
                                              "nofield.jsonl:1: no field 'text' (found ['body']); set --text_field"),
    "prepare: Parquet without the column": (PREP, ["--input={X}/nocol.parquet", "--output={N}"],
                                            "no column 'text' (columns: ['body'])"),
    "prepare: text not UTF-8": (PREP, ["--input={X}/latin1.txt", "--output={N}"], "latin1.txt: not UTF-8 at byte 3"),
    "prepare: a JSON line not UTF-8": (PREP, ["--input={X}/latin1.jsonl", "--output={N}"],
                                       "latin1.jsonl:2: not UTF-8 at byte"),
    "prepare: no input": (PREP, ["--output={N}"], "no input"),
    "prepare: an unknown TFDS dataset": (PREP, ["--tfds=no_such_dataset", "--tfds_data_dir={X}/empty", "--output={N}"],
                                         "no_such_dataset"),
    "convert: missing folder": ("parcae_jax.commands.convert", ["--reference={N}"], "missing config.json"),
    "convert: config.json not JSON": ("parcae_jax.commands.convert", ["--reference={R}/bad_json"],
                                      "config.json: not JSON"),
    "convert: config.json without a field": ("parcae_jax.commands.convert", ["--reference={R}/no_field"], "no field"),
    "convert: garbage safetensors": ("parcae_jax.commands.convert", ["--reference={R}/bad_tensors"],
                                     "not a readable safetensors file"),
    "convert: a context of 10**12 positions": ("parcae_jax.commands.convert", ["--reference={R}/huge_block"],
                                               "is beyond any model here"),
    **{f"{m.rsplit('.', 1)[-1]}: flag of the wrong type": (m, [flag], f"flag {flag}: invalid literal")
       for m, flag in (("parcae_jax.commands.generate", "--max_new_tokens=abc"),
                       ("parcae_jax.commands.evaluate", "--limit=x"),
                       ("parcae_jax.commands.recurrence_curve", "--seed=1.5"))},
    **{f"{m.rsplit('.', 1)[-1]}: unknown flag": (m, ["--no_such_flag=1"], "Unknown command line flag 'no_such_flag'")
       for m in ("parcae_jax.commands.sweep", "parcae_jax.commands.stability", "parcae_jax.commands.compare",
                 "parcae_jax.commands.report", "parcae_jax.commands.prepare", "parcae_jax.commands.train_tokenizer",
                 "parcae_jax.commands.memory_table")},
    "generate: prompt past the block": (GEN[0], [*GEN[1:], "--prompt=" + "x" * 60],
                                        "a prompt of 60 tokens plus 64 new tokens exceeds the model's block size 64"),
    "generate: unknown cache strategy": (GEN[0], [*GEN[1:], "--prompt=a", "--cache_strategy=compress-q2"],
                                         "cache strategy 'compress-q2' is unknown"),
    "generate: top_p 0": (GEN[0], [*GEN[1:], "--prompt=a", "--top_p=0"], "top_p must be in (0, 1]"),
    "generate: recurrence 0": (GEN[0], [*GEN[1:], "--prompt=a", "--recurrence=0"], "recurrence must be >= 1"),
    "generate: no prompt": (GEN[0], [*GEN[1:]], "pass at least one --prompt"),
    "generate: temperature nan": (GEN[0], [*GEN[1:], "--prompt=a", "--temperature=nan"],
                                  "temperature must be a finite number >= 0"),
    "generate: exit threshold nan": (GEN[0], [*GEN[1:], "--prompt=a", "--exit_rule=delta", "--exit_threshold=nan"],
                                     "exit threshold must be a finite number >= 0"),
    "generate: exit threshold -1": (GEN[0], [*GEN[1:], "--prompt=a", "--exit_rule=kl", "--exit_threshold=-1"],
                                    "exit threshold must be a finite number >= 0"),
    "generate: compress-s0": (GEN[0], [*GEN[1:], "--prompt=a", "--cache_strategy=compress-s0"],
                              "cache strategy 'compress-s0' needs K >= 1"),
    "generate: compress-stride0": (GEN[0], [*GEN[1:], "--prompt=a", "--cache_strategy=compress-stride0"],
                                   "needs K >= 1"),
    "generate: a folder naming no tokenizer": (GEN[0], ["--checkpoint={P}", "--prompt=a"],
                                               "names no tokenizer; pass --tokenizer"),
    "generate: an empty prompt": (GEN[0], [*GEN[1:], "--prompt="], "the tokenizer maps it to no tokens"),
    "generate: a prompt the tokenizer cannot encode": (GEN[0], ["--checkpoint={P}", "--tokenizer={X}/words.json",
                                                                "--prompt=zebra"], "the tokenizer cannot encode it"),
    "generate: a tokenizer larger than the model": (GEN[0], ["--checkpoint={P}", "--tokenizer={X}/many_words.json",
                                                             "--prompt=w299", "--max_new_tokens=4"],
                                                   "(id 299) is outside the model's vocabulary [0, 256)"),
    "generate: a run without checkpoints": (GEN[0], ["--checkpoint={C}", "--tokenizer=bytes", "--prompt=a"],
                                            "no checkpoint"),
    "evaluate: limit 0": (EVAL[0], [*EVAL[1:], "--tasks={E}", "--limit=0"], "--limit=0: 0 is not a positive integer"),
    "evaluate: num_fewshot -1": (EVAL[0], [*EVAL[1:], "--tasks={E}", "--num_fewshot=-1"],
                                 "--num_fewshot=-1: -1 is not a non-negative integer"),
    "evaluate: eval_batch_size 0": (EVAL[0], [*EVAL[1:], "--tasks={E}", "--eval_batch_size=0"],
                                    "--eval_batch_size=0: 0 is not a positive integer"),
    "evaluate: output is a folder": (EVAL[0], [*EVAL[1:], "--tasks={E}", "--output={C}"],
                                     "is a directory; name a file"),
    "evaluate: output in no folder": (EVAL[0], [*EVAL[1:], "--tasks={E}", "--output={N}/scores.json"],
                                      "no such directory"),
    "evaluate: no tasks": (EVAL[0], [*EVAL[1:]], "pass --tasks="),
    "evaluate: recurrences not integers": (EVAL[0], [*EVAL[1:], "--tasks={E}", "--recurrences=a"],
                                           "--recurrences=a: give positive integers"),
    "evaluate: a task file missing": (EVAL[0], [*EVAL[1:], "--tasks={N}.yaml"], "No such file or directory"),
    "evaluate: a task file not YAML": (EVAL[0], [*EVAL[1:], "--tasks={X}/bad.yaml"], "not a task YAML"),
    "evaluate: a task without its name": (EVAL[0], [*EVAL[1:], "--tasks={X}/nameless.yaml"], "needs a `task:` name"),
    "evaluate: a task without doc_to_text": (EVAL[0], [*EVAL[1:], "--tasks={X}/notext.yaml"],
                                             "needs `doc_to_text:`"),
    "evaluate: a data line not JSON": (EVAL[0], [*EVAL[1:], "--tasks={X}/badline.yaml"],
                                       "badline.jsonl:2: not valid JSON"),
    "evaluate: a data line not an object": (EVAL[0], [*EVAL[1:], "--tasks={X}/listline.yaml"],
                                            "listline.jsonl:1: a document must be a JSON object, got list"),
    "evaluate: a tokenizer larger than the model": (EVAL[0], ["--checkpoint={P}", "--tokenizer={X}/many_words.json",
                                                              "--tasks={X}/words.yaml"],
                                                    "is outside the model's vocabulary [0, 256)"),
    "evaluate: a text the tokenizer cannot encode": (EVAL[0], ["--checkpoint={P}", "--tokenizer={X}/words.json",
                                                               "--tasks={X}/words.yaml"],
                                                     "the tokenizer cannot encode"),
    "evaluate: an unknown task": (EVAL[0], [*EVAL[1:], "--tasks=no_such_task"],
                                  "'no_such_task' is not a task lm-eval knows"),
    "evaluate: a registry task without network": (EVAL[0], [*EVAL[1:], "--tasks=arc_easy"],
                                                  "task arc_easy: lm-eval cannot build it (ConnectionError"),
    "test_time: T of 0": ("parcae_jax.commands.recurrence_curve", ["--checkpoint={C}", "--recurrences=0,2"],
                          "--recurrences=0,2: give positive integers"),
    "test_time: T not integers": ("parcae_jax.commands.recurrence_curve", ["--checkpoint={C}", "--recurrences=a"],
                                  "give positive integers"),
    "test_time: no data": ("parcae_jax.commands.recurrence_curve", ["--checkpoint={P}", "--tokenizer=bytes"],
                           "pass --data_path"),
    "test_time: a run that is not there": ("parcae_jax.commands.recurrence_curve", ["--checkpoint={N}"],
                                           "no checkpoints"),
    **{f"stability: {what}": ("parcae_jax.commands.stability", args, says) for what, args, says in (
        ("no out_dir", [], "pass --out_dir"),
        ("unknown variant", ["--out_dir={N}", "--variants=diagonal,concat"], "'concat' is unknown"),
        ("negative multiplier", ["--out_dir={N}", "--lr_multipliers=1,-2"], "must be > 0"),
        ("missing base", ["--out_dir={N}", "--base={N}.py"], "cannot load"),
        ("no variants", ["--out_dir={N}", "--variants="], "--variants is empty"),
        ("a base without injection", ["--out_dir={N}", "--base=gpt_140m"], "has no injection; give a Parcae config"),
        ("spike threshold 0", ["--out_dir={N}", "--spike_nats=0"], "must be > 0"))},
    **{f"launcher: {what}": ("launch.tpu_pod", args, says) for what, args, says in (
        ("a TPU name that is an option", ["logs", "--tpu=-oProxyCommand=x", "--zone=z"],
         "--tpu='-oProxyCommand=x': use letters"),
        ("a run name that climbs",
         ["logs", "--tpu=pod1", "--zone=us-east5-a", "--name=" + os.path.join("..", "..", "etc")], "use letters"),
        ("a run name ..", ["logs", "--tpu=pod1", "--zone=us-east5-a", "--name=.."], "--name='..': use letters"),
        ("a zone that is an option", ["stop", "--tpu=pod1", "--zone=--quiet"], "--zone='--quiet': use letters"),
        ("a project that is an option", ["delete", "--tpu=pod1", "--zone=z", "--project=-p"],
         "--project='-p': use letters"),
        ("a run name with a slash", ["run", "--tpu=pod1", "--zone=z", "configs/tiny.py", "gs://b/r", "--name=a/b"],
         "--name='a/b': use letters"))},
}

# found only once the work is under way (lm-eval tokenizes the task's texts while it evaluates)
FOUND_WHILE_WORKING = {"evaluate: a tokenizer larger than the model", "evaluate: a text the tokenizer cannot encode"}


@pytest.mark.parametrize("case", list(TOOLS))
def test_the_other_commands_answer_bad_input_in_one_line_too(places, case):
    module, args, says = TOOLS[case]
    new = os.path.join(places["root"], f"new_tool_{list(TOOLS).index(case)}")
    args = [a.format(**{**places, "N": new}) for a in args]
    before = tree_hash(places["root"])
    out = run_module(module, [*args], cwd=ROOT, timeout=120,
                     env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})  # no network, in any CI
    lines = out.stderr.strip().splitlines()
    if case in FOUND_WHILE_WORKING:  # after the command's own progress lines: the error is the last, and alone
        lines = [line for line in lines if line.startswith(("error", "Traceback"))]
    assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), out.stderr[-3000:]
    assert says in lines[0], lines[0]
    assert out.stderr.strip().splitlines()[-1] == lines[0]
    assert tree_hash(places["root"]) == before and not os.path.exists(new)


def test_the_table_covers_every_command_and_is_large():
    modules = {"parcae_jax.main"} | {m for m, _, _ in TOOLS.values()}
    assert {"parcae_jax.commands.prepare", "parcae_jax.commands.convert", "parcae_jax.commands.generate",
            "parcae_jax.commands.evaluate", "parcae_jax.commands.recurrence_curve", "parcae_jax.commands.stability",
            "launch.tpu_pod"} <= modules
    assert len(CASES) + len(TOOLS) + 2 >= 120
