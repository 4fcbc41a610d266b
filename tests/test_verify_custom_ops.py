"""--verify on models with custom ops LiteRT cannot run: compared around them, or one clear line."""

from __future__ import annotations

import chef
import numpy as np
from conftest import RECIPES

import tfl_fuse
from tfl_fuse import cli, fb, verify
from tfl_fuse.graph import Graph

RECIPE = RECIPES / "Net_Custom_Op_BN_000"


def _custom_model(shape_of_output=None) -> bytes:
    recipe = chef.load_recipe(RECIPE)
    if shape_of_output is not None:
        for operand in recipe["operand"]:
            if operand["name"] == "ofm":
                operand["shape"] = shape_of_output
    return fb.encode(chef.build_model(recipe))


def test_verify_compares_around_a_custom_op(tmp_path, capsys):
    src = tmp_path / "in.tflite"
    src.write_bytes(_custom_model())
    assert cli.main([str(src), str(tmp_path / "out.tflite"), "--verify"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "compared around custom op(s) TflFuseTestOp" in err[0]


def test_verify_around_a_custom_op_still_sees_a_wrong_model():
    data = _custom_model()
    out, report = tfl_fuse.optimize(data)
    model = fb.decode(out)
    graph = Graph(model, 0)
    conv = graph.ops_of_type("CONV_2D")[0]
    bias = graph.constant(conv.inputs[2])
    graph.set_constant(conv, 2, bias + np.float32(0.5))  # a wrong fold
    result = verify.compare_models(data, fb.encode(model))
    assert not result["match"] and "around custom op" in result["summary"]
    assert verify.compare_models(data, out)["match"]


def test_verify_says_in_one_line_when_a_custom_op_cannot_be_cut_out(tmp_path, capsys):
    src = tmp_path / "in.tflite"
    src.write_bytes(_custom_model(shape_of_output=[]))  # no static shape to feed instead
    dst = tmp_path / "out.tflite"
    assert cli.main([str(src), str(dst), "--verify"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "LiteRT cannot run custom op 'TflFuseTestOp'" in err[0]
    assert not dst.exists()
