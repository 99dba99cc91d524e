"""optim.update_impl: AdamW's update and the step's non-finite guard as one CPU kernel.

The step's tail in XLA (step.py) clips the gradient, runs the optax chain make_optimizer
builds for `adamw`, checks every new parameter and moment for finiteness, and keeps the old
state through a conditional when one is not finite. XLA:CPU turns that into ~10 small loops
per parameter leaf and copies the whole new state once more (the conditional cannot write in
place). `model/cpu_kernels/adamw.cc` does the same in one call over all leaves: a pass that
only checks the new values, then, when all are finite, a pass that writes them in place
(its header gives the arithmetic). The logged gradient norm, the clipping factor, the
learning rate and the bias corrections still come from XLA, the same expressions as the
XLA path's.

Where it runs ("auto"): a CPU backend, one device, `optim.name=adamw`, and the kernel
library builds (x86-64 Linux with AVX-512 and a C++ compiler). Elsewhere "auto" means XLA and
an explicit "cpu" is a ConfigError naming the reason (validate.py asks before compiling).
Parameters and moments must be float32, as the model makes them (a TypeError while tracing
otherwise).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from parcae_jax.model.config import ConfigError
from parcae_jax.model.cpu_kernels import library

IMPLS = ("auto", "xla", "cpu")


def unavailable(optim, devices: int, backend: str | None = None) -> str | None:
    """Why the kernel cannot run this optimizer on these devices (None when it can)."""
    backend = backend or jax.default_backend()
    if optim.name != "adamw":
        return f"runs AdamW only (optim.name={optim.name!r})"
    if backend != "cpu":
        return f"runs on the CPU backend only (this is {backend})"
    if devices != 1:
        return f"runs on one device (the mesh has {devices})"
    lib = library.load()
    return lib if isinstance(lib, str) else None


def uses_kernel(optim, devices: int) -> bool:
    """Whether the step's update runs in the kernel: optim.update_impl resolved, "cpu" refused
    with the reason where the kernel cannot run."""
    if optim.update_impl == "xla":
        return False
    why = unavailable(optim, devices)
    if why and optim.update_impl == "cpu":
        raise ConfigError(f"optim.update_impl='cpu': the fused AdamW kernel {why}; "
                          "set --config.optim.update_impl=auto (or xla)")
    return why is None


def make_update(optim, lr: Callable) -> Callable:
    """step.guarded_update's twin through the kernel, for make_optimizer's adamw chain:
    `update(params, grads, opt_state, *, step, schedule, denom, clip, ok) -> (params, opt_state, ok)`
    updates with `grads / denom * clip` unless the flag `ok` is off or a new value is not
    finite (then the state passed in and False). `opt_state` is (ScaleByAdamState, weight
    decay's state, the lr scale's state)."""
    attrs = dict(b1=np.float32(optim.b1), one_minus_b1=np.float32(1 - optim.b1), b2=np.float32(optim.b2),
                 one_minus_b2=np.float32(1 - optim.b2), eps=np.float32(optim.eps), eps_root=np.float32(0.0),
                 weight_decay=np.float32(optim.weight_decay))

    def update(params, grads, opt_state, *, step, schedule, denom, clip, ok) -> tuple[Any, Any, jax.Array]:
        adam, *rest = opt_state
        if not isinstance(adam, optax.ScaleByAdamState):
            raise TypeError(f"the fused AdamW update needs make_optimizer's adamw state, got {type(adam).__name__}")
        leaves, tree = jax.tree.flatten(params)
        g, m, v = (tree.flatten_up_to(t) for t in (grads, adam.mu, adam.nu))
        if any(x.dtype != jnp.float32 for x in leaves + g + m + v):
            raise TypeError("the fused AdamW update needs float32 parameters, gradients and moments")
        count = optax.safe_increment(adam.count)  # optax's bias corrections, in float32 as there
        scalars = jnp.stack([denom, clip, -lr(step, schedule), 1 - optim.b1 ** count, 1 - optim.b2 ** count,
                             ok.astype(jnp.float32)]).astype(jnp.float32)
        n = len(leaves)
        results = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves + m + v]
        out = jax.ffi.ffi_call(library.ADAMW_TARGET, [*results, jax.ShapeDtypeStruct((), jnp.int32)],
                               input_output_aliases={1 + n + i: i for i in range(3 * n)})(
            scalars, *g, *leaves, *m, *v, leaves=np.int64(n), **attrs)
        done = out[-1] != 0
        new_adam = adam._replace(count=jnp.where(done, count, adam.count), mu=tree.unflatten(out[n:2 * n]),
                                 nu=tree.unflatten(out[2 * n:3 * n]))
        return tree.unflatten(out[:n]), (new_adam, *rest), done

    return update
