"""Every option that changes the traced program trains, evaluates, checkpoints and resumes.

Each architecture and every non-default value of each such option, at the smallest widths.
Each case builds one Trainer (one compiled train step, one eval step) and uses it
for all of: 3 steps with an evaluation at steps 2 and 3 and a checkpoint after every
step; a copy of that workdir with its last checkpoint removed (a run killed before step
3's save), resumed; and `--mode=eval` on the result. The resumed run must log exactly
what the uninterrupted one did.
"""

import json
import math
import shutil

import jax
import pytest

from parcae_jax.training.train import Trainer, evaluate_checkpoint, train
from parcae_jax.training.validate import validate
from tests.test_train import small_config

GPT = {"model.arch": "gpt", "model.n_layers": 2}
# Every non-default value of every option appears in at least one case. Options that do not
# interact share a case (its id names each): each case is a compile of its own (~10 s here).
CASES = {
    "parcae": {},
    "gpt": GPT,
    "gpt+untied-softcap+bfloat16": {**GPT, "model.tie_embeddings": False, "model.logit_softcap": 10.0,
                                    "model.dtype": "bfloat16"},
    "gpt+no-value-embeds+no-qk-norm+document-masking+microbatches-2": {
        **GPT, "model.value_embeds": False, "model.qk_norm": False, "data.document_masking": True,
        "train.microbatches": 2},
    "injection-linear+state-init-normal+no-prelude-norm+remat-none": {
        "model.injection": "linear", "model.state_init": "normal", "model.prelude_norm": False,
        "model.remat_policy": "none"},
    "injection-add+state-init-zero+adamw": {"model.injection": "add", "model.state_init": "zero",
                                            "optim.name": "adamw", "optim.lr": 1e-3},
    "sampling-fixed+state-init-embed+no-value-embeds+remat-dots": {
        "model.sampling_scheme": "fixed", "model.state_init": "embed", "model.value_embeds": False,
        "model.remat_policy": "dots"},
    "sampling-per-batch+state-init-unit+no-qk-norm+remat-dots-no-batch": {
        "model.sampling_unit": "per-batch", "model.state_init": "unit", "model.qk_norm": False,
        "model.remat_policy": "dots_no_batch"},
    "untied-softcap+schedule-cosine+microbatches-2+document-masking": {
        "model.tie_embeddings": False, "model.logit_softcap": 10.0, "optim.schedule": "cosine",
        "optim.warmup_steps": 1, "train.microbatches": 2, "data.document_masking": True},
    "tied-softcap-scale+schedule-constant+float16": {"model.logit_softcap": 10.0, "model.logit_scale": 0.5,
                                                     "optim.schedule": "constant", "model.dtype": "float16"},
    "bfloat16+muon-bfloat16": {"model.dtype": "bfloat16", "optim.muon_dtype": "bfloat16"},
}
PARCAE_ONLY = {"rho", "state_norm", "depth_mean", "depth_max_nograd", "depth_max_grad"}


def case_config(overrides: dict):
    # Batch 2 on one device: the no-gradient loop has 2 row buckets, so compiles stay short.
    config = small_config(steps=3, batch_size=2, eval_every=2, log_every=1, eval_batches=1)
    config.model.update(n_core=1, mean_recurrence=3, mean_backprop_depth=2)
    config.ckpt.update(every=1, keep=5)
    for key, value in overrides.items():
        section, name = key.split(".")
        setattr(config[section], name, value)
    return config


def rows(workdir):
    with open(workdir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


# What depends on wall-clock time, not on the computation.
TIMING = {"step_time_s", "tokens_per_sec", "mfu", "data_wait_s"}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_option_trains_evaluates_checkpoints_and_resumes(name, tmp_path):
    config = case_config(CASES[name])
    run = validate(config, n_devices=1)
    trainer = Trainer(config, run, jax.devices()[:1])
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    train(config, str(whole), run, trainer)
    logged = rows(whole)
    assert [r["step"] for r in logged] == [1, 2, 3]
    parcae = config.model.arch == "parcae"
    eval_keys = {f"eval/loss_r{r}" for r in (1, 2, 3)} if parcae else {"eval/loss"}
    last = logged[-1]
    assert eval_keys <= set(last) and eval_keys <= set(logged[1]) and not eval_keys & set(logged[0])
    assert (PARCAE_ONLY <= set(last)) if parcae else not (PARCAE_ONLY & set(last))
    assert last["skipped_total"] == 0
    assert all(math.isfinite(v) for r in logged for v in r.values())
    assert all(last[k] < logged[0]["loss"] + 1 for k in eval_keys)  # evaluation of a model that trains

    shutil.copytree(whole, cut)  # killed after step 2's checkpoint, before step 3's
    shutil.rmtree(cut / "checkpoints" / "3")
    train(config, str(cut), run, trainer)
    strip = lambda rs: [{k: v for k, v in r.items() if k not in TIMING} for r in rs]  # noqa: E731
    assert strip(rows(cut)) == strip(logged)  # every loss and evaluation, bit for bit

    evaluated = evaluate_checkpoint(config, str(cut), run, trainer)
    assert evaluated["step"] == 3
    assert {k: evaluated[k] for k in eval_keys} == {k: last[k] for k in eval_keys}
