"""Named predicates and facts shared by the rules: layer layouts, activations, constants.

Each predicate either answers a question (``has_one_consumer``) or returns what a rule needs
and raises :class:`Decline` with a reason a user can read (``per_channel_vector``).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from ..graph import Graph
from ..model import (
    RELEASE_MAPPED_BYTES,
    SCALE_CHUNK_VALUES,
    ModelError,
    ScaledProduct,
    Table,
    release_mapped_pages,
)
from ..validate import PADDING_SAME, PADDING_VALID, output_size
from .base import Decline

ACTIVATIONS = {"NONE": 0, "RELU": 1, "RELU_N1_TO_1": 2, "RELU6": 3, "TANH": 4, "SIGN_BIT": 5}
ACTIVATION_NAMES = {v: k for k, v in ACTIVATIONS.items()}
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
    layer_weight_shape(graph, layer)
    return graph.constant(layer.inputs[LAYERS[layer.opcode.name].weight_input])


def layer_weight_shape(graph: Graph, layer: Table) -> list[int]:
    """:func:`layer_weights`' checks and the weights' shape, without reading them: weights a
    fold changed are computed only when read (:class:`~tfl_fuse.model.ScaledProduct`)."""
    kind = layer.opcode.name
    layout = LAYERS[kind]
    if len(layer.inputs) <= max(layout.data_input, layout.weight_input) or len(layer.outputs) != 1:
        raise Decline(f"{kind} has an unexpected operand list")
    if layer.get("builtinOptions") is None:
        raise Decline(f"{kind} has no options")
    tensor = layer.inputs[layout.weight_input]
    require_float_constant_tensor(graph, tensor, "weights")
    shape = graph.shape(tensor)  # its data's size (validated when decoded, kept by rules)
    if len(shape) != WEIGHT_RANK[kind]:
        raise Decline(f"{kind} weights have rank {len(shape)}, expected {WEIGHT_RANK[kind]}")
    out_shape = graph.shape(layer.outputs[0])
    if not out_shape or out_shape[-1] != shape[layout.output_channel_axis]:
        raise Decline(
            f"{kind} weights do not match its output's {out_shape[-1:] or 'missing'} channels"
        )
    return shape


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
    """Set the fused activation (copy-on-write of the options table). An operator without an
    options table has none; rules decline before a fold would need to give it one."""
    if op.get("builtinOptions") is None and name == "NONE":
        return
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
    require_float_constant_tensor(graph, tensor, what)
    return graph.constant(tensor)


def require_float_constant_tensor(graph: Graph, tensor: int, what: str) -> None:
    """Decline unless ``tensor`` is a dense float32 constant (its value not read)."""
    if graph.tensors[tensor].get("sparsity") is not None:
        raise Decline(f"the {what} {graph.name(tensor)!r} is sparse")
    if not graph.is_constant(tensor):
        producer = graph.producer_of(tensor)
        how = f"computed by {producer.opcode.name}" if producer is not None else "not a constant"
        raise Decline(f"the {what} {graph.name(tensor)!r} is {how}")
    require_float32(graph, tensor, what)


FLOAT32_MAX = float(np.finfo(np.float32).max)


SMALL_ARRAY = 64  # values below which plain Python beats numpy's per-call cost


def require_finite(*arrays: np.ndarray) -> None:
    for array in arrays:
        array = np.asarray(array)
        if array.size <= SMALL_ARRAY:
            values = array.ravel().tolist()
            finite = all(map(math.isfinite, values))
            largest = max(map(abs, values), default=0.0) if finite else 0.0
        else:
            # min and max see every NaN and infinity (NaN propagates), without temporaries
            low, high = float(array.min()), float(array.max())
            finite = math.isfinite(low) and math.isfinite(high)
            largest = max(-low, high) if finite else 0.0
        if not finite:
            raise Decline("the folded constants would not be finite")
        if largest > FLOAT32_MAX:
            raise Decline("the folded constants would overflow float32")


EAGER_BELOW_BYTES = 4096

# True while the run's output will be written: folded weights then skip the read for their
# extremes, and are checked as they are written instead (see overflow_checks_at_write)
_CHECKS_AT_WRITE: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "tfl_fuse_overflow_checks_at_write", default=False
)


@contextlib.contextmanager
def overflow_checks_at_write() -> Iterator[None]:
    """Within this, :func:`scaled_float32` does not read the weights it folds: it leaves the
    check of its products to when they are computed, as the model is written (or its value is
    read), where a failure is :class:`~tfl_fuse.model.FoldedOverflow` instead of a Decline.

    Only for a run whose output is then written: a dry run never computes the products. The
    caller makes the run again without this where FoldedOverflow comes
    (:func:`tfl_fuse.api.optimize_and_write`).
    """
    token = _CHECKS_AT_WRITE.set(True)
    try:
        yield
    finally:
        _CHECKS_AT_WRITE.reset(token)


def scaled_float32(weights: np.ndarray, factors: np.ndarray) -> np.ndarray | ScaledProduct:
    """float32(weights * factors): each product computed in float64 and rounded once.

    ``factors`` broadcasts to the shape of ``weights``. Declines (as require_finite) where a
    product would not be finite or would overflow float32. The products themselves are
    computed when the model is written (:class:`ScaledProduct`); this only reads the weights
    for their extremes, a few rows at a time: along every axis ``factors`` does not vary, the
    largest product in magnitude is the largest or the smallest weight times the factor
    (rounding keeps the order), so the check is the one the products would pass.
    Within :func:`overflow_checks_at_write` the weights are not read here at all.
    """
    factors = np.asarray(factors, np.float64)
    if weights.nbytes < EAGER_BELOW_BYTES:  # less than a page: computed now, as it is cheaper
        with np.errstate(over="ignore", invalid="ignore"):  # require_finite says why
            product = np.asarray(np.multiply(weights, factors, dtype=np.float64))
        require_finite(product)
        return product.astype(np.float32)
    padded = factors.reshape((1,) * (weights.ndim - factors.ndim) + factors.shape)
    if _CHECKS_AT_WRITE.get():
        return ScaledProduct(weights, padded, checked=False)
    flat_axes = tuple(axis for axis in range(weights.ndim) if padded.shape[axis] == 1)
    per_row = padded.shape[0] != 1
    reach = float(np.abs(padded).max()) if padded.size else 0.0
    release = weights.nbytes >= RELEASE_MAPPED_BYTES
    # a large layer a few rows at a time, giving back the input pages read
    rows = max(1, SCALE_CHUNK_VALUES // max(1, weights[0].size)) if release else len(weights)
    for start in range(0, len(weights), rows):
        part = slice(start, start + rows)
        block = weights[part]
        # The largest weight in magnitude times the largest factor bounds every product;
        # only where that bound is not finite or not below FLOAT32_MAX are the extremes
        # taken along the axes the factors run on, which is what the products would give.
        high, low = float(block.max()), float(block.min())
        if not (
            math.isfinite(high) and math.isfinite(low) and max(high, -low) * reach <= FLOAT32_MAX
        ):
            near = padded[part] if per_row else padded
            high_by = block.max(axis=flat_axes, keepdims=True).astype(np.float64)
            low_by = block.min(axis=flat_axes, keepdims=True).astype(np.float64)
            require_finite(high_by * near, low_by * near)
        if release:
            release_mapped_pages(block)
    return ScaledProduct(weights, padded)


# per-channel constants ----------------------------------------------------------------------
def require_per_channel_shape(
    graph: Graph, tensor: int, shape: tuple[int, ...], channels: int, rank: int
) -> None:
    """Decline unless ``shape`` broadcasts along the last (channel) axis only."""
    if (
        len(shape) > rank
        or any(d != 1 for d in shape[:-1])
        or (shape and shape[-1] not in (1, channels))
    ):
        raise Decline(
            f"constant {graph.name(tensor)!r} of shape {list(shape)} is not per-channel "
            f"for {channels} channels"
        )


def per_channel_vector(graph: Graph, tensor: int, channels: int, rank: int) -> np.ndarray:
    """The constant ``tensor`` as a float64 vector of ``channels`` entries, or Decline.

    Per-channel means it broadcasts along the last (channel) axis only: shape [], [1], [C],
    [1, C], ... [1, ..., 1, C] with at most ``rank`` dimensions.
    """
    value = require_float_constant(graph, tensor, "constant operand")
    require_per_channel_shape(graph, tensor, value.shape, channels, rank)
    return _channel_values(value, channels)


def _channel_values(value: np.ndarray, channels: int) -> np.ndarray:
    """A per-channel constant's values as a float64 vector of ``channels`` entries, its own."""
    vector = value.astype(np.float64).reshape(-1)  # a copy of its own
    return vector if len(vector) == channels else np.full(channels, vector[0])


