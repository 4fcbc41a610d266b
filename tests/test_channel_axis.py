"""Unit tests of "where the channel axis is" (DESIGN.md 11): per-axis constants and the ops a
per-channel op may cross (rules/predicates.py channel_axis_through / channel_axis_after)."""

from __future__ import annotations

import pytest
from test_rules import graph_of

from tfl_fuse.rules.base import Decline
from tfl_fuse.rules.predicates import (
    affine_of,
    channel_axis_after,
    channel_axis_through,
    per_axis_vector,
)


def one_op(kind, in_shape, out_shape, constants=(), options=None, signature=None):
    """x -> kind(x, *constants) -> y; constants are (shape, values) of int32 tensors."""
    operands = [{"name": "x", "shape": in_shape}, {"name": "y", "shape": out_shape}]
    names = []
    for i, (shape, values) in enumerate(constants):
        names.append(f"c{i}")
        operands.append(
            {
                "name": f"c{i}",
                "shape": shape,
                "type": "int32",
                "filler": {"kind": "explicit", "values": values},
            }
        )
    operation = {"type": kind, "inputs": ["x", *names], "outputs": ["y"]}
    if options:
        operation["options"] = options
    graph = graph_of(operands, [operation])
    if signature is not None:
        for tensor in graph.tensors:
            tensor.shapeSignature = [
                -1 if i in signature else d for i, d in enumerate(tensor.shape)
            ]
    return graph, graph.ops_of_type(kind)[0]


def test_transpose_maps_axes_by_its_permutation():
    graph, op = one_op("TRANSPOSE", [1, 8, 8, 4], [1, 4, 8, 8], [([4], [0, 3, 1, 2])])
    assert channel_axis_through(graph, op, 1) == 3  # NCHW channel <- NHWC last axis
    assert channel_axis_after(graph, op, 3) == 1


@pytest.mark.parametrize(
    "in_shape, out_shape, axis, expected",
    [
        ([1, 8, 1, 16], [1, 8, 16], 1, 1),  # squeeze a unit axis: the channel stays
        ([1, 8, 16], [1, 8, 1, 16], 1, 1),
        ([1, 4, 4, 6], [1, 16, 6], 2, 3),  # H and W merge: the channel stays
        ([1, 4, 4, 6], [1, 4, 8, 3], 3, None),  # mixes the channel axis
        ([1, 4, 4, 6], [1, 96], 1, None),  # flattens it
    ],
)
def test_reshape_keeps_an_axis_only_when_other_axes_split_or_merge(
    in_shape, out_shape, axis, expected
):
    graph, op = one_op("RESHAPE", in_shape, out_shape, [([len(out_shape)], out_shape)])
    assert channel_axis_through(graph, op, axis) == expected


def test_reshape_with_a_run_time_batch():
    graph, op = one_op("RESHAPE", [1, 8, 1, 16], [1, 8, 16], [([3], [-1, 8, 16])], signature={0})
    assert channel_axis_through(graph, op, 1) == 1
    assert channel_axis_through(graph, op, 0) is None


@pytest.mark.parametrize(
    "begin, end, strides, out_shape, axis, expected",
    [
        ([0, 1, 1, 0], [1, 9, 9, 6], [1, 1, 1, 1], [1, 8, 8, 6], 3, 3),  # spatial crop
        ([0, 0, 0, 1], [1, 9, 9, 5], [1, 1, 1, 1], [1, 9, 9, 4], 3, None),  # channel slice
        ([0, 0, 0, 5], [1, 9, 9, -7], [1, 1, 1, -1], [1, 9, 9, 6], 3, None),  # channels reversed
    ],
)
def test_strided_slice(begin, end, strides, out_shape, axis, expected):
    graph, op = one_op(
        "STRIDED_SLICE",
        [1, 9, 9, 6],
        out_shape,
        [([4], begin), ([4], end), ([4], strides)],
    )
    assert channel_axis_through(graph, op, axis) == expected


def test_pad_and_gather_keep_other_axes():
    graph, pad = one_op("PAD", [1, 4, 4, 3], [1, 6, 6, 3], [([4, 2], [0, 0, 1, 1, 1, 1, 0, 0])])
    assert channel_axis_through(graph, pad, 3) == 3
    graph, pad = one_op("PAD", [1, 4, 4, 3], [1, 4, 4, 5], [([4, 2], [0, 0, 0, 0, 0, 0, 1, 1])])
    assert channel_axis_through(graph, pad, 3) is None
    graph, gather = one_op("GATHER", [1, 4, 4, 3], [1, 2, 4, 3], [([2], [0, 3])], {"axis": 1})
    assert channel_axis_through(graph, gather, 3) == 3
    graph, gather = one_op("GATHER", [1, 4, 4, 3], [1, 4, 4, 2], [([2], [0, 2])], {"axis": 3})
    assert channel_axis_through(graph, gather, 3) is None


@pytest.mark.parametrize(
    "shape, axis", [([1, 4, 1, 1], 1), ([4, 1, 1], 1), ([1, 4, 1], None), ([4], 3), ([1], None)]
)
def test_per_axis_constants(shape, axis):
    values = list(range(1, 5)) if 4 in shape else [2.0]
    operands = [
        {"name": "x", "shape": [1, 4, 6, 4]},
        {"name": "c", "shape": shape, "filler": {"kind": "explicit", "values": values}},
        {"name": "y", "shape": [1, 4, 6, 4]},
    ]
    graph = graph_of(operands, [{"type": "MUL", "inputs": ["x", "c"], "outputs": ["y"]}])
    c = graph.ops_of_type("MUL")[0].inputs[1]
    if shape == [1, 4, 1]:  # axis 2 of [1, 4, 6, 4] has 6 entries, not 4
        with pytest.raises(Decline):
            per_axis_vector(graph, c, [1, 4, 6, 4])
        return
    vector, found = per_axis_vector(graph, c, [1, 4, 6, 4])
    assert found == axis and len(vector) == 4
    mul = graph.ops_of_type("MUL")[0]
    if axis not in (3, None):  # the default reading wants the last axis
        with pytest.raises(Decline):
            affine_of(graph, mul)
    assert affine_of(graph, mul, any_axis=True).axis == axis
