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
input model's by the float16 rounding of the folded weights. That rounding is new: the error
against the float model the float16 one was made from grows (by about sqrt(2) on a small net
whose every layer is refolded, by nothing measurable on ResNet50V2; tools/quantfold.py).

With ``store="float32"`` (``--float16-folds float32``) a changed or created constant stays the
float32 constant the rules computed from the float16 values: the model computes exactly what the
input did (float32 rounding aside) and grows by two bytes per changed weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .graph import Graph
from .model import Table


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
        and (q is None or q.get("scale") is None or len(q.scale) == 0)
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


def lower(graph: Graph, state: LiftState, store: str = "float16") -> dict[str, int]:
    """Give back float16 storage; returns how many constants were kept, rewritten as float16
    and left float32 (widened: with ``store="float32"``, or where float16 would overflow).

    A layer whose weights end float32 gets float32 bias (and other lifted inputs) too: XNNPACK
    does not delegate a CONV_2D with float32 weights and a float16-dequantized bias (measured on
    ResNet50V2: 4 partitions became 16).
    """
    if not state.lifted:
        return {"kept": 0, "rewritten": 0, "widened": 0}
    lifted = {entry.tensor: entry for entry in state.lifted}
    changed: list[int] = []  # float32 constants the rules changed or created, in use
    for entry in state.lifted:
        t = graph.tensors[entry.tensor]
        if not graph.consumers_of(entry.tensor):
            t.buffer = 0  # the rules made it unused; the sweep drops it
        elif t.buffer != entry.buffer:
            changed.append(entry.tensor)
    for tensor in range(state.tensor_count, len(graph.tensors)):
        if graph.consumers_of(tensor) and _is_float32_constant(graph, tensor):
            changed.append(tensor)  # created by a rule (copies of lifted ones included)
    wide = {tensor for tensor in changed if store == "float32" or not _fits_float16(graph, tensor)}
    for tensor in list(wide):
        for op in graph.consumers_of(tensor):
            wide.update(i for i in op.inputs if i in lifted and graph.consumers_of(i))
    counts = {"kept": 0, "rewritten": 0, "widened": len(wide)}
    template = state.lifted[0].op
    for tensor in changed:
        if tensor not in wide:
            entry = lifted.get(tensor)
            _store_as_float16(graph, tensor, entry.op if entry else template)
            counts["rewritten"] += 1
    for entry in state.lifted:
        t = graph.tensors[entry.tensor]
        if entry.tensor in wide or t.buffer != entry.buffer or not graph.consumers_of(entry.tensor):
            continue
        t.buffer = 0  # unchanged: its own DEQUANTIZE of its own float16 buffer, byte-identical
        graph.revive_op(entry.op)
        _place_before_consumers(graph, entry.op, entry.tensor)
        counts["kept"] += 1
    return counts


def _fits_float16(graph: Graph, tensor: int) -> bool:
    with np.errstate(over="ignore"):
        return bool(np.all(np.isfinite(graph.constant(tensor).astype(np.float16))))


def _is_float32_constant(graph: Graph, tensor: int) -> bool:
    q = graph.tensors[tensor].get("quantization")
    return (
        graph.dtype(tensor) == "FLOAT32"
        and graph.is_constant(tensor)
        and (q is None or q.get("scale") is None or len(q.scale) == 0)
        and not graph.is_graph_output(tensor)
    )


def _store_as_float16(graph: Graph, tensor: int, template: Table) -> None:
    """``tensor`` (a float32 constant whose values fit float16) becomes DEQUANTIZE of a new
    float16 constant."""
    value = graph.constant(tensor).astype(np.float64).astype(np.float16)
    source = graph.add_constant(f"{graph.name(tensor)}_fp16", value, type_name="FLOAT16")
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
