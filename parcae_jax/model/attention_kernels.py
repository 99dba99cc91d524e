"""Fused attention kernels behind `model.attention_impl`: cuDNN flash attention (NVIDIA GPUs),
Pallas splash attention (TPUs) and our fused CPU kernel (cpu_kernels/, AVX-512 CPUs), with the
XLA path of attention.py as default and fallback.

Both adapters take what the XLA path takes (q [B,T,H,D], k/v [B,T,G,D] float32, RoPE'd and
qk-normed; packed-document segment ids [B,T] or None), attend causally within each document,
read kv head h // (H/G) from query head h, run the products in the compute dtype and return
float32 [B,T,H,D]. The 1/sqrt(D) scale is applied to q in float32 before the cast, exactly as
the XLA path does, so both see the same rounded operands.

On CPU neither kernel exists; `emulated_kernels()` (tests only) routes "cudnn" through the same
wrapper with jax.nn's XLA implementation and "splash" through Pallas interpret mode.
"""

from __future__ import annotations

import contextlib
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from parcae_jax.model.config import ConfigError

_emulate = False  # set only inside emulated_kernels(); read at trace time


@contextlib.contextmanager
def emulated_kernels():
    """Test only: while tracing inside this block, "cudnn" runs its wrapper with
    jax.nn.dot_product_attention(implementation="xla") and "splash" runs the Pallas kernel in
    interpret mode, on any backend. Trace-time switch: jit caches made inside stay emulated."""
    global _emulate
    before, _emulate = _emulate, True
    try:
        yield
    finally:
        _emulate = before


def emulating() -> bool:
    """Whether an `emulated_kernels()` block is active (read while tracing)."""
    return _emulate


def _nvidia() -> bool:
    if jax.default_backend() != "gpu":
        return False
    from jax.extend.backend import get_backend  # not loaded by `import jax`

    try:  # ROCm is a "gpu" backend too, without cuDNN
        return "cuda" in get_backend().platform_version.lower()
    except Exception:  # a client without a version string: let cuDNN say so itself
        return True


def _cudnn_max_head_dim() -> int:
    """cuDNN flash attention takes head dims up to 128, or 256 from Hopper (sm_90) on."""
    cc = getattr(jax.devices()[0], "compute_capability", "0.0")
    return 256 if tuple(int(x) for x in str(cc).split(".")[:2]) >= (9, 0) else 128


def cudnn_unfit(dtype, D: int, T: int, segments: bool) -> str | None:
    """Why cuDNN flash attention cannot take these inputs (None when it can): the limits
    jax's check_layout / check_is_flash_attention enforce, turned into a fix to name."""
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"needs model.dtype=bfloat16 or float16 (got {jnp.dtype(dtype).name}); set --config.model.dtype=bfloat16"
    if D % 8 or D > _cudnn_max_head_dim():
        return f"needs a head_dim that is a multiple of 8 and <= {_cudnn_max_head_dim()} (got {D}); change n_heads"
    if segments and T % 2:  # the segment mask travels as a bias, which needs even lengths
        return f"with document masking needs an even sequence length (got {T}); change seq_len"
    return None


def splash_block(T: int) -> int | None:
    """The splash tile (queries and keys) for length T: 512, 256 or 128, whichever divides T
    first (the kernel's key blocks must be multiples of the 128 TPU lanes); None if none does."""
    return next((b for b in (512, 256, 128) if T % b == 0), None)


def resolve_impl(impl: str, dtype, D: int, T: int, segments: bool, heads: tuple[int, int, int] | None = None) -> str:
    """`attention_impl` -> the implementation this trace runs: "xla", "cudnn", "splash" or "cpu".

    "auto" picks cuDNN on NVIDIA GPUs, splash on TPUs and the fused CPU kernel on AVX-512
    CPUs when they can take the shapes, else XLA. An explicit kernel that cannot run here
    raises ConfigError before anything compiles, unless `emulated_kernels()` is active.
    `heads` (B, H, G), when known, lets the CPU kernel check the mesh it would run under.
    """
    backend = jax.default_backend()
    if impl == "auto":
        if _nvidia() and cudnn_unfit(dtype, D, T, segments) is None:
            return "cudnn"
        if backend == "tpu" and splash_block(T) is not None:
            return "splash"
        if backend == "cpu" and cpu_unfit(dtype, D, T, heads) is None:
            return "cpu"
        return "xla"
    where = f"model.attention_impl={impl!r}"
    if impl == "cpu":
        why = f"runs on CPUs only, but JAX runs on {backend}" if backend != "cpu" else cpu_unfit(dtype, D, T, heads)
        if why:
            raise ConfigError(f"{where}: the fused CPU kernel {why}; set --config.model.attention_impl=auto (or xla)")
    if impl == "cudnn" and not _emulate:
        if not _nvidia():
            raise ConfigError(f"{where} runs on NVIDIA GPUs only, but JAX runs on {backend}; "
                              "set --config.model.attention_impl=auto (or xla)")
        why = cudnn_unfit(dtype, D, T, segments)
        if why:
            raise ConfigError(f"{where} {why}, or set --config.model.attention_impl=xla")
    if impl == "splash":
        if backend != "tpu" and not _emulate:
            raise ConfigError(f"{where} runs on TPUs only, but JAX runs on {backend}; "
                              "set --config.model.attention_impl=auto (or xla)")
        if splash_block(T) is None:
            raise ConfigError(f"{where} needs a sequence length that is a multiple of 128 (got {T}); "
                              "change seq_len or set --config.model.attention_impl=xla")
    return impl


