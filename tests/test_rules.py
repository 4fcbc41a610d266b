"""Unit tests of the shared predicates and of rule selection, on tiny graphs built by the chef."""

from __future__ import annotations

import chef
import numpy as np
import pytest

from tfl_fuse import engine, fb, rules
from tfl_fuse.graph import Graph
from tfl_fuse.rules.base import Decline
from tfl_fuse.rules.predicates import affine_of, per_channel_vector, spatial_padding_is_zero


def graph_of(operands, operations, inputs=("x",), outputs=("y",)) -> Graph:
    recipe = {
        "inputs": list(inputs),
        "outputs": list(outputs),
        "operand": operands,
        "operation": operations,
    }
    return Graph(fb.decode(fb.encode(chef.build_model(recipe))), 0)


def binary(kind, const_shape, const_first=False, values=None):
    filler = (
        {"kind": "explicit", "values": values}
        if values is not None
        else {"kind": "uniform", "low": 0.5, "high": 1.5}
    )
    operands = [
        {"name": "x", "shape": [1, 4, 4, 3]},
        {"name": "c", "shape": const_shape, "filler": filler},
        {"name": "y", "shape": [1, 4, 4, 3]},
    ]
    inputs = ["c", "x"] if const_first else ["x", "c"]
    return graph_of(operands, [{"type": kind, "inputs": inputs, "outputs": ["y"]}])


@pytest.mark.parametrize("shape", [[], [1], [3], [1, 3], [1, 1, 3], [1, 1, 1, 3]])
def test_per_channel_shapes_are_accepted(shape):
    graph = binary("MUL", shape)
    vector = per_channel_vector(graph, 1, 3, 4)
    assert vector.shape == (3,) and vector.dtype == np.float64


@pytest.mark.parametrize("shape", [[1, 4, 4, 1], [4, 3], [1, 4, 1, 3], [4, 4, 3]])
def test_other_shapes_are_not_per_channel(shape):
    graph = binary("MUL", shape)
    with pytest.raises(Decline, match="not per-channel"):
        per_channel_vector(graph, 1, 3, 4)


def test_affine_reading_of_each_op():
    values = [1.0, 2.0, 4.0]
    g = binary("SUB", [3], const_first=True, values=values)
    sub_first = affine_of(g, g.ops[0])
    assert np.allclose(sub_first.scale, -1) and np.allclose(sub_first.shift, values)
    g = binary("DIV", [3], values=values)
    div = affine_of(g, g.ops[0])
    assert np.allclose(div.scale, [1, 0.5, 0.25]) and not np.any(div.shift)
    g = binary("DIV", [3], const_first=True, values=values)
    with pytest.raises(Decline, match="not linear"):
        affine_of(g, g.ops[0])
    g = binary("DIV", [3], values=[1.0, 0.0, 2.0])
    with pytest.raises(Decline, match="zero"):
        affine_of(g, g.ops[0])


@pytest.mark.parametrize(
    "kernel, stride, padding, size, expected",
    [
        (1, 1, "SAME", 8, True),
        (3, 1, "SAME", 8, False),
        (3, 1, "VALID", 8, True),
        (1, 2, "SAME", 8, True),
        (2, 2, "SAME", 8, True),
        (2, 2, "SAME", 7, False),
    ],
)
def test_spatial_padding_is_zero(kernel, stride, padding, size, expected):
    out = -(-size // stride) if padding == "SAME" else (size - kernel) // stride + 1
    operands = [
        {"name": "x", "shape": [1, size, size, 2]},
        {"name": "w", "shape": [3, kernel, kernel, 2], "filler": {"kind": "gaussian"}},
        {"name": "b", "shape": [3], "filler": {"kind": "gaussian"}},
        {"name": "y", "shape": [1, out, out, 3]},
    ]
    graph = graph_of(
        operands,
        [
            {
                "type": "CONV_2D",
                "inputs": ["x", "w", "b"],
                "outputs": ["y"],
                "options": {"padding": padding, "stride_w": stride, "stride_h": stride},
            }
        ],
    )
    assert spatial_padding_is_zero(graph, graph.ops[0]) is expected


def test_rule_selection():
    assert [r.name for r in rules.select(None)] == [r.name for r in rules.default_rules()]
    assert [r.name for r in rules.select(["fuse_activation"])] == ["fuse_activation"]
    assert "fuse_activation" not in [r.name for r in rules.select(None, ["fuse_activation"])]
    with pytest.raises(KeyError):
        rules.select(["no_such_rule"])


def test_engine_reaches_a_fixed_point_and_reports_passes():
    g = binary("MUL", [3])
    report = engine.run(g.model, rules.select(None))
    assert report["passes"] >= 1 and report["ops_after"] == {"MUL": 1}


def test_approximate_gamma_rule_is_off_by_default_and_says_what_it_changed(capsys):
    from conftest import RECIPES

    import tfl_fuse
    from tfl_fuse import cli

    assert "make_gamma_positive" not in [r.name for r in rules.default_rules()]
    assert cli.main(["--list-rules"]) == 0
    listed = [
        line
        for line in capsys.readouterr().out.splitlines()
        if line.startswith("make_gamma_positive")
    ]
    assert listed and "approximate; off by default" in listed[0]

    data, _ = chef.cook(RECIPES / "Net_Preactivation_NegGamma_000")
    _, exact = tfl_fuse.optimize(data)
    assert exact["ops_after"].get("MUL", 0) == 1
    chosen = [r.name for r in rules.ALL_RULES]
    with pytest.raises(tfl_fuse.VerificationError) as error:
        tfl_fuse.optimize(data, chosen, verify=True)
    assert error.value.result["max_abs_diff"]["ofm"] > 0
    out, report = tfl_fuse.optimize(data, chosen)
    assert report["ops_after"].get("MUL", 0) == 0
    assert any(
        r.get("approximate") and "1 scale(s) <= 0" in r["detail"] for r in report["rewrites"]
    )
