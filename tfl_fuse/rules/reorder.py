"""Move a per-channel MUL / ADD / SUB / DIV across ops that keep channels apart, to reach a layer.

Math (DESIGN.md 3.7, 11). TRANSPOSE, RESHAPE / SQUEEZE / EXPAND_DIMS that only split or merge
other axes, STRIDED_SLICE / SLICE / GATHER over other axes, MIRROR_PAD, PAD and the
BATCH_TO_SPACE_ND / SPACE_TO_BATCH_ND of a dilated conv move, copy or crop elements without
mixing them along the channel axis c. A per-channel affine map f along c (with any fused
activation, which is elementwise) therefore commutes with such an op R::

    f_c(R(y)) = R(f_c'(y))        c' = the axis of R's input that becomes c
                                  (``channel_axis_through``; the constant is laid along c')

PAD and SPACE_TO_BATCH_ND insert zeros: s * 0 = 0, so a scale commutes with them, a shift
does not. MAX_POOL_2D and AVERAGE_POOL_2D (no fused activation) keep the channel axis and
commute with a shift and a scale (MAX_POOL_2D: s >= 0, max keeps order; LiteRT's SAME pools
skip the padded border rather than pad zeros). Converters from PyTorch write such ops around every layer (NCHW <-> NHWC TRANSPOSE,
RESHAPE around 1-D convs, STRIDED_SLICE crops after TRANSPOSE_CONV), so the op moves:

* above R (``layer -> R... -> f`` becomes ``layer -> f -> R...``) when a chain of such ops leads
  up to a layer whose output channel axis is c', each with one consumer: the backward fold
  then takes it;
* below R (``f -> R... -> layer`` becomes ``R... -> f -> layer``) when nothing above is a layer
  and R's output goes only to layers (possibly through more such ops, or other per-channel
  ops along the same axis) reading it on their input-channel axis: the forward folds then
  take it.

Exact when every moved-across tensor has one consumer and is not a graph output, the constant
runs along one axis that R keeps whole, and float32. The op keeps its output tensor at the end.
"""

from __future__ import annotations

import re

import numpy as np

from ..graph import Graph
from ..model import Table
from .base import Context, Decline, Rule
from .chain import make_linear
from .predicates import (
    CHANNEL_KEEPING,
    LAYERS,
    LINEAR_OPS,
    POOLS,
    Affine,
    activation_code,
    affine_of,
    axis_constant,
    channel_axis_after,
    channel_axis_through,
    crossing_refusal,
    fused_activation,
    has_one_consumer,
)

MAX_DEPTH = 16


def layer_above(
    graph: Graph, tensor: int, axis: int, move: tuple[str, np.ndarray, str], depth: int = 0
) -> bool:
    """Whether ``tensor`` is a layer's output on its channel axis, maybe through CHANNEL_KEEPING
    ops that ``move`` (kind, constant) can cross, whose outputs each have one consumer."""
    producer = graph.producer_of(tensor)
    if producer is None or depth > MAX_DEPTH:
        return False
    if producer.opcode.name in LAYERS:
        return axis == len(graph.shape(tensor)) - 1
    if (
        producer.opcode.name not in CHANNEL_KEEPING
        or not has_one_consumer(graph, tensor)
        or crossing_refusal(producer, *move)
    ):
        return False
    source_axis = channel_axis_through(graph, producer, axis)
    return source_axis is not None and layer_above(
        graph, producer.inputs[0], source_axis, move, depth + 1
    )