_UNITS: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def _units(length: int) -> tuple[np.ndarray, np.ndarray]:
    """Read-only float64 ones and zeros of ``length`` (shared: nobody writes into them)."""
    pair = _UNITS.get(length)
    if pair is None:
        if len(_UNITS) >= 256:
            _UNITS.clear()
        ones, zeros = np.ones(length), np.zeros(length)
        ones.flags.writeable = zeros.flags.writeable = False
        pair = _UNITS[length] = (ones, zeros)
    return pair


@dataclass
class Affine:
    """An elementwise op read as y = scale * x + shift with per-channel constants."""

    op: Table
    data: int  # the non-constant input tensor
    scale: np.ndarray
    shift: np.ndarray
    # the axis of ``data`` the constant runs along (-1: the last); None: a single value, any axis
    axis: int | None = -1


def affine_of(graph: Graph, op: Table, any_axis: bool = False) -> Affine:
    """Read MUL/ADD/SUB/DIV with one per-channel constant operand as an affine map.

    By default the constant must run along the last (NHWC channel) axis. With ``any_axis`` it
    may run along any one axis (``[1, C, 1, 1]``, ``[1, C, 1]`` as converters from PyTorch write
    them); ``Affine.axis`` then says which (None for a single value).

    The all-ones scale of an ADD and the all-zeros shift of a MUL are shared read-only arrays.
    """
    kind = op.opcode.name
    if kind not in LINEAR_OPS or len(op.inputs) != 2 or len(op.outputs) != 1:
        raise Decline(f"{kind} is not a binary elementwise op")
    a, b = op.inputs
    const_a, const_b = graph.is_constant(a), graph.is_constant(b)
    if const_a == const_b:
        raise Decline(f"{kind} has {'two' if const_a else 'no'} constant operands")
    data, const = (b, a) if const_a else (a, b)
    tensors, out = graph.tensors, op.outputs[0]
    if tensors[data].type != "FLOAT32":
        require_float32(graph, data, f"{kind} input")
    if tensors[out].type != "FLOAT32":
        require_float32(graph, out, f"{kind} output")
    out_shape = tensors[out].shape
    if not out_shape or list(tensors[data].shape or []) != list(out_shape):
        raise Decline(
            f"the constant of {kind} broadcasts its input {graph.name(data)!r} to a larger shape"
        )
    if any_axis:
        value, axis = per_axis_vector(graph, const, list(out_shape))
    else:
        require_float32(graph, const, "constant operand")  # a constant: neither sparse nor a string
        value = graph.constant(const)
        require_per_channel_shape(graph, const, value.shape, out_shape[-1], len(out_shape))
        value, axis = _channel_values(value, out_shape[-1]), -1
    # float32 values in float64 sum to a finite value unless one of them is NaN or infinite
    if not math.isfinite(float(np.add.reduce(value))):
        # 0 * NaN is NaN: moved, merged or folded elsewhere, it would meet other values (a
        # zero PAD's border, a bias) than where the model applies it
        raise Decline(f"constant {graph.name(const)!r} of {kind} holds NaN or infinity")
    ones, zeros = _units(len(value))
    if kind == "MUL":
        return Affine(op, data, value, zeros, axis)
    if kind == "ADD":
        return Affine(op, data, ones, value, axis)
    if kind == "SUB":
        return (
            Affine(op, data, ones, -value, axis)
            if const_b
            else Affine(op, data, -ones, value, axis)
        )
    if const_a:
        raise Decline("DIV by a variable (constant / x) is not linear")
    if np.any(value == 0):
        raise Decline("DIV by a constant with zero entries")
    return Affine(op, data, 1.0 / value, zeros, axis)


