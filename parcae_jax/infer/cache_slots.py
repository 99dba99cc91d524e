"""Which KV-cache slot each unrolled layer application of a Parcae model reads and writes.

Generating with R recurrences applies n_prelude + R * n_core + n_coda layers, and the
official cache keys them by the application's index ("step"):

    prelude layer i          -> i
    core layer j, iteration r -> n_prelude + r * n_core + j
    coda layer c             -> n_prelude + R * n_core + c

`full` gives every application its own slot. The `compress-*` strategies send several core
iterations to one slot, so the cache holds fewer than n_prelude + R * n_core + n_coda
layers' worth of keys and values (a slot written twice for a position keeps the later
write). With K the strategy's number, r the iteration and j the layer within the core:

    compress-firstK   iterations >= K share iteration K's slot
    compress-lastK    the first R - K iterations share iteration 0's slot; the last K
                      take slots 1 .. K (K < R: at K = R the last iteration would take the
                      coda's first slot, which the official rule does not guard against)
    compress-strideK  iteration r uses slot r // K
    compress-boundaries  the last iteration uses slot 1, every other slot 0 (R >= 2)
    compress-sK       (r * n_core + j) mod (K * n_core): K slots used cyclically
    compress-rK       (r * n_core + j) // K: K consecutive applications share a slot
    compress-anchor   the first 32 applications keep their own; later ones cycle through the
                      4 slots from index 34 (the official rule, written for n_prelude = 2)

Prelude and coda applications are never remapped.
"""

from __future__ import annotations

import re

from parcae_jax.infer import GenerationError

STRATEGY = re.compile(r"full|compress-(first|last|stride|s|r)(\d+)|compress-(boundaries|anchor)")


def check_strategy(strategy: str) -> None:
    """One line naming the accepted forms, for a strategy this module does not know."""
    m = STRATEGY.fullmatch(strategy)
    if not m:
        raise GenerationError(f"cache strategy {strategy!r} is unknown; use full, compress-firstK, compress-lastK, "
                         "compress-strideK, compress-sK, compress-rK, compress-boundaries or compress-anchor")
    if m.group(2) is not None and int(m.group(2)) < 1:  # K iterations or slots: 0 would divide by zero
        raise GenerationError(f"cache strategy {strategy!r} needs K >= 1")


def slot(step: int, n_prelude: int, n_core: int, recurrence: int, strategy: str = "full") -> int:
    """The cache slot of unrolled application `step` at `recurrence` iterations."""
    check_strategy(strategy)
    core_start, core_end = n_prelude, n_prelude + recurrence * n_core
    if strategy == "full" or not core_start <= step < core_end:
        return step
    rel = step - core_start
    r, j = divmod(rel, n_core)
    m = STRATEGY.fullmatch(strategy)
    kind, k = (m.group(1), int(m.group(2))) if m.group(1) else (m.group(3), 0)
    if kind == "first":
        return step if r < k else core_start + k * n_core + j
    if kind == "last":
        if k >= recurrence:  # the official rule would put the last iteration in the coda's first slot
            raise GenerationError(f"cache strategy {strategy!r} needs a recurrence above {k} (it keeps the last {k} "
                             f"iterations apart), got {recurrence}")
        threshold = recurrence - k
        return core_start + j if r < threshold else core_start + (r - threshold + 1) * n_core + j
    if kind == "stride":
        return core_start + (r // k) * n_core + j
    if kind == "boundaries":
        if recurrence < 2:  # as compress-last: the last iteration would take the coda's slot
            raise GenerationError(f"cache strategy {strategy!r} needs at least 2 recurrences")
        return core_start + (n_core if r == recurrence - 1 else 0) + j
    if kind == "s":
        return core_start + rel % (k * n_core)
    if kind == "anchor":
        return step if rel < 32 else 34 + (step - 34) % 4
    return core_start + rel // k  # "r"


def slot_table(n_prelude: int, n_core: int, n_coda: int, recurrence: int, strategy: str = "full") -> list[int]:
    """slot(step) for every application, in order, renumbered 0 .. n_slots - 1 by first use,
    so a preallocated cache needs exactly max(table) + 1 slots."""
    raw = [slot(s, n_prelude, n_core, recurrence, strategy) for s in range(n_prelude + recurrence * n_core + n_coda)]
    order = {}
    for s in raw:
        order.setdefault(s, len(order))
    return [order[s] for s in raw]
