"""Cross-layer equalization (Nagel et al., "Data-Free Quantization Through Weight Equalization and
Bias Correction", ICCV 2019, section 4.1), for a float model that a quantizer takes next.

        x                                   x
        |                                   |
    L1 (W1, b1, RELU or none)          L1 (W1 / r, b1 / r)
        |                      =>           |
    L2 (W2, b2)                        L2 (W2 * r on its input channels, b2)
        |                                   |

Math (DESIGN.md 3b). For r > 0 per channel, relu(y / r) = relu(y) / r, so scaling output channel
o of L1 (weights and bias) by 1 / r[o] and input channel o of L2 by r[o] computes the same
function. It changes only how a quantizer sees the pair: the per-channel magnitudes of the tensor
between L1 and L2 (quantized with one scale per tensor) and the per-output-channel weight ranges
of L2 (and of L1 with per-tensor weights).

Nagel's choice r[o] = sqrt(range1[o] * range2[o]) / range2[o] (range1: output channel o of W1,
range2: input channel o of W2) makes both ranges equal to sqrt(range1 * range2).

When it helps: a rule applied blindly makes some trained networks worse (measured on mediapipe's
face_landmark: 1.03x-1.12x the int8 error). So each pair is equalized only where a model of the
quantization noise at L2's output predicts a gain of at least ``MIN_GAIN``. The model sums, over
the outputs o of L2, the variance each rounding adds there, taking L1's inputs as unit-variance
noise (data-free: sigma[c] = sqrt(sum W1[c]^2) is then the RMS of channel c between the layers):

    the tensor between, one scale per tensor:  (max_c (3 sigma[c] + |b1[c]|) / 255)^2 * sum_c W2[o, c]^2
    L2's weights, step d2[o] = max |W2[o]| / 127: d2[o]^2 * sum_c (sigma[c]^2 + b1[c]^2)
    L1's weights, step d1[c] = max |W1[c]| / 127: sum_c W2[o, c]^2 * d1[c]^2 * fan_in

each over 12 (uniform rounding); with per-tensor weights (``--weight-granularity tensor``) the
steps are the whole tensor's. With one scale per channel, L1's term does not change (scaling a
channel scales its step with it) and L2's widens where the activation term narrows. The gain is
the ratio of the sums before and after; ``make bench`` checks it against measured int8 errors.

Between L1 and L2 there may be a RELU or a PRELU op with per-channel alphas (prelu(y / r) =
prelu(y) / r for r > 0, the alphas unchanged).

Exact when L1 has no fused activation or RELU (not RELU6: min(y, 6) / r != min(y / r, 6)), its
output (and the op between) has one consumer, L2 reads it as its data input, every r is finite and positive, weights
and biases are float32 constants, and L2 is not a grouped conv. DEPTHWISE_CONV_2D as L2 needs
depth multiplier 1 (its channel o reads input channel o).
"""

from __future__ import annotations

import numpy as np

from ..graph import Graph
from ..model import Table
from .backward import layer_bias, scale_along_axis, set_layer_bias
from .base import Context, Decline, Rule
from .predicates import (
    LAYERS,
    fused_activation,
    has_one_consumer,
    layer_weights,
    per_channel_vector,
    require_finite,
    require_float32,
)

FIRST_LAYERS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")
SECOND_LAYERS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")
# The predicted gain (noise before / after) a pair must reach, by weight granularity: chosen on
# mediapipe's trained face_detection_short_range, face_landmark and palm_detection_lite
# (bench/results.md). With one scale per channel, 1.25 still let one palm_detection_lite pair
# through that made an output 1.15x worse; 1.4 keeps every output at or below the untouched one.
MIN_GAIN = {"channel": 1.4, "tensor": 1.0}  # predicted noise before / after
R_LIMIT = 1e3
MAX_TIMES = 4  # no channel scaled by more than this (a dead channel would otherwise explode)


