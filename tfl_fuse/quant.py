"""Quantization parameters: the one place that knows scales, zero points and per-axis dimensions.

A quantized value q stands for r = scale * (q - zero_point) (DESIGN.md 3b). A per-axis tensor
has one scale and zero point per index of ``quantized_dimension``; a per-tensor one has one of
each. The helpers here read those parameters, dequantize constants (to read a BN's s and t as
the integer kernels compute them), and write new parameters as fresh tables (a tensor's
quantization table may be shared with a copy of it, so it is never changed in place).

Nothing here requantizes a tensor through float: rules keep or negate weight integers and change
only scales, output parameters and the integer bias.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .graph import Graph
from .model import Table

INTEGER_RANGES = {
    "INT8": (-128, 127),
    "UINT8": (0, 255),
    "INT16": (-32768, 32767),
    "INT32": (-(2**31), 2**31 - 1),
    "INT64": (-(2**63), 2**63 - 1),
}
QUANTIZED_ACTIVATION_TYPES = ("INT8", "UINT8", "INT16")
# 16x8 models (int16 activations) keep their bias in int64, the others in int32.
BIAS_TYPE_FOR_ACTIVATION = {"INT8": "INT32", "UINT8": "INT32", "INT16": "INT64"}
SYMMETRIC_WEIGHT_LIMIT = 127  # int8 weights use -127..127, so a negation stays in range


@dataclass(frozen=True)
class Quantization:
    """A tensor's scales and zero points; ``axis`` matters only when there are several."""

    scale: np.ndarray  # float64
    zero_point: np.ndarray  # int64
    axis: int

    @property
    def per_axis(self) -> bool:
        return len(self.scale) > 1

    def scale_for(self, channels: int) -> np.ndarray:
        """One scale per channel (a per-tensor scale repeated)."""
        return np.broadcast_to(self.scale, (channels,)).astype(np.float64)

    def zero_point_for(self, channels: int) -> np.ndarray:
        return np.broadcast_to(self.zero_point, (channels,)).astype(np.int64)


def quantization_of(graph: Graph, tensor: int) -> Quantization | None:
    """The tensor's parameters, or None when it has no scale (a float tensor)."""
    if tensor < 0:
        return None
    q = graph.tensors[tensor].get("quantization")
    if q is None or q.get("scale") is None or len(q.scale) == 0:
        return None
    scale = np.asarray(q.scale, dtype=np.float64).reshape(-1)
    zero_point = q.get("zeroPoint")
    zero_point = (
        np.zeros(len(scale), dtype=np.int64)
        if zero_point is None or len(zero_point) == 0
        else np.asarray(zero_point, dtype=np.int64).reshape(-1)
    )
    return Quantization(scale, zero_point, int(q.get("quantizedDimension") or 0))


def is_quantized_activation(graph: Graph, tensor: int) -> bool:
    """An integer tensor with a scale: the values of a fully quantized model."""
    return (
        graph.dtype(tensor) in QUANTIZED_ACTIVATION_TYPES
        and quantization_of(graph, tensor) is not None
    )


def dequantize(graph: Graph, tensor: int) -> np.ndarray:
    """A quantized constant's real values in float64, as the integer kernels read them."""
    q = quantization_of(graph, tensor)
    value = graph.constant(tensor).astype(np.float64)
    if q is None:
        return value
    if not q.per_axis:
        return q.scale[0] * (value - q.zero_point[0])
    shape = [1] * value.ndim
    shape[q.axis] = -1
    return q.scale.reshape(shape) * (value - q.zero_point.reshape(shape))


def with_quantization(
    graph: Graph, tensor: int, scale: np.ndarray, zero_point: np.ndarray, axis: int = 0
) -> None:
    """Give ``tensor`` a new quantization table (scale float32, zero point int64)."""
    t = graph.tensors[tensor]
    old = t.get("quantization")
    q = old.copy() if old is not None else Table("QuantizationParameters")
    q.scale = np.asarray(scale, dtype=np.float32).reshape(-1)
    q.zeroPoint = np.asarray(zero_point, dtype=np.int64).reshape(-1)
    q.quantizedDimension = int(axis)
    q.min = None
    q.max = None
    t.quantization = q


def fits(values: np.ndarray, type_name: str, margin: int = 0) -> bool:
    """All ``values`` lie in the integer range of ``type_name`` (``margin`` kept free each side)."""
    low, high = INTEGER_RANGES[type_name]
    return bool(np.all(values >= low + margin) and np.all(values <= high - margin))


def round_half_away(values: np.ndarray) -> np.ndarray:
    """Round to nearest, ties away from zero, as TFLite's quantizer rounds biases."""
    return np.sign(values) * np.floor(np.abs(values) + 0.5)
