"""BN folds in already-quantized models: int8 (and 16x8) activations, or dynamic range.

The integer arithmetic is DESIGN.md 3b; scales and zero points are read in ``tfl_fuse.quant``.
No weight is requantized through float: weight integers are kept or negated, and only scales,
the output parameters and the integer bias (the rounding of an added shift) change.

``fold_into_quantized_layer``: a per-channel MUL / ADD / SUB / DIV after a layer with per-axis
int8 weights goes into the layer::

    x -> CONV_2D (W_q, ws[o]; bias_q) -> y -> MUL s -> z           (int8, or float in dynamic range)
    ==>  x -> CONV_2D (W_q * sign(s), ws[o] * |s[o]|; bias_q * sign(s)) -> z

    y -> ADD t -> z   ==>   bias_q[o] += round(t[o] / (input_scale * ws[o]))

Why: the layer computes y[o] = ws[o] * input_scale * (sum W_q (x_q - x_zp) + bias_q[o]) before
rounding to its output scale, so s[o] * y[o] is the same sum with ws[o] * |s[o]| and, where
s[o] < 0, negated integers (exact: the weights are symmetric, -127..127, zero point 0). The
bias is in the accumulator's scale, so its integers move with the weight scale and only the
added shift is rounded (to a fine step: input_scale * weight scale). The layer takes the last
op's output tensor (its quantization) and fused activation; one rounding (the intermediate
tensor's) is gone, so outputs differ from the unfolded model by at most about one quantum.
In dynamic-range models (float activations, the layer dequantizes its int8 weights) the bias
is float32: b' = s * b + t. A channel with s = 0 gets zero weights (its output is t).
Conditions: the layer has no fused activation and its output only feeds the op; its weights
are int8 constants quantized per output channel (per tensor only when s is one value for all
channels); a negated channel holds no -128; the constant is per-channel; the bias fits.
s and t are the op's dequantized constant (what the integer kernel multiplies and adds).

``quantized_bn_to_depthwise``: an int8 BN pair that no layer can take becomes one op::

    x -> MUL s -> ADD t (act) -> z   ==>   x -> DEPTHWISE_CONV_2D 1x1 (w, bias) (act) -> z

with per-channel int8 weights w[c] = 127 * sign(s[c]), weight scale |s[c]| / 127
(quantized_dimension 3), int32 bias round(t[c] / (input_scale * weight_scale[c])) and the ADD's
output quantization and activation: w[c] * weight_scale[c] = s[c] exactly, so the depthwise
op computes s * x + t with one rounding instead of two. A channel with s = 0 gets weight 0 and
the largest weight scale of the others (the bias must stay representable). Conditions: int8 or
int16 rank-4 tensors with per-tensor activation parameters, MUL without activation and with
the ADD/SUB as its only consumer, per-channel constants, a bias that fits and a requantization
multiplier that LiteRT can represent. uint8 models are declined (LiteRT runs per-channel
weights for int8 and int16 only).

``dynamic_range_bn_to_depthwise``: in a dynamic-range model (float activations, int8 weights),
a float BN pair ``MUL s -> ADD t`` whose output feeds a layer with int8 weights cannot move its
scale forward (that would requantize the int8 weights along their input channels), so it
becomes one float DEPTHWISE_CONV_2D 1x1 with weights s and bias t (exact in float, as
``standalone_bn_to_depthwise``). Conditions: float32 rank-4 tensors, the MUL without activation
and with the ADD/SUB as its only consumer, per-channel constants, and at least one consumer
holding int8 weights (directly or through the MEAN, pools, PADs and RESHAPEs that
move_scale_forward would carry the scale through, as ResNet50V2's head BN reaches its int8
FULLY_CONNECTED).

Every quantized MUL / ADD / SUB / DIV by a constant that stays is named in the report with the
reason (:func:`explain_quantized`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import quant
from ..graph import Graph
from ..model import Table
from .base import Context, Decline, Rule, op_label, record_decline
from .preactivation import crosses_with_the_scale
from .predicates import (
    ACTIVATIONS,
    LAYERS,
    LINEAR_OPS,
    affine_of,
    fused_activation,
    has_fused_activation_slot,
    require_per_channel_shape,
    require_single_consumer,
    set_fused_activation,
)
from .standalone import become_depthwise, following_shift

QUANTIZED_LAYERS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")
ACTIVATIONS_A_LAYER_RUNS = ("NONE", "RELU", "RELU6", "RELU_N1_TO_1")
# DEPTHWISE_CONV_2D op versions LiteRT registers for per-channel int8 and for 16x8.
DEPTHWISE_VERSION = {"INT8": 3, "INT16": 5}
# Keep the bias well inside its type: the accumulator adds products to it.
BIAS_MARGIN = {"INT32": 2**30, "INT64": 2**40}
SMALLEST_MULTIPLIER = 2.0**-31  # LiteRT turns smaller requantization multipliers into 0
# The width LiteRT requantizes an accumulator in (sign bit aside), by the layer's bias type.
ACCUMULATOR_BITS = {"INT32": 31, "INT64": 63}


@dataclass
class QuantAffine:
    """A MUL/ADD/SUB/DIV read as z = scale * y + shift, with the real (dequantized) constants."""

    op: Table
    data: int
    scale: np.ndarray
    shift: np.ndarray
    integer: bool  # integer activations (else float activations, dynamic range)


def constant_vector(graph: Graph, tensor: int, channels: int, rank: int) -> np.ndarray:
    """A per-channel constant's real values (dequantized when quantized), one per channel."""
    if graph.tensors[tensor].get("sparsity") is not None:
        raise Decline(f"the constant {graph.name(tensor)!r} is sparse")
    if graph.dtype(tensor) not in ("FLOAT32", *quant.QUANTIZED_ACTIVATION_TYPES):
        raise Decline(f"the constant {graph.name(tensor)!r} is {graph.dtype(tensor)}")
    value = quant.dequantize(graph, tensor)
    require_per_channel_shape(graph, tensor, value.shape, channels, rank)
    return np.broadcast_to(value.reshape(-1), (channels,)).copy()


