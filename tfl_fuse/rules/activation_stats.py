"""Data-free activation statistics: a per-channel mean and variance for every float tensor.

Equalization's noise model needs to know how large each channel of a tensor is. Without
calibration data, this estimates it by pushing a mean and a variance per channel from the graph
inputs (taken as uniform in [-1, 1]: mean 0, variance 1/3) through the ops, in graph order:

* a layer: mean[o] = sum W[o, .] * mean[.] + b[o], variance[o] = sum W[o, .]^2 * variance[.]
  (inputs taken as independent; a TRANSPOSE_CONV output sums about 1 / stride^2 of its taps);
* ADD / SUB of two tensors: means add, variances add; by a constant: the mean moves;
* MUL / DIV by a constant: mean * c, variance * c^2; of two tensors: the product's moments;
* RELU (fused or not), RELU6, PRELU: the rectified Gaussian's moments;
* pools, PAD, resizes, reshapes and transposes that keep the last axis: unchanged;
  a channel CONCATENATION: the parts side by side;
* anything else: the input's figures averaged over channels, or (0, 1).

Only ranks matter to the rule that reads them (which channels are larger, by how much), so the
simplifications are acceptable; the quantization bench checks the rule, not these figures.
"""

from __future__ import annotations

import math

import numpy as np

from ..graph import Graph
from ..model import Table
from .predicates import LAYERS, fused_activation

INPUT_MEAN, INPUT_VARIANCE = 0.0, 1.0 / 3.0
# Tensors with more channels than this get no figures (as a tensor of an unknown kind): no layer
# has that many, and the figures' arrays would take memory from the stored shape alone.
MAX_CHANNELS = 1 << 20
Stats = tuple[np.ndarray, np.ndarray]  # per-channel mean, variance


def _phi(x: np.ndarray) -> np.ndarray:
    return np.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


