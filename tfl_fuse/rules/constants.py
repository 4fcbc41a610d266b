"""Constant folding: an op whose inputs are all constants is evaluated once and removed.

Math (DESIGN.md 3.6): the op's output is a function of constants only, so replacing it by
its value computes the same function. This turns a BatchNorm exported as small ops
(``gamma * rsqrt(var + eps)``, ``beta - mean * scale``, reshapes) into plain per-channel
MUL/ADD constants that the other rules fold.

Exact when every input is a float32 constant (shape ops also accept integer constants), the
result is finite and has the output tensor's shape, and the output is not a graph output.
Arithmetic is done in float64 and cast once. The result's shape is computed from the operand
shapes before anything is allocated: a result that would not have the output's shape, or that
would hold more than MAX_FOLD_ELEMENTS values, is declined (a 320 KB model can ask for
[40000, 1] + [1, 40000], 1.6 billion values).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from ..graph import NUMPY_DTYPES, Graph
from ..model import Table
from .base import Context, Decline, Rule
from .predicates import fused_activation, is_quantized

ACTIVATION_FUNCTIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "NONE": lambda v: v,
    "RELU": lambda v: np.maximum(v, 0),
    "RELU6": lambda v: np.clip(v, 0, 6),
    "RELU_N1_TO_1": lambda v: np.clip(v, -1, 1),
    "TANH": np.tanh,
}

ARITHMETIC: dict[str, Callable[..., np.ndarray]] = {
    "ADD": np.add,
    "SUB": np.subtract,
    "MUL": np.multiply,
    "DIV": np.divide,
    "MAXIMUM": np.maximum,
    "MINIMUM": np.minimum,
    "SQUARED_DIFFERENCE": lambda a, b: (a - b) ** 2,
    "RSQRT": lambda a: 1.0 / np.sqrt(a),
    "SQRT": np.sqrt,
    "NEG": np.negative,
    "ABS": np.abs,
    "SQUARE": np.square,
    "EXP": np.exp,
    "LOG": np.log,
}
SHAPE_OPS = {"RESHAPE", "SQUEEZE", "EXPAND_DIMS", "TRANSPOSE"}
MAX_FOLD_ELEMENTS = 1 << 25  # 32 Mi values: 256 MB in float64 while folding


def result_shape(graph: Graph, inputs: list[int], out_shape: list[int]) -> list[int]:
    """The broadcast shape of an elementwise op's operands, checked before any allocation."""
    try:
        shape = list(np.broadcast_shapes(*(tuple(graph.shape(t)) for t in inputs)))
    except ValueError:
        shapes = " and ".join(str(graph.shape(t)) for t in inputs)
        raise Decline(f"operand shapes {shapes} do not broadcast together") from None
    size = math.prod(shape)
    if size > MAX_FOLD_ELEMENTS:
        raise Decline(
            f"the result would hold {size} values, above the {MAX_FOLD_ELEMENTS} folded at most"
        )
    if shape != out_shape and size != math.prod(out_shape):
        raise Decline(f"result shape {shape} differs from {out_shape}")
    return shape


def evaluate(graph: Graph, op: Table) -> np.ndarray:
    kind = op.opcode.name
    inputs = [t for t in op.inputs if t >= 0]
    out = op.outputs[0]
    out_shape = graph.shape(out)
    if kind in ARITHMETIC:
        for t in inputs + [out]:
            if graph.dtype(t) != "FLOAT32":
                raise Decline(
                    f"{graph.name(t)!r} is {graph.dtype(t)}; constant arithmetic is folded for float32 only"
                )
        result_shape(graph, inputs, out_shape)
        values = [graph.constant(t).astype(np.float64) for t in inputs]
        with np.errstate(all="ignore"):
            result = ARITHMETIC[kind](*values)
            activation = fused_activation(op)
            if activation not in ACTIVATION_FUNCTIONS:
                raise Decline(f"fused {activation} is not evaluated")
            result = ACTIVATION_FUNCTIONS[activation](result)
    elif kind in SHAPE_OPS:
        data = op.inputs[0]
        if is_quantized(graph, data) or graph.dtype(data) != graph.dtype(out):
            raise Decline("quantized or type-changing shape op")
        value = graph.constant(data)
        if kind == "TRANSPOSE":
            permutation = graph.constant(op.inputs[1]).astype(np.int64).reshape(-1)
            if sorted(permutation.tolist()) != list(range(value.ndim)):
                raise Decline(f"{permutation.tolist()} is no permutation of {value.ndim} axes")
            result = np.transpose(value, permutation)
        elif value.size != math.prod(out_shape):
            raise Decline(f"{value.size} values cannot take the output shape {out_shape}")
        else:
            result = value.reshape(out_shape)
    else:
        raise Decline(f"{kind} is not evaluated")
    result = np.asarray(result)
    if list(result.shape) != out_shape:
        if result.size == int(np.prod(out_shape)) and kind in ARITHMETIC:
            result = result.reshape(out_shape)
        else:
            raise Decline(f"result shape {list(result.shape)} differs from {out_shape}")
    if result.dtype.kind in "fc" and not np.all(np.isfinite(result)):
        raise Decline("the result would not be finite")
    return result.astype(NUMPY_DTYPES[graph.dtype(out)])


class FoldConstants(Rule):
    name = "fold_constants"
    summary = (
        "ops whose inputs are all constants (decomposed BN arithmetic, reshapes) are evaluated once"
    )

    def apply(self, graph: Graph, ctx: Context) -> int:
        count = 0
        for op in graph.live_ops(*ARITHMETIC, *SHAPE_OPS):
            if len(op.outputs) != 1:
                continue
            inputs = [t for t in op.inputs if t >= 0]
            if not inputs or not all(graph.is_constant(t) for t in inputs):
                continue
            out = op.outputs[0]
            try:
                if graph.is_graph_output(out):
                    raise Decline(f"{graph.name(out)!r} is a graph output")
                reason = ctx.excluded(graph, op)
                if reason:
                    raise Decline(reason)
                value = evaluate(graph, op)
            except Decline as decline:
                self.declined(graph, ctx, op, f"not evaluated: {decline}")
                continue
            tensor = graph.tensors[out]
            tensor.buffer = graph.model.add_buffer(value)
            graph.remove_op(op)
            self.rewrote(
                graph,
                ctx,
                self.labels(graph, [op]),
                f"{op.opcode.name} of constants replaced by its value",
            )
            count += 1
        return count