# where the channel axis is (DESIGN.md 11) -----------------------------------------------------
def per_axis_vector(graph: Graph, tensor: int, shape: list[int]) -> tuple[np.ndarray, int | None]:
    """A constant that varies along at most one axis of ``shape``: (its values, that axis).

    ``[C]``, ``[1, C]``, ``[1, 1, 1, C]`` run along the last axis, ``[1, C, 1, 1]`` along axis 1
    (numpy broadcasting aligns shapes on the right). A single value gives the axis None and
    a vector as long as the last axis.
    """
    value = require_float_constant(graph, tensor, "constant operand")
    rank = len(shape)
    varying = [i for i, d in enumerate(value.shape) if d != 1]
    if value.ndim > rank or len(varying) > 1:
        raise Decline(
            f"constant {graph.name(tensor)!r} of shape {list(value.shape)} varies along more than one axis"
        )
    if not varying:
        return np.full(shape[-1], float(value.reshape(-1)[0])), None
    axis = rank - value.ndim + varying[0]
    if value.shape[varying[0]] != shape[axis]:
        raise Decline(
            f"constant {graph.name(tensor)!r} of shape {list(value.shape)} does not match {shape}"
        )
    return value.astype(np.float64).reshape(-1), axis


def axis_constant(vector: np.ndarray, axis: int | None, rank: int) -> np.ndarray:
    """``vector`` laid along ``axis`` of a rank-``rank`` tensor: [C] for the last axis, else
    [1, .., C, .., 1]."""
    if axis is None or axis % rank == rank - 1:
        return vector
    shape = [1] * rank
    shape[axis % rank] = -1
    return vector.reshape(shape)


