"""Small configs and tools shared by the tests."""

import numpy as np

from parcae_jax.model.config import ModelConfig

# The shape of the reference fixture: width 64, 4 heads, 1/2/1 layers, vocab 256.
TINY = dict(vocab_size=256, block_size=64, seq_len=64, d_model=64, n_heads=4, n_kv_heads=4, d_mlp=256,
            n_prelude=1, n_core=2, n_coda=1, d_rec=64, d_rec_mlp=256, n_rec_heads=4,
            mean_recurrence=4, mean_backprop_depth=2)


def tiny(**changes) -> ModelConfig:
    return ModelConfig(**{**TINY, **changes}).replace()  # replace() validates


def shifted_labels(ids: np.ndarray) -> np.ndarray:
    """labels[:, t] = ids[:, t + 1]; the last position is ignored (-100), as the fixtures."""
    return np.concatenate([ids[:, 1:], np.full((ids.shape[0], 1), -100, ids.dtype)], axis=1)


def get(tree, path):
    for p in path:
        tree = tree[p]
    return tree
