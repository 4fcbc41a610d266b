"""Backward fold: a per-channel MUL / ADD / SUB / DIV after a layer goes into its weights and bias.

Math (DESIGN.md 3.1). A layer L computes y = W * x + b, linear in W and b, with output
channel o produced by the weight slice at ``output_channel_axis`` index o. For a per-channel
affine map z = s * y + t (MUL s, ADD t, SUB t as ADD -t, DIV s as MUL 1/s, SUB(t, y) as
-y + t)::

    z[o] = s[o] * (W[o] * x + b[o]) + t[o] = (s[o] * W[o]) * x + (s[o] * b[o] + t[o])

so W' = W scaled by s along the output-channel axis, b' = s * b + t. The elementwise op's
fused activation moves onto L.

Exact when:
* L has no fused activation, or it is RELU and the map is a pure scale with every s > 0
  (s * relu(y) = relu(s * y)); then the op may itself carry NONE, RELU or RELU6;
* L's output has no other consumer and is not a graph output;
* weights and bias are float32 constants (float16 weights arrive as float32 ones, see
  float16.py; quantized weights belong to quantized.py);
* the constant is per-channel (broadcasts along the channel axis only);
* every folded value is finite.
A missing bias is created (TRANSPOSE_CONV then needs op version >= 3).

Through a channel CONCATENATION (DESIGN.md 3.7): ``concat(L1(x1), L2(x2)) -> MUL s -> ADD t``
folds slice by slice, Li taking the entries of s and t for its channels, when every input of
the concat is produced by such a layer and each of these checks holds for every Li; the
concat then outputs the op's tensor.
"""

from __future__ import annotations

import numpy as np

from ..graph import Graph
from ..model import Table
from .base import Context, Decline, Rule
from .predicates import (
    LAYERS,
    LINEAR_OPS,
    Affine,
    affine_of,
    fused_activation,
    has_fused_activation_slot,
    layer_weights,
    require_finite,
    require_float32,
    require_float_constant,
    require_single_consumer,
    scaled_float32,
    set_fused_activation,
)

ACTIVATIONS_A_LAYER_RUNS = {"NONE", "RELU", "RELU6", "RELU_N1_TO_1"}
TRANSPOSE_CONV_BIAS_VERSION = 3


def scale_along_axis(weights: np.ndarray, scale: np.ndarray, axis: int) -> np.ndarray:
    shape = [1] * weights.ndim
    shape[axis] = -1
    return weights.astype(np.float64) * scale.reshape(shape)


def scaled_weights(weights: np.ndarray, scale: np.ndarray, axis: int) -> np.ndarray:
    """float32 weights * scale along ``axis``, in float64 chunk by chunk, checked finite."""
    shape = [1] * weights.ndim
    shape[axis] = -1
    return scaled_float32(weights, scale.reshape(shape))


def layer_bias(graph: Graph, layer: Table, channels: int) -> np.ndarray:
    position = LAYERS[layer.opcode.name].bias_input
    if position < len(layer.inputs) and layer.inputs[position] >= 0:
        bias = (
            require_float_constant(graph, layer.inputs[position], "bias")
            .astype(np.float64)
            .reshape(-1)
        )
        if bias.size != channels:
            raise Decline(f"the bias has {bias.size} entries for {channels} output channels")
        return bias
    return np.zeros(channels)


def set_layer_bias(graph: Graph, layer: Table, bias: np.ndarray) -> None:
    """Write ``bias`` (float64) into the layer, creating the bias input when it is absent."""
    position = LAYERS[layer.opcode.name].bias_input
    value = bias.astype(np.float32)
    if position < len(layer.inputs) and layer.inputs[position] >= 0:
        graph.set_constant(layer, position, value)
        return
    tensor = graph.add_constant(f"{graph.name(layer.outputs[0])}/bias", value)
    while len(layer.inputs) < position:
        graph.append_input(layer, -1)
    if len(layer.inputs) == position:
        graph.append_input(layer, tensor)
    else:
        graph.replace_input(layer, position, tensor)
    if layer.opcode.name == "TRANSPOSE_CONV" and layer.opcode.version < TRANSPOSE_CONV_BIAS_VERSION:
        graph.set_op_type(layer, "TRANSPOSE_CONV", TRANSPOSE_CONV_BIAS_VERSION)