def quantized_affine_of(graph: Graph, op: Table) -> QuantAffine:
    """Read an elementwise op with one per-channel constant; integer or float activations."""
    kind = op.opcode.name
    if kind not in LINEAR_OPS or len(op.inputs) != 2 or len(op.outputs) != 1:
        raise Decline(f"{kind} is not a binary elementwise op")
    a, b = op.inputs
    const_a, const_b = graph.is_constant(a), graph.is_constant(b)
    if const_a == const_b:
        raise Decline(f"{kind} has {'two' if const_a else 'no'} constant operands")
    data, const = (b, a) if const_a else (a, b)
    out = op.outputs[0]
    integer = quant.is_quantized_activation(graph, data)
    if integer:
        if graph.dtype(out) != graph.dtype(data) or quant.quantization_of(graph, out) is None:
            raise Decline(f"{kind} changes the type of its input")
    elif graph.dtype(data) != "FLOAT32" or graph.dtype(out) != "FLOAT32":
        raise Decline(f"{kind} works on {graph.dtype(data)}, neither quantized nor float32")
    out_shape = graph.shape(out)
    if graph.shape(data) != out_shape or not out_shape:
        raise Decline(f"the constant of {kind} broadcasts its input to a larger shape")
    channels = out_shape[-1]
    value = constant_vector(graph, const, channels, len(out_shape))
    ones, zeros = np.ones(channels), np.zeros(channels)
    if kind == "MUL":
        return QuantAffine(op, data, value, zeros, integer)
    if kind == "ADD":
        return QuantAffine(op, data, ones, value, integer)
    if kind == "SUB":
        if const_a:
            return QuantAffine(op, data, -ones, value, integer)
        return QuantAffine(op, data, ones, -value, integer)
    if const_a:
        raise Decline("DIV by a variable (constant / x) is not linear")
    if np.any(value == 0):
        raise Decline("DIV by a constant with zero entries")
    return QuantAffine(op, data, 1.0 / value, zeros, integer)