def layers_below(
    graph: Graph, tensor: int, axis: int, move: tuple[str, np.ndarray, str], depth: int = 0
) -> bool:
    """Whether every consumer of ``tensor`` is a layer reading it on its input-channel axis, maybe
    through one chain of CHANNEL_KEEPING ops that ``move`` can cross."""
    if graph.is_graph_output(tensor) or depth > MAX_DEPTH:
        return False
    consumers = graph.consumers_of(tensor)
    if not consumers:
        return False
    if all(c.opcode.name in LAYERS for c in consumers):
        return axis == len(graph.shape(tensor)) - 1 and all(
            c.inputs[LAYERS[c.opcode.name].data_input] == tensor for c in consumers
        )
    if len(consumers) == 1 and consumers[0].opcode.name in LINEAR_OPS:
        # another per-channel op on the way (a BN's ADD after its MUL) goes the same way
        try:
            other = affine_of(graph, consumers[0], any_axis=True)
        except Decline:
            return False
        rank = len(graph.shape(tensor))
        if other.data != tensor or (other.axis is not None and other.axis % rank != axis):
            return False
        return layers_below(graph, consumers[0].outputs[0], axis, move, depth + 1)
    if len(consumers) != 1 or consumers[0].opcode.name not in CHANNEL_KEEPING:
        return False
    mover = consumers[0]
    if mover.inputs[0] != tensor or crossing_refusal(mover, *move):
        return False
    out_axis = channel_axis_after(graph, mover, axis)
    return out_axis is not None and layers_below(graph, mover.outputs[0], out_axis, move, depth + 1)


def _base_name(name: str) -> str:
    """A tensor name without the ``/before_...`` suffixes earlier moves gave it (and ``_n``)."""
    return re.sub(r"(/before_[a-z0-9_]+)+$", "", name)


def _single_move(affine: Affine) -> tuple[str, np.ndarray, str]:
    """The op as one MUL or one ADD with its fused activation, or Decline (SUB from a constant
    scales and shifts)."""
    has_shift, has_scale = bool(np.any(affine.shift)), bool(np.any(affine.scale != 1))
    if has_shift and has_scale:
        raise Decline("SUB from a constant is left where it is")
    activation = fused_activation(affine.op)
    if affine.axis is None:  # a single value: keep it one value wherever it goes
        return (
            ("ADD", affine.shift[:1], activation)
            if has_shift
            else ("MUL", affine.scale[:1], activation)
        )
    return ("ADD", affine.shift, activation) if has_shift else ("MUL", affine.scale, activation)