def activation_after_fold(layer: Table, affine: Affine) -> str:
    """The fused activation L gets, or Decline when L's activation blocks the fold."""
    layer_act, op_act = fused_activation(layer), fused_activation(affine.op)
    if op_act not in ACTIVATIONS_A_LAYER_RUNS:
        raise Decline(
            f"{affine.op.opcode.name} has fused {op_act}, which {layer.opcode.name} cannot run"
        )
    if layer_act == "NONE":
        if op_act != "NONE" and not has_fused_activation_slot(layer):
            raise Decline(f"{layer.opcode.name} has no options table to take the fused {op_act}")
        return op_act
    pure_positive_scale = np.all(affine.scale > 0) and not np.any(affine.shift)
    if layer_act == "RELU" and pure_positive_scale and op_act in ("NONE", "RELU", "RELU6"):
        return "RELU" if op_act == "NONE" else op_act
    if layer_act == "RELU" and not np.any(affine.shift):
        raise Decline(
            f"{layer.opcode.name} has fused RELU and the scale is not positive in every channel"
        )
    raise Decline(
        f"{layer.opcode.name} has fused {layer_act}, which the {affine.op.opcode.name} does not commute with"
    )


def plan_affine_fold(
    graph: Graph, layer: Table, affine: Affine
) -> tuple[np.ndarray, np.ndarray, str]:
    """New (weights, bias, activation) for ``layer`` computing ``affine`` of its output, or Decline."""
    layout = LAYERS[layer.opcode.name]
    require_single_consumer(graph, layer.outputs[0], layer.opcode.name)
    activation = activation_after_fold(layer, affine)
    require_float32(graph, layer.outputs[0], f"{layer.opcode.name} output")
    weights = layer_weights(graph, layer)
    channels = weights.shape[layout.output_channel_axis]
    if channels != len(affine.scale):
        raise Decline(
            f"{layer.opcode.name} has {channels} output channels, the constant {len(affine.scale)}"
        )
    bias = layer_bias(graph, layer, channels)
    new_weights = scaled_weights(weights, affine.scale, layout.output_channel_axis)
    new_bias = affine.scale * bias + affine.shift
    require_finite(new_bias)  # the weights were checked chunk by chunk
    return new_weights, new_bias, activation


def set_layer_constants(
    graph: Graph, layer: Table, weights: np.ndarray, bias: np.ndarray, activation: str
) -> None:
    graph.set_constant(
        layer, LAYERS[layer.opcode.name].weight_input, weights.astype(np.float32, copy=False)
    )
    set_layer_bias(graph, layer, bias)
    set_fused_activation(layer, activation)


def fold_affine_into_layer(graph: Graph, layer: Table, affine: Affine) -> None:
    """Rewrite ``layer`` so it computes ``affine`` of its output (checks, then changes)."""
    weights, bias, activation = plan_affine_fold(graph, layer, affine)
    set_layer_constants(graph, layer, weights, bias, activation)
    graph.set_output(layer, 0, affine.op.outputs[0])
    graph.remove_op(affine.op)


def concat_producers(graph: Graph, concat: Table) -> list[Table] | None:
    """The layers producing each input of a channel CONCATENATION, or None when one is not."""
    rank = len(graph.shape(concat.outputs[0]))
    options = concat.get("builtinOptions")
    if not rank or options is None or options.axis % rank != rank - 1:
        return None
    if len(set(concat.inputs)) != len(concat.inputs):
        return None
    producers = [graph.producer_of(t) if t >= 0 else None for t in concat.inputs]
    if any(p is None or p.opcode.name not in LAYERS for p in producers):
        return None
    return producers


