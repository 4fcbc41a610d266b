"""Identity removal: an op that returns its input unchanged is dropped.

A MAX_POOL_2D or AVERAGE_POOL_2D with a 1x1 window, stride 1 and no fused activation, and
a RESHAPE to the shape it already has, compute y = x. Their consumers read x instead.

Exact when input and output have the same type, shape and quantization, and the output is
not a graph output (whose tensor must keep its name).
"""

from __future__ import annotations

from ..graph import Graph
from ..model import Table
from .base import Context, Rule
from .predicates import fused_activation

POOLS = ("MAX_POOL_2D", "AVERAGE_POOL_2D")


def is_identity(graph: Graph, op: Table) -> bool:
    if len(op.outputs) != 1 or not op.inputs or op.inputs[0] < 0:
        return False
    x, y = op.inputs[0], op.outputs[0]
    same = graph.shape(x) == graph.shape(y) and graph.dtype(x) == graph.dtype(y)
    tx, ty = graph.tensors[x], graph.tensors[y]
    same = same and repr(tx.get("quantization")) == repr(ty.get("quantization"))
    # a dynamic dimension (shape signature -1) must stay as it is
    signature_x = list(tx.get("shapeSignature") or tx.shape or [])
    same = same and signature_x == list(ty.get("shapeSignature") or ty.shape or [])
    if not same:
        return False
    if op.opcode.name in POOLS:
        o = op.get("builtinOptions")
        return (
            o is not None
            and (o.filterWidth, o.filterHeight, o.strideW, o.strideH) == (1, 1, 1, 1)
            and fused_activation(op) == "NONE"
        )
    return op.opcode.name == "RESHAPE" and -1 not in graph.shape(y)


class RemoveIdentity(Rule):
    name = "remove_identity"
    summary = "1x1 stride-1 pools without activation and RESHAPEs to the same shape are dropped"

    def apply(self, graph: Graph, ctx: Context) -> int:
        count = 0
        for op in graph.live_ops(*POOLS, "RESHAPE"):
            if (
                not is_identity(graph, op)
                or graph.is_graph_output(op.outputs[0])
                or ctx.excluded(graph, op)
            ):
                continue
            labels = self.labels(graph, [op])
            graph.replace_uses(op.outputs[0], op.inputs[0])
            graph.remove_op(op)
            self.rewrote(graph, ctx, labels, f"{op.opcode.name} returned its input unchanged")
            count += 1
        return count
