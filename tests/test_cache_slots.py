"""The per-recurrence cache layout: which slot each unrolled layer application uses."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from parcae_jax.infer.cache_slots import slot, slot_table

P, C, D, R = 2, 2, 2, 6  # prelude, core, coda layers; recurrences


def core_slots(strategy):
    """Per iteration, the (raw) slots of its core layers."""
    return [[slot(P + r * C + j, P, C, R, strategy) for j in range(C)] for r in range(R)]


def test_each_strategy_on_a_2_2_2_model_at_6_recurrences():
    # raw slots: prelude 0, 1; core iteration r layer j: 2 + 2r + j; coda 14, 15
    assert core_slots("full") == [[2 + 2 * r, 3 + 2 * r] for r in range(R)]
    assert core_slots("compress-first2") == [[2, 3], [4, 5], [6, 7], [6, 7], [6, 7], [6, 7]]
    assert core_slots("compress-last2") == [[2, 3], [2, 3], [2, 3], [2, 3], [4, 5], [6, 7]]
    assert core_slots("compress-stride3") == [[2, 3], [2, 3], [2, 3], [4, 5], [4, 5], [4, 5]]
    assert core_slots("compress-boundaries") == [[2, 3]] * 5 + [[4, 5]]
    assert core_slots("compress-s2") == [[2, 3], [4, 5]] * 3
    assert core_slots("compress-r3") == [[2, 2], [2, 3], [3, 3], [4, 4], [4, 5], [5, 5]]
    for strategy in ("full", "compress-first2", "compress-s2", "compress-r3"):
        assert [slot(s, P, C, R, strategy) for s in (0, 1, 14, 15)] == [0, 1, 14, 15]  # prelude, coda kept


def test_anchor_keeps_32_applications_then_cycles_four_slots():
    steps = range(2, 2 + 40 * 1)
    got = [slot(s, 2, 1, 40, "compress-anchor") for s in steps]
    assert got[:32] == list(range(2, 34)) and got[32:] == [34, 35, 36, 37, 34, 35, 36, 37]


def test_the_table_renumbers_slots_densely():
    table = slot_table(P, C, D, R, "compress-first2")
    assert table == [0, 1, 2, 3, 4, 5, 6, 7, 6, 7, 6, 7, 6, 7, 8, 9]
    assert slot_table(P, C, D, R) == list(range(P + R * C + D))


def test_an_unknown_strategy_is_one_line():
    with pytest.raises(ValueError, match="cache strategy 'compress-last' is unknown; use full"):
        slot(3, P, C, R, "compress-last")


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 3), st.integers(1, 3), st.integers(0, 3), st.integers(1, 12), st.integers(1, 12),
       st.sampled_from(["first", "last", "stride", "s", "r", "boundaries"]))
def test_compression_never_adds_slots_and_degenerates_to_full(n_prelude, n_core, n_coda, recurrence, k, kind):
    strategy = f"compress-{kind}" + ("" if kind == "boundaries" else str(k))
    if (kind == "last" and k >= recurrence) or (kind == "boundaries" and recurrence < 2):
        with pytest.raises(ValueError, match="needs"):
            slot_table(n_prelude, n_core, n_coda, recurrence, strategy)
        return
    table = slot_table(n_prelude, n_core, n_coda, recurrence, strategy)
    full = slot_table(n_prelude, n_core, n_coda, recurrence)
    assert max(table) <= max(full) and table[:n_prelude] == full[:n_prelude]
    # a slot is shared only between applications of the same core layer j (never prelude/coda)
    for a, sa in enumerate(table):
        for b in range(a):
            if table[b] == sa and kind not in ("r",):
                assert n_prelude <= a < n_prelude + recurrence * n_core and (a - b) % n_core == 0
    exact = {"first": k >= recurrence, "stride": k == 1, "s": k >= recurrence, "r": k == 1}
    if exact.get(kind):
        assert table == full