def output_channel_ranges(weights: np.ndarray, axis: int) -> np.ndarray:
    moved = np.moveaxis(np.abs(weights.astype(np.float64)), axis, 0)
    return moved.reshape(moved.shape[0], -1).max(axis=1)


def second_layer_matrix(kind: str, weights: np.ndarray) -> np.ndarray:
    """L2's weights as [outputs, input channels, taps] (a depthwise op: one input per output)."""
    w = weights.astype(np.float64)
    if kind == "FULLY_CONNECTED":
        return w[:, :, None]
    if kind == "DEPTHWISE_CONV_2D":
        channels = w.shape[3]
        taps = w.reshape(-1, channels).T  # [C, KH*KW]
        matrix = np.zeros((channels, channels, taps.shape[1]))
        matrix[np.arange(channels), np.arange(channels)] = taps
        return matrix
    return np.moveaxis(w.reshape(w.shape[0], -1, w.shape[3]), 2, 1)  # [O, I, KH*KW]


def predicted_noise(w1_rows: np.ndarray, b1: np.ndarray, w2: np.ndarray, per_tensor: bool) -> float:
    """Variance of the quantization noise summed over L2's outputs (module docstring).

    ``w1_rows``: L1's weights as [channels, fan-in]; ``w2``: L2's as [outputs, channels, taps].
    Inputs of L1 are taken as unit-variance noise: a data-free stand-in that ranks scalings.
    """
    fan_in = w1_rows.shape[1]
    sigma = np.sqrt((w1_rows**2).sum(axis=1))  # RMS of each channel between the layers
    second_moment = sigma**2 + b1**2
    activation_step = (3 * sigma + np.abs(b1)).max() / 255  # one scale per tensor
    energy = (w2**2).sum(axis=2)  # [O, C]
    if per_tensor:
        step1 = np.full(len(b1), np.abs(w1_rows).max() / 127)
        step2 = np.full(w2.shape[0], np.abs(w2).max() / 127)
    else:
        step1 = np.abs(w1_rows).max(axis=1) / 127
        step2 = np.abs(w2).max(axis=(1, 2)) / 127
    activation = activation_step**2 * energy.sum()
    first_weights = float((energy * (step1**2 * fan_in)[None, :]).sum())
    second_weights = float((step2**2).sum() * second_moment.sum() * w2.shape[2])
    return (activation + first_weights + second_weights) / 12


def equalizing_scale(w1: np.ndarray, axis1: int, w2: np.ndarray) -> np.ndarray:
    range1 = output_channel_ranges(w1, axis1)
    range2 = np.abs(w2).max(axis=(0, 2))
    alive = (range1 > 0) & (range2 > 0)
    r = np.ones_like(range1)
    r[alive] = np.sqrt(range1[alive] * range2[alive]) / range2[alive]
    return np.clip(r, 1 / R_LIMIT, R_LIMIT)


def _between(graph: Graph, first: Table) -> tuple[Table | None, Table | None]:
    """(the op between, L2) after L1: ``L1 -> L2`` or ``L1 -> PRELU/RELU -> L2``, single consumers."""
    tensor = first.outputs[0]
    if not has_one_consumer(graph, tensor):
        return None, None
    user = graph.consumers_of(tensor)[0]
    if user.opcode.name in SECOND_LAYERS:
        return None, user
    if user.opcode.name not in ("PRELU", "RELU") or user.inputs[0] != tensor:
        return None, None
    if not has_one_consumer(graph, user.outputs[0]):
        return None, None
    second = graph.consumers_of(user.outputs[0])[0]
    return (user, second) if second.opcode.name in SECOND_LAYERS else (None, None)


