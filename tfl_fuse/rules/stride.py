"""Stride optimization (ResNet v1): a 1x1 stride-2 conv reads only every other pixel, so compute only those.

Math (DESIGN.md 3.9). A 1x1 convolution with stride s is a 1x1 stride-1 convolution of the
subsampled input x[:, ::s, ::s, :] (a 1x1 kernel never pads). Subsampling commutes with every
elementwise op (ADD/SUB/MUL/DIV of same-shaped tensors or per-channel constants, MAXIMUM,
MINIMUM, activations, fused or not) and a 1x1 stride-1 conv becomes a 1x1 stride-s conv. So when
every consumer of x is such a strided 1x1 conv, the stride moves up: the producers compute only
the pixels that are read, the consumers run at stride 1. Where a tensor on the way has other
consumers that need every pixel, it is subsampled explicitly for this path by a MAX_POOL_2D with
a 1x1 window and stride s, which selects x[:, ::s, ::s, :].

Exact (pixels are only selected, never computed differently). Done only when at least one
producer conv gets the stride (otherwise no work is saved), on float32 rank-4 tensors that are
not graph outputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .. import quant
from ..graph import Graph
from ..model import Table
from .base import Context, Decline, Rule
from .predicates import PADDING_VALID

ELEMENTWISE = {
    "ADD",
    "SUB",
    "MUL",
    "DIV",
    "MAXIMUM",
    "MINIMUM",
    "RELU",
    "RELU6",
    "RELU_N1_TO_1",
    "TANH",
    "LOGISTIC",
}


def strided_1x1(graph: Graph, op: Table) -> tuple[int, int] | None:
    """(stride_h, stride_w) of a CONV_2D with a 1x1 kernel, stride > 1 and no dilation."""
    if op.opcode.name != "CONV_2D" or len(op.inputs) < 2 or op.get("builtinOptions") is None:
        return None
    o = op.builtinOptions
    weights = graph.shape(op.inputs[1])
    if (
        len(weights) != 4
        or weights[1:3] != [1, 1]
        or (o.dilationHFactor, o.dilationWFactor) != (1, 1)
    ):
        return None
    if (o.strideH, o.strideW) == (1, 1):
        return None
    return o.strideH, o.strideW


def subsampled(shape: list[int], stride: tuple[int, int]) -> list[int]:
    return [shape[0], -(-shape[1] // stride[0]), -(-shape[2] // stride[1]), shape[3]]


@dataclass
class StridePlan:
    stride: tuple[int, int]
    strided_convs: list[Table] = field(default_factory=list)
    resized: list[int] = field(default_factory=list)  # tensors that become subsampled
    pools: list[tuple[int, Table]] = field(
        default_factory=list
    )  # (tensor, user): subsample for that user
    visited: set[int] = field(default_factory=set)


def plain_1x1(graph: Graph, op: Table) -> bool:
    """A CONV_2D with a 1x1 kernel, stride 1 and no dilation: it can take a stride instead."""
    if op.opcode.name != "CONV_2D" or len(op.inputs) < 2 or op.get("builtinOptions") is None:
        return False
    o = op.builtinOptions
    return graph.shape(op.inputs[1])[1:3] == [1, 1] and (
        o.strideH,
        o.strideW,
        o.dilationHFactor,
        o.dilationWFactor,
    ) == (1, 1, 1, 1)


def require_subsampling_keeps_quantization(graph: Graph, tensor: int) -> None:
    """Decline where ``tensor`` has one scale per entry of an axis: subsampled, the scales and
    the shape would disagree (the model would no longer be valid)."""
    q = quant.quantization_of(graph, tensor)
    if q is not None and q.per_axis:
        raise Decline(
            f"{graph.name(tensor)!r} has quantization parameters per axis {q.axis}, which "
            "subsampling it would contradict"
        )


def take_stride(graph: Graph, tensor: int, plan: StridePlan, depth: int) -> bool:
    """Plan for the producer of ``tensor`` to compute it subsampled; False if it cannot."""
    require_subsampling_keeps_quantization(graph, tensor)
    producer = graph.producer_of(tensor)
    if producer is None:
        return False
    if plain_1x1(graph, producer):
        plan.strided_convs.append(producer)
        plan.resized.append(tensor)
        return True
    if producer.opcode.name not in ELEMENTWISE or len(producer.outputs) != 1:
        return False
    shape = graph.shape(tensor)
    variables = [t for t in producer.inputs if t >= 0 and not graph.is_constant(t)]
    constants = [t for t in producer.inputs if t >= 0 and graph.is_constant(t)]
    per_channel = all(all(d == 1 for d in graph.shape(c)[:-1]) for c in constants)
    if not per_channel or any(graph.shape(v) != shape for v in variables):
        return False
    plan.resized.append(tensor)
    for variable in dict.fromkeys(variables):
        plan_subsample(graph, variable, producer, plan, depth + 1)
    return True


def plan_subsample(
    graph: Graph, tensor: int, user: Table, plan: StridePlan, depth: int = 0
) -> None:
    """Plan for ``user`` to read ``tensor`` subsampled by the plan's stride."""
    if depth > 64 or tensor in plan.visited:
        raise Decline(f"{graph.name(tensor)!r} is reached twice")
    plan.visited.add(tensor)
    if len(graph.shape(tensor)) != 4 or graph.dtype(tensor) != "FLOAT32":
        raise Decline(f"{graph.name(tensor)!r} is not a float32 NHWC tensor")
    require_subsampling_keeps_quantization(graph, tensor)
    alone = graph.consumers_of(tensor) == [user] and not graph.is_graph_output(tensor)
    if not (alone and take_stride(graph, tensor, plan, depth)):
        plan.pools.append((tensor, user))


