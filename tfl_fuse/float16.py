"""Float16 weights in a float model: folds computed from the float16 values, stored as float16.

TF's float16 conversion stores every float constant as a FLOAT16 tensor behind a DEQUANTIZE::

    W16 (FLOAT16 constant) -> DEQUANTIZE -> W (FLOAT32) -> CONV_2D ...

For the float target the engine lifts each such pair before the rules run: W becomes a float32
constant holding exactly the float16 values (the float16 -> float32 conversion is exact), so
every rule folds it like any float32 constant, in float64. After the rules it lowers them again:

* a lifted constant no rule changed gets its own DEQUANTIZE back (same op, same float16 buffer:
  byte-identical);
* a lifted constant a rule changed, and a constant a rule created, becomes a new float16
  constant behind a DEQUANTIZE. Those are the weights TF's converter would have written had the
  BN been folded before its float16 cast: computed from the float16 values and rounded to
  float16. (The rules store their float64 result as float32 first, so the value is rounded
  twice; that differs from one rounding only where the float32 value lies exactly halfway
  between two float16 values.)

The model keeps its float16 storage and the folded ops are gone; its outputs differ from the
input model's by the float16 rounding of the folded weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .graph import Graph
from .model import Table

FLOAT16_MAX = float(np.finfo(np.float16).max)


@dataclass
class Lifted:
    op: Table  # the DEQUANTIZE removed while the rules run
    tensor: int  # its output, a float32 constant meanwhile
    buffer: int  # the float32 buffer given at the lift: still there means unchanged


@dataclass
class LiftState:
    lifted: list[Lifted]
    tensor_count: int  # tensors at or past this index were created by the rules


def _is_float16_dequantize(graph: Graph, op: Table) -> bool:
    if len(op.inputs) != 1 or len(op.outputs) != 1:
        return False
    source, out = op.inputs[0], op.outputs[0]
    if source < 0 or not graph.is_constant(source) or graph.dtype(source) != "FLOAT16":
        return False
    q = graph.tensors[out].get("quantization")
    return (
        graph.dtype(out) == "FLOAT32"
        and (q is None or len(q.get("scale") or []) == 0)
        and graph.tensors[source].get("sparsity") is None
        and graph.shape(source) == graph.shape(out)
        and not graph.is_graph_output(out)
    )


def lift(graph: Graph) -> LiftState:
    """Every DEQUANTIZE of a float16 constant: its output becomes a float32 constant."""
    state = LiftState([], len(graph.tensors))
    stored: dict[tuple[int, tuple[int, ...]], int] = {}
    for op in graph.live_ops("DEQUANTIZE"):
        if not _is_float16_dequantize(graph, op):
            continue
        source, out = op.inputs[0], op.outputs[0]
        key = (graph.tensors[source].buffer, tuple(graph.shape(source)))
        if key not in stored:
            value = graph.constant(source).astype(np.float32)
            if not np.all(np.isfinite(value)):
                continue
            stored[key] = graph.model.add_buffer(value)
        graph.remove_op(op)
        graph.tensors[out].buffer = stored[key]
        graph.tensors[out]._float16 = True  # copies made by rules (add_constant like=) keep it
        state.lifted.append(Lifted(op, out, stored[key]))
    return state


def lower(graph: Graph, state: LiftState) -> dict[str, int]:
    """Give back float16 storage; returns how many constants were kept and rewritten."""
    kept = rewritten = 0
    handled: set[int] = set()
    for entry in state.lifted:
        handled.add(entry.tensor)
        t = graph.tensors[entry.tensor]
        if not graph.consumers_of(entry.tensor):
            t.buffer = 0  # the rules made it unused; the sweep drops it
            continue
        if t.buffer == entry.buffer:
            t.buffer = 0
            graph.revive_op(entry.op)
            _place_before_consumers(graph, entry.op, entry.tensor)
            kept += 1
        else:
            _store_as_float16(graph, entry.tensor, entry.op)
            rewritten += 1
    if not state.lifted:
        return {"kept": 0, "rewritten": 0}
    template = state.lifted[0].op
    for tensor in range(len(graph.tensors)):
        if tensor in handled or not graph.consumers_of(tensor):
            continue
        t = graph.tensors[tensor]
        created = tensor >= state.tensor_count
        if (created or t.__dict__.get("_float16")) and _is_float32_constant(graph, tensor):
            _store_as_float16(graph, tensor, template)
            rewritten += 1
    return {"kept": kept, "rewritten": rewritten}


def _is_float32_constant(graph: Graph, tensor: int) -> bool:
    q = graph.tensors[tensor].get("quantization")
    return (
        graph.dtype(tensor) == "FLOAT32"
        and graph.is_constant(tensor)
        and (q is None or len(q.get("scale") or []) == 0)
        and not graph.is_graph_output(tensor)
    )


def _store_as_float16(graph: Graph, tensor: int, template: Table) -> None:
    """``tensor`` (a float32 constant) becomes DEQUANTIZE of a new float16 constant."""
    value = graph.constant(tensor).astype(np.float64)
    if np.any(np.abs(value) > FLOAT16_MAX):
        return  # would overflow float16: stays float32, exact
    source = graph.add_constant(
        f"{graph.name(tensor)}_fp16", value.astype(np.float16), type_name="FLOAT16"
    )
    graph.tensors[tensor].buffer = 0
    first = _first_consumer(graph, tensor)
    op = graph.insert_op("DEQUANTIZE", [source], [tensor], None, first)
    op.opcode = template.opcode


def _first_consumer(graph: Graph, tensor: int) -> Table:
    order = {id(op): i for i, op in enumerate(graph.subgraph.operators)}
    return min(graph.consumers_of(tensor), key=lambda op: order[id(op)])


def _place_before_consumers(graph: Graph, op: Table, tensor: int) -> None:
    order = {id(o): i for i, o in enumerate(graph.subgraph.operators)}
    first = _first_consumer(graph, tensor)
    if order[id(op)] > order[id(first)]:
        graph.move_before(op, first)