class EqualizeCrossLayer(Rule):
    name = "equalize_cross_layer"
    summary = "cross-layer equalization of layer -> (RELU or PRELU) -> layer pairs where a noise model predicts a better int8 model (exact in float); on with --target int8"
    default = False

    def is_default(self, target: str = "float") -> bool:
        return target == "int8"

    def apply(self, graph: Graph, ctx: Context) -> int:
        count = 0
        # A pair is decided again after its neighbours changed (the engine runs to a fixed
        # point, so a second run finds nothing left); the count bounds any ping-pong in a chain.
        times = ctx.memo.setdefault(self.name, {})
        for first in graph.live_ops(*FIRST_LAYERS):
            if times.get(id(first), 0) >= MAX_TIMES or len(first.outputs) != 1:
                continue
            middle, second = _between(graph, first)
            if second is None or fused_activation(first) not in ("NONE", "RELU"):
                continue  # RELU6 and other clamps do not commute with a per-channel scale
            try:
                plan = self._plan(graph, ctx, first, middle, second)
            except Decline as decline:
                self.declined(graph, ctx, first, f"not equalized with the next layer: {decline}")
                continue
            if plan is None:
                continue
            times[id(first)] = times.get(id(first), 0) + 1
            new_w1, new_b1, new_w2, gain = plan
            labels = self.labels(graph, [o for o in (first, middle, second) if o is not None])
            graph.set_constant(first, LAYERS[first.opcode.name].weight_input, new_w1)
            set_layer_bias(graph, first, new_b1)
            graph.set_constant(second, LAYERS[second.opcode.name].weight_input, new_w2)
            self.rewrote(
                graph, ctx, labels, f"equalized (predicted quantization noise {gain:.2f}x lower)"
            )
            count += 1
        return count

    @staticmethod
    def _plan(graph: Graph, ctx: Context, first: Table, middle: Table | None, second: Table):
        """New (W1, b1, W2, gain); None where the pair does not fit or gains too little."""
        kind1, kind2 = first.opcode.name, second.opcode.name
        layout1, layout2 = LAYERS[kind1], LAYERS[kind2]
        tensor = (middle or first).outputs[0]
        if second.inputs[layout2.data_input] != tensor or list(second.inputs).count(tensor) != 1:
            return None
        try:
            w1 = layer_weights(graph, first)
            w2 = layer_weights(graph, second)
            require_float32(graph, first.outputs[0], f"{kind1} output")
            channels = w1.shape[layout1.output_channel_axis]
            b1 = layer_bias(graph, first, channels)
            if middle is not None and middle.opcode.name == "PRELU":
                # prelu(y / r) = prelu(y) / r for r > 0 with the same alpha: alpha must be a
                # constant that does not vary along the spatial axes
                per_channel_vector(graph, middle.inputs[1], channels, len(graph.shape(tensor)))
        except Decline:
            return None  # quantized, computed weights, spatial alphas: nothing to equalize
        if kind2 == "DEPTHWISE_CONV_2D":
            if w2.shape[3] != channels:
                return None  # depth multiplier > 1
        elif w2.shape[layout2.input_channel_axis] != channels:
            return None  # grouped, or a FULLY_CONNECTED that flattens
        reason = ctx.excluded(graph, *(o for o in (first, middle, second) if o is not None))
        if reason:
            raise Decline(reason)
        matrix = second_layer_matrix(kind2, w2)
        axis1 = layout1.output_channel_axis
        r = equalizing_scale(w1, axis1, matrix)
        rows = np.moveaxis(w1.astype(np.float64), axis1, 0).reshape(channels, -1)
        per_tensor = ctx.weight_granularity == "tensor"
        before = predicted_noise(rows, b1, matrix, per_tensor)
        after = predicted_noise(rows / r[:, None], b1 / r, matrix * r[None, :, None], per_tensor)
        gain = before / after if after > 0 else 1.0
        if not gain >= MIN_GAIN[ctx.weight_granularity]:
            return None
        new_w1 = scale_along_axis(w1, 1 / r, axis1)
        new_b1 = b1 / r
        axis2 = (
            layout2.output_channel_axis
            if kind2 == "DEPTHWISE_CONV_2D"
            else layout2.input_channel_axis
        )
        new_w2 = scale_along_axis(w2, r, axis2)
        require_finite(new_w1, new_b1, new_w2)
        return new_w1.astype(np.float32), new_b1, new_w2.astype(np.float32), gain
