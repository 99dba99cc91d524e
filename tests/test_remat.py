"""Rematerialisation and unrolling change memory and speed, not results: every loop policy,
every block policy and both ways of running the gradient iterations' scan (model.scan_unroll)
give a bit-identical loss and the same gradient (to the last bits: XLA fuses a recomputed
backward differently, which moves an element by an ulp), and block remat really frees
activations."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from parcae_jax import model as M
from parcae_jax.model.cpu_kernels import library
from parcae_jax.model.remat import checkpoint_policy
from parcae_jax.training.describe import flops_per_token
from tests.helpers import eqn_params, loss_and_grad, tiny


def _grad_fn(cfg, B=2, params=None):
    return loss_and_grad(cfg, B, perturb=0.02, params=params)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["parcae", "gpt"])
def test_every_remat_policy_and_unrolling_give_bit_identical_loss_and_the_same_gradient(arch):
    base = tiny(arch=arch, n_layers=3)
    settings = [("none", "full", "none"), ("full", "full", "full"), ("dots", "none", "full"),
                ("dots_no_batch", "dots_attention", "none")]
    results, params = [], None
    for block, loop, unroll in settings:
        cfg = base.replace(block_remat=block, remat_policy=loop, scan_unroll=unroll)
        fn, params = _grad_fn(cfg, params=params)
        results.append(fn(params))
    (loss0, g0) = results[0]
    for (block, loop, unroll), (loss, g) in zip(settings[1:], results[1:]):
        assert float(loss) == float(loss0), (block, loop, unroll)
        for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g)):
            # An entry that is a sum of cancelling terms moves by ulps of its terms, not of itself:
            # the floor is ~8 float32 ulps of the leaf's largest entry (the suite's fast-compile
            # emitters move such entries by up to ~4; a wrong recomputation moves every entry).
            floor = 1e-6 * float(np.abs(a).max())
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=floor, err_msg=f"{block=} {loop=} {unroll=}")


@pytest.mark.parametrize("arch,policy", [("gpt", "dots"), ("parcae", "full")])
def test_block_remat_wraps_every_block_outside_the_loop_with_its_policy(arch, policy):
    """Each prelude, coda or GPT block is one remat region with the named policy (the loop's
    gradient iterations keep their own). XLA:CPU's memory analysis does not show the saving:
    its scheduler may run a block's recomputation as soon as its inputs exist (a 6-layer GPT
    at B=8, T=256: 188.5 MB of temporaries without, 186.6 MB with); accelerator schedulers
    place it in the backward pass. So this checks the program, and describe's count."""
    cfg = tiny(arch=arch, n_layers=3, block_remat=policy, remat_policy="dots_no_batch")
    fn, params = _grad_fn(cfg)
    found = eqn_params(jax.make_jaxpr(fn)(params).jaxpr, "remat2", "policy")
    named = checkpoint_policy(policy)
    blocks = cfg.n_layers if arch == "gpt" else cfg.n_prelude + cfg.n_coda
    assert sum(p is named for p in found) == blocks, found
    if arch == "parcae":
        assert jax.checkpoint_policies.dots_with_no_batch_dims_saveable in found  # the loop's own
    fn, params = _grad_fn(cfg.replace(block_remat="none"), params=params)
    assert not any(p is named for p in eqn_params(jax.make_jaxpr(fn)(params).jaxpr, "remat2", "policy"))

    plain, remat = flops_per_token(cfg.replace(block_remat="none")), flops_per_token(cfg)
    assert remat["flops_per_token"] == plain["flops_per_token"]  # model FLOPs do not change
    outside = sum(describe_block_flops(cfg))
    assert remat["remat_recompute_flops_per_token"] - plain["remat_recompute_flops_per_token"] == outside


def describe_block_flops(cfg):
    from parcae_jax.model.layout import block_specs
    from parcae_jax.training.describe import block_forward_flops

    return [block_forward_flops(s, cfg, cfg.seq_len) for s in block_specs(cfg) if s.segment != "core"]


@pytest.mark.skipif(isinstance(library.load(), str), reason="the CPU attention kernel is unavailable here")
def test_dots_attention_keeps_the_kernels_outputs_so_the_backward_recomputes_no_product():
    """remat_policy "dots_attention" (auto's pick on a CPU): a gradient iteration's backward runs
    neither a matmul nor the attention forward again, as with nothing rematerialised, where
    "dots_no_batch" runs the attention forward of each core block once more. Counted in the
    lowered program, where remat's recomputation is still explicit."""
    cfg = tiny(attention_impl="cpu", mean_recurrence=2, mean_backprop_depth=1)
    params = M.param_shapes(cfg)  # lowering needs only shapes: no initialisation to compile

    def calls(policy):
        nonlocal params
        fn, params = loss_and_grad(cfg.replace(remat_policy=policy), params=params)
        text = fn.lower(params).as_text()
        return text.count(f"@{library.FORWARD_TARGET}("), text.count("stablehlo.dot_general")

    kept, none, dots = calls("dots_attention"), calls("none"), calls("dots_no_batch")
    assert kept == none
    assert dots == (kept[0] + cfg.n_core, kept[1])
