"""Every configuration key parcae_jax reads, with its default.

The configs in configs/ start from `get_config()` here and change what differs; a key that is not
declared here cannot be set (configs are locked), so a typo in an override fails at once.
The model defaults are the published 140m Parcae (docs/design.md §1), taken from
`parcae_jax.model.config.ModelConfig`, where each is defined once.
"""

import dataclasses
import importlib.util
import os

import ml_collections
from ml_collections import config_dict

from parcae_jax.data import prepare
from parcae_jax.model.config import ModelConfig

INTERNAL_MODEL_FIELDS = ("reference_config",)  # provenance of converted checkpoints, not a setting
OPTIONAL_TYPES = {"float | None": float, "int | None": int, "str | None": str}


def model_config() -> ml_collections.ConfigDict:
    """`config.model`: every `ModelConfig` field with its default, read from the dataclass
    (the one place they are defined, with their comments and choice lists)."""
    values = {}
    for field in dataclasses.fields(ModelConfig):
        if field.name in INTERNAL_MODEL_FIELDS:
            continue
        # A None default still needs a type, so that --config.model.logit_softcap=30 parses.
        values[field.name] = field.default if field.default is not None else config_dict.placeholder(
            OPTIONAL_TYPES[field.type])
    return ml_collections.ConfigDict(values)


def data_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        source="embedded",  # embedded (ships with Python) | prepared | tfds | stream
        # source=prepared: the directory `parcae_jax.commands.prepare` wrote; source=stream: Parquet /
        # JSONL(.gz) files, directories or globs, comma-separated (training), and val_path (validation)
        path=config_dict.placeholder(str),
        val_path=config_dict.placeholder(str),
        tokenizer="bytes",  # bytes | path to tokenizer.json | path to a SentencePiece .model
        eod_token=config_dict.placeholder(str),  # if not <|endoftext|> (or the SentencePiece EOS)
        tfds_name=config_dict.placeholder(str),  # source=tfds
        tfds_split="train",
        tfds_data_dir=config_dict.placeholder(str),
        text_field="text",
        val_every=prepare.VAL_EVERY,  # source=tfds: hold out about 1 document in val_every (by a hash of its text)
        cache_dir=config_dict.placeholder(str),  # prepared embedded/TFDS data; default ~/.cache/parcae_jax
        num_workers=0,  # grain worker processes for the training loader
        read_threads=2,
        prefetch=4,
        document_masking=False,  # attention stays inside each packed document
    ))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    del arg
    config = ml_collections.ConfigDict()
    config.seed = 0  # parameters, data order, and the depths and x0 of every step
    config.model = model_config()
    config.data = data_config()
    config.mesh = ml_collections.ConfigDict(dict(
        shape=(-1, 1, 1),  # devices along (data, fsdp, tensor); one -1 takes the rest
    ))
    config.train = ml_collections.ConfigDict(dict(
        steps=1000,
        batch_size=256,  # global, in sequences of model.seq_len tokens
        microbatches=1,  # gradient accumulation: the batch is cut into this many pieces
        max_consecutive_skips=20,  # this many skipped steps in a row stop the run (exit 3); 0: never
        clip_norm=1.0,  # global-norm clipping (0: off); the logged grad_norm is before clipping
        log_every=10,
        eval_every=500,  # 0: never (an evaluation also runs at the last step)
        eval_batches=8,  # validation batches (of batch_size) per evaluation
        eval_recurrences=config_dict.placeholder(tuple),  # None: (1, 2, 4, model.mean_recurrence)
    ))
    config.optim = ml_collections.ConfigDict(dict(
        name="muon_adamw",  # muon_adamw (the official recipe) | adamw
        lr=8e-3,  # AdamW lr (embeddings, tables, head, norms, A_log, dt_bias, B, C)
        b1=0.8,
        b2=0.95,
        eps=1e-10,
        weight_decay=0.0,
        muon_lr=8e-3,  # Muon lr (attention and MLP matrices), scaled by sqrt(max(1, rows/cols))
        muon_momentum=0.95,
        muon_momentum_start=0.85,  # warmed up linearly to muon_momentum over:
        muon_momentum_warmup_steps=300,
        muon_weight_decay=0.2,  # cautious, decays linearly to 0 at train.steps
        muon_beta2=0.95,  # NorMuon second moment
        muon_ns_steps=5,
        muon_dtype="bfloat16",  # where the official Muon works in bfloat16 (float32: exact, slower)
        schedule="trapezoid",  # trapezoid (warmup-stable-decay) | cosine | constant
        warmup_steps=0,
        cooldown_fraction=0.5,  # trapezoid: the last half decays linearly
        min_lr_ratio=0.0,
        update_impl="auto",  # auto | xla | cpu: adamw's update and its guard as one CPU kernel where it runs
    ))
    config.ckpt = ml_collections.ConfigDict(dict(
        every=500,  # steps between checkpoints (0: only at the end and on SIGTERM)
        keep=3,
        allow_changes=config_dict.placeholder(str),  # resume despite these changed keys, e.g. "seed,train.batch_size"
        async_save=True,
        lock_lease_s=60,  # gs:// only: a dead trainer's workdir lock is free this long after its last renewal
    ))
    config.dist = ml_collections.ConfigDict(dict(
        initialize="auto",  # auto (Cloud TPU pods, Slurm, or a coordinator address) | always | never
        coordinator_address=config_dict.placeholder(str),  # e.g. 10.0.0.1:1234 (or $JAX_COORDINATOR_ADDRESS)
        num_processes=config_dict.placeholder(int),
        process_id=config_dict.placeholder(int),
        init_timeout_s=300,  # how long start-up waits for every process to join
        heartbeat_timeout_s=30,  # a process silent this long is taken as dead: the others stop (JAX: 100)
    ))
    # XLA's persistent compilation cache. auto: <data cache>/xla for one accelerator process; off on
    # CPU and for several processes (give a folder every host reads, gs://...); "": off.
    config.compilation_cache_dir = "auto"
    config.profile = ml_collections.ConfigDict(dict(
        start_step=10,  # a profiler trace of steps start_step+1 .. start_step+steps into WORKDIR/profile
        steps=0,  # 0: no trace (open it with TensorBoard's profile plugin or xprof)
    ))
    config.wandb = ml_collections.ConfigDict(dict(
        project=config_dict.placeholder(str),  # None: no Weights & Biases; TensorBoard and metrics.jsonl always
        entity=config_dict.placeholder(str),
        name=config_dict.placeholder(str),  # None: the workdir's last component
        mode="online",  # online | offline (logs under WORKDIR/wandb, `wandb sync` later) | disabled
    ))
    config.bench = ml_collections.ConfigDict(dict(
        warmup=3,
        steps=10,
        compile_only=False,  # lower and compile the sharded step from abstract shapes; report memory, run nothing
        breakdown_steps=0,  # >0: trace that many more steps and report where the time went (XLA:CPU)
    ))
    return config