# checks -----------------------------------------------------------------------------------------
def per_tensor_activation(graph: Graph, tensor: int, what: str) -> quant.Quantization:
    q = quant.quantization_of(graph, tensor)
    if q is None:
        raise Decline(f"the {what} {graph.name(tensor)!r} has no quantization parameters")
    if q.per_axis:
        raise Decline(f"the {what} {graph.name(tensor)!r} is quantized per axis")
    return q


def check_bias_fits(bias: np.ndarray, type_name: str) -> None:
    if not quant.fits(bias, type_name, BIAS_MARGIN.get(type_name, 0)):
        raise Decline(f"the folded bias would not fit in {type_name}")


def check_multiplier(
    input_scale: float,
    weight_scale: np.ndarray,
    output_scale: float,
    reach: np.ndarray | None = None,
    bias_type: str = "INT32",
) -> None:
    """Decline a requantization multiplier LiteRT cannot apply: below SMALLEST_MULTIPLIER, or,
    given ``reach`` (the largest accumulator magnitude per channel), so large that LiteRT's
    fixed-point requantization, which shifts the accumulator left by the multiplier's exponent
    in the bias type's width, would overflow (it wraps: garbage where it should saturate)."""
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):  # checked right below
        multiplier = input_scale * weight_scale / output_scale
    if np.any(multiplier < SMALLEST_MULTIPLIER) or not np.all(np.isfinite(multiplier)):
        raise Decline("a requantization multiplier would be too small for LiteRT (scale near 0)")
    if reach is None:
        return
    left_shift = np.maximum(np.frexp(multiplier)[1], 0).astype(np.float64)
    bits = ACCUMULATOR_BITS.get(bias_type, 31)
    if np.any(np.asarray(reach, np.float64) * np.exp2(left_shift) >= 2.0**bits):
        raise Decline(
            f"a requantization multiplier up to {float(multiplier.max()):.3g} would overflow "
            f"LiteRT's {bits + 1}-bit requantization of this layer's accumulator"
        )


def accumulator_reach(
    weights: np.ndarray, axis: int, bias: np.ndarray, input_type: str, zero_point: int
) -> np.ndarray:
    """The largest accumulator magnitude per output channel (along ``axis`` of the integer
    ``weights``): every |input - zero point| at its type's extreme, plus the integer bias."""
    low, high = quant.INTEGER_RANGES.get(input_type, quant.INTEGER_RANGES["INT16"])
    span = max(high - zero_point, zero_point - low)
    others = tuple(a for a in range(weights.ndim) if a != axis % weights.ndim)
    total = np.abs(weights.astype(np.int64)).sum(axis=others).astype(np.float64)
    return total * span + np.abs(bias.astype(np.float64))


@dataclass
class QuantizedWeights:
    """A layer's int8 weights as the fold needs them: integers, per-channel scales, zero points."""

    tensor: int
    values: np.ndarray
    scale: np.ndarray  # one per output channel
    zero_point: np.ndarray
    per_axis: bool
    axis: int


def quantized_weights(graph: Graph, layer: Table) -> QuantizedWeights:
    kind = layer.opcode.name
    layout = LAYERS[kind]
    if len(layer.inputs) <= layout.weight_input or len(layer.outputs) != 1:
        raise Decline(f"{kind} has an unexpected operand list")
    tensor = layer.inputs[layout.weight_input]
    if not graph.is_constant(tensor):
        raise Decline(f"the weights of {kind} are not a constant")
    if graph.dtype(tensor) != "INT8":
        raise Decline(f"the weights of {kind} are {graph.dtype(tensor)}, not int8")
    if graph.tensors[tensor].get("sparsity") is not None:
        raise Decline(f"the weights of {kind} are sparse")
    q = quant.quantization_of(graph, tensor)
    if q is None:
        raise Decline(f"the int8 weights of {kind} have no scale")
    values = graph.constant(tensor)
    axis = layout.output_channel_axis
    if values.ndim <= axis:
        raise Decline(f"the weights of {kind} have rank {values.ndim}")
    channels = values.shape[axis]
    out_shape = graph.shape(layer.outputs[0])
    if not out_shape or out_shape[-1] != channels:
        raise Decline(f"{kind} weights do not match its output channels")
    if q.per_axis and (q.axis != axis or len(q.scale) != channels):
        raise Decline(f"the weights of {kind} are quantized along axis {q.axis}, not the output")
    return QuantizedWeights(
        tensor,
        values,
        q.scale_for(channels),
        q.zero_point_for(channels),
        q.per_axis,
        axis,
    )


