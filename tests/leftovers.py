"""No silent leftovers: every MUL/ADD/SUB/DIV by a constant left in a model must be explained.

``unexplained_leftovers(model_bytes, report)`` lists the ops (``TYPE -> output name``) whose
constant operand (a constant tensor, or the DEQUANTIZE of one: float16 or quantized) is still
there after tfl_fuse although no ``declined`` entry of the report names them (by their output
tensor in ``where``, or quoted in a ``reason``; or a decline of its whole subgraph). Reusable for any model and any rule set.
"""

from __future__ import annotations

from typing import Any

from tfl_fuse import fb
from tfl_fuse.graph import Graph

LINEAR_OPS = ("MUL", "ADD", "SUB", "DIV")


def _is_constant_operand(graph: Graph, tensor: int) -> bool:
    if tensor < 0:
        return False
    if graph.is_constant(tensor):
        return True
    producer = graph.producer_of(tensor)
    return (
        producer is not None
        and producer.opcode.name == "DEQUANTIZE"
        and graph.is_constant(producer.inputs[0])
    )


def leftovers(model: bytes) -> list[tuple[int, str]]:
    """(subgraph, ``TYPE -> output name``) of every MUL/ADD/SUB/DIV with a constant operand."""
    decoded = fb.decode(model)
    found = []
    for index in range(len(decoded.subgraphs)):
        graph = Graph(decoded, index)
        for op in graph.ops_of_type(*LINEAR_OPS):
            if any(_is_constant_operand(graph, t) for t in op.inputs):
                found.append((index, f"{op.opcode.name} -> {graph.name(op.outputs[0])}"))
    return found


def unexplained_leftovers(model: bytes, report: dict[str, Any]) -> list[str]:
    declined = report.get("declined", [])
    named = {(d["subgraph"], name) for d in declined for name in d.get("outputs", [])}
    skipped = {d["subgraph"] for d in declined if not d["ops"]}  # a whole subgraph, and why
    reasons = " ".join(d["reason"] for d in declined)
    unexplained = []
    for index, entry in leftovers(model):
        name = entry.split(" -> ", 1)[1]
        if index in skipped or (index, name) in named or repr(name) in reasons:
            continue
        unexplained.append(entry)
    return unexplained
