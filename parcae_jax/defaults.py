"""Every configuration key parcae_jax reads, with its default.

Other configs start from `get_config()` here and change what differs; a key that is not
declared here cannot be set (configs are locked), so a typo in an override fails at once.
The model defaults are the published 140m Parcae (docs/design.md §1).
"""

import ml_collections
from ml_collections import config_dict


def model_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        arch="parcae",  # parcae | gpt
        vocab_size=32768,
        padding_multiple=64,  # tables are padded to a multiple of this
        block_size=2048,  # longest context (RoPE positions)
        seq_len=2048,  # training sequence length, <= block_size
        d_model=768,
        n_heads=6,
        n_kv_heads=6,  # < n_heads: grouped-query attention in prelude, coda and GPT
        d_mlp=3072,
        n_layers=6,  # GPT only
        n_prelude=2,
        n_core=2,
        n_coda=2,
        d_rec=768,  # recurrent state width
        d_rec_mlp=3072,
        n_rec_heads=6,
        injection="diagonal",  # diagonal | linear | add
        prelude_norm=True,
        state_init="like-init",  # like-init | normal | embed | zero | unit
        mean_recurrence=8,
        mean_backprop_depth=4,
        sampling_scheme="poisson-truncated-full",  # poisson-truncated-full | fixed
        sampling_unit="per-sequence",  # per-sequence | per-batch
        qk_norm=True,
        norm_eps=1e-5,
        rope_base=50000.0,
        rope_condense_ratio=1.0,
        value_embeds=True,
        ve_gate_channels=32,
        tie_embeddings=True,
        logit_softcap=config_dict.placeholder(float),  # None: off
        logit_scale=1.0,
        emb_scale=1.0,
        init_orthogonal=True,
        remat_policy="full",  # per loop iteration: full | dots | dots_no_batch | none
        dtype="auto",  # compute dtype (auto: bfloat16 on accelerators, float32 on CPU); parameters stay float32
        attention_impl="xla",  # xla | cudnn
    ))


def data_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        source="embedded",  # embedded (ships with Python) | prepared | tfds
        path=config_dict.placeholder(str),  # source=prepared: the directory `parcae_jax.data.prepare` wrote
        tokenizer="bytes",  # bytes | path to tokenizer.json | path to a SentencePiece .model
        eod_token=config_dict.placeholder(str),  # if not <|endoftext|> (or the SentencePiece EOS)
        tfds_name=config_dict.placeholder(str),  # source=tfds
        tfds_split="train",
        tfds_data_dir=config_dict.placeholder(str),
        text_field="text",
        val_every=200,  # source=tfds: hold out about 1 document in val_every (by a hash of its text)
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
    ))
    config.ckpt = ml_collections.ConfigDict(dict(
        every=500,  # steps between checkpoints (0: only at the end and on SIGTERM)
        keep=3,
        allow_changes=config_dict.placeholder(str),  # resume despite these changed keys, e.g. "seed,train.batch_size"
        async_save=True,
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
    ))
    return config


def parcae(d_model: int, n_heads: int, n_layers_each: int) -> ml_collections.ConfigDict:
    """A published Parcae size: MHA, MLP 4d, r = d, prelude/core/coda of n_layers_each."""
    config = get_config()
    config.data.source = "prepared"  # FineWeb-Edu (or any corpus) via parcae_jax.data.prepare
    config.model.update(d_model=d_model, n_heads=n_heads, n_kv_heads=n_heads, d_mlp=4 * d_model,
                        n_prelude=n_layers_each, n_core=n_layers_each, n_coda=n_layers_each,
                        d_rec=d_model, d_rec_mlp=4 * d_model, n_rec_heads=n_heads)
    return config


def gpt(d_model: int, n_heads: int, n_layers: int) -> ml_collections.ConfigDict:
    """A published GPT baseline: the same blocks as its Parcae, n_layers = Parcae's unique layers."""
    config = parcae(d_model, n_heads, n_layers // 3)
    config.model.update(arch="gpt", n_layers=n_layers)
    return config