def along(values: np.ndarray, axis: int, ndim: int) -> np.ndarray:
    shape = [1] * ndim
    shape[axis] = -1
    return values.reshape(shape)


# fold into the layer before -------------------------------------------------------------------
def fold_into_quantized_layer(graph: Graph, layer: Table, affine: QuantAffine) -> str:
    """Rewrite ``layer`` to compute ``affine`` of its output; checks first, then changes."""
    kind = layer.opcode.name
    layout = LAYERS[kind]
    require_single_consumer(graph, layer.outputs[0], kind)
    if fused_activation(layer) != "NONE":
        raise Decline(f"{kind} has fused {fused_activation(layer)}")
    activation = fused_activation(affine.op)
    if activation not in ACTIVATIONS_A_LAYER_RUNS:
        raise Decline(f"{affine.op.opcode.name} has fused {activation}, which {kind} cannot run")
    if activation != "NONE" and not has_fused_activation_slot(layer):
        raise Decline(f"{kind} has no options table to take the fused {activation}")
    weights = quantized_weights(graph, layer)
    scale, shift = affine.scale, affine.shift
    channels = len(weights.scale)
    if len(scale) != channels:
        raise Decline(f"{kind} has {channels} output channels, the constant {len(scale)}")
    if not weights.per_axis and np.any(scale != scale[0]):
        raise Decline(
            f"the weights of {kind} are quantized per tensor: a per-channel scale would "
            "requantize them (not exact)"
        )
    data_in = layer.inputs[layout.data_input]
    out_type = graph.dtype(affine.op.outputs[0])
    if affine.integer:
        if graph.dtype(layer.outputs[0]) != out_type:
            raise Decline(f"{kind} output and {affine.op.opcode.name} output differ in type")
        in_q = per_tensor_activation(graph, data_in, f"{kind} input")
        if out_type not in quant.BIAS_TYPE_FOR_ACTIVATION:
            raise Decline(f"{out_type} activations are not folded")
    elif graph.dtype(data_in) != "FLOAT32" or graph.dtype(layer.outputs[0]) != "FLOAT32":
        raise Decline(f"{kind} is neither fully quantized nor a dynamic-range layer")

    sign = np.sign(scale)
    flip = sign < 0
    if np.any(flip & (weights.zero_point != 0)):
        raise Decline(f"the weights of {kind} have a nonzero zero point: negating them is inexact")
    w = weights.values.astype(np.int64)
    if np.any(flip) and np.any((w == -128) & along(flip, weights.axis, w.ndim)):
        raise Decline("a channel to negate holds -128, which int8 cannot negate")
    zero = scale == 0
    new_w = np.where(
        along(zero, weights.axis, w.ndim),
        along(weights.zero_point, weights.axis, w.ndim),
        w * along(np.where(flip, -1, 1), weights.axis, w.ndim),
    )
    new_scale = np.where(zero, weights.scale, weights.scale * np.abs(scale))
    new_scale32 = new_scale.astype(np.float32).astype(np.float64)
    if not np.all(np.isfinite(new_scale32)) or np.any(new_scale32 <= 0):
        raise Decline("a folded weight scale would be zero or not finite")

    position = layout.bias_input
    has_bias = position < len(layer.inputs) and layer.inputs[position] >= 0
    if affine.integer:
        bias_type = quant.BIAS_TYPE_FOR_ACTIVATION[out_type]
        out_q = per_tensor_activation(
            graph, affine.op.outputs[0], f"{affine.op.opcode.name} output"
        )
        bias_scale = (np.float32(in_q.scale[0]) * new_scale32.astype(np.float32)).astype(np.float64)
        if has_bias:
            bias_tensor = layer.inputs[position]
            if not graph.is_constant(bias_tensor):
                raise Decline(f"the bias of {kind} is not a constant")
            bias_type = graph.dtype(bias_tensor)
            if bias_type not in ("INT32", "INT64"):
                raise Decline(f"the bias of {kind} is {bias_type}")
            old = graph.constant(bias_tensor).astype(np.int64).reshape(-1)
            if old.size != channels:
                raise Decline(f"the bias has {old.size} entries for {channels} channels")
        else:
            old = np.zeros(channels, dtype=np.int64)
        new_bias: np.ndarray = np.where(zero, 0, old * np.where(flip, -1, 1))
        with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
            moved = shift / bias_scale
        if not np.all(np.abs(moved) < 2.0**62):  # nor NaN: what no int64 holds
            raise Decline(f"the folded bias would not fit in {bias_type}")
        new_bias = new_bias + quant.round_half_away(moved).astype(np.int64)
        check_bias_fits(new_bias, bias_type)
        reach = accumulator_reach(
            new_w, weights.axis, new_bias, graph.dtype(data_in), int(in_q.zero_point[0])
        )
        input_scale = float(np.float32(in_q.scale[0]))
        check_multiplier(input_scale, new_scale32, out_q.scale[0], reach, bias_type)
    else:
        if has_bias:
            bias_tensor = layer.inputs[position]
            if not graph.is_constant(bias_tensor) or graph.dtype(bias_tensor) != "FLOAT32":
                raise Decline(f"the bias of {kind} is not a float32 constant")
            old_f = graph.constant(bias_tensor).astype(np.float64).reshape(-1)
            if old_f.size != channels:
                raise Decline(f"the bias has {old_f.size} entries for {channels} channels")
        else:
            old_f = np.zeros(channels)
        new_bias = scale * old_f + shift
        if not np.all(np.isfinite(new_bias.astype(np.float32))):
            raise Decline("the folded bias would not be finite")

    # all checks passed: change the graph
    weight_tensor = graph.set_constant(layer, layout.weight_input, new_w.astype(np.int8))
    if weights.per_axis:
        quant.with_quantization(graph, weight_tensor, new_scale32, np.zeros(channels), weights.axis)
    else:
        quant.with_quantization(graph, weight_tensor, new_scale32[:1], np.zeros(1), 0)
    if affine.integer:
        scales = bias_scale if weights.per_axis else bias_scale[:1]
        write_bias(graph, layer, new_bias, bias_type)
        bias_tensor = layer.inputs[position]
        quant.with_quantization(graph, bias_tensor, scales, np.zeros(len(scales)), 0)
    else:
        write_bias(graph, layer, new_bias, "FLOAT32")
    set_fused_activation(layer, activation)
    graph.set_output(layer, 0, affine.op.outputs[0])
    graph.remove_op(affine.op)
    parts = []
    if np.any(scale != 1):
        parts.append(
            f"weight scales x|s|{f', {int(flip.sum())} channel(s) negated' if flip.any() else ''}"
        )
    if np.any(shift != 0):
        parts.append("the shift added to the " + ("integer bias" if affine.integer else "bias"))
    return "; ".join(parts) or "identity"


