"""Activation fusion: a standalone RELU / RELU6 / RELU_N1_TO_1 joins its producer's fused slot.

Math (DESIGN.md 3.8): relu(P(x)) computed by a separate op equals P(x) with its fused
activation set to RELU, for ops whose LiteRT float kernels apply the fused activation to
their result (conv, depthwise, fully connected, conv 3D, elementwise arithmetic, pools).

Stacked clamps merge too: relu6(relu(y)) = relu(relu6(y)) = relu6(y) and relu(relu(y)) = relu(y),
so a standalone RELU or RELU6 after a producer whose fused activation is RELU or RELU6 is
absorbed into it.

Exact when the producer's fused activation is NONE (or a stacking clamp as above), its
output has no other consumer and is not a graph output, and both tensors are float32 (a
quantized RELU may requantize).
"""

from __future__ import annotations

from ..graph import Graph
from .base import Context, Decline, Rule
from .predicates import (
    fused_activation,
    has_fused_activation_slot,
    require_float32,
    require_single_consumer,
    set_fused_activation,
)

STANDALONE = ("RELU", "RELU6", "RELU_N1_TO_1")
# (fused activation already there, standalone op) -> the single clamp that computes both
STACKED = {
    ("NONE", "RELU"): "RELU",
    ("NONE", "RELU6"): "RELU6",
    ("NONE", "RELU_N1_TO_1"): "RELU_N1_TO_1",
    ("RELU", "RELU"): "RELU",
    ("RELU", "RELU6"): "RELU6",
    ("RELU6", "RELU"): "RELU6",
    ("RELU6", "RELU6"): "RELU6",
}
HONOURS_FUSED_ACTIVATION = {
    "CONV_2D",
    "DEPTHWISE_CONV_2D",
    "FULLY_CONNECTED",
    "CONV_3D",
    "ADD",
    "SUB",
    "MUL",
    "DIV",
    "MAX_POOL_2D",
    "AVERAGE_POOL_2D",
}


class FuseActivation(Rule):
    name = "fuse_activation"
    summary = "a standalone RELU/RELU6/RELU_N1_TO_1 is fused into its producer's activation slot"

    def apply(self, graph: Graph, ctx: Context) -> int:
        count = 0
        for relu in graph.live_ops(*STANDALONE):
            if len(relu.inputs) != 1:
                continue
            producer = graph.producer_of(relu.inputs[0])
            if producer is None or producer.opcode.name not in HONOURS_FUSED_ACTIVATION:
                continue
            combined = STACKED.get((fused_activation(producer), relu.opcode.name))
            if not has_fused_activation_slot(producer) or combined is None:
                continue  # nothing to fuse into: not a refusal worth reporting
            if len(graph.consumers_of(relu.inputs[0])) != 1 or graph.is_graph_output(
                relu.inputs[0]
            ):
                continue  # e.g. a residual sum that also feeds the shortcut
            try:
                reason = ctx.excluded(graph, producer, relu)
                if reason:
                    raise Decline(reason)
                require_single_consumer(graph, relu.inputs[0], producer.opcode.name)
                require_float32(graph, relu.inputs[0], f"{relu.opcode.name} input")
                require_float32(graph, relu.outputs[0], f"{relu.opcode.name} output")
            except Decline as decline:
                self.declined(graph, ctx, relu, f"not fused into {producer.opcode.name}: {decline}")
                continue
            labels = self.labels(graph, [producer, relu])
            set_fused_activation(producer, combined)
            graph.set_output(producer, 0, relu.outputs[0])
            graph.remove_op(relu)
            self.rewrote(
                graph, ctx, labels, f"{relu.opcode.name} fused into {producer.opcode.name}"
            )
            count += 1
        return count
