"""Inference: the per-recurrence KV cache layout (cache_slots.py), decoding over it
(decode.py), generation (generator.py) and the lm-eval adapter (harness.py).

`GenerationError` is every request the model cannot serve (a sampling setting, a cache
strategy, an exit rule, a prompt): one line naming the fix."""

from parcae_jax.errors import UserError


class GenerationError(UserError, ValueError):
    """A generation request the model cannot serve (one line, names the fix)."""
