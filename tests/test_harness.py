"""The harness itself: it can fail, the chef names bad keys, h5compare behaves like h5diff -d."""

from __future__ import annotations

import chef
import h5compare
import numpy as np
import pytest
import valuetest
from conftest import RECIPES, recipe_dirs

import tfl_fuse
from tfl_fuse import fb
from tfl_fuse.graph import Graph


def test_enough_recipes_exist():
    assert len(recipe_dirs()) >= 10


def test_a_perturbed_weight_makes_the_value_test_fail(tmp_path):
    data, _ = chef.cook(RECIPES / "Net_Conv_Add_Mul_000")
    out, _ = tfl_fuse.optimize(data)
    model = fb.decode(out)
    graph = Graph(model, 0)
    conv = graph.ops_of_type("CONV_2D")[0]
    weights = graph.constant(conv.inputs[1]).copy()
    weights.flat[3] += 0.05
    graph.set_constant(conv, 1, weights)
    broken = bytes(fb.encode(model))
    ok, lines = valuetest.run_value_test("perturbed", data, broken, tmp_path)
    assert not ok
    assert any(line.startswith("[normal] DIFF") for line in lines)
    assert (
        h5compare.main(
            [str(tmp_path / "perturbed.expected.h5"), str(tmp_path / "perturbed.opt.h5")]
        )
        == 1
    )
    assert {p.name for p in tmp_path.iterdir()} >= {
        "perturbed.input.h5",
        "perturbed.expected.h5",
        "perturbed.opt.h5",
    }


def test_h5_dump_layout_and_compare(tmp_path):
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    h5compare.write_dump(
        a, ["out", "idx"], [np.array([1.0, 2.0, 3.0], np.float32), np.array([1, 2], np.int32)]
    )
    h5compare.write_dump(
        b, ["out", "idx"], [np.array([1.0, 2.0, 3.00001], np.float32), np.array([1, 2], np.int32)]
    )
    names, values = h5compare.read_dump(a)
    assert names == ["out", "idx"] and values[1].dtype == np.int32
    import h5py

    with h5py.File(a) as f:
        assert set(f.keys()) == {"name", "value"} and set(f["value"].keys()) == {"0", "1"}
    assert h5compare.main([str(a), str(b)]) == 0
    h5compare.write_dump(
        b, ["out", "idx"], [np.array([1.0, 2.0, 3.0], np.float32), np.array([1, 3], np.int32)]
    )
    assert h5compare.main([str(a), str(b)]) == 1  # integers compare exactly
    assert h5compare.main([str(a), str(tmp_path / "missing.h5")]) == 2


def test_chef_is_deterministic():
    for recipe in recipe_dirs()[:5]:
        assert chef.cook(recipe)[0] == chef.cook(recipe)[0]


@pytest.mark.parametrize(
    "text, message",
    [
        (
            'inputs = ["x"]\noutputs = ["y"]\noperand = [ { name = "x", shape = [1] } ]\noperation = [ { type = "RELU", inputs = ["x"], outputs = ["nope"] } ]',
            "operation[0].outputs: unknown operand 'nope'",
        ),
        (
            'inputs = ["x"]\noutputs = ["x"]\noperand = [ { name = "x", type = "float33" } ]',
            "operand[0].type",
        ),
        (
            'inputs = ["x"]\noutputs = ["x"]\noperand = [ { name = "x", shape = [2], filler = { kind = "explicit", values = [1] } } ]',
            "operand[0].filler.values",
        ),
        (
            'inputs = ["x"]\noutputs = ["x"]\noperand = [ { name = "x" } ]\noperation = [ { type = "NOT_AN_OP" } ]',
            "operation[0].type",
        ),
        ('inputs = ["x"]\noutputs = = 3\n', "line 2"),
        (
            'inputs = ["x"]\noutputs = ["x"]\noperand = [ { name = "x" } ]\n[expect]\nfird = ["a"]',
            "expect.fird: unknown key (known in expect: atol_scale, declined, equalize, exclude,",
        ),
        (
            'inputs = ["x"]\noperand = [ { name = "x" } ]\n[expect]\nfired = []\noutputs = ["x"]',
            "expect.outputs: a top-level key written after [expect]",
        ),
        (
            'inputs = ["x"]\noutputs = ["x"]\nformt = "tflite"\noperand = [ { name = "x" } ]',
            "recipe.formt: unknown key",
        ),
        (
            'inputs = ["x"]\noutputs = ["x"]\noperand = [ { name = "x", filler = { knd = "constant" } } ]',
            "operand[0].filler.knd: unknown key",
        ),
        (
            'inputs = ["x"]\noutputs = ["x"]\noperand = [ { name = "x" } ]\n[[expect.declined]]\nrule = "a"\nreson = "b"',
            "expect.declined[0].reson: unknown key",
        ),
    ],
)
def test_chef_errors_name_the_key(tmp_path, text, message, capsys):
    (tmp_path / "recipe.toml").write_text(text)
    assert chef.main([str(tmp_path), "-o", str(tmp_path / "m.tflite")]) == 1
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert str(tmp_path / "recipe.toml") in err  # the recipe's path