def write_bias(graph: Graph, layer: Table, bias: np.ndarray, type_name: str) -> None:
    """Set the layer's bias (copy-on-write), creating the input when it is absent."""
    position = LAYERS[layer.opcode.name].bias_input
    value = bias.astype(np.float32 if type_name == "FLOAT32" else np.int64)
    if position < len(layer.inputs) and layer.inputs[position] >= 0:
        graph.set_constant(layer, position, value)
        return
    tensor = graph.add_constant(f"{graph.name(layer.outputs[0])}/bias", value, type_name=type_name)
    while len(layer.inputs) < position:
        graph.append_input(layer, -1)
    if len(layer.inputs) == position:
        graph.append_input(layer, tensor)
    else:
        graph.replace_input(layer, position, tensor)


class FoldIntoQuantizedLayer(Rule):
    name = "fold_into_quantized_layer"
    summary = (
        "MUL/ADD/SUB/DIV by a per-channel constant after an int8-weight CONV_2D, "
        "DEPTHWISE_CONV_2D or FULLY_CONNECTED (int8, 16x8 or dynamic range) goes into its "
        "weight scales and integer bias"
    )
    quantized = True

    def apply(self, graph: Graph, ctx: Context) -> int:
        count = 0
        for op in graph.live_ops(*LINEAR_OPS):
            layer = self._quantized_layer_before(graph, op)
            if layer is None:
                continue
            try:
                reason = ctx.excluded(graph, op, layer)
                if reason:
                    raise Decline(reason)
                affine = quantized_affine_of(graph, op)
                labels = self.labels(graph, [layer, op])
                detail = fold_into_quantized_layer(graph, layer, affine)
            except Decline as decline:
                self.declined(graph, ctx, op, f"not folded into {layer.opcode.name}: {decline}")
                continue
            self.rewrote(
                graph,
                ctx,
                labels,
                f"{op.opcode.name} folded into {layer.opcode.name} ({detail})",
            )
            count += 1
        return count

    @staticmethod
    def _quantized_layer_before(graph: Graph, op: Table) -> Table | None:
        """The layer with integer weights producing the op's non-constant operand, if any."""
        if len(op.inputs) != 2:
            return None
        variables = [t for t in op.inputs if t >= 0 and not graph.is_constant(t)]
        if len(variables) != 1:
            return None
        producer = graph.producer_of(variables[0])
        if producer is None or producer.opcode.name not in QUANTIZED_LAYERS:
            return None
        weights = producer.inputs[LAYERS[producer.opcode.name].weight_input]
        if weights < 0 or graph.dtype(weights) not in ("INT8", "UINT8", "INT4"):
            return None  # float layers belong to fold_into_preceding_layer
        return producer


