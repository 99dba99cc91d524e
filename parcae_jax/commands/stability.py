"""The stability experiment (science/stability.py): each injection variant trained at
growing learning rates, counting divergences and loss spikes.

    python -m parcae_jax.commands.stability --out_dir=DIR [--base=tiny] [--steps=150] \\
        [--variants=diagonal,linear,add] [--lr_multipliers=1,4,16,64]

Writes one run per (variant, multiplier) under DIR and stability.json, .csv and .png.
"""

from __future__ import annotations

from absl import flags

from parcae_jax.commands import cli, science_flags
from parcae_jax.commands.training_flags import STEPS, base_config
from parcae_jax.errors import UsageError
from parcae_jax.science.stability import DEFAULT_STEPS, SPIKE_NATS, STATE_BOUND, VARIANTS, experiment

_MULTS = flags.DEFINE_list("lr_multipliers", ["1", "4", "16", "64"], "Learning-rate multipliers over the base's.")
_VARIANTS = flags.DEFINE_list("variants", list(VARIANTS), f"Any of {', '.join(VARIANTS)}.")
_BOUND = flags.DEFINE_float("state_bound", STATE_BOUND, "A state norm above this counts as divergence.")
_SPIKE = flags.DEFINE_float("spike_nats", SPIKE_NATS,
                            "A loss this far above the median of the previous 10 steps is a spike.")


def main(argv: list[str]) -> None:
    cli.no_arguments(argv)
    out_dir = science_flags.out_dir("the runs, stability.json, .csv and .png")
    steps = STEPS.value or DEFAULT_STEPS
    unknown = [v for v in _VARIANTS.value if v not in VARIANTS]
    if not _VARIANTS.value:
        raise UsageError(f"--variants is empty; give any of {', '.join(VARIANTS)}")
    if unknown:
        raise UsageError(f"--variants: {unknown[0]!r} is unknown; use any of {', '.join(VARIANTS)}")
    try:
        multipliers = [float(m) for m in _MULTS.value]
    except ValueError:
        raise UsageError(f"--lr_multipliers={','.join(_MULTS.value)}: give positive numbers such as 1,4,16") from None
    if not multipliers or min(multipliers) <= 0 or steps < 11:
        raise UsageError("--lr_multipliers must be > 0 and --steps >= 11 (spikes compare with the previous 10 steps)")
    if not _BOUND.value > 0 or not _SPIKE.value > 0:
        raise UsageError(f"--state_bound={_BOUND.value} and --spike_nats={_SPIKE.value} must be > 0")
    experiment(base_config(), out_dir, variants=_VARIANTS.value, multipliers=multipliers, steps=steps,
               state_bound=_BOUND.value, spike_nats=_SPIKE.value)


def run() -> None:
    """The `parcae-stability` command."""
    cli.run(main, __name__)


if __name__ == "__main__":
    run()