# Ops that only move, copy or crop elements: a per-channel op along an axis they leave whole
# commutes with them (the constant is permuted or reshaped with it).
REARRANGING = (
    "TRANSPOSE",
    "RESHAPE",
    "SQUEEZE",
    "EXPAND_DIMS",
    "STRIDED_SLICE",
    "SLICE",
    "GATHER",
    "PAD",
    "MIRROR_PAD",
    "BATCH_TO_SPACE_ND",
    "SPACE_TO_BATCH_ND",
)
# Those that insert zeros: a scale commutes with them, a shift does not (the border changes).
ZERO_INSERTING = ("PAD", "SPACE_TO_BATCH_ND")
# Pools keep the channel axis and commute with a per-channel shift (LiteRT's SAME pools skip
# the padded border) and a scale (MAX_POOL_2D: a scale >= 0 only, max keeps order).
POOLS = ("MAX_POOL_2D", "AVERAGE_POOL_2D")
CHANNEL_KEEPING = REARRANGING + POOLS


def static_shape(graph: Graph, tensor: int) -> list[int] | None:
    shape = graph.shape(tensor)
    if not shape or any(d <= 0 for d in shape):
        return None
    return shape


def dynamic_axes(graph: Graph, tensor: int) -> set[int]:
    """Axes whose extent is only known at run time (-1 in the shape signature, e.g. the batch)."""
    signature = graph.tensors[tensor].get("shapeSignature")
    return {i for i, d in enumerate(signature) if d < 0} if signature is not None else set()