def cpu_unfit(dtype, D: int, T: int, heads: tuple[int, int, int] | None = None) -> str | None:
    """Why the fused CPU kernel cannot take these inputs here (None when it can); `heads`
    (B, H, G): also under the mesh in use."""
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
        return f"runs float32 or bfloat16 products (got {jnp.dtype(dtype).name})"
    from parcae_jax.model.cpu_kernels import attention as cpu_attention  # builds the kernel on first use

    return cpu_attention.unfit(D, T) or (mesh_unfit(*heads) if heads else None)


def cudnn_attention(q_BxTxHxD, k_BxTxGxD, v_BxTxGxD, segment_ids_BxT, dtype, implementation: str = "cudnn"):
    """Causal GQA attention through jax.nn.dot_product_attention (cuDNN flash attention).

    `implementation="xla"` runs this same call on any backend (how the tests check it on CPU).
    Documents: jax 0.10.2 takes no segment ids and its seq-length arguments describe one
    padded run per row, so the same-document test goes in as a boolean `mask` [B,1,T,T]; cuDNN
    adds it as a bias (and, in this jax, also computes that bias's unused gradient), which
    costs B*T*T bf16 reads and writes per call next to the flash kernel's work.
    """
    D = q_BxTxHxD.shape[-1]
    q = (q_BxTxHxD * (1.0 / math.sqrt(D))).astype(dtype)  # the XLA path's scale and rounding
    mask_Bx1xTxT = None
    if segment_ids_BxT is not None:
        mask_Bx1xTxT = (segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :])[:, None]
    out = jax.nn.dot_product_attention(q, k_BxTxGxD.astype(dtype), v_BxTxGxD.astype(dtype), mask=mask_Bx1xTxT,
                                       scale=1.0, is_causal=True, implementation=implementation)
    return out.astype(jnp.float32)


def splash_attention(q_BxTxHxD, k_BxTxGxD, v_BxTxGxD, segment_ids_BxT, dtype, interpret: bool = False):
    """Causal GQA attention with the Pallas TPU splash kernel (`interpret=True`: any backend).

    The kernel attends one example heads-first ([H,T,D] queries, [G,T,D] keys and values; its
    MHA form reads kv head h // (H/G) itself), so it is vmapped over the batch. Under a mesh
    (`jax.set_mesh`) it runs inside shard_map with the activations' logical sharding (batch
    over data/fsdp, heads over tensor): a Pallas call cannot be partitioned by XLA itself.
    """
    D = q_BxTxHxD.shape[-1]
    q = (q_BxTxHxD * (1.0 / math.sqrt(D))).astype(dtype)
    k, v = k_BxTxGxD.astype(dtype), v_BxTxGxD.astype(dtype)
    seg = segment_ids_BxT
    if seg is None:  # one document per row: the segment test is then always true
        seg = jnp.zeros(q.shape[:2], jnp.int32)
    kernel = per_device(lambda q, k, v, seg: _splash_local(q, k, v, seg, segment_ids_BxT is not None, interpret))
    return kernel(q, k, v, seg.astype(jnp.int32)).astype(jnp.float32)