def fold_affine_into_concat(graph: Graph, concat: Table, affine: Affine) -> int:
    """Fold ``affine`` after a channel CONCATENATION into each producing layer by slice.

    concat(L1(x1), L2(x2)) -> MUL s -> ADD t equals concat(L1'(x1), L2'(x2)) where Li' takes the
    slice of s and t for its channels (and the op's activation, which commutes with concat).
    Returns the number of layers changed, or Decline.
    """
    require_single_consumer(graph, concat.outputs[0], "CONCATENATION")
    if fused_activation(concat) != "NONE":
        raise Decline(f"CONCATENATION has fused {fused_activation(concat)}")
    plans, start = [], 0
    for part in concat.inputs:
        layer = graph.producer_of(part)
        width = graph.shape(part)[-1]
        piece = slice(start, start + width)
        start += width
        part_affine = Affine(affine.op, part, affine.scale[piece], affine.shift[piece])
        plans.append((layer, plan_affine_fold(graph, layer, part_affine)))
    if start != len(affine.scale):
        raise Decline("the CONCATENATION inputs do not add up to its output channels")
    for layer, (weights, bias, activation) in plans:
        set_layer_constants(graph, layer, weights, bias, activation)
    graph.set_output(concat, 0, affine.op.outputs[0])
    graph.remove_op(affine.op)
    return len(plans)


class FoldIntoPrecedingLayer(Rule):
    name = "fold_into_preceding_layer"
    summary = "MUL/ADD/SUB/DIV by a per-channel constant after CONV_2D, DEPTHWISE_CONV_2D, TRANSPOSE_CONV, FULLY_CONNECTED or CONV_3D goes into its weights and bias"

    def apply(self, graph: Graph, ctx: Context) -> int:
        count = 0
        for op in graph.live_ops(*LINEAR_OPS):
            layer = self._layer_before(graph, op)
            if layer is None:
                count += self._fold_into_concat(graph, ctx, op)
                continue
            try:
                reason = ctx.excluded(graph, op, layer)
                if reason:
                    raise Decline(reason)
                affine = affine_of(graph, op)
                labels = self.labels(graph, [layer, op])
                fold_affine_into_layer(graph, layer, affine)
            except Decline as decline:
                self.declined(graph, ctx, op, f"not folded into {layer.opcode.name}: {decline}")
                continue
            self.rewrote(
                graph,
                ctx,
                labels,
                f"{op.opcode.name} folded into the weights and bias of {layer.opcode.name}",
            )
            count += 1
        return count

    def _fold_into_concat(self, graph: Graph, ctx: Context, op: Table) -> int:
        """``concat(L1, L2, ...) -> op``: fold ``op`` into every Li by slice (DESIGN.md 3.7)."""
        variables = [t for t in op.inputs if t >= 0 and not graph.is_constant(t)]
        concat = graph.producer_of(variables[0]) if len(variables) == 1 else None
        if concat is None or concat.opcode.name != "CONCATENATION" or len(op.inputs) != 2:
            return 0
        layers = concat_producers(graph, concat)
        if layers is None:
            return 0  # not every slice has a layer to go into; other rules may move it on
        try:
            reason = ctx.excluded(graph, op, concat, *layers)
            if reason:
                raise Decline(reason)
            affine = affine_of(graph, op)
            labels = self.labels(graph, [*layers, concat, op])
            changed = fold_affine_into_concat(graph, concat, affine)
        except Decline as decline:
            self.declined(
                graph, ctx, op, f"not folded into the layers before CONCATENATION: {decline}"
            )
            return 0
        self.rewrote(
            graph,
            ctx,
            labels,
            f"{op.opcode.name} folded by slice into the {changed} layers before CONCATENATION",
        )
        return 1

    @staticmethod
    def _layer_before(graph: Graph, op: Table) -> Table | None:
        """The layer producing the non-constant operand of ``op``, if there is exactly one."""
        if len(op.inputs) != 2:
            return None
        variables = [t for t in op.inputs if t >= 0 and not graph.is_constant(t)]
        if len(variables) != 1:
            return None
        producer = graph.producer_of(variables[0])
        if producer is None or producer.opcode.name not in LAYERS:
            return None
        return producer
