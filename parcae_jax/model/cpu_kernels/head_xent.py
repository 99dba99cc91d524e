"""head_xent.cc's softmax cross-entropy of the LM head as a JAX function, for xent.py's
custom VJP: the per-token loss and the logits' gradient `softmax - onehot` in the compute
dtype, from the float32 head output, in one pass over each row on every thread."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from parcae_jax.model.cpu_kernels import library


def unfit(vocab: int, dtype) -> str | None:
    """Why the kernel cannot take logits of this vocab width with the gradient in `dtype` here,
    or None: it needs a vocab multiple of 16, bfloat16 or float32, a CPU backend, no mesh of
    more than one device (XLA cannot partition a custom call), and the library built."""
    if vocab % 16:
        return f"needs a padded vocab that is a multiple of 16 (got {vocab})"
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)):
        return f"computes in bfloat16 or float32 (got {jnp.dtype(dtype).name})"
    return library.unavailable_here()


def loss_and_gradient(z_NxV: jax.Array, targets_N: jax.Array, scale: float, dtype) -> tuple[jax.Array, jax.Array]:
    """(loss [..] float32, d loss / d z [.., V] in `dtype`) for logits `z * scale`, z float32
    [.., V], targets int32 [..] (indices into V; one outside gives that row NaN)."""
    return jax.ffi.ffi_call(library.HEAD_XENT_TARGET, (
        jax.ShapeDtypeStruct(targets_N.shape, jnp.float32), jax.ShapeDtypeStruct(z_NxV.shape, jnp.dtype(dtype))))(
        z_NxV.astype(jnp.float32), targets_N.astype(jnp.int32), scale=np.float32(scale))