def parcae(d_model: int, n_heads: int, n_layers_each: int) -> ml_collections.ConfigDict:
    """A published Parcae size: MHA, MLP 4d, r = d, prelude/core/coda of n_layers_each."""
    config = get_config()
    config.data.source = "prepared"  # FineWeb-Edu (or any corpus) via parcae_jax.commands.prepare
    config.model.update(d_model=d_model, n_heads=n_heads, n_kv_heads=n_heads, d_mlp=4 * d_model,
                        n_prelude=n_layers_each, n_core=n_layers_each, n_coda=n_layers_each,
                        d_rec=d_model, d_rec_mlp=4 * d_model, n_rec_heads=n_heads)
    return config


def gpt(d_model: int, n_heads: int, n_layers: int) -> ml_collections.ConfigDict:
    """A published GPT baseline: the same blocks as its Parcae, n_layers = Parcae's unique layers."""
    config = parcae(d_model, n_heads, n_layers // 3)
    config.model.update(arch="gpt", n_layers=n_layers)
    return config


def shipped_config(name: str) -> str | None:
    """The file of a config shipped with parcae_jax (`tiny`, `1p3b`, `gpt_370m`, ...), or None.

    Installed, configs/ is the package parcae_jax.configs; in a checkout that is not installed
    (a launcher's synced copy), it is the folder beside the package."""
    spec = importlib.util.find_spec("parcae_jax.configs")
    folders = [*(spec.submodule_search_locations or [] if spec else []),
               os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")]
    return next((p for p in (os.path.join(f, f"{name}.py") for f in folders) if os.path.isfile(p)), None)


def load_shipped(name: str) -> ml_collections.ConfigDict:
    """`get_config()` of a shipped config, loaded from its file as `--config` would."""
    path = shipped_config(name)
    if path is None:
        raise FileNotFoundError(f"no shipped config named {name!r}")
    spec = importlib.util.spec_from_file_location(f"parcae_jax_shipped_config_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()