def channel_axis_through(graph: Graph, op: Table, axis: int) -> int | None:
    """The axis of ``op``'s data input that becomes ``axis`` of its output, unchanged and whole.

    When it exists, a per-channel op along ``axis`` after ``op`` equals the same op along the
    returned axis before it (for ZERO_INSERTING ops a scale only, for MAX_POOL_2D a scale >= 0:
    ``crossing_refusal``). None: ``op`` mixes, crops or reorders that axis (or its shapes are
    not static).
    """
    kind = op.opcode.name
    if kind not in CHANNEL_KEEPING or not op.inputs or len(op.outputs) != 1:
        return None
    source, out = op.inputs[0], op.outputs[0]
    in_shape, out_shape = static_shape(graph, source), static_shape(graph, out)
    if in_shape is None or out_shape is None or not 0 <= axis < len(out_shape):
        return None
    options = op.get("builtinOptions")
    dynamic = dynamic_axes(graph, source) | dynamic_axes(graph, out)
    if kind == "TRANSPOSE":
        perm = _constant_ints(graph, op, 1, (len(out_shape),))
        if perm is None:
            return None
        return int(perm[axis]) % len(in_shape)
    if kind in ("RESHAPE", "SQUEEZE", "EXPAND_DIMS"):
        # only other axes split or merge: the same extent with the same product before it. A
        # run-time batch (axis 0 on both sides) multiplies both products alike.
        if dynamic - {0} or (dynamic and axis == 0):
            return None
        before = int(np.prod(out_shape[:axis]))
        for candidate, size in enumerate(in_shape):
            if size == out_shape[axis] and int(np.prod(in_shape[:candidate])) == before:
                return None if dynamic and candidate == 0 else candidate
        return None
    if axis in dynamic:
        return None
    if len(in_shape) != len(out_shape) or in_shape[axis] != out_shape[axis]:
        return None  # the remaining ops keep the rank; the axis must keep its extent
    if kind in ("BATCH_TO_SPACE_ND", "SPACE_TO_BATCH_ND"):
        return axis if axis == len(out_shape) - 1 else None
    if kind in POOLS:
        last = axis == len(out_shape) - 1 == 3
        return axis if last and fused_activation(op) == "NONE" else None
    if kind == "STRIDED_SLICE":
        strides = _constant_ints(graph, op, 3, (len(in_shape),))
        masks = (
            (options.get("ellipsisMask", 0), options.get("newAxisMask", 0))
            if options is not None
            else (0, 0)
        )
        shrink = options.get("shrinkAxisMask", 0) if options is not None else 0
        if strides is None or any(masks) or shrink or strides[axis] != 1:
            return None
        return axis  # stride 1 over the whole extent: the axis is kept as it is
    if kind == "SLICE":
        return axis
    if kind == "GATHER":
        gather_axis = options.get("axis", 0) if options is not None else 0
        batch_dims = options.get("batchDims", 0) if options is not None else 0
        indices = op.inputs[1]
        if len(graph.shape(indices)) != 1 or batch_dims or gather_axis % len(in_shape) == axis:
            return None
        return axis
    if kind in ("PAD", "MIRROR_PAD"):
        paddings = _constant_ints(graph, op, 1, (len(in_shape), 2))
        if paddings is None or np.any(paddings[axis]):
            return None
        return axis
    return None


def crossing_refusal(
    op: Table, kind: str, vector: np.ndarray, activation: str = "NONE"
) -> str | None:
    """Why a per-channel MUL (scale ``vector``) or ADD (shift) with a fused ``activation``
    cannot cross ``op``, or None. Elementwise activations commute with ops that only move
    elements; with MAX_POOL_2D only the clamps (monotone), with AVERAGE_POOL_2D none."""
    name = op.opcode.name
    if kind == "ADD" and name in ZERO_INSERTING:
        return f"a shift does not commute with the zeros {name} inserts"
    if kind == "MUL" and name == "MAX_POOL_2D" and np.any(vector < 0):
        return "MAX_POOL_2D does not commute with a negative scale"
    if name == "AVERAGE_POOL_2D" and activation != "NONE":
        return f"AVERAGE_POOL_2D does not commute with the fused {activation}"
    if name == "MAX_POOL_2D" and activation not in ("NONE", "RELU", "RELU6", "RELU_N1_TO_1"):
        return f"MAX_POOL_2D does not commute with the fused {activation}"
    return None


def channel_axis_after(graph: Graph, op: Table, axis: int) -> int | None:
    """The output axis of ``op`` that carries its input's ``axis`` (channel_axis_through inverted)."""
    out_shape = static_shape(graph, op.outputs[0]) if len(op.outputs) == 1 else None
    if out_shape is None:
        return None
    for candidate in range(len(out_shape)):
        if channel_axis_through(graph, op, candidate) == axis:
            return candidate
    return None


def _constant_ints(
    graph: Graph, op: Table, position: int, shape: tuple[int, ...]
) -> np.ndarray | None:
    """Input ``position`` of ``op`` as int64, where it is an INT32 or INT64 constant of ``shape``
    (what LiteRT's kernels take for a permutation, strides or paddings); else None."""
    if position >= len(op.inputs) or not graph.is_constant(op.inputs[position]):
        return None
    if graph.dtype(op.inputs[position]) not in ("INT32", "INT64"):
        return None
    try:
        value = graph.constant(op.inputs[position])
    except ModelError:  # an unreadable constant is simply not a known layout
        return None
    return value.astype(np.int64) if value.shape == shape else None


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
        out = output_size(PADDING_SAME, size, k, s, d)
        if max((out - 1) * s + effective - size, 0) != 0:
            return False
    return True
