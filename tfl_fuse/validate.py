"""Structural checks of a decoded model, so rules can trust every index, option and constant.

Every model is validated before any rule runs; what fails is a ModelError naming the first
inconsistency, so a rule never meets a model that LiteRT would read differently (or not at all).
"""

from __future__ import annotations

import math
from collections import deque
from functools import cache

import numpy as np

from . import formats
from .model import Model, ModelError, Table

# Options tables shared by several operators, whose names do not follow from the operator's
# name; every other operator's table is found by name (CONV_2D -> Conv2DOptions).
SHARED_OPTIONS = {
    "Pool2DOptions": ("AVERAGE_POOL_2D", "MAX_POOL_2D", "L2_POOL_2D"),
    "ReducerOptions": (
        "MEAN",
        "SUM",
        "REDUCE_PROD",
        "REDUCE_MAX",
        "REDUCE_MIN",
        "REDUCE_ANY",
        "REDUCE_ALL",
    ),
    "MaximumMinimumOptions": ("MAXIMUM", "MINIMUM"),
    "L2NormOptions": ("L2_NORMALIZATION",),
    "SequenceRNNOptions": ("UNIDIRECTIONAL_SEQUENCE_RNN",),
    "RandomOptions": ("RANDOM_STANDARD_NORMAL", "RANDOM_UNIFORM", "MULTINOMIAL"),
    "Conv3DOptions": ("CONV_3D_TRANSPOSE",),
}
# Operators whose options are theirs to define (a custom op or delegate may carry anything).
FREE_OPTIONS = {"CUSTOM", "DELEGATE", "PLACEHOLDER_FOR_GREATER_OP_CODES"}
# Fields that LiteRT divides by or multiplies a kernel extent with: each must be >= 1.
POSITIVE_FIELDS = (
    "strideW",
    "strideH",
    "strideD",
    "dilationWFactor",
    "dilationHFactor",
    "dilationDFactor",
    "filterWidth",
    "filterHeight",
)
# Constant element types with a fixed size per element (strings and packed int4 are not).
FIXED_SIZE_TYPES = {
    "FLOAT32": 4,
    "FLOAT16": 2,
    "FLOAT64": 8,
    "INT32": 4,
    "UINT8": 1,
    "INT64": 8,
    "BOOL": 1,
    "INT16": 2,
    "INT8": 1,
    "UINT64": 8,
    "UINT32": 4,
    "UINT16": 2,
    "COMPLEX64": 8,
    "COMPLEX128": 16,
    "BFLOAT16": 2,
}

_BINARY = ("ADD", "SUB", "MUL", "DIV", "MAXIMUM", "MINIMUM", "SQUARED_DIFFERENCE", "PRELU")
_UNARY = ("RSQRT", "SQRT", "NEG", "ABS", "SQUARE", "EXP", "LOG", "RELU", "RELU6", "RELU_N1_TO_1")
_UNARY += ("TANH", "LOGISTIC", "HARD_SWISH")
_SHAPING = ("SQUEEZE", "MAX_POOL_2D", "AVERAGE_POOL_2D")
# Where the data operand is not input 0; the operators whose output is meant to be of another
# kind (float vs integer) than their data.
DATA_INPUT = {"TRANSPOSE_CONV": 2}
CONVERTING_OPS = {"QUANTIZE", "DEQUANTIZE"}
# Binary ops whose output may have another type than their operands: LiteRT's int16 MUL
# requantizes into int8 or uint8 (LSTM cells).
NARROWING_BINARY = {("MUL", "INT16")}
FLOAT_TYPES = {"FLOAT32", "FLOAT16", "FLOAT64", "BFLOAT16"}
QUANTIZED_ACTIVATIONS = {"INT8", "UINT8", "INT16"}  # LiteRT's ADD/SUB/MUL requantize these
# Zero points a tensor of each type can hold. LiteRT keeps zero points as int32, so every
# other integer type (biases included) is bounded by that.
INT32_RANGE = (-(2**31), 2**31 - 1)
ZERO_POINT_RANGE = {
    "INT4": (-8, 7),
    "INT8": (-128, 127),
    "UINT8": (0, 255),
    "INT16": (-32768, 32767),
    "UINT16": (0, 65535),
}
# Operand counts of LiteRT's kernels for the operators rules read: (min inputs, max inputs,
# min outputs, max outputs, input positions that may be absent (-1), the optional biases).
ARITY: dict[str, tuple[int, int, int, int, tuple[int, ...]]] = {
    **{op: (2, 2, 1, 1, ()) for op in _BINARY},
    **{op: (1, 1, 1, 1, ()) for op in _UNARY + _SHAPING},
    "CONV_2D": (2, 3, 1, 1, (2,)),
    "DEPTHWISE_CONV_2D": (2, 3, 1, 1, (2,)),
    "FULLY_CONNECTED": (2, 3, 1, 2, (2,)),
    "CONV_3D": (2, 3, 1, 1, (2,)),
    "TRANSPOSE_CONV": (3, 4, 1, 1, (3,)),
    "RESHAPE": (1, 2, 1, 1, (1,)),
    "EXPAND_DIMS": (2, 2, 1, 1, ()),
    "TRANSPOSE": (2, 2, 1, 1, ()),
    "PAD": (2, 3, 1, 1, (2,)),
    "MEAN": (2, 2, 1, 1, ()),
    "SPACE_TO_BATCH_ND": (3, 3, 1, 1, ()),
    "BATCH_TO_SPACE_ND": (3, 3, 1, 1, ()),
    "CONCATENATION": (1, 1 << 30, 1, 1, ()),
    "STRIDED_SLICE": (4, 4, 1, 1, ()),
    "SLICE": (3, 3, 1, 1, ()),
    "GATHER": (2, 2, 1, 1, ()),
    "MIRROR_PAD": (2, 2, 1, 1, ()),
    "PADV2": (2, 3, 1, 1, (2,)),
    "RESIZE_BILINEAR": (2, 2, 1, 1, ()),
    "RESIZE_NEAREST_NEIGHBOR": (2, 2, 1, 1, ()),
    "DEQUANTIZE": (1, 1, 1, 1, ()),
    "QUANTIZE": (1, 1, 1, 1, ()),
    "FAKE_QUANT": (1, 1, 1, 1, ()),
}

