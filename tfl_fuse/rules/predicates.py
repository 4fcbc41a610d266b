"""Named predicates and facts shared by the rules: layer layouts, activations, constants.

Each predicate either answers a question (``has_one_consumer``) or returns what a rule needs
and raises :class:`Decline` with a reason a user can read (``per_channel_vector``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..graph import Graph
from ..model import Table
from .base import Decline

ACTIVATIONS = {"NONE": 0, "RELU": 1, "RELU_N1_TO_1": 2, "RELU6": 3, "TANH": 4, "SIGN_BIT": 5}
ACTIVATION_NAMES = {v: k for k, v in ACTIVATIONS.items()}
PADDING_SAME, PADDING_VALID = 0, 1
QUANTIZED_TYPES = {"INT8", "UINT8", "INT16", "INT4", "UINT4"}


@dataclass(frozen=True)
class LayerLayout:
    """Where a layer keeps its operands and which weight axes carry channels (DESIGN.md 2)."""

    data_input: int
    weight_input: int
    bias_input: int
    output_channel_axis: int
    input_channel_axis: int


LAYERS: dict[str, LayerLayout] = {
    "CONV_2D": LayerLayout(0, 1, 2, output_channel_axis=0, input_channel_axis=3),
    "DEPTHWISE_CONV_2D": LayerLayout(0, 1, 2, output_channel_axis=3, input_channel_axis=3),
    "TRANSPOSE_CONV": LayerLayout(2, 1, 3, output_channel_axis=0, input_channel_axis=3),
    "FULLY_CONNECTED": LayerLayout(0, 1, 2, output_channel_axis=0, input_channel_axis=1),
    "CONV_3D": LayerLayout(0, 1, 2, output_channel_axis=4, input_channel_axis=3),
}
WEIGHT_RANK = {
    "CONV_2D": 4,
    "DEPTHWISE_CONV_2D": 4,
    "TRANSPOSE_CONV": 4,
    "FULLY_CONNECTED": 2,
    "CONV_3D": 5,
}


def layer_weights(graph: Graph, layer: Table) -> np.ndarray:
    """A layer's float32 constant weights, checked against its operand list and output shape."""
    kind = layer.opcode.name
    layout = LAYERS[kind]
    if len(layer.inputs) <= max(layout.data_input, layout.weight_input) or len(layer.outputs) != 1:
        raise Decline(f"{kind} has an unexpected operand list")
    if layer.get("builtinOptions") is None:
        raise Decline(f"{kind} has no options")
    weights = require_float_constant(graph, layer.inputs[layout.weight_input], "weights")
    if weights.ndim != WEIGHT_RANK[kind]:
        raise Decline(f"{kind} weights have rank {weights.ndim}, expected {WEIGHT_RANK[kind]}")
    out_shape = graph.shape(layer.outputs[0])
    if not out_shape or out_shape[-1] != weights.shape[layout.output_channel_axis]:
        raise Decline(
            f"{kind} weights do not match its output's {out_shape[-1:] or 'missing'} channels"
        )
    return weights


# Elementwise ops whose float kernels in LiteRT apply a fused activation.
LINEAR_OPS = ("MUL", "ADD", "SUB", "DIV")
OPTIONS_OF = {"ADD": "AddOptions", "SUB": "SubOptions", "MUL": "MulOptions", "DIV": "DivOptions"}


# activations ----------------------------------------------------------------------------------
def fused_activation(op: Table) -> str:
    options = op.get("builtinOptions")
    value = options.get("fusedActivationFunction", 0) if options is not None else 0
    return ACTIVATION_NAMES.get(value, str(value))


def activation_code(op: Table) -> int:
    """The fused activation's schema value; an operator without options has none (0)."""
    options = op.get("builtinOptions")
    return options.get("fusedActivationFunction", 0) if options is not None else 0


def set_fused_activation(op: Table, name: str) -> None:
    op.builtinOptions = op.builtinOptions.copy()
    op.builtinOptions.fusedActivationFunction = ACTIVATIONS[name]


def has_fused_activation_slot(op: Table) -> bool:
    options = op.get("builtinOptions")
    return options is not None and "fusedActivationFunction" in options.fields()


# graph shape ----------------------------------------------------------------------------------
def has_one_consumer(graph: Graph, tensor: int) -> bool:
    """Exactly one live operator reads ``tensor`` and it is no graph or signature output."""
    return len(graph.consumers_of(tensor)) == 1 and not graph.is_graph_output(tensor)


def require_single_consumer(graph: Graph, tensor: int, what: str) -> None:
    if graph.is_graph_output(tensor):
        raise Decline(f"the {what} output {graph.name(tensor)!r} is also a graph output")
    users = graph.consumers_of(tensor)
    if len(users) != 1:
        raise Decline(f"the {what} output {graph.name(tensor)!r} has {len(users)} consumers")


# dtypes -----------------------------------------------------------------------------------------
def is_quantized(graph: Graph, tensor: int) -> bool:
    t = graph.tensors[tensor]
    if t.type in QUANTIZED_TYPES:
        return True
    q = t.get("quantization")
    return q is not None and q.get("scale") is not None and len(q.scale) > 0 and t.type != "FLOAT32"