# BN pair -> depthwise -------------------------------------------------------------------------
def following_quantized_shift(graph: Graph, mul: Table) -> Table | None:
    """The ADD/SUB by a constant that alone consumes an integer MUL, if any."""
    if graph.is_graph_output(mul.outputs[0]):
        return None
    users = graph.consumers_of(mul.outputs[0])
    if len(users) != 1 or users[0].opcode.name not in ("ADD", "SUB"):
        return None
    if not any(t >= 0 and graph.is_constant(t) for t in users[0].inputs):
        return None
    return users[0]


class QuantizedBnToDepthwise(Rule):
    name = "quantized_bn_to_depthwise"
    summary = (
        "an int8 (or 16x8) MUL s -> ADD t pair becomes one DEPTHWISE_CONV_2D 1x1 with "
        "per-channel int8 weights for s and an integer bias for t"
    )
    quantized = True

    def apply(self, graph: Graph, ctx: Context) -> int:
        count = 0
        for mul in graph.live_ops("MUL"):
            if not quant.is_quantized_activation(graph, mul.outputs[0]):
                continue
            add = following_quantized_shift(graph, mul)
            if add is None:
                continue
            try:
                reason = ctx.excluded(graph, mul, add)
                if reason:
                    raise Decline(reason)
                labels = self.labels(graph, [mul, add])
                bn_pair_to_depthwise(graph, mul, add)
            except Decline as decline:
                self.declined(graph, ctx, mul, f"not turned into DEPTHWISE_CONV_2D: {decline}")
                continue
            self.rewrote(graph, ctx, labels, "int8 MUL and ADD became one DEPTHWISE_CONV_2D 1x1")
            count += 1
        return count