# Ops whose output LiteRT sizes from the input, a window, strides, dilations and padding:
# (rank, the weights input whose axes give the window, those axes); pools take the window from
# their options.
SPATIAL_KERNELS = {
    "CONV_2D": (4, 1, (1, 2)),
    "DEPTHWISE_CONV_2D": (4, 1, (1, 2)),
    "CONV_3D": (5, 1, (0, 1, 2)),
    "MAX_POOL_2D": (4, None, ()),
    "AVERAGE_POOL_2D": (4, None, ()),
}
PADDING_SAME, PADDING_VALID = 0, 1  # the schema's Padding enum


def output_size(padding: int, size: int, window: int, stride: int, dilation: int = 1) -> int:
    """The output extent LiteRT gives a conv or pool along one axis (its ComputeOutSize)."""
    if padding == PADDING_SAME:
        return (size + stride - 1) // stride
    reach = size + stride - ((window - 1) * dilation + 1)  # VALID; C's division truncates
    return reach // stride if reach >= 0 else -(-reach // stride)


# Layers: (weights input, bias input, output-channel axis of the weights, weights rank).
LAYER_CHANNELS = {
    "CONV_2D": (1, 2, 0, 4),
    "DEPTHWISE_CONV_2D": (1, 2, 3, 4),
    "TRANSPOSE_CONV": (1, 3, 0, 4),
    "FULLY_CONNECTED": (1, 2, 0, 2),
    "CONV_3D": (1, 2, 4, 5),
}


@cache
def options_of(format_name: str) -> dict[str, dict[str, str]]:
    """Operator name -> {union field: options table} for a format, derived from its schema.

    The schema's BuiltinOptions/BuiltinOptions2 unions name the tables; an operator takes the
    table named like itself without underscores (FULLY_CONNECTED -> FullyConnectedOptions),
    or one of SHARED_OPTIONS. An operator absent from the result takes no options table.
    """
    fmt = formats.get(format_name)
    by_name: dict[str, tuple[str, str]] = {}
    for field, union in (
        ("builtinOptions", "BuiltinOptions"),
        ("builtinOptions2", "BuiltinOptions2"),
    ):
        for table in fmt.enum(union):
            if table.endswith("Options"):
                by_name[table[: -len("Options")].lower()] = (field, table)
    shared = {op: table for table, ops in SHARED_OPTIONS.items() for op in ops}
    result: dict[str, dict[str, str]] = {}
    for op in fmt.enum("BuiltinOperator"):
        if op in shared:
            result[op] = {"builtinOptions": shared[op]}
        elif op.replace("_", "").lower() in by_name:
            field, table = by_name[op.replace("_", "").lower()]
            result[op] = {field: table}
    return result


class _Place:
    """Where a check looks, put in words only when a check fails (almost none does)."""

    __slots__ = ("template", "args")

    def __init__(self, template: str, *args: object) -> None:
        self.template = template
        self.args = args

    def __str__(self) -> str:
        return self.template.format(*self.args)

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)


def _check_index(value: int, limit: int, what: str, allow_absent: bool = False) -> None:
    if allow_absent and value == -1:
        return
    if not 0 <= value < limit:
        raise ModelError(f"{what} is {value}, out of range [0, {limit})")


