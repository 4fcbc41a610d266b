"""Linear-chain merge: consecutive per-channel MUL/ADD/SUB/DIV become one MUL and one ADD.

Math (DESIGN.md 3.5). Each op is an affine map y = s * x + t per channel (SUB t is ADD -t,
DIV s is MUL 1/s, SUB(t, x) is -x + t). Two in a row compose to

    s2 * (s1 * x + t1) + t2 = (s2 * s1) * x + (s2 * t1 + t2)

which is written back as MUL(S) then ADD(T), dropping a MUL by 1 or an ADD of 0. So
``conv -> add -> mul -> sub`` becomes ``conv -> mul -> add``, which the backward fold takes.
The constants may run along any one axis (``[1, C, 1, 1]`` from PyTorch converters), the same
for both ops (a single value goes with any axis).

Exact when the first op has no fused activation and its output has no other consumer and is
not a graph output; the second op's activation stays on the last op written. A chain that is
already MUL then ADD is left as it is.
"""

from __future__ import annotations

import numpy as np

from ..graph import Graph
from ..model import Table
from .base import Context, Decline, Rule
from .predicates import (
    LINEAR_OPS,
    OPTIONS_OF,
    Affine,
    activation_code,
    affine_of,
    axis_constant,
    fused_activation,
    has_one_consumer,
    require_finite,
)


def make_linear(
    graph: Graph, op: Table, kind: str, data: int, constant: np.ndarray, activation: int
) -> None:
    """Turn ``op`` into ``kind(data, constant)`` with the given fused activation."""
    if op.opcode.name != kind:
        graph.set_op_type(op, kind, 1)
    op.builtinOptions = Table(OPTIONS_OF[kind], fusedActivationFunction=activation)
    name = f"{graph.name(op.outputs[0])}/{kind.lower()}_constant"
    tensor = graph.add_constant(name, constant.astype(np.float32))
    if op.inputs[0] != data:
        graph.replace_input(op, 0, data)
    graph.replace_input(op, 1, tensor)


def _values(affine: Affine) -> tuple[np.ndarray, np.ndarray]:
    if affine.axis is None:
        return affine.scale[:1], affine.shift[:1]
    return affine.scale, affine.shift


def _follows_linear_op(graph: Graph, op: Table) -> bool:
    """Some input of ``op`` is computed by a MUL/ADD/SUB/DIV."""
    for tensor in op.inputs:
        producer = graph.producer_of(tensor) if tensor >= 0 else None
        if producer is not None and producer.opcode.name in LINEAR_OPS:
            return True
    return False


class MergeLinearChain(Rule):
    name = "merge_linear_chain"
    summary = "consecutive per-channel MUL/ADD/SUB/DIV by constants merge into at most one MUL and one ADD"

    def apply(self, graph: Graph, ctx: Context) -> int:
        count = 0
        for second in graph.live_ops(*LINEAR_OPS):
            if not _follows_linear_op(graph, second):
                continue  # (cheap test first: most ops follow a layer)
            try:
                affine2 = affine_of(graph, second, any_axis=True)
            except Decline:
                continue
            first = graph.producer_of(affine2.data)
            if first is None or first.opcode.name not in LINEAR_OPS:
                continue
            if first.opcode.name == "MUL" and second.opcode.name == "ADD":
                continue  # already the canonical form
            try:
                affine1 = affine_of(graph, first, any_axis=True)
            except Decline:
                continue
            if None not in (affine1.axis, affine2.axis) and affine1.axis != affine2.axis:
                continue  # constants along different axes do not merge into one per-axis op
            if fused_activation(first) != "NONE" or not has_one_consumer(graph, first.outputs[0]):
                why = (
                    f"{first.opcode.name} has fused {fused_activation(first)}"
                    if fused_activation(first) != "NONE"
                    else f"{graph.name(first.outputs[0])!r} has other consumers or is a graph output"
                )
                self.declined(
                    graph, ctx, second, f"not merged with the preceding {first.opcode.name}: {why}"
                )
                continue
            reason = ctx.excluded(graph, first, second)
            if reason:
                self.declined(graph, ctx, second, reason)
                continue
            # a single-value constant (axis None) broadcasts along the other one's axis
            s1, t1 = _values(affine1)
            s2, t2 = _values(affine2)
            scale = s2 * s1
            shift = s2 * t1 + t2
            try:
                require_finite(scale, shift)
            except Decline as decline:
                self.declined(graph, ctx, second, str(decline))
                continue
            labels = self.labels(graph, [first, second])
            axis = affine2.axis if affine2.axis is not None else affine1.axis
            rank = len(graph.shape(affine1.data))
            self._rewrite(
                graph,
                first,
                second,
                affine1.data,
                axis_constant(scale, axis, rank),
                axis_constant(shift, axis, rank),
            )
            self.rewrote(graph, ctx, labels, "merged into one MUL and one ADD")
            count += 1
        return count

    @staticmethod
    def _rewrite(
        graph: Graph, first: Table, second: Table, data: int, scale: np.ndarray, shift: np.ndarray
    ) -> None:
        activation = activation_code(second)
        needs_scale = bool(np.any(scale != 1))
        needs_shift = bool(np.any(shift != 0))
        if needs_scale and needs_shift:
            make_linear(graph, first, "MUL", data, scale, 0)
            make_linear(graph, second, "ADD", first.outputs[0], shift, activation)
        elif needs_scale:
            make_linear(graph, second, "MUL", data, scale, activation)
            graph.remove_op(first)
        else:
            # a pure shift (possibly zero): one ADD keeps the output tensor and activation
            make_linear(graph, second, "ADD", data, shift, activation)
            graph.remove_op(first)