def require_float32(graph: Graph, tensor: int, what: str) -> None:
    t = graph.tensors[tensor]
    if t.type != "FLOAT32":
        kind = "quantized" if is_quantized(graph, tensor) else t.type
        raise Decline(f"the {what} {t.name!r} is {kind} ({t.type}); only float32 is folded")


def is_float_constant(graph: Graph, tensor: int) -> bool:
    return tensor >= 0 and graph.is_constant(tensor) and graph.dtype(tensor) == "FLOAT32"


def require_float_constant(graph: Graph, tensor: int, what: str) -> np.ndarray:
    if not graph.is_constant(tensor):
        producer = graph.producer_of(tensor)
        how = f"computed by {producer.opcode.name}" if producer is not None else "not a constant"
        raise Decline(f"the {what} {graph.name(tensor)!r} is {how}")
    require_float32(graph, tensor, what)
    if graph.tensors[tensor].get("sparsity") is not None:
        raise Decline(f"the {what} {graph.name(tensor)!r} is sparse")
    return graph.constant(tensor)


def require_finite(*arrays: np.ndarray) -> None:
    for array in arrays:
        if not np.all(np.isfinite(array)):
            raise Decline("the folded constants would not be finite")
        if np.any(np.abs(array) > np.finfo(np.float32).max):
            raise Decline("the folded constants would overflow float32")


# per-channel constants ----------------------------------------------------------------------
def per_channel_vector(graph: Graph, tensor: int, channels: int, rank: int) -> np.ndarray:
    """The constant ``tensor`` as a float64 vector of ``channels`` entries, or Decline.

    Per-channel means it broadcasts along the last (channel) axis only: shape [], [1], [C],
    [1, C], ... [1, ..., 1, C] with at most ``rank`` dimensions.
    """
    value = require_float_constant(graph, tensor, "constant operand")
    shape = value.shape
    if (
        len(shape) > rank
        or any(d != 1 for d in shape[:-1])
        or (shape and shape[-1] not in (1, channels))
    ):
        raise Decline(
            f"constant {graph.name(tensor)!r} of shape {list(shape)} is not per-channel for {channels} channels"
        )
    return np.broadcast_to(value.astype(np.float64).reshape(-1), (channels,)).copy()


@dataclass
class Affine:
    """An elementwise op read as y = scale * x + shift with per-channel constants."""

    op: Table
    data: int  # the non-constant input tensor
    scale: np.ndarray
    shift: np.ndarray


def affine_of(graph: Graph, op: Table) -> Affine:
    """Read MUL/ADD/SUB/DIV with one per-channel constant operand as an affine map."""
    kind = op.opcode.name
    if kind not in LINEAR_OPS or len(op.inputs) != 2 or len(op.outputs) != 1:
        raise Decline(f"{kind} is not a binary elementwise op")
    a, b = op.inputs
    const_a, const_b = graph.is_constant(a), graph.is_constant(b)
    if const_a == const_b:
        raise Decline(f"{kind} has {'two' if const_a else 'no'} constant operands")
    data, const = (b, a) if const_a else (a, b)
    require_float32(graph, data, f"{kind} input")
    require_float32(graph, op.outputs[0], f"{kind} output")
    out_shape = graph.shape(op.outputs[0])
    if graph.shape(data) != out_shape or not out_shape:
        raise Decline(
            f"the constant of {kind} broadcasts its input {graph.name(data)!r} to a larger shape"
        )
    channels = out_shape[-1]
    value = per_channel_vector(graph, const, channels, len(out_shape))
    ones, zeros = np.ones(channels), np.zeros(channels)
    if kind == "MUL":
        return Affine(op, data, value, zeros)
    if kind == "ADD":
        return Affine(op, data, ones, value)
    if kind == "SUB":
        return Affine(op, data, ones, -value) if const_b else Affine(op, data, -ones, value)
    if const_a:
        raise Decline("DIV by a variable (constant / x) is not linear")
    if np.any(value == 0):
        raise Decline("DIV by a constant with zero entries")
    return Affine(op, data, 1.0 / value, zeros)


def spatial_padding_is_zero(graph: Graph, op: Table) -> bool:
    """True when a conv applies no padding: VALID, or SAME whose computed padding is 0."""
    options = op.builtinOptions
    if options.padding == PADDING_VALID:
        return True
    layout = LAYERS[op.opcode.name]
    weight_shape = graph.shape(op.inputs[layout.weight_input])
    in_shape = graph.shape(op.inputs[layout.data_input])
    if op.opcode.name == "CONV_3D":
        kernel = weight_shape[0:3]
        spatial = in_shape[1:4]
        strides = [options.strideD, options.strideH, options.strideW]
        dilations = [options.dilationDFactor, options.dilationHFactor, options.dilationWFactor]
    else:
        kernel = weight_shape[1:3]
        spatial = in_shape[1:3]
        strides = [options.strideH, options.strideW]
        dilations = [options.dilationHFactor, options.dilationWFactor]
    for size, k, s, d in zip(spatial, kernel, strides, dilations):
        effective = (k - 1) * d + 1
        out = (size + s - 1) // s
        if max((out - 1) * s + effective - size, 0) != 0:
            return False
    return True
