"""transpose.cc's [M, N] -> [N, M] bfloat16 copy as a JAX function, for matmul.py's weight
gradients.

XLA:CPU fuses such a copy into the loop producing its operand and writes it element by
element; the kernel reads the operand as XLA materialised it and moves 16 x 16 blocks of
32-bit words. Values are copied, never changed, so it is exact.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from parcae_jax.model.cpu_kernels import library


def fits(shape: tuple[int, ...], dtype) -> bool:
    """Whether the kernel takes a 2-D operand of this shape and dtype here: bfloat16 (float32
    copies gained nothing), rows a multiple of 32 and columns of 16, a CPU backend, no mesh of
    more than one device (XLA cannot partition a custom call), and the library built."""
    if len(shape) != 2 or jnp.dtype(dtype) != jnp.dtype(jnp.bfloat16) or shape[0] % 32 or shape[1] % 16:
        return False
    if max(shape[0] // 2, shape[1]) * 16 >= 2**31:  # the kernel's 32-bit strides
        return False
    return library.unavailable_here() is None


@jax.custom_vjp
def transpose(x: jax.Array) -> jax.Array:
    """x.T for a 2-D x that `fits`."""
    return _call(x)


def _call(x):
    return jax.ffi.ffi_call(library.TRANSPOSE_TARGET, jax.ShapeDtypeStruct(x.shape[::-1], x.dtype))(x)


transpose.defvjp(lambda x: (_call(x), None), lambda _, g: (transpose(g) if fits(g.shape, g.dtype) else g.T,))
