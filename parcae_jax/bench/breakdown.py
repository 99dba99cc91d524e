"""Where a compiled step's time goes on XLA:CPU: a profiler trace of a few steps, each traced
operation attributed to one kind of work through the compiled HLO.

XLA:CPU names every operation it runs (a thunk) after its HLO instruction, so the trace's
events join the HLO text: an instruction is "matmul" when it is a dot or a fusion holding
one (its FLOPs come from the dot's shapes), "collective" for all-reduces and the like,
"layout" when it only copies, transposes, converts or broadcasts (the CPU transpose kernel's
calls too), "reduction" when it holds a reduce, "fused_attention" for the CPU attention
kernel's custom calls, else "elementwise" (the fused AdamW and loss kernels' calls among them).
Durations are summed per kind (thread time: XLA:CPU runs independent operations side by side,
so the sum exceeds the step's wall time), and `busy_ms_per_step` is the wall time during which
at least one operation ran. An operation that spreads its work over the pool's threads (a
large dot, the attention kernel's tasks) is traced as one event on the calling thread and
counted once, for that span. XLA:CPU also traces an "end: NAME" event when an operation's
work is done, which for a dot it hands to Eigen comes long after the short launch event (that
dot's work runs in the pool, outside any event): a matmul counts from its launch to that end.
Other operations keep their own span (for an element-wise loop split over both threads, the
end waits for the other thread to be free). Other backends name their kernels differently;
their events are counted as "unattributed".

Used by `--mode=bench --config.bench.breakdown_steps=N` (bench/step.py).
"""

from __future__ import annotations

import collections
import gzip
import json
import re
import tempfile
from pathlib import Path
from typing import Callable

import jax

from parcae_jax.model.cpu_kernels import attention as cpu_attention
from parcae_jax.model.cpu_kernels import library

_INSTRUCTION = re.compile(r"^\s+(?:ROOT )?%?([\w.\-]+) = (\(.*?\)|\S+) ([\w\-]+)\((.*)$")  # shape: array or tuple
_OPERATION = re.compile(r"[a-z][\w\-]*(\.\d+)?$")  # an HLO instruction's name, not a runtime event's
_LAYOUT_OPS = {"parameter", "copy", "bitcast", "convert", "transpose", "broadcast", "reshape", "constant",
               "slice", "dynamic-slice", "dynamic-update-slice", "concatenate", "pad", "tuple", "get-tuple-element",
               "gather", "iota", "reverse"}
_FUSED_ATTENTION = re.compile(r'custom_call_target="(parcae_attention_\w+)"')  # model/cpu_kernels
_CONTROL_OPS = {"while", "conditional", "call"}  # their bodies' operations are traced one by one
_COLLECTIVES = {"all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute",
                "all-reduce-start", "all-gather-start", "collective-permute-start", "all-reduce-done",
                "all-gather-done", "collective-permute-done", "async-start", "async-done"}


def _dims(shape: str) -> list[int]:
    m = re.match(r"\w+\[([\d,]*)\]", shape)
    return [int(d) for d in m.group(1).split(",") if d] if m else []


def _computations(hlo: str) -> dict[str, list[tuple[str, str, str, str]]]:
    """computation name -> its instructions as (name, shape, opcode, rest of the line)."""
    comps, current = {}, None
    for line in hlo.splitlines():
        if line and not line[0].isspace() and line.rstrip().endswith("{"):
            current = line.split()[1 if line.startswith("ENTRY") else 0].lstrip("%")
            comps[current] = []
        elif current is not None and (m := _INSTRUCTION.match(line)):
            comps[current].append(m.groups())
    return comps


def _dot_flops(shape: str, rest: str, shapes: dict[str, str]) -> int:
    """2 x output elements x contracted size of one dot instruction."""
    lhs = re.match(r"\s*(?:\w+\[[\d,]*\](?:\{[^}]*\})?\s+)?%?([\w.\-]+)", rest)  # an optional typed operand
    contracted = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", rest)
    if not lhs or not contracted or lhs.group(1) not in shapes:
        return 0  # a form this parser does not know: counted as time, not as FLOPs
    lhs, contracted = lhs.group(1), contracted.group(1)
    k = 1
    for i in (int(d) for d in contracted.split(",") if d):
        k *= _dims(shapes[lhs])[i]
    n = 1
    for d in _dims(shape):
        n *= d
    return 2 * n * k


def _fused_attention_flops(shape: str, target: str, rest: str) -> int:
    """The products one CPU attention call executes: the forward (and a prefill) runs scores and
    values (2), the backward recomputes the scores and runs dP, dV, dK and dQ (5), each
    2 x B x H x T x keys x D, with the keys each query's block reads. B and T from the first
    result, H and D from the call's attributes."""
    B, T = _dims(shape.strip("(").split("{")[0])[:2]
    attrs = {a: re.search(rf"\b{a} = (\d+)", rest) for a in ("heads", "head_dim")}
    if not all(attrs.values()):
        return 0  # a form this parser does not know: counted as time, not as FLOPs
    H, D = (int(m.group(1)) for m in attrs.values())
    products = 5 if target.endswith("bwd") else 2
    return round(products * 2 * B * H * T * cpu_attention.keys_per_query(T) * D)


