"""Every matmul of the model: inputs in the compute dtype, float32 accumulation and output,
forward and backward.

With a 16-bit compute dtype, autodiff of `einsum(..., preferred_element_type=float32)` would
give backward dots with one float32 operand (the cotangent), which XLA runs as float32 dots:
the backward pass, two thirds of a step's FLOPs, would gain nothing. The custom VJP below
casts the cotangent to the compute dtype too, so all three dots of a matmul (y, dx, dw) are
16-bit x 16-bit -> float32. CPUs with AVX512-BF16 run those at about twice their float32
rate (docs/performance.md); GPUs and TPUs run them on their matrix units. Parameters,
cotangents and everything between matmuls (norms, softmax, RoPE, the loss) stay float32, and
the residuals kept for the backward pass are the 16-bit copies (half the bytes).

With float32 the values are the plain float32 einsum's. On XLA:CPU, in both precisions, a
weight's gradient is computed from a row-major copy of its smaller operand (_weight_gradient):
the same products, summed in another order, at up to 3x the speed of the dot XLA:CPU emits
for autodiff's form. Other backends transpose operands inside their matmul units and get the
plain einsums.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from parcae_jax.model.cpu_kernels import transpose as cpu_transpose


def einsum(spec: str, x: jax.Array, w: jax.Array, dtype) -> jax.Array:
    """`jnp.einsum(spec, x, w)` computed in `dtype` with float32 accumulation; returns float32.

    `spec` is a two-operand einsum without ellipses in which every index of an operand appears
    in the other operand or the output (true of every projection and attention product), so
    that the backward products are einsums too.
    """
    dtype = jnp.dtype(dtype)
    if dtype == jnp.float32 and not _row_major_weight_gradient(spec):
        return jnp.einsum(spec, x.astype(jnp.float32), w.astype(jnp.float32))  # autodiff's VJP is float32 too
    return _matmul(spec, dtype, jnp.dtype(x.dtype), jnp.dtype(w.dtype), x, w)


def backward_specs(spec: str) -> tuple[str, str]:
    """The einsums of the two cotangents: (dy, w -> dx) and (x, dy -> dw)."""
    inputs, out = spec.replace(" ", "").split("->")
    a, b = inputs.split(",")
    for name, operand, others in (("x", a, b + out), ("w", b, a + out)):
        if set(operand) - set(others):
            raise ValueError(f"einsum {spec!r}: an index of {name} appears nowhere else; sum it out first")
    return f"{out},{b}->{a}", f"{a},{out}->{b}"


# The custom VJP: operands and cotangent in `dtype` (a 16-bit one, or float32 where only the
# weight gradient's layout differs from autodiff's), float32 accumulation and results.
@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _matmul(spec, dtype, x_dtype, w_dtype, x, w):
    return _fwd(spec, dtype, x_dtype, w_dtype, x, w)[0]


def _fwd(spec, dtype, x_dtype, w_dtype, x, w):
    xc, wc = x.astype(dtype), w.astype(dtype)
    return jnp.einsum(spec, xc, wc, preferred_element_type=jnp.float32), (xc, wc)


def _bwd(spec, dtype, x_dtype, w_dtype, residuals, g):
    xc, wc = residuals
    gc = g.astype(dtype)
    return input_cotangent(spec, gc, wc).astype(x_dtype), weight_cotangent(spec, xc, gc).astype(w_dtype)


def input_cotangent(spec: str, gc: jax.Array, wc: jax.Array) -> jax.Array:
    """x's cotangent (float32) of `einsum(spec, x, w)` from the output's cotangent `gc` and
    w, both already in the compute dtype."""
    return jnp.einsum(backward_specs(spec)[0], gc, wc, preferred_element_type=jnp.float32)


def weight_cotangent(spec: str, xc: jax.Array, gc: jax.Array) -> jax.Array:
    """w's cotangent (float32) of `einsum(spec, x, w)` from x and the output's cotangent, both
    already in the compute dtype; through _weight_gradient where that is faster."""
    dw_spec = backward_specs(spec)[1]
    if _row_major_weight_gradient(spec):
        return _weight_gradient(dw_spec, xc, gc)
    return jnp.einsum(dw_spec, xc, gc, preferred_element_type=jnp.float32)


_matmul.defvjp(_fwd, _bwd)


def _weight_like(spec: str) -> bool:
    """Whether no index is shared by x, w and the output (w is a weight, as in every projection,
    not a batch of matrices, as in the attention products)."""
    inputs, out = spec.replace(" ", "").split("->")
    a, b = inputs.split(",")
    return not set(a) & set(b) & set(out)


def _row_major_weight_gradient(spec: str) -> bool:
    """Whether w's gradient goes through _weight_gradient: for a weight, on XLA:CPU (where it
    was measured; elsewhere the copy would only add memory traffic)."""
    return _weight_like(spec) and jax.default_backend() == "cpu"


def _weight_gradient(dw_spec: str, x: jax.Array, g: jax.Array) -> jax.Array:
    """einsum(dw_spec, x, g) (float32 out), with the operands in the layout YNNPACK wants.

    Autodiff's weight gradient contracts both operands over their leading (token) axes. XLA:CPU
    hands such a dot to Eigen, which on a 2-core Xeon ran it at 80-90 GFLOP/s inside the float32
    step (a quarter of the roof; 280 GFLOP/s as the same product in row-major form). Here the
    smaller operand is transposed into a row-major [kept, tokens] copy (no-op reduce_precision:
    XLA keeps the copy rather than folding it back into the dot), the dot is computed in its
    natural output order, and only the small result is transposed, if at all. Without the last
    step XLA swapped the operands and transposed the larger one instead (an [tokens, 1024] ->
    [1024, tokens] copy that took 11-25 ms)."""
    a, out = dw_spec.split("->")[0].split(",")
    b = dw_spec.split("->")[1]
    kept = lambda s: "".join(c for c in s if c in b)  # noqa: E731
    contract = "".join(c for c in a if c not in b)
    (lhs, ls), (rhs, rs) = ((x, a), (g, out)) if x.size <= g.size else ((g, out), (x, a))
    lhs_t = _transposed(lhs, ls, kept(ls), contract)
    natural = kept(ls) + kept(rs)
    dw = jnp.einsum(f"{kept(ls)}{contract},{rs}->{natural}", lhs_t, rhs, preferred_element_type=jnp.float32)
    return dw if natural == b else jnp.einsum(f"{natural}->{b}", own_precision(dw))


def _transposed(x: jax.Array, spec: str, kept: str, contract: str) -> jax.Array:
    """einsum(spec -> kept + contract) of x, materialised: by the CPU transpose kernel where
    `spec` is contract + kept (a 2-D transpose of x's rows) and the kernel fits, else as XLA's
    copy that own_precision keeps. XLA:CPU fuses its copy into the loop producing x (an
    RMSNorm, a cast) and writes it element by element: 2-3x slower."""
    if spec == contract + kept:
        n = len(contract)
        rows, cols = math.prod(x.shape[:n]), math.prod(x.shape[n:])
        if cpu_transpose.fits((rows, cols), x.dtype):
            return cpu_transpose.transpose(x.reshape(rows, cols)).reshape(x.shape[n:] + x.shape[:n])
    return own_precision(jnp.einsum(f"{spec}->{kept}{contract}", x))


def own_precision(x: jax.Array) -> jax.Array:
    """x unchanged: reduce_precision to x's own format, which XLA keeps and YNNPACK cannot fuse.
    So the value is materialised as it is (XLA cannot fold a transpose before it into the next
    dot), and the matmuls on either side stay in separate fusions: XLA:CPU once joined a prefill
    MLP's fc, activation and proj into one YNNPACK fusion that ran ~60% slower than apart."""
    info = jnp.finfo(x.dtype)
    return jax.lax.reduce_precision(x, exponent_bits=info.nexp, mantissa_bits=info.nmant)


class Dense(nn.Module):
    """y = x @ (kernel * kernel_scale) (no bias) through einsum: `dtype` inputs, float32
    accumulation and output, float32 kernel named "kernel" as flax's Dense names it."""

    features: int
    kernel_init: object
    dtype: object = jnp.float32
    kernel_scale: float = 1.0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), jnp.float32)
        if self.kernel_scale != 1.0:
            kernel = kernel * self.kernel_scale
        lead = "ijklmn"[: x.ndim - 1]
        return einsum(f"{lead}x,xy->{lead}y", x, kernel, self.dtype)
