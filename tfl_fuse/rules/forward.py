"""Forward fold: a per-channel MUL / ADD before layers goes into their weights and bias.

Math (DESIGN.md 3.2). A layer reads its input x linearly: y[o] = sum_i W[o, i] * x[i] + b[o]
(summing also over kernel positions). With x = s * u (MUL s)::

    y[o] = sum_i (W[o, i] * s[i]) * u[i] + b[o]          W' = W scaled by s on the input-channel axis

Exact for any padding: a padded zero stays zero after scaling. With x = u + t (ADD t)::

    y[o] = sum_i W[o, i] * u[i] + (b[o] + sum_i W[o, i] * t[i])     b' = b + W . t

Exact only where every output sums the whole kernel over real inputs: FULLY_CONNECTED, and
convolutions that apply no padding (VALID, or SAME whose computed padding is zero). Never
for TRANSPOSE_CONV, whose border outputs sum fewer inputs. DEPTHWISE_CONV_2D output o reads
input channel o // depth_multiplier. A grouped CONV_2D (W[O, KH, KW, C / groups]) output o
reads the input channels of its group g(o) = o // (O / groups): channel g(o) * C / groups + k at
index k of the input-channel axis, so the scale (and shift) is taken per output channel.

With ``--target int8`` or ``dynamic`` (the output is quantized next), a scale that is not the same in every
channel is not folded into the input channels of weights a quantizer quantizes per output
channel (CONV_2D, TRANSPOSE_CONV, FULLY_CONNECTED, CONV_3D): one output channel's weights would
then span the range set by its most scaled input channel (measured: 2.65x more weight
quantization error on ResNet50V2). DEPTHWISE_CONV_2D scales its output channels, so it takes
any scale; a uniform scale widens nothing.

Also required: the MUL/ADD has no fused activation, its output is not a graph output, every
consumer reads it as its data input and can absorb it (all fold or none do), the weights and
bias are float32 constants, and the folded values are finite.
"""

from __future__ import annotations

import numpy as np

from ..graph import Graph
from ..model import Table
from .backward import layer_bias, set_layer_bias
from .base import QUANTIZED_TARGETS, Context, Decline, Rule
from .predicates import (
    LAYERS,
    Affine,
    affine_of,
    fused_activation,
    layer_weights,
    require_finite,
    require_float32,
    scaled_float32,
    spatial_padding_is_zero,
)


def input_channel_map(graph: Graph, layer: Table, weights: np.ndarray, channels: int) -> np.ndarray:
    """For each index along the weights' input-channel axis, the input channel it reads.

    A vector, except for a grouped CONV_2D: there an [O, C / groups] map, row o holding the
    input channels that output channel o reads.
    """
    kind = layer.opcode.name
    layout = LAYERS[kind]
    if kind == "DEPTHWISE_CONV_2D":
        out_channels = weights.shape[3]
        if out_channels % channels:
            raise Decline(
                f"DEPTHWISE_CONV_2D has {out_channels} outputs for {channels} input channels"
            )
        return np.arange(out_channels) // (out_channels // channels)
    size = weights.shape[layout.input_channel_axis]
    if size == channels:
        return np.arange(size)
    if kind == "CONV_2D" and size and channels % size == 0:
        return grouped_input_channel_map(weights.shape[0], size, channels)
    raise Decline(f"{kind} reads {size} input channels per output, the constant has {channels}")


def grouped_input_channel_map(out_channels: int, per_group: int, channels: int) -> np.ndarray:
    """[O, C / groups]: the input channels each output channel of a grouped CONV_2D reads."""
    groups = channels // per_group
    if out_channels % groups:
        raise Decline(
            f"grouped CONV_2D has {out_channels} outputs, not a multiple of its {groups} groups"
        )
    group_of_output = np.arange(out_channels) // (out_channels // groups)
    return group_of_output[:, None] * per_group + np.arange(per_group)[None, :]


def absorb_scale(weights: np.ndarray, layer: Table, scale: np.ndarray) -> np.ndarray:
    """float32 weights scaled on the input-channel axis (in float64, rounded once, checked
    finite); an [O, C / groups] scale (grouped CONV_2D) scales each output channel's slice by
    its own group's entries."""
    layout = LAYERS[layer.opcode.name]
    if scale.ndim == 2:
        return scaled_float32(weights, scale[:, None, None, :])
    axis = (
        layout.output_channel_axis
        if layer.opcode.name == "DEPTHWISE_CONV_2D"
        else layout.input_channel_axis
    )
    shape = [1] * weights.ndim
    shape[axis] = -1
    return scaled_float32(weights, scale.reshape(shape))


def absorbed_shift(weights: np.ndarray, layer: Table, shift: np.ndarray) -> np.ndarray:
    """W . t per output channel: what ADD t before the layer adds to every output."""
    kind = layer.opcode.name
    w = weights.astype(np.float64)
    if kind == "DEPTHWISE_CONV_2D":
        return (w * shift.reshape(1, 1, 1, -1)).sum(axis=(0, 1, 2))
    if kind == "CONV_2D":
        if shift.ndim == 2:  # grouped: row o is the shift of output o's input channels
            return np.einsum("ohwi,oi->o", w, shift)
        return np.einsum("ohwi,i->o", w, shift)
    if kind == "FULLY_CONNECTED":
        return w @ shift
    if kind == "CONV_3D":
        return np.einsum("dhwio,i->o", w, shift)
    raise Decline(f"a shift before {kind} is not exact at its borders")