def _cdf(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


def rectified(
    stats: Stats, negative_slope: np.ndarray | float = 0.0, cap: float | None = None
) -> Stats:
    """Moments of max(x, 0) + slope * min(x, 0) for x ~ N(mean, variance) per channel."""
    mean, variance = stats
    sigma = np.sqrt(np.maximum(variance, 1e-30))
    z = mean / sigma
    pos_mean = mean * _cdf(z) + sigma * _phi(z)
    pos_square = (mean**2 + variance) * _cdf(z) + mean * sigma * _phi(z)
    neg_mean = mean - pos_mean  # E[min(x, 0)]
    neg_square = (mean**2 + variance) - pos_square
    out_mean = pos_mean + negative_slope * neg_mean
    out_square = pos_square + np.square(negative_slope) * neg_square
    if cap is not None:
        out_mean = np.minimum(out_mean, cap)
        out_square = np.minimum(out_square, cap * cap)
    return out_mean, np.maximum(out_square - out_mean**2, 0.0)


def _channels(graph: Graph, tensor: int) -> int:
    shape = graph.shape(tensor)
    return int(shape[-1]) if shape else 1


def _flat(stats: Stats, channels: int) -> Stats:
    """The figures averaged over channels, for a tensor whose channels do not map one to one;
    (0, 1) where it has no channels to average."""
    mean, variance = stats
    if not mean.size:
        return np.zeros(channels), np.ones(channels)
    return np.full(channels, float(mean.mean())), np.full(channels, float(variance.mean()))


def _activation(op: Table, stats: Stats) -> Stats:
    act = fused_activation(op)
    if act == "RELU":
        return rectified(stats)
    if act == "RELU6":
        return rectified(stats, cap=6.0)
    if act == "RELU_N1_TO_1":
        return np.clip(stats[0], -1, 1), np.minimum(stats[1], 1.0)
    return stats


def _layer(graph: Graph, op: Table, inputs: Stats) -> Stats | None:
    kind = op.opcode.name
    layout = LAYERS[kind]
    weights_tensor = op.inputs[layout.weight_input]
    if not graph.is_constant(weights_tensor) or graph.dtype(weights_tensor) != "FLOAT32":
        return None
    w = graph.constant(weights_tensor).astype(np.float64)
    mean, variance = inputs
    if kind == "FULLY_CONNECTED":
        if w.shape[1] != len(mean):
            mean, variance = _flat(inputs, w.shape[1])
        out_mean, out_var = w @ mean, (w**2) @ variance
    elif kind == "DEPTHWISE_CONV_2D":
        channels = w.shape[3]
        source = np.arange(channels) // max(channels // max(len(mean), 1), 1)
        source = np.minimum(source, len(mean) - 1)
        taps = w.reshape(-1, channels)
        out_mean = taps.sum(axis=0) * mean[source]
        out_var = (taps**2).sum(axis=0) * variance[source]
    elif kind == "CONV_3D":
        rows = np.moveaxis(w, 4, 0)  # [O, KD, KH, KW, I]
        if rows.shape[-1] != len(mean):
            return None
        rows = rows.reshape(rows.shape[0], -1, rows.shape[-1])
        out_mean = (rows * mean).sum(axis=(1, 2))
        out_var = (rows**2 * variance).sum(axis=(1, 2))
    else:  # CONV_2D, TRANSPOSE_CONV: [O, KH, KW, I] (grouped: I = channels / groups)
        rows = w.reshape(w.shape[0], -1, w.shape[3])
        groups = max(len(mean) // max(w.shape[3], 1), 1)
        per_group = w.shape[0] // groups if w.shape[0] % groups == 0 else w.shape[0]
        out_mean = np.empty(w.shape[0])
        out_var = np.empty(w.shape[0])
        for o in range(w.shape[0]):
            g = min(o // per_group, groups - 1)
            part = slice(g * w.shape[3], (g + 1) * w.shape[3])
            m, v = mean[part], variance[part]
            if len(m) != w.shape[3]:
                m, v = _flat((mean, variance), w.shape[3])
            out_mean[o] = (rows[o] * m).sum()
            out_var[o] = (rows[o] ** 2 * v).sum()
        if kind == "TRANSPOSE_CONV":
            options = op.builtinOptions
            share = 1.0 / max(options.strideH * options.strideW, 1)
            out_mean, out_var = out_mean * share, out_var * share
    bias_position = layout.bias_input
    if bias_position < len(op.inputs) and op.inputs[bias_position] >= 0:
        bias = op.inputs[bias_position]
        if graph.is_constant(bias) and graph.dtype(bias) == "FLOAT32":
            values = graph.constant(bias).astype(np.float64).reshape(-1)
            if values.size == len(out_mean):
                out_mean = out_mean + values
    return _activation(op, (out_mean, out_var))


def _constant_vector(graph: Graph, tensor: int, channels: int) -> np.ndarray | None:
    if graph.dtype(tensor) != "FLOAT32":
        return None
    value = graph.constant(tensor).astype(np.float64)
    if value.size == 1:
        return np.full(channels, float(value.reshape(-1)[0]))
    if value.shape and value.shape[-1] == channels and value.size == channels:
        return value.reshape(-1)
    return np.full(channels, float(value.mean()))


def _elementwise(graph: Graph, op: Table, stats: dict[int, Stats], channels: int) -> Stats | None:
    kind = op.opcode.name
    parts = []
    for t in op.inputs[:2]:
        if graph.is_constant(t):
            value = _constant_vector(graph, t, channels)
            if value is None:
                return None
            parts.append(("constant", value))
        elif t in stats:
            s = stats[t]
            parts.append(("tensor", s if len(s[0]) == channels else _flat(s, channels)))
        else:
            return None
    if len(parts) != 2:
        return None
    (ka, a), (kb, b) = parts
    if kind in ("ADD", "SUB"):
        sign = 1.0 if kind == "ADD" else -1.0
        if ka == "tensor" and kb == "tensor":
            result = (a[0] + sign * b[0], a[1] + b[1])
        elif ka == "tensor":
            result = (a[0] + sign * b, a[1])
        else:
            result = (a - b[0] if kind == "SUB" else a + b[0], b[1])
    elif kind == "MUL":
        if ka == "tensor" and kb == "tensor":
            result = (
                a[0] * b[0],
                a[1] * b[1] + a[1] * b[0] ** 2 + b[1] * a[0] ** 2,
            )
        else:
            tensor, c = (a, b) if ka == "tensor" else (b, a)
            result = (tensor[0] * c, tensor[1] * c**2)
    elif kind == "DIV" and ka == "tensor" and kb == "constant" and np.all(b != 0):
        result = (a[0] / b, a[1] / b**2)
    else:
        return None
    return _activation(op, result)


KEEPING = {
    "MAX_POOL_2D",
    "AVERAGE_POOL_2D",
    "PAD",
    "PADV2",
    "MIRROR_PAD",
    "RESIZE_BILINEAR",
    "RESIZE_NEAREST_NEIGHBOR",
    "RESHAPE",
    "SQUEEZE",
    "EXPAND_DIMS",
    "STRIDED_SLICE",
    "SLICE",
    "SPACE_TO_BATCH_ND",
    "BATCH_TO_SPACE_ND",
    "MEAN",
    "DEQUANTIZE",
    "QUANTIZE",
}


def activation_statistics(graph: Graph) -> dict[int, Stats]:
    """Per-channel (mean, variance) of every float tensor a graph computes or takes as input."""
    stats: dict[int, Stats] = {}
    for t in graph.subgraph.inputs:
        if t < 0 or graph.is_constant(t):
            continue
        c = _channels(graph, t)
        if c <= MAX_CHANNELS:
            stats[t] = np.full(c, INPUT_MEAN), np.full(c, INPUT_VARIANCE)
    for op in graph.ops:
        if len(op.outputs) != 1 or op.outputs[0] < 0:
            continue
        out = op.outputs[0]
        channels = _channels(graph, out)
        if channels > MAX_CHANNELS:
            continue
        data = [t for t in op.inputs if t >= 0 and t in stats]
        first = stats[data[0]] if data else (np.zeros(1), np.ones(1))
        kind = op.opcode.name
        result: Stats | None = None
        try:
            if kind in LAYERS and op.inputs[LAYERS[kind].data_input] in stats:
                result = _layer(graph, op, stats[op.inputs[LAYERS[kind].data_input]])
            elif kind in ("ADD", "SUB", "MUL", "DIV") and len(op.inputs) == 2:
                result = _elementwise(graph, op, stats, channels)
            elif kind == "RELU":
                result = rectified(first)
            elif kind == "RELU6":
                result = rectified(first, cap=6.0)
            elif kind == "PRELU" and graph.is_constant(op.inputs[1]):
                alpha = _constant_vector(graph, op.inputs[1], len(first[0]))
                if alpha is not None:
                    result = rectified(first, alpha)
            elif kind == "CONCATENATION" and all(t in stats for t in op.inputs):
                rank = len(graph.shape(out))
                options = op.get("builtinOptions") or Table("ConcatenationOptions")
                if rank and options.get("axis", 0) % rank == rank - 1:
                    result = (
                        np.concatenate([stats[t][0] for t in op.inputs]),
                        np.concatenate([stats[t][1] for t in op.inputs]),
                    )
            elif kind in KEEPING and data:
                result = _activation(op, first) if kind.endswith("POOL_2D") else first
        except (ValueError, IndexError, AttributeError, TypeError):
            result = None  # an op this estimate does not model: averaged figures below
        if result is None or len(result[0]) != channels:
            result = _flat(result or first, channels)
        stats[out] = (np.asarray(result[0], float), np.maximum(np.asarray(result[1], float), 0.0))
    return stats