def per_device(kernel, tables: bool | None = None):
    """kernel(q [B,T,H,D], k, v [B,T,G,D], seg [B,T]) -> [B,T,H,D], run inside shard_map with the
    activations' logical sharding under a mesh (`jax.set_mesh`), as is without one: XLA cannot
    partition a Pallas call or a custom call itself. With `tables` not None the kernel also takes
    two RoPE tables [Bc, T, D/2]: one row per batch row when `tables` (split like the batch),
    else one row for all (whole on every device)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return kernel
    spec_q = nn.logical_to_mesh_axes(("batch", "length", "heads", "head_dim"))
    spec_kv = nn.logical_to_mesh_axes(("batch", "length", "kv_heads", "head_dim"))
    spec_seg = nn.logical_to_mesh_axes(("batch", "length"))
    specs = (spec_q, spec_kv, spec_kv, spec_seg)
    if tables is not None:
        specs += (nn.logical_to_mesh_axes(("batch" if tables else None, "length", None)),) * 2
    return jax.shard_map(kernel, mesh=mesh, in_specs=specs, out_specs=spec_q, check_vma=False)


def per_device_packed(kernel, tables: bool, own_v: bool):
    """kernel(qkv [B,T,F], seg [B,T], cos, sin[, v [B,T,G*D]]) -> [B,T,H,D], run inside
    shard_map with the rows split as the batch is, as is without a mesh. Only where
    `heads_whole()`: a device's slice of F would otherwise mix q, k and v channels."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return kernel
    rows = nn.logical_to_mesh_axes(("batch", "length", None))
    table = nn.logical_to_mesh_axes(("batch" if tables else None, "length", None))
    specs = (rows, nn.logical_to_mesh_axes(("batch", "length")), table, table) + ((rows,) if own_v else ())
    # Manual over the axes the rows are split by only: over the others (size 1 here) the
    # transpose would sum qkv's gradient, a copy of it per call.
    manual = {a for p in rows for a in _mesh_axes(p)}
    return jax.shard_map(kernel, mesh=mesh, in_specs=specs, axis_names=manual,
                         out_specs=nn.logical_to_mesh_axes(("batch", "length", None, None)), check_vma=False)


def _ways(mesh, name: str) -> int:
    """Over how many devices the mesh splits logical axis `name` (asked alone: asked together, a
    mesh axis taken by one name is not given to the next)."""
    return math.prod(mesh.shape[a] for a in _mesh_axes(nn.logical_to_mesh_axes((name,))[0]))


def _mesh_axes(entry) -> tuple[str, ...]:
    """The mesh axes of one PartitionSpec entry (None, a name, or a tuple of names)."""
    return (entry,) if isinstance(entry, str) else tuple(entry or ())


def heads_whole() -> bool:
    """Whether every device holds every head: no mesh, or one that splits neither kind of head
    (data parallelism, FSDP, a single device). The CPU kernel may then read q, k and v in place
    from the fused projection's output (cpu_kernels/attention.py `attention_packed`)."""
    mesh = jax.sharding.get_abstract_mesh()
    return mesh.empty or (_ways(mesh, "heads") == 1 and _ways(mesh, "kv_heads") == 1)


def mesh_unfit(B: int, H: int, G: int) -> str | None:
    """Why `per_device` cannot hand each device whole rows and whole head groups under the mesh
    in use (None when it can, or without a mesh): the batch, query heads and kv heads must
    divide by the mesh axes they are split over, and both kinds of heads split alike, so that
    local query head h still reads local kv head h // (H/G)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return None
    ways = {k: _ways(mesh, k) for k in ("batch", "heads", "kv_heads")}
    for what, size in (("batch", B), ("heads", H), ("kv_heads", G)):
        if size % ways[what]:
            return f"needs {what}={size} to divide by the {ways[what]} devices the mesh splits it over"
    if ways["heads"] != ways["kv_heads"]:
        return f"needs heads and kv heads split alike (the mesh splits them {ways['heads']}, {ways['kv_heads']} ways)"
    return None


def _splash_local(q_BxTxHxD, k_BxTxGxD, v_BxTxGxD, seg_BxT, segments: bool, interpret: bool):
    """Splash on this device's rows and heads; returns [B,T,H,D] in the compute dtype."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa  # TPU-only module, load on use

    T, H = q_BxTxHxD.shape[1], q_BxTxHxD.shape[2]
    b = splash_block(T)
    blocks = sa.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                           block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
    # Every head shares the static causal mask: fully masked tiles are skipped, not computed.
    mask = sa.MultiHeadMask([sa.CausalMask((T, T)) for _ in range(H)])
    kernel = sa.make_splash_mha(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1, interpret=interpret)

    def one(q_HxTxD, k_GxTxD, v_GxTxD, seg_T):
        return kernel(q_HxTxD, k_GxTxD, v_GxTxD, segment_ids=sa.SegmentIds(seg_T, seg_T) if segments else None)

    heads_first = lambda x: x.transpose(0, 2, 1, 3)  # noqa: E731
    out_BxHxTxD = jax.vmap(one)(heads_first(q_BxTxHxD), heads_first(k_BxTxGxD), heads_first(v_BxTxGxD), seg_BxT)
    return heads_first(out_BxHxTxD)
