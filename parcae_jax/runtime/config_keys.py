"""What each config key means for a run, in one table: may it change when a run resumes, and
does it change a finished run's result (the science commands' provenance check)?

Three kinds:

- IDENTITY: what the run is (its model, seed, data, global batch, optimizer family). A resume
  that changes one is refused in one line unless `ckpt.allow_changes` names it; a science
  point trained with another value is another point.
- SCHEDULE: how the run is driven (learning rates, step count, clipping, ...). A resume may
  change it (logged: lowering the learning rate after a divergence is the usual fix), but a
  finished point trained with another value is another result.
- EXECUTION: how, not what, is computed or recorded (cadences, storage, the mesh, remat, the
  compute dtype, micro-batching, the loss's chunking, logging). Free on resume, ignored by
  provenance.

A key is matched by its longest entry (an entry ending in "." is a prefix); every key of the
defaults must match one (tests/test_config.py), so a new key takes a decision.
"""

from __future__ import annotations

IDENTITY, SCHEDULE, EXECUTION = "identity", "schedule", "execution"

KINDS = {
    "seed": IDENTITY,
    "model.": IDENTITY,
    "model.remat_policy": EXECUTION,
    "model.block_remat": EXECUTION,
    "model.scan_unroll": EXECUTION,
    "model.attention_impl": EXECUTION,
    "model.loss_impl": EXECUTION,
    "model.dtype": EXECUTION,
    "model.loss_chunk": EXECUTION,
    "train.batch_size": IDENTITY,
    "train.steps": SCHEDULE,
    "train.clip_norm": SCHEDULE,
    "train.eval_batches": SCHEDULE,
    "train.max_consecutive_skips": SCHEDULE,
    "train.microbatches": EXECUTION,
    "train.log_every": EXECUTION,
    "train.eval_every": EXECUTION,
    "train.eval_recurrences": EXECUTION,
    "optim.": SCHEDULE,
    "optim.name": IDENTITY,
    "optim.update_impl": EXECUTION,
    "data.source": IDENTITY,
    "data.path": IDENTITY,
    "data.val_path": IDENTITY,
    "data.tokenizer": IDENTITY,
    "data.eod_token": IDENTITY,
    "data.tfds_name": IDENTITY,
    "data.tfds_split": IDENTITY,
    "data.text_field": IDENTITY,
    "data.val_every": IDENTITY,
    "data.document_masking": IDENTITY,
    "data.tfds_data_dir": EXECUTION,
    "data.cache_dir": EXECUTION,
    "data.num_workers": EXECUTION,
    "data.prefetch": EXECUTION,
    "data.read_threads": EXECUTION,
    "ckpt.": EXECUTION,
    "profile.": EXECUTION,
    "wandb.": EXECUTION,
    "bench.": EXECUTION,
    "dist.": EXECUTION,
    "mesh.": EXECUTION,
    "compilation_cache_dir": EXECUTION,
}


def entry(key: str) -> str | None:
    """The table entry that governs a dotted key (the longest that matches), or None."""
    matches = [e for e in KINDS if key == e or (e.endswith(".") and key.startswith(e))]
    return max(matches, key=len, default=None)


def kind(key: str) -> str:
    """IDENTITY, SCHEDULE or EXECUTION; a key the table does not know counts as IDENTITY (a
    config from a newer version: refused rather than silently accepted)."""
    found = entry(key)
    return KINDS[found] if found else IDENTITY