def classify(hlo: str) -> dict[str, tuple[str, int]]:
    """HLO instruction name -> (kind of work, matmul FLOPs) for every instruction that runs."""
    comps = _computations(hlo)
    kinds = {}
    for instructions in comps.values():
        outer = {i[0]: i[1] for i in instructions}
        for name, shape, opcode, rest in instructions:
            if opcode in _CONTROL_OPS or opcode in ("parameter", "tuple", "get-tuple-element", "bitcast", "constant"):
                continue
            body = [(name, shape, opcode, rest)]
            if opcode == "fusion" and (called := re.search(r"calls=%([\w.\-]+)", rest)):
                body = comps.get(called.group(1), body)
            shapes = {**outer, **{i[0]: i[1] for i in body}}
            ops = {i[2] for i in body}
            flops = sum(_dot_flops(s, r, shapes) for _, s, o, r in body if o == "dot")
            if flops:
                kind = "matmul"
            elif opcode == "custom-call" and (target := _FUSED_ATTENTION.search(rest)):
                kind, flops = "fused_attention", _fused_attention_flops(shape, target.group(1), rest)
            elif opcode == "custom-call" and f'custom_call_target="{library.TRANSPOSE_TARGET}"' in rest:
                kind = "layout"  # the CPU transpose kernel's copies (matmul.py's weight gradients)
            elif opcode in _COLLECTIVES:
                kind = "collective"
            elif ops <= _LAYOUT_OPS:
                kind = "layout"
            elif "reduce" in ops or "reduce-window" in ops:
                kind = "reduction"
            else:
                kind = "elementwise"
            kinds[name] = (kind, flops)
    return kinds


def _busy(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def _durations(events: list[dict], until_end: set[str]) -> list[tuple[dict, float]]:
    """Each complete event with its duration in µs; those named in `until_end` last until the
    end of their "end: NAME" event."""
    complete = sorted((e for e in events if e.get("ph") == "X"), key=lambda e: e["ts"])
    out, launched = [], {}
    for e in complete:
        name = e["name"]
        if name.startswith("end: "):
            i = launched.pop(name[5:], None)
            if i is not None:
                start = out[i][0]
                out[i] = (start, max(out[i][1], e["ts"] + e["dur"] - start["ts"]))
            continue
        if name in until_end:
            launched[name] = len(out)
        out.append((e, e["dur"]))
    return out


def summarise(events: list[dict], kinds: dict[str, tuple[str, int]], steps: int, top: int = 8) -> dict:
    """Per kind: ms per step (thread time), share of the attributed time, matmul FLOPs and
    GFLOP/s; the matmul share and the thread time of everything else at the top level (where
    the floor is once the matmuls are fast); the time of operations the HLO does not name; the
    busiest operations."""
    ms = collections.defaultdict(float)
    flops = collections.defaultdict(float)
    per_op = collections.defaultdict(float)
    spans = []
    for e, dur in _durations(events, {n for n, (kind, _) in kinds.items() if kind == "matmul"}):
        if e["name"].startswith(("while", "conditional", "call")):
            continue
        kind, f = kinds.get(e["name"], ("unattributed", 0))
        if kind == "unattributed" and not _OPERATION.match(e["name"]):
            continue  # runtime and Python events (executor, block_until_ready), not operations
        ms[kind] += dur / 1e3 / steps
        flops[kind] += f / steps
        per_op[e["name"]] += dur / 1e3 / steps
        if kind != "unattributed":
            spans.append((e["ts"], e["ts"] + dur))
    unattributed = ms.pop("unattributed", 0.0)
    total = sum(ms.values()) or float("nan")
    out = {"busy_ms_per_step": _busy(spans) / 1e3 / steps, "thread_ms_per_step": total,
           "matmul_share": ms.get("matmul", 0.0) / total, "non_matmul_ms_per_step": total - ms.get("matmul", 0.0),
           "unattributed_ms_per_step": unattributed, "kinds": {}}
    for kind in sorted(ms, key=ms.get, reverse=True):
        row = {"ms_per_step": ms[kind], "share": ms[kind] / total}
        if flops[kind]:
            row.update(gflop_per_step=flops[kind] / 1e9, gflops_per_sec=flops[kind] / (ms[kind] / 1e3) / 1e9)
        out["kinds"][kind] = row
    out["top_ops"] = [{"name": n, "kind": kinds.get(n, ("unattributed", 0))[0], "ms_per_step": v}
                      for n, v in sorted(per_op.items(), key=lambda x: -x[1])[:top]]
    return out


def trace_events(directory: str) -> list[dict]:
    """The events of the Perfetto trace jax.profiler wrote under `directory`."""
    found = sorted(Path(directory).rglob("perfetto_trace.json.gz"))
    if not found:
        raise RuntimeError(f"jax.profiler wrote no Perfetto trace under {directory}; the breakdown needs one")
    path = found[-1]
    with gzip.open(path) as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def breakdown(compiled, run_step: Callable[[], None], steps: int) -> dict:
    """Traces `steps` calls of `run_step` (each synchronised) and attributes the time."""
    kinds = classify(compiled.as_text())
    with tempfile.TemporaryDirectory() as directory:
        with jax.profiler.trace(directory, create_perfetto_trace=True):
            for _ in range(steps):
                run_step()
        events = trace_events(directory)
    return {"steps": steps, **summarise(events, kinds, steps)}