def bn_pair_to_depthwise(graph: Graph, mul: Table, add: Table) -> None:
    scaling = quantized_affine_of(graph, mul)
    shifting = quantized_affine_of(graph, add)
    if not scaling.integer or not shifting.integer:
        raise Decline("the pair is not on integer tensors")
    if fused_activation(mul) != "NONE":
        raise Decline(f"the MUL has fused {fused_activation(mul)}")
    activation = fused_activation(add)
    if activation not in ACTIVATIONS_A_LAYER_RUNS:
        raise Decline(f"the {add.opcode.name} has fused {activation}")
    if np.any(shifting.scale != 1):
        raise Decline(f"{add.opcode.name}(constant, x) negates x")
    x, out = scaling.data, add.outputs[0]
    kind = graph.dtype(x)
    if kind not in DEPTHWISE_VERSION:
        raise Decline(
            f"{kind} activations: LiteRT runs per-channel DEPTHWISE_CONV_2D weights for "
            "int8 and int16 only"
        )
    if len(graph.shape(x)) != 4:
        raise Decline("the input is not a rank-4 NHWC tensor")
    in_q = per_tensor_activation(graph, x, "MUL input")
    out_q = per_tensor_activation(graph, out, f"{add.opcode.name} output")
    if kind == "INT16" and (in_q.zero_point[0] != 0 or out_q.zero_point[0] != 0):
        raise Decline("int16 activations with a nonzero zero point")
    scale, shift = scaling.scale, shifting.shift
    channels = len(scale)
    magnitude = np.abs(scale) / quant.SYMMETRIC_WEIGHT_LIMIT
    nonzero = scale != 0
    fallback = float(magnitude[nonzero].max()) if np.any(nonzero) else 1.0 / 127
    weight_scale = np.where(nonzero, magnitude, fallback).astype(np.float32)
    weights = (np.sign(scale) * quant.SYMMETRIC_WEIGHT_LIMIT).astype(np.int8)
    input_scale = np.float32(in_q.scale[0])
    check_multiplier(float(input_scale), weight_scale.astype(np.float64), out_q.scale[0])
    bias_scale = (input_scale * weight_scale).astype(np.float64)
    bias_type = quant.BIAS_TYPE_FOR_ACTIVATION[kind]
    bias = quant.round_half_away(shift / bias_scale)
    check_bias_fits(bias, bias_type)
    reach = accumulator_reach(
        weights.reshape(1, -1), 1, bias, graph.dtype(x), int(in_q.zero_point[0])
    )
    check_multiplier(
        float(input_scale), weight_scale.astype(np.float64), out_q.scale[0], reach, bias_type
    )

    name = graph.name(out)
    weight_tensor = graph.add_constant(
        f"{name}/dw_weights", weights.reshape(1, 1, 1, channels), type_name="INT8"
    )
    quant.with_quantization(graph, weight_tensor, weight_scale, np.zeros(channels), 3)
    bias_tensor = graph.add_constant(f"{name}/dw_bias", bias.astype(np.int64), type_name=bias_type)
    quant.with_quantization(graph, bias_tensor, bias_scale, np.zeros(channels), 0)
    graph.set_op_type(add, "DEPTHWISE_CONV_2D", DEPTHWISE_VERSION[kind])
    add.builtinOptions = Table(
        "DepthwiseConv2DOptions",
        padding=1,
        strideW=1,
        strideH=1,
        depthMultiplier=1,
        fusedActivationFunction=ACTIVATIONS[activation],
        dilationWFactor=1,
        dilationHFactor=1,
    )
    graph.replace_input(add, 0, x)
    graph.replace_input(add, 1, weight_tensor)
    graph.append_input(add, bias_tensor)
    graph.remove_op(mul)