UNIFORM_SCALE_RTOL = 1e-6


def is_uniform(scale: np.ndarray) -> bool:
    """The same magnitude in every channel (a sign flip keeps every weight range)."""
    magnitude = np.abs(scale)
    return bool(magnitude.max() <= magnitude.min() * (1 + UNIFORM_SCALE_RTOL))


def require_quantization_friendly_scale(layer: Table, scale: np.ndarray, target: str) -> None:
    """With a quantizer next, Decline a non-uniform scale bound for input channels of ``layer``."""
    kind = layer.opcode.name
    if target not in QUANTIZED_TARGETS or kind == "DEPTHWISE_CONV_2D" or is_uniform(scale):
        return
    raise Decline(
        f"--target {target}: a scale that differs across channels (|s| from {np.abs(scale).min():.3g} "
        f"to {np.abs(scale).max():.3g}) would widen the per-output-channel weight ranges of {kind}, "
        "which a quantizer quantizes per output channel"
    )


def plan_consumer(
    graph: Graph, layer: Table, affine: Affine, data_tensor: int, target: str = "float"
) -> tuple[np.ndarray, np.ndarray]:
    """New (float32 weights, float64 bias) for one consumer, or Decline."""
    kind = layer.opcode.name
    if kind not in LAYERS:
        raise Decline(f"consumer {kind} cannot absorb a per-channel constant")
    layout = LAYERS[kind]
    if layer.inputs[layout.data_input] != data_tensor or list(layer.inputs).count(data_tensor) != 1:
        raise Decline(
            f"{kind} reads {graph.name(data_tensor)!r} as something other than its data input"
        )
    has_shift = bool(affine.shift.any())
    has_scale = bool((affine.scale != 1).any())
    if has_shift:
        if kind == "TRANSPOSE_CONV":
            raise Decline(
                "a shift before TRANSPOSE_CONV is not exact: its border outputs sum fewer inputs"
            )
        if kind != "FULLY_CONNECTED" and not spatial_padding_is_zero(graph, layer):
            raise Decline(f"{kind} pads its input, and a shift of padded zeros is not exact")
    if has_scale:
        require_quantization_friendly_scale(layer, affine.scale, target)
    require_float32(graph, layer.outputs[0], f"{kind} output")
    weights = layer_weights(graph, layer)
    channels = len(affine.scale)
    if kind == "FULLY_CONNECTED" and graph.shape(data_tensor)[-1] != weights.shape[1]:
        raise Decline("FULLY_CONNECTED flattens its input across the channel axis")
    mapping = input_channel_map(graph, layer, weights, channels)
    bias = layer_bias(graph, layer, weights.shape[layout.output_channel_axis])
    if has_scale:
        new_weights = absorb_scale(weights, layer, affine.scale[mapping])  # checked finite
    else:
        new_weights = weights
        require_finite(weights)
    new_bias = bias + absorbed_shift(weights, layer, affine.shift[mapping]) if has_shift else bias
    require_finite(new_bias)
    return new_weights, new_bias


class FoldIntoFollowingLayers(Rule):
    name = "fold_into_following_layers"
    summary = "MUL/ADD by a per-channel constant before conv/depthwise/FC/conv3D layers goes into their weights (ADD only where no padding applies)"

    def apply(self, graph: Graph, ctx: Context) -> int:
        count = 0
        for op in graph.live_ops("MUL", "ADD", "SUB", "DIV"):
            out = op.outputs[0]
            consumers = graph.consumers_of(out)
            if not consumers or not any(c.opcode.name in LAYERS for c in consumers):
                continue
            if fused_activation(op) != "NONE":
                continue  # relu(s*x+t) is the pre-activation rules' pattern
            try:
                affine = affine_of(graph, op)
            except Decline:
                continue  # not a per-channel affine op: nothing to say here
            try:
                reason = ctx.excluded(graph, op, *consumers)
                if reason:
                    raise Decline(reason)
                if fused_activation(op) != "NONE":
                    raise Decline(f"{op.opcode.name} has fused {fused_activation(op)}")
                if graph.is_graph_output(out):
                    raise Decline(f"{graph.name(out)!r} is a graph output")
                plans = [
                    (layer, plan_consumer(graph, layer, affine, out, ctx.target))
                    for layer in consumers
                ]
            except Decline as decline:
                self.declined(graph, ctx, op, f"not folded into the following layers: {decline}")
                continue
            labels = self.labels(graph, [op, *consumers])
            scaled = not is_uniform(affine.scale) and any(
                layer.opcode.name != "DEPTHWISE_CONV_2D" for layer in consumers
            )
            for layer, (weights, bias) in plans:
                layout = LAYERS[layer.opcode.name]
                graph.set_constant(
                    layer, layout.weight_input, weights.astype(np.float32, copy=False)
                )
                if np.any(affine.shift):
                    set_layer_bias(graph, layer, bias)
                graph.replace_input(layer, layout.data_input, affine.data)
            graph.remove_op(op)
            self.rewrote(
                graph,
                ctx,
                labels,
                f"{op.opcode.name} folded into {len(plans)} following layer(s)",
                **({"scaled_input_channels": True} if scaled else {}),
            )
            count += 1
        return count
