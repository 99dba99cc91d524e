"""Which blocks a model has, their widths, and where value embeddings apply.

The official code decides value embeddings with two rules that do not always agree
(docs/design.md §3), and we reproduce both exactly:
- a table `k` exists iff has_ve(k, n_unique_layers), k = the block's position in the stack;
- a block owns a gate iff has_ve(layer_id, n_gate), with Parcae's `layer_id` counting the
  unrolled core (coda ids start after n_core * mean_recurrence) and n_gate = n_core *
  mean_backprop_depth.
A value embedding is applied only where both hold. Where exactly one holds the official
model carries a dead tensor; we create it too, so that checkpoints round-trip.
"""

from __future__ import annotations

import dataclasses

from parcae_jax.model.config import ModelConfig


def has_ve(index: int, n: int) -> bool:
    """Alternating layers, the last one always included."""
    return index % 2 == (n - 1) % 2


PRELUDE, CORE, CODA = "prelude", "core", "coda"  # a Parcae's segments, in stack order


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    segment: str  # "prelude" | "core" | "coda" | "gpt"
    index: int  # position inside its segment
    width: int
    n_heads: int
    n_kv_heads: int
    d_mlp: int
    table: str | None  # the value-embedding table this block would read, if it exists
    gate: bool  # the block owns a ve gate

    @property
    def applies_ve(self) -> bool:
        return self.table is not None and self.gate

    @property
    def head_dim(self) -> int:
        return self.width // self.n_heads

    @property
    def kv_width(self) -> int:
        return self.n_kv_heads * self.head_dim


def block_specs(cfg: ModelConfig) -> list[BlockSpec]:
    """All blocks in stack order (for Parcae: prelude, core, coda)."""
    use = cfg.value_embeds
    main = dict(width=cfg.d_model, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads, d_mlp=cfg.d_mlp)
    if cfg.arch == "gpt":
        n = cfg.n_layers
        return [
            BlockSpec("gpt", i, table=str(i) if use and has_ve(i, n) else None, gate=use and has_ve(i, n), **main)
            for i in range(n)
        ]
    core = dict(width=cfg.d_rec, n_heads=cfg.n_rec_heads, n_kv_heads=cfg.n_rec_heads, d_mlp=cfg.d_rec_mlp)
    n_eff = cfg.n_unique_layers
    n_gate = cfg.n_core * cfg.mean_backprop_depth
    coda_first_id = cfg.n_prelude + cfg.n_core * cfg.mean_recurrence
    specs = []
    for segment, count, first_table, first_id, dims in (
        (PRELUDE, cfg.n_prelude, 0, 0, main),
        (CORE, cfg.n_core, cfg.n_prelude, cfg.n_prelude, core),
        (CODA, cfg.n_coda, cfg.n_prelude + cfg.n_core, coda_first_id, main),
    ):
        for i in range(count):
            k = first_table + i
            table = str(k) if use and has_ve(k, n_eff) else None
            specs.append(BlockSpec(segment, i, table=table, gate=use and has_ve(first_id + i, n_gate), **dims))
    return specs


def segment_specs(cfg: ModelConfig, segment: str) -> list[BlockSpec]:
    """The blocks of one segment (PRELUDE, CORE, CODA), in order."""
    return [s for s in block_specs(cfg) if s.segment == segment]


def table_widths(cfg: ModelConfig) -> dict[str, int]:
    """Width of every value-embedding table that exists, by table key.

    The official model sizes every table by the main config's kv width, which crashes
    when a core block of another width applies one; we size an applied table by the
    block that reads it (identical wherever the official code works).
    """
    main_kv = cfg.n_kv_heads * cfg.head_dim
    return {s.table: (s.kv_width if s.applies_ve else main_kv) for s in block_specs(cfg) if s.table is not None}