class DynamicRangeBnToDepthwise(Rule):
    name = "dynamic_range_bn_to_depthwise"
    summary = (
        "dynamic range: a float MUL s -> ADD t pair feeding int8-weight layers (which a forward "
        "fold would requantize) becomes one float DEPTHWISE_CONV_2D 1x1"
    )
    quantized = True

    def apply(self, graph: Graph, ctx: Context) -> int:
        count = 0
        for mul in graph.live_ops("MUL"):
            if graph.dtype(mul.outputs[0]) != "FLOAT32":
                continue
            add = following_shift(graph, mul, ACTIVATIONS_A_LAYER_RUNS)
            if add is None or not feeds_int8_weight_layer(graph, add.outputs[0]):
                continue
            try:
                scaling = affine_of(graph, mul)
                shift = affine_of(graph, add).shift
                if len(graph.shape(scaling.data)) != 4:
                    raise Decline("the input is not a rank-4 NHWC tensor")
                reason = ctx.excluded(graph, mul, add)
                if reason:
                    raise Decline(reason)
            except Decline as decline:
                self.declined(graph, ctx, mul, f"not turned into DEPTHWISE_CONV_2D: {decline}")
                continue
            labels = self.labels(graph, [mul, add])
            become_depthwise(graph, add, scaling.data, scaling.scale, shift)
            graph.remove_op(mul)
            self.rewrote(
                graph,
                ctx,
                labels,
                "MUL and ADD became one float DEPTHWISE_CONV_2D 1x1 (the next layers hold int8 "
                "weights, which a forward fold would requantize)",
            )
            count += 1
        return count


def feeds_int8_weight_layer(graph: Graph, tensor: int) -> bool:
    """Whether a layer with int8 weights takes ``tensor``, directly or through ops that a
    per-channel scale crosses on its way forward to the next layers (as move_scale_forward
    moves it): an int8-weight layer behind them blocks the fold just the same (ResNet50V2's
    head: BN -> MEAN -> FULLY_CONNECTED)."""
    seen: set[int] = set()
    pending = [tensor]
    while pending:
        current = pending.pop()
        if current in seen:
            continue
        seen.add(current)
        for user in graph.consumers_of(current):
            if crosses_with_the_scale(graph, user, current):
                pending.extend(t for t in user.outputs if t >= 0)
                continue
            layout = LAYERS.get(user.opcode.name)
            if layout is None or len(user.inputs) <= layout.weight_input:
                continue
            weights = user.inputs[layout.weight_input]
            if weights >= 0 and graph.dtype(weights) in ("INT8", "INT4", "UINT8"):
                return True
    return False


# what stays ------------------------------------------------------------------------------------
def explain_quantized(graph: Graph, ctx: Context) -> None:
    """Name every quantized MUL/ADD/SUB/DIV by a constant left, with why no rule took it.

    A quantized rule that matched and declined already said why; the others did not match,
    so the reason is the pattern they need and this op's neighbourhood.
    """
    quantized_rules = {FoldIntoQuantizedLayer.name, QuantizedBnToDepthwise.name}
    explained = {
        label
        for entry in ctx.declines.values()
        if entry["subgraph"] == graph.index and entry["rule"] in quantized_rules
        for label in entry["ops"]
    }
    for op in graph.live_ops(*LINEAR_OPS):
        if len(op.inputs) != 2 or len(op.outputs) != 1:
            continue
        constants = [t for t in op.inputs if t >= 0 and graph.is_constant(t)]
        if len(constants) != 1:
            continue
        if not any(quant.is_quantized_activation(graph, t) for t in (*op.inputs, *op.outputs)):
            continue
        label = op_label(graph, op)
        if label in explained:
            continue
        data = next(t for t in op.inputs if t not in constants)
        producer = graph.producer_of(data)
        source = f"{producer.opcode.name}" if producer is not None else "a graph input"
        kind = op.opcode.name
        if kind == "MUL":
            why = (
                f"its input comes from {source}, not from a layer with per-axis int8 weights "
                "alone, and no ADD/SUB by a constant alone follows it to make a "
                "DEPTHWISE_CONV_2D; a forward fold into the next layers would requantize "
                "their int8 weights"
            )
        elif producer is not None and producer.opcode.name == "MUL":
            why = "it follows a MUL that stays (see that MUL)"
        else:
            why = (
                f"its input comes from {source}, not from a layer with per-axis int8 weights "
                "alone, and no quantized MUL precedes it"
            )
        record_decline(
            ctx,
            "*",
            graph.index,
            [label],
            f"quantized {kind} by a constant stays: {why}",
            graph,
            op,
        )