class MoveStrideUp(Rule):
    name = "move_stride_up"
    summary = "when every consumer is a 1x1 stride-2 conv, the producers compute only the pixels read (ResNet v1): fewer FLOPs"

    def apply(self, graph: Graph, ctx: Context) -> int:
        count = 0
        for conv in graph.live_ops("CONV_2D"):
            stride = strided_1x1(graph, conv)
            if stride is None:
                continue
            x = conv.inputs[0]
            users = graph.consumers_of(x)
            if graph.is_graph_output(x) or any(
                strided_1x1(graph, u) != stride or u.inputs[0] != x or list(u.inputs).count(x) != 1
                for u in users
            ):
                continue
            if users[0] is not conv:
                continue  # each group of consumers is handled once, from its first member
            producer = graph.producer_of(x)
            if producer is None:
                continue
            plan = StridePlan(stride, visited={x})
            if len(graph.shape(x)) != 4 or graph.dtype(x) != "FLOAT32":
                continue
            try:
                if not take_stride(graph, x, plan, 0) or not plan.strided_convs:
                    continue  # no producer conv can take the stride: no work to save, nothing to say
                reason = ctx.excluded(graph, *users, *plan.strided_convs)
                if reason:
                    raise Decline(reason)
            except Decline as decline:
                self.declined(graph, ctx, conv, f"stride not moved up: {decline}")
                continue
            labels = self.labels(graph, users)
            changed = self.labels(graph, plan.strided_convs)
            self._rewrite(graph, plan, users)
            self.rewrote(
                graph,
                ctx,
                labels,
                f"stride {stride[0]}x{stride[1]} moved into {len(plan.strided_convs)} producer conv(s), {len(plan.pools)} subsampling pool(s) added",
                changed=changed,
            )
            count += 1
        return count

    @staticmethod
    def _rewrite(graph: Graph, plan: StridePlan, users: list[Table]) -> None:
        stride = plan.stride
        for tensor in plan.resized:
            graph.set_shape(tensor, subsampled(graph.shape(tensor), stride))
        for producer in plan.strided_convs:
            producer.builtinOptions = producer.builtinOptions.copy()
            producer.builtinOptions.strideH, producer.builtinOptions.strideW = stride
        for tensor, user in plan.pools:
            small = graph.add_tensor_like(
                tensor, f"{graph.name(tensor)}/subsampled", subsampled(graph.shape(tensor), stride)
            )
            options = Table(
                "Pool2DOptions",
                padding=PADDING_VALID,
                strideW=stride[1],
                strideH=stride[0],
                filterWidth=1,
                filterHeight=1,
                fusedActivationFunction=0,
            )
            graph.insert_op("MAX_POOL_2D", [tensor], [small], options, before=user)
            for position, t in enumerate(user.inputs):
                if t == tensor:
                    graph.replace_input(user, position, small)
        for user in users:
            user.builtinOptions = user.builtinOptions.copy()
            user.builtinOptions.strideH = user.builtinOptions.strideW = 1