class MoveBeforeRearrangement(Rule):
    name = "move_before_rearrangement"
    summary = "a per-channel MUL/ADD/SUB/DIV crosses TRANSPOSE, RESHAPE, SQUEEZE, EXPAND_DIMS, STRIDED_SLICE, SLICE, GATHER, (MIRROR_)PAD or BATCH_TO_SPACE_ND that keep its channel axis whole, towards the layer it folds into"

    def apply(self, graph: Graph, ctx: Context) -> int:
        count = 0
        for op in graph.live_ops(*LINEAR_OPS):
            if not self._next_to_rearrangement(graph, op):
                continue  # (cheap test first: neither _try_above nor _try_below could move it)
            try:
                affine = affine_of(graph, op, any_axis=True)
            except Decline:
                continue
            rank = len(graph.shape(affine.data))
            axis = rank - 1 if affine.axis is None else affine.axis % rank
            if self._try_above(graph, ctx, op, affine, axis) or self._try_below(
                graph, ctx, op, affine, axis
            ):
                count += 1
        return count

    def _try_above(self, graph: Graph, ctx: Context, op: Table, affine: Affine, axis: int) -> bool:
        mover = graph.producer_of(affine.data)
        if mover is None or mover.opcode.name not in CHANNEL_KEEPING or mover.inputs[0] < 0:
            return False
        source = mover.inputs[0]
        if not self._layer_nearby_above(graph, source):
            return False  # nothing to fold into up there: maybe below
        source_axis = channel_axis_through(graph, mover, axis)
        try:
            reason = ctx.excluded(graph, op, mover)
            if reason:
                raise Decline(reason)
            if not has_one_consumer(graph, affine.data):
                raise Decline(
                    f"{graph.name(affine.data)!r} has other consumers or is a graph output"
                )
            if mover.opcode.name in POOLS and fused_activation(mover) != "NONE":
                raise Decline(f"{mover.opcode.name} has fused {fused_activation(mover)}")
            if source_axis is None or graph.dtype(source) != "FLOAT32":
                raise Decline(f"{mover.opcode.name} does not keep the channel axis whole")
            move = _single_move(affine)
            kind, vector, _ = move
            refusal = crossing_refusal(mover, *move)
            if refusal:
                raise Decline(refusal)
            if not layer_above(graph, source, source_axis, move):
                raise Decline(
                    f"the channel axis above {mover.opcode.name} is not a layer's output channel"
                )
        except Decline as decline:
            self.declined(graph, ctx, op, f"not moved above {mover.opcode.name}: {decline}")
            return False
        labels = self.labels(graph, [mover, op])
        out = op.outputs[0]
        moved = graph.add_tensor_like(
            source, f"{_base_name(graph.name(out))}/before_{mover.opcode.name.lower()}"
        )
        constant = axis_constant(
            vector, source_axis if affine.axis is not None else None, len(graph.shape(source))
        )
        make_linear(graph, op, kind, source, constant, activation_code(op))
        graph.set_output(op, 0, moved)
        graph.replace_input(mover, 0, moved)
        graph.set_output(mover, 0, out)
        graph.move_before(op, mover)
        self.rewrote(graph, ctx, labels, f"{op.opcode.name} moved above {mover.opcode.name}")
        return True

    @staticmethod
    def _next_to_rearrangement(graph: Graph, op: Table) -> bool:
        """A CHANNEL_KEEPING op computes an input of ``op`` or alone reads its output."""
        for tensor in op.inputs:
            producer = graph.producer_of(tensor) if tensor >= 0 else None
            if producer is not None and producer.opcode.name in CHANNEL_KEEPING:
                return True
        consumers = graph.consumers_of(op.outputs[0]) if op.outputs else []
        return len(consumers) == 1 and consumers[0].opcode.name in CHANNEL_KEEPING

    @staticmethod
    def _layer_nearby_above(graph: Graph, tensor: int) -> bool:
        """A layer right above, or above a chain of CHANNEL_KEEPING ops: worth saying why not."""
        for _ in range(MAX_DEPTH):
            producer = graph.producer_of(tensor)
            if producer is None:
                return False
            if producer.opcode.name in LAYERS:
                return True
            if producer.opcode.name not in CHANNEL_KEEPING or not producer.inputs:
                return False
            tensor = producer.inputs[0]
        return False

    def _try_below(self, graph: Graph, ctx: Context, op: Table, affine: Affine, axis: int) -> bool:
        out = op.outputs[0]
        consumers = graph.consumers_of(out)
        if len(consumers) != 1 or graph.is_graph_output(out):
            return False
        mover = consumers[0]
        if mover.opcode.name not in CHANNEL_KEEPING or mover.inputs[0] != out:
            return False
        try:
            move = _single_move(affine)
        except Decline:
            return False
        kind, vector, _ = move
        target_axis = channel_axis_after(graph, mover, axis)
        if target_axis is None or layer_above(graph, affine.data, axis, move):
            return False  # R mixes the axis, or the op goes up instead
        refusal = crossing_refusal(mover, *move)
        if refusal:
            if layers_below(graph, mover.outputs[0], target_axis, (kind, vector, "NONE")):
                # layers wait below, only this crossing is not exact: say so
                self.declined(graph, ctx, op, f"not moved below {mover.opcode.name}: {refusal}")
            return False
        if not layers_below(graph, mover.outputs[0], target_axis, move):
            return False
        reason = ctx.excluded(graph, op, mover)
        if reason or graph.dtype(mover.outputs[0]) != "FLOAT32":
            self.declined(
                graph, ctx, op, f"not moved below {mover.opcode.name}: {reason or 'not float32'}"
            )
            return False
        labels = self.labels(graph, [op, mover])
        result = mover.outputs[0]
        rearranged = graph.add_tensor_like(
            result, f"{_base_name(graph.name(result))}/before_{op.opcode.name.lower()}"
        )
        graph.replace_input(mover, 0, affine.data)
        graph.set_output(mover, 0, rearranged)
        constant = axis_constant(
            vector, target_axis if affine.axis is not None else None, len(graph.shape(result))
        )
        make_linear(graph, op, kind, rearranged, constant, activation_code(op))
        graph.set_output(op, 0, result)
        graph.move_before(mover, op)
        self.rewrote(graph, ctx, labels, f"{op.opcode.name} moved below {mover.opcode.name}")
        return True