def _subgraph_references(options: Table | None, fmt: formats.Format) -> list[tuple[str, int]]:
    if options is None:
        return []
    names = _reference_fields(fmt, options._type)
    references = []
    for name in options.fields() if names is None else names:
        value = options.get(name)
        if isinstance(value, int) and (name.endswith("SubgraphIndex") or name == "subgraph"):
            references.append((name, value))
    return references


@cache
def _reference_fields(fmt: formats.Format, table: str) -> tuple[str, ...] | None:
    """The fields of an options table that may name a subgraph (None: the schema lacks it)."""
    layout = fmt.layout(table)
    if layout is None:
        return None
    return tuple(
        f.name for f in layout.fields if f.name.endswith("SubgraphIndex") or f.name == "subgraph"
    )


def _broadcast_shape(shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
    """numpy's broadcast of ``shapes`` (ValueError where they do not broadcast), without
    numpy's per-call cost; ranks numpy cannot hold go to numpy to fail as it does."""
    rank = max((len(shape) for shape in shapes), default=0)
    if rank > 32:
        return np.broadcast_shapes(*shapes)
    result = [1] * rank
    for shape in shapes:
        for axis, size in enumerate(shape, rank - len(shape)):
            if size != 1:
                if result[axis] == 1:
                    result[axis] = size
                elif result[axis] != size:
                    raise ValueError(f"shapes {shapes} do not broadcast")
    return tuple(result)


def validate(model: Model) -> None:
    """Raise ModelError naming the first inconsistency: an index out of range, a double
    producer or cycle, a constant whose bytes contradict its shape, quantization parameters
    that contradict the tensor, an options table of another operator, a stride or dilation
    below 1, or a main graph without outputs."""
    if not model.subgraphs:
        raise ModelError("the model has no subgraphs")
    if not model.subgraphs[0].outputs:
        raise ModelError("subgraph 0 (the main graph) has no outputs")
    n_buffers = len(model.buffers)
    n_subgraphs = len(model.subgraphs)
    expected_options = options_of(model.format)
    fmt = formats.get(model.format)
    for s, subgraph in enumerate(model.subgraphs):
        n_tensors = len(subgraph.tensors)
        where = f"subgraph {s}"
        for t, tensor in enumerate(subgraph.tensors):
            tensor_where = _Place("subgraph {}: tensor {} ({!r})", s, t, tensor.name)
            if not 0 <= tensor.buffer < n_buffers:
                _check_index(tensor.buffer, n_buffers, f"{tensor_where} buffer index")
            _check_tensor(model, tensor, tensor_where)
        for i in subgraph.inputs:
            _check_index(i, n_tensors, f"{where}: input tensor index")
        for o in subgraph.outputs:
            _check_index(o, n_tensors, f"{where}: output tensor index")
        graph_inputs = set(subgraph.inputs)
        for k, op in enumerate(subgraph.operators):
            op_where = _Place("subgraph {}: operator {} ({})", s, k, op.opcode.name)
            for o in op.outputs:
                if o in graph_inputs:  # the caller sets it: LiteRT allocates it as no op's output
                    raise ModelError(f"{op_where} writes tensor {o}, a graph input")
                if 0 <= o < n_tensors and subgraph.tensors[o].get("isVariable"):
                    # state that stateful ops update through an input (LiteRT crashes on this)
                    raise ModelError(f"{op_where} writes tensor {o}, a variable tensor")
                if 0 <= o < n_tensors and 0 <= subgraph.tensors[o].buffer < n_buffers:
                    data = model.buffers[subgraph.tensors[o].buffer].data
                    if data is not None and len(data):
                        # LiteRT maps such a tensor read-only from the model, with whatever
                        # shares its buffer: the op would write into constants
                        raise ModelError(f"{op_where} writes tensor {o}, which holds constant data")
            for i in op.inputs:
                if not -1 <= i < n_tensors:
                    _check_index(i, n_tensors, f"{op_where} input tensor index", allow_absent=True)
            for o in op.outputs:
                if not -1 <= o < n_tensors:
                    _check_index(o, n_tensors, f"{op_where} output tensor index", allow_absent=True)
            for i in op.get("intermediates") or []:
                _check_index(
                    i, n_tensors, f"{op_where} intermediate tensor index", allow_absent=True
                )
            _check_arity(op, subgraph.tensors, model.buffers, op_where)
            _check_options(op, expected_options.get(op.opcode.name), op_where, fmt)
            for options in (op.get("builtinOptions"), op.get("builtinOptions2")):
                if options is None or _reference_fields(fmt, options._type) == ():
                    continue  # (most options tables name no subgraph)
                for name, value in _subgraph_references(options, fmt):
                    _check_index(value, n_subgraphs, f"{op_where} {name}")
        producer = _check_acyclic(subgraph, where)
        _check_order(model, subgraph, s, producer)
        for k, op in enumerate(subgraph.operators):  # shapes, once the graph is one
            if op.opcode.name in SPATIAL_KERNELS:
                op_where = _Place("subgraph {}: operator {} ({})", s, k, op.opcode.name)
                _check_spatial_output(op, subgraph.tensors, op_where)
            elif op.opcode.name == "FULLY_CONNECTED":
                op_where = _Place("subgraph {}: operator {} ({})", s, k, op.opcode.name)
                _check_fully_connected_output(op, subgraph.tensors, op_where)
            elif op.opcode.name in ("STRIDED_SLICE", "SLICE"):
                op_where = _Place("subgraph {}: operator {} ({})", s, k, op.opcode.name)
                _check_slice_output(op, subgraph.tensors, model.buffers, op_where)
    _check_input_buffers(model)
    for signature in model.signature_defs:
        index = signature.get("subgraphIndex", 0)
        _check_index(
            index, n_subgraphs, f"signature {signature.get('signatureKey')!r} subgraph index"
        )
        n_tensors = len(model.subgraphs[index].tensors)
        for entry in (signature.get("inputs") or []) + (signature.get("outputs") or []):
            _check_index(
                entry.tensorIndex,
                n_tensors,
                f"signature {signature.get('signatureKey')!r} tensor {entry.name!r}",
            )
    for entry in model.root.get("metadata") or []:
        _check_index(entry.buffer, n_buffers, f"metadata {entry.name!r} buffer index")


def _check_acyclic(subgraph: Table, where: str) -> dict[int, int]:
    """Refuse a cycle; return tensor -> the index of the operator that computes it."""
    producer: dict[int, int] = {}
    for k, op in enumerate(subgraph.operators):
        for o in op.outputs:
            if o < 0:
                continue
            if o in producer:
                raise ModelError(
                    f"{where}: tensor {o} is produced by operators {producer[o]} and {k}"
                )
            producer[o] = k
    waiting = [0] * len(subgraph.operators)
    dependants: dict[int, list[int]] = {}
    for k, op in enumerate(subgraph.operators):
        for i in set(op.inputs):
            if i in producer:
                waiting[k] += 1
                dependants.setdefault(producer[i], []).append(k)
    ready = deque(k for k, n in enumerate(waiting) if n == 0)
    done = 0
    while ready:
        k = ready.popleft()
        done += 1
        for d in dependants.get(k, ()):
            waiting[d] -= 1
            if waiting[d] == 0:
                ready.append(d)
    if done != len(subgraph.operators):
        stuck = [k for k, n in enumerate(waiting) if n > 0][:3]
        raise ModelError(f"{where}: the graph has a cycle through operators {stuck}")
    return producer


# Types LiteRT lets an operator read without data (their values live elsewhere).
VALUELESS_TYPES = {"RESOURCE", "VARIANT", "STRING"}


def _check_input_buffers(model: Model) -> None:
    """No graph input shares its data with another tensor: LiteRT writes what the caller sets
    into the input's buffer, which the other tensor then reads (a constant that is not one)."""
    owners: dict[int, str] = {}
    for s, subgraph in enumerate(model.subgraphs):
        for i in subgraph.inputs:
            buffer = subgraph.tensors[i].buffer
            data = model.buffers[buffer].data
            if data is not None and len(data):
                owners.setdefault(buffer, f"subgraph {s}: graph input {i}")
    if not owners:
        return
    for s, subgraph in enumerate(model.subgraphs):
        inputs = set(subgraph.inputs)
        for t, tensor in enumerate(subgraph.tensors):
            owner = owners.get(tensor.buffer)
            if owner is not None and (t not in inputs or not owner.startswith(f"subgraph {s}:")):
                raise ModelError(
                    f"{owner} shares buffer {tensor.buffer} with tensor {t} ({tensor.name!r}) of "
                    f"subgraph {s}: what the caller sets would change that tensor too"
                )


def _check_order(model: Model, subgraph: Table, s: int, producer: dict[int, int]) -> None:
    """Every tensor an operator reads has a value by then, as LiteRT runs the operators in the
    order listed: an earlier operator computed it, or it is a graph input, a constant or a
    variable. Otherwise LiteRT reads memory no one wrote (a later operator's result, in an
    acyclic graph listed out of order) or refuses to run ("Input tensor lacks data"), and a
    rewrite that reorders or removes operators would change what the model computes."""
    tensors = subgraph.tensors
    has_value = set(subgraph.inputs)
    for k, op in enumerate(subgraph.operators):
        for position, i in enumerate(op.inputs):
            if i < 0 or i in has_value:
                continue
            tensor = tensors[i]
            if tensor.get("isVariable") or tensor.type in VALUELESS_TYPES:
                continue
            where = _Place("subgraph {}: operator {} ({})", s, k, op.opcode.name)
            later = producer.get(i)
            if later is not None:
                raise ModelError(
                    f"{where} reads tensor {i} ({tensor.name!r}) before operator {later} computes "
                    "it: LiteRT runs operators in the order listed"
                )
            data = model.buffers[tensor.buffer].data
            if data is not None and len(data):
                continue
            shape = tensor.shape or []
            if any(d == 0 for d in shape) or (
                op.opcode.name == "RESHAPE" and position == 1 and len(shape) != 1
            ):
                continue  # no bytes to read, or a shape LiteRT's RESHAPE reads from dimensions
            raise ModelError(
                f"{where} reads tensor {i} ({tensor.name!r}), which has no data and which no "
                "operator computes and no caller sets"
            )
        has_value.update(o for o in op.outputs if o >= 0)
    for o in subgraph.outputs:
        tensor = tensors[o]
        data = model.buffers[tensor.buffer].data
        if o not in has_value and not tensor.get("isVariable") and (data is None or not len(data)):
            raise ModelError(
                f"subgraph {s}: graph output {o} ({tensor.name!r}) has no value: no operator "
                "computes it, no caller sets it and it has no data"
            )


def _check_options(
    op: Table, expected: dict[str, str] | None, where: str | _Place, fmt: formats.Format
) -> None:
    """The operator's options tables are the ones its type takes, with strides/dilations >= 1."""
    if op.opcode.name in FREE_OPTIONS or op.opcode.custom_code:
        return
    for field in ("builtinOptions", "builtinOptions2"):
        options = op.get(field)
        wanted = (expected or {}).get(field)
        if options is None:
            if wanted and _needs_table(fmt, wanted):
                raise ModelError(f"{where} has no {wanted}, which {op.opcode.name} needs")
            continue
        if options._type != wanted:
            takes = f"takes {wanted}" if wanted else "takes no options table there"
            raise ModelError(f"{where} carries {options._type}, but {op.opcode.name} {takes}")
        for name in _positive_fields(fmt, options._type):
            value = options.get(name)
            if value is not None and value < 1:
                raise ModelError(f"{where}: {options._type}.{name} is {value}, must be >= 1")


@cache
def _positive_fields(fmt: formats.Format, table: str) -> tuple[str, ...]:
    """The POSITIVE_FIELDS an options table of ``fmt`` has (all of them where the schema
    lacks the table: then its fields are whatever was read)."""
    layout = fmt.layout(table)
    return tuple(name for name in POSITIVE_FIELDS if layout is None or name in layout.names)


def _check_tensor(model: Model, tensor: Table, where: str | _Place) -> None:
    shape = tensor.get("shape") or []
    if shape and min(shape) < 0:
        raise ModelError(f"{where} has a negative dimension in its shape {list(shape)}")
    data = model.buffers[tensor.buffer].data
    itemsize = FIXED_SIZE_TYPES.get(tensor.type)
    if (
        data is not None
        and len(data)
        and itemsize is not None
        and tensor.get("sparsity") is None
        and len(data) != math.prod(shape) * itemsize
    ):
        raise ModelError(
            f"{where} is a constant of {len(data)} bytes, but shape {list(shape)} of "
            f"{tensor.type} needs {math.prod(shape) * itemsize}"
        )
    _check_quantization(tensor.get("quantization"), shape, tensor.type, where)


def _check_quantization(q: Table | None, shape: list[int], dtype: str, where: str | _Place) -> None:
    """Scales finite, zero points in range, one zero point per scale, one scale per slice."""
    if q is None:
        return
    scale = q.get("scale")
    zero_point = q.get("zeroPoint")
    n_scale = 0 if scale is None else len(scale)
    n_zero = 0 if zero_point is None else len(zero_point)
    if n_scale == 0:
        if n_zero:
            raise ModelError(f"{where} has {n_zero} quantization zero points but no scales")
        return
    if not np.all(np.isfinite(np.asarray(scale, dtype=np.float64))):
        raise ModelError(f"{where} has a quantization scale that is not finite")
    if n_zero != n_scale:
        raise ModelError(f"{where} has {n_scale} quantization scales but {n_zero} zero points")
    if dtype not in FLOAT_TYPES:
        low, high = ZERO_POINT_RANGE.get(dtype, INT32_RANGE)
        zero = np.asarray(zero_point, dtype=np.int64)
        if zero.min() < low or zero.max() > high:
            bad = int(zero[(zero < low) | (zero > high)][0])
            raise ModelError(
                f"{where} has quantization zero point {bad}, outside {dtype}'s {low}..{high}"
            )
    dimension = q.get("quantizedDimension", 0) or 0
    if n_scale > 1 or dimension:
        if not 0 <= dimension < max(len(shape), 1):
            raise ModelError(
                f"{where}: quantizedDimension {dimension} is out of range for shape {list(shape)}"
            )
    if n_scale > 1 and (not shape or shape[dimension] != n_scale):
        raise ModelError(
            f"{where} has {n_scale} quantization scales, but shape {list(shape)} has "
            f"{shape[dimension] if shape else 'no'} entries along quantizedDimension {dimension}"
        )


@cache
def _needs_table(fmt: formats.Format, table: str) -> bool:
    """An options table whose absence LiteRT reads as a stride or dilation of 0."""
    cls = fmt.table_class(table)
    defaults = vars(cls()) if cls is not None else {}
    return any(defaults.get(name, 1) < 1 for name in POSITIVE_FIELDS)


def _check_arity(
    op: Table, tensors: list[Table], buffers: list[Table], where: str | _Place
) -> None:
    arity = ARITY.get(op.opcode.name)
    if arity is None:
        return
    min_in, max_in, min_out, max_out, optional = arity
    n_in, n_out = len(op.inputs), len(op.outputs)
    if not min_in <= n_in <= max_in or not min_out <= n_out <= max_out:
        raise ModelError(f"{where} has {n_in} inputs and {n_out} outputs")
    for position, tensor in enumerate(op.inputs):
        if tensor < 0 and position not in optional:
            raise ModelError(f"{where} input {position} is absent (-1), which it needs")
    if any(tensor < 0 for tensor in op.outputs):
        raise ModelError(f"{where} has an absent (-1) output")
    if op.opcode.name not in CONVERTING_OPS:
        data = tensors[op.inputs[DATA_INPUT.get(op.opcode.name, 0)]].type
        out = tensors[op.outputs[0]].type
        if (data in FLOAT_TYPES) != (out in FLOAT_TYPES):
            # LiteRT's kernels pick their arithmetic by one of the two: the other is misread
            raise ModelError(f"{where} reads {data} data and writes {out}")
    if op.opcode.name in LAYER_CHANNELS:
        _check_layer_channels(op, tensors, where)
    if op.opcode.name == "CONCATENATION":
        ranks = [len(tensors[t].get("shape") or ()) for t in [*op.inputs, op.outputs[0]]]
        if len(set(ranks)) > 1:
            raise ModelError(
                f"{where}: inputs of ranks {ranks[:-1]} for an output of rank {ranks[-1]}"
            )
    if op.opcode.name == "TRANSPOSE":
        _check_transpose(op, tensors, buffers, where)
    if op.opcode.name in ("RESHAPE", "SQUEEZE", "EXPAND_DIMS"):
        in_shape = list(tensors[op.inputs[0]].get("shape") or ())
        out_shape = list(tensors[op.outputs[0]].get("shape") or ())
        if in_shape and out_shape and math.prod(in_shape) != math.prod(out_shape):
            raise ModelError(f"{where}: {in_shape} cannot take the shape {out_shape}")
    if op.opcode.name in _BINARY:
        types = [tensors[t].type for t in op.inputs]
        if types[0] != types[1]:  # LiteRT's kernels take operands of one type
            raise ModelError(f"{where}: operands of types {types[0]} and {types[1]}")
        out_type = tensors[op.outputs[0]].type
        if out_type != types[0] and (op.opcode.name, types[0]) not in NARROWING_BINARY:
            # the kernel picks its arithmetic by the output's type and misreads the operands
            raise ModelError(f"{where}: operands of type {types[0]} and an output of {out_type}")
        if types[0] in QUANTIZED_ACTIVATIONS and op.opcode.name in ("ADD", "SUB", "MUL"):
            for t in (*op.inputs, op.outputs[0]):
                quantization = tensors[t].get("quantization")
                scales = None if quantization is None else quantization.get("scale")
                if scales is None or not len(scales) or not scales[0] > 0:
                    # LiteRT divides by the scales to requantize (it aborts on a zero)
                    raise ModelError(
                        f"{where}: {types[0]} tensor {t} ({tensors[t].name!r}) has no "
                        "quantization scale"
                    )
    if op.opcode.name in _BINARY or op.opcode.name in _UNARY:
        shapes = [tuple(tensors[t].get("shape") or ()) for t in op.inputs]
        try:
            shape = _broadcast_shape(shapes)
        except ValueError:
            raise ModelError(
                f"{where}: operand shapes {list(shapes[0])} and {list(shapes[1])} do not broadcast"
            ) from None
        out_shape = tuple(tensors[op.outputs[0]].get("shape") or ())
        if all(shapes) and out_shape != shape:
            raise ModelError(
                f"{where}: output shape {list(out_shape)} is not the operands' {list(shape)}"
            )


def _check_fully_connected_output(op: Table, tensors: list[Table], where: str | _Place) -> None:
    """The output shape is the one LiteRT gives it when it prepares the op: the input's shape
    with the last axis made the weights' rows (keep_num_dims), else [input size / the weights'
    columns, rows]. Rules reason on the stored shape (which axis a MUL's constant runs along)."""
    data, weights, out = (tensors[t] for t in (op.inputs[0], op.inputs[1], op.outputs[0]))
    in_shape, out_shape = list(data.get("shape") or ()), list(out.get("shape") or ())
    weight_shape = list(weights.get("shape") or ())
    if not in_shape or not out_shape or len(weight_shape) != 2 or weight_shape[1] <= 0:
        return
    if any(-1 in list(t.get("shapeSignature") or ()) for t in (data, out)):
        return
    options = op.get("builtinOptions")
    if options is not None and options.get("keepNumDims"):
        expected = [*in_shape[:-1], weight_shape[0]]
    else:
        expected = [math.prod(in_shape) // weight_shape[1], weight_shape[0]]
    if out_shape != expected:
        raise ModelError(
            f"{where}: output shape {out_shape} is not the {expected} LiteRT computes from "
            f"input {in_shape} and weights {weight_shape}"
        )


def _constant_ints(tensor: Table, buffers: list[Table]) -> list[int] | None:
    """A dense INT32/INT64 constant's values, or None (sparse bytes are no dense values: rules
    never read them, Graph.is_constant)."""
    data = buffers[tensor.buffer].data
    if data is None or not len(data) or tensor.type not in ("INT32", "INT64"):
        return None
    if tensor.get("sparsity") is not None:
        return None
    return np.frombuffer(data, "<i4" if tensor.type == "INT32" else "<i8").tolist()


def _check_slice_output(
    op: Table, tensors: list[Table], buffers: list[Table], where: str | _Place
) -> None:
    """With constant operands and static shapes, a STRIDED_SLICE's or SLICE's output shape is the
    one LiteRT computes when it prepares the op (strided_slice_logic: negative indices count
    from the end, then clamp; a shrunk axis is dropped). Rules reason on the stored shape (a
    slice that keeps the channel axis whole); ellipsis, new-axis and offset forms are left to
    runtime."""
    data, out = tensors[op.inputs[0]], tensors[op.outputs[0]]
    in_shape, out_shape = list(data.get("shape") or ()), list(out.get("shape") or ())
    if not in_shape or any(-1 in list(t.get("shapeSignature") or ()) for t in (data, out)):
        return
    operands = [_constant_ints(tensors[t], buffers) for t in op.inputs[1:]]
    if any(v is None or len(v) != len(in_shape) for v in operands):
        return
    if op.opcode.name == "SLICE":
        begin, size = operands
        expected = [d - b if n == -1 else n for d, b, n in zip(in_shape, begin, size)]
        if any(b < 0 or n < 0 or b + n > d for d, b, n in zip(in_shape, begin, expected)):
            raise ModelError(f"{where}: begin {begin} and size {size} lie outside {in_shape}")
    else:
        options = op.get("builtinOptions")
        get = (lambda name: options.get(name, 0) or 0) if options is not None else lambda n: 0
        if get("ellipsisMask") or get("newAxisMask") or get("offset"):
            return
        begin, end, strides = operands
        if 0 in strides:
            raise ModelError(f"{where}: strides {strides} hold 0")
        expected = []
        for axis, (size, b, e, stride) in enumerate(zip(in_shape, begin, end, strides)):
            if get("shrinkAxisMask") >> axis & 1:
                continue  # one element: the axis is dropped
            start = _slice_index(b, size, stride, get("beginMask") >> axis & 1, begin=True)
            stop = _slice_index(e, size, stride, get("endMask") >> axis & 1, begin=False)
            expected.append(max(0, -(-(stop - start) // stride)) if size else 0)
    if out_shape != expected:
        raise ModelError(
            f"{where}: output shape {out_shape} is not the {expected} LiteRT computes from "
            f"input {in_shape} and {[list(v) for v in operands]}"
        )


def _slice_index(index: int, size: int, stride: int, masked: int, begin: bool) -> int:
    """A begin or end index as LiteRT resolves it for an axis of ``size``: a masked one is
    the first (begin) or past the last (end) element in the direction of ``stride``."""
    if masked:
        index = -(2**31) if (stride > 0) == begin else 2**31 - 1
    if index < 0:
        index += size
    return min(max(index, 0), size) if stride > 0 else min(max(index, -1), size - 1)


def _check_spatial_output(op: Table, tensors: list[Table], where: str | _Place) -> None:
    """The output's batch and spatial size are the ones LiteRT computes from the input, the window,
    the strides, dilations and padding (it resizes the output to it when it prepares the op). A
    stored shape that says otherwise contradicts the model, and rules reason on stored shapes
    (the border a SAME padding adds, what a simulation costs). Shapes with dynamic axes
    (a shape signature with -1) are left to runtime."""
    options = op.get("builtinOptions")
    rank, weights_input, axes = SPATIAL_KERNELS[op.opcode.name]
    data, out = tensors[op.inputs[0]], tensors[op.outputs[0]]
    in_shape, out_shape = list(data.get("shape") or ()), list(out.get("shape") or ())
    if options is None or len(in_shape) != rank or len(out_shape) != rank:
        return
    if any(-1 in list(t.get("shapeSignature") or ()) for t in (data, out)):
        return
    if weights_input is None:
        window = [options.filterHeight, options.filterWidth]
        strides, dilations = [options.strideH, options.strideW], [1, 1]
    else:
        weight_shape = list(tensors[op.inputs[weights_input]].get("shape") or ())
        if len(weight_shape) != rank:
            return  # _check_layer_channels says why
        window = [weight_shape[a] for a in axes]
        strides = [options.strideH, options.strideW]
        dilations = [options.dilationHFactor, options.dilationWFactor]
        if rank == 5:
            strides, dilations = [options.strideD, *strides], [options.dilationDFactor, *dilations]
    expected = [in_shape[0], *out_shape[1:]]  # the batch passes through
    for axis, (size, k, stride, dilation) in enumerate(
        zip(in_shape[1:-1], window, strides, dilations), start=1
    ):
        expected[axis] = output_size(options.padding, size, k, stride, dilation)
    if expected != out_shape:
        raise ModelError(
            f"{where}: output shape {out_shape} is not the {expected} LiteRT computes "
            f"from its input {in_shape}"
        )


def _check_layer_channels(op: Table, tensors: list[Table], where: str | _Place) -> None:
    """A layer's output channels are its weights' (and bias') output channels, as LiteRT checks."""
    weight_input, bias_input, axis, rank = LAYER_CHANNELS[op.opcode.name]
    for position in (weight_input, bias_input):
        if position < len(op.inputs) and op.inputs[position] >= 0:
            kind = tensors[op.inputs[position]].type
            if kind in VALUELESS_TYPES:
                # LiteRT reads them as numbers, past their bytes (what lies after them in the
                # file, which re-encoding moves): no answer to keep
                what = "weights" if position == weight_input else "bias"
                raise ModelError(f"{where}: its {what} are of type {kind}, not numbers")
    weight_shape = list(tensors[op.inputs[weight_input]].get("shape") or [])
    out_shape = list(tensors[op.outputs[0]].get("shape") or [])
    if not weight_shape or not out_shape:
        return  # shapes left to runtime
    if len(weight_shape) != rank:
        raise ModelError(f"{where}: weights of shape {weight_shape} are not of rank {rank}")
    channels = weight_shape[axis]
    if out_shape[-1] != channels:
        raise ModelError(
            f"{where}: output shape {out_shape} has {out_shape[-1]} channels, "
            f"weights of shape {weight_shape} have {channels}"
        )
    data_input = 2 if op.opcode.name == "TRANSPOSE_CONV" else 0
    in_shape = list(tensors[op.inputs[data_input]].get("shape") or [])
    if in_shape and not _input_channels_fit(op.opcode.name, in_shape, weight_shape):
        raise ModelError(f"{where}: input shape {in_shape} does not fit weights {weight_shape}")
    if len(op.inputs) > bias_input and op.inputs[bias_input] >= 0:
        bias_shape = list(tensors[op.inputs[bias_input]].get("shape") or [])
        if bias_shape and math.prod(bias_shape) != channels:
            raise ModelError(f"{where}: bias of shape {bias_shape} for {channels} channels")


def _check_transpose(
    op: Table, tensors: list[Table], buffers: list[Table], where: str | _Place
) -> None:
    """The permutation is 1-D, of the input's rank, and (when constant) gives the output shape."""
    perm = tensors[op.inputs[1]]
    perm_shape = list(perm.get("shape") or ())
    in_shape = list(tensors[op.inputs[0]].get("shape") or ())
    rank = len(in_shape)
    if len(perm_shape) != 1 or (rank and perm_shape[0] != rank):
        raise ModelError(f"{where}: a permutation of shape {perm_shape} for rank {rank}")
    values = _constant_ints(perm, buffers)
    if not rank or values is None:
        return
    if sorted(values) != list(range(rank)):
        raise ModelError(f"{where}: {values} is no permutation of {rank} axes")
    out_shape = list(tensors[op.outputs[0]].get("shape") or ())
    if out_shape != [in_shape[axis] for axis in values]:
        raise ModelError(
            f"{where}: output shape {out_shape} is not {in_shape} permuted by {values}"
        )


def _input_channels_fit(kind: str, in_shape: list[int], weight_shape: list[int]) -> bool:
    """The input's channels are what the weights take (a whole number of groups for convs)."""
    if kind == "FULLY_CONNECTED":
        return weight_shape[1] > 0 and math.prod(in_shape) % weight_shape[1] == 0
    if kind == "DEPTHWISE_CONV_2D":
        return in_shape[-1] > 0 and weight_shape[3] % in_shape[-1] == 0
    if kind == "TRANSPOSE_CONV":
        return in_shape[-1] == weight_shape[3]
    # CONV_2D, CONV_3D: at least one group (LiteRT divides by the number of groups)
    return weight_shape[3] > 0 and in_shape[-1] > 0 and in_shape[-1] % weight_shape[3] == 0
