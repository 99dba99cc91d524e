"""The rematerialisation policies behind `model.remat_policy` and `model.block_remat`.

Each name in config.REMAT_POLICIES is a `jax.checkpoint_policies` entry, except
"dots_attention", defined here: what "dots_no_batch" keeps (the projections' and the MLP's
matmul outputs) plus the fused CPU attention kernel's forward outputs (the attention output and
its log-sum-exp). Under it the backward pass recomputes no product at all where the kernel
runs: only element-wise work (norms, activations, casts). Where XLA's attention runs, its
products are batched dots and are recomputed, as under "dots_no_batch".
"""

from __future__ import annotations

from typing import Callable

import jax

from parcae_jax.model.config import REMAT_POLICIES
from parcae_jax.model.cpu_kernels.library import FORWARD_TARGET


def checkpoint_policy(name: str) -> Callable | None:
    """The `jax.checkpoint` policy of a REMAT_POLICIES name; None for "none" (save everything)."""
    target = REMAT_POLICIES[name]
    return None if target is None else _OURS.get(target) or getattr(jax.checkpoint_policies, target)


def _dots_and_attention(prim, *args, **params) -> bool:
    if prim.name == "ffi_call":
        return params.get("target_name") == FORWARD_TARGET
    return jax.checkpoint_policies.dots_with_no_batch_dims_saveable(prim, *args, **params)


# Module-level functions: jax caches a remat trace by the policy's identity.
_OURS = {"dots_attention": _dots_and_attention}
