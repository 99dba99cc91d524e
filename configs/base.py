"""Every configuration key parcae_jax reads, with its default.

Other configs start from `get_config()` here and change what differs; a key that is not
declared here cannot be set (configs are locked), so a typo in an override fails at once.
The model defaults are the published 140m Parcae (REFERENCE_SPEC section 1).
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
        dtype="float32",  # compute dtype; parameters stay float32
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
    config.seed = 0
    config.model = model_config()
    config.data = data_config()
    return config


def parcae(d_model: int, n_heads: int, n_layers_each: int) -> ml_collections.ConfigDict:
    """A published Parcae size: MHA, MLP 4d, r = d, prelude/core/coda of n_layers_each."""
    config = get_config()
    config.model.update(d_model=d_model, n_heads=n_heads, n_kv_heads=n_heads, d_mlp=4 * d_model,
                        n_prelude=n_layers_each, n_core=n_layers_each, n_coda=n_layers_each,
                        d_rec=d_model, d_rec_mlp=4 * d_model, n_rec_heads=n_heads)
    return config


def gpt(d_model: int, n_heads: int, n_layers: int) -> ml_collections.ConfigDict:
    """A published GPT baseline: the same blocks as its Parcae, n_layers = Parcae's unique layers."""
    config = parcae(d_model, n_heads, n_layers // 3)
    config.model.update(arch="gpt", n_layers=n_layers)
    return config
