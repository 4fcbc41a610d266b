"""--target int8 normalizations: the output goes through ai-edge-quantizer (static int8) and runs.

Each normalization is checked twice: the model tfl_fuse writes is quantized by
ai-edge-quantizer 0.10 (``recipe.static_wi8_ai8()``, a few random calibration samples) and the
quantized model runs in LiteRT close to the float one; and the same model left untouched does
not go through, so these tests fail if the normalization stops doing its job.
"""

from __future__ import annotations

import os
import subprocess
import sys

import chef
import flatbuffers
import numpy as np
import pytest
import valuetest
from conftest import RECIPES, ROOT

import tfl_fuse
from tfl_fuse import formats, verify
from tfl_fuse.rules.normalize import signature_name

quantizer = pytest.importorskip("ai_edge_quantizer.quantizer")
quant_recipe = pytest.importorskip("ai_edge_quantizer.recipe")
schema = pytest.importorskip("ai_edge_litert.schema_py_generated")
Circle = __import__("circle_schema.v0_10.circle.Model", fromlist=["ModelT"])

SIGNATURE = "serving_default"


# helpers -------------------------------------------------------------------------------------
def with_old_opcodes(data: bytes, fmt: str = "tflite") -> bytes:
    """The model as older writers stored it: the op only in deprecated_builtin_code."""
    model_class = schema.ModelT if fmt == "tflite" else Circle.ModelT
    model = model_class.InitFromPackedBuf(data, 0)
    for code in model.operatorCodes:
        assert 0 <= code.deprecatedBuiltinCode < formats.PLACEHOLDER_FOR_GREATER_OP_CODES
        code.builtinCode = 0
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3" if fmt == "tflite" else b"CIR0")
    return bytes(builder.Output())


def opcode_fields(data: bytes) -> list[tuple[int, int]]:
    model = schema.ModelT.InitFromPackedBuf(data, 0)
    return [(c.deprecatedBuiltinCode, c.builtinCode) for c in model.operatorCodes]


def samples(model: bytes, count: int = 3) -> list[dict[str, np.ndarray]]:
    runner = verify.interpreter(model).get_signature_runner(SIGNATURE)
    rng = np.random.default_rng(0)
    return [
        {
            name: rng.normal(size=detail["shape"]).astype(detail["dtype"])
            for name, detail in runner.get_input_details().items()
        }
        for _ in range(count)
    ]


def quantize_static_int8(model: bytes, calibration: list[dict[str, np.ndarray]]) -> bytes:
    q = quantizer.Quantizer(bytearray(model), quant_recipe.static_wi8_ai8())
    result = q.calibrate({SIGNATURE: calibration})
    return bytes(q.quantize(result, enable_progress_report=False).quantized_model)


def run_signature(model: bytes, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run the signature; int8 inputs and outputs are (de)quantized with their parameters."""
    interpreter = verify.interpreter(model)
    runner = interpreter.get_signature_runner(SIGNATURE)
    fed = {}
    for name, detail in runner.get_input_details().items():
        value = inputs[name]
        if detail["dtype"] != np.float32:
            scale, zero = detail["quantization"]
            info = np.iinfo(detail["dtype"])
            value = np.clip(np.round(value / scale) + zero, info.min, info.max)
        fed[name] = value.astype(detail["dtype"])
    out = runner(**fed)
    results = {}
    for name, detail in runner.get_output_details().items():
        value = out[name]
        if detail["dtype"] != np.float32:
            scale, zero = detail["quantization"]
            value = (value.astype(np.float32) - zero) * scale
        results[name] = value
    return results


def assert_quantizes_and_runs(model: bytes) -> None:
    """Static int8 quantization goes through; the int8 model is close to the float one."""
    calibration = samples(model)
    quantized = quantize_static_int8(model, calibration)
    expected = run_signature(model, calibration[0])
    got = run_signature(quantized, calibration[0])
    assert set(got) == set(expected)
    for name, value in expected.items():
        spread = float(np.max(value) - np.min(value))
        error = float(np.max(np.abs(got[name] - value)))
        # a handful of int8 steps of the output's range: far below what a wrong op would give
        assert error <= 0.05 * spread, f"{name}: int8 error {error} vs range {spread}"


def assert_does_not_quantize(model: bytes) -> None:
    """ai-edge-quantizer refuses the model, or writes one LiteRT cannot prepare."""
    with pytest.raises((ValueError, RuntimeError)):
        quantized = quantize_static_int8(model, samples_without_signature(model))
        run_signature(quantized, samples_without_signature(model)[0])


def samples_without_signature(model: bytes) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    details = verify.interpreter(model).get_input_details()
    names = [signature_name(d["name"]) or d["name"] for d in details]
    return [
        {n: rng.normal(size=d["shape"]).astype(d["dtype"]) for n, d in zip(names, details)}
        for _ in range(3)
    ]


def int8(data: bytes, rules: list[str] | None = None) -> tuple[bytes, dict]:
    return tfl_fuse.optimize(data, rules, target="int8")


# float16 weights -----------------------------------------------------------------------------
def test_float16_weights_become_float32_and_quantize(build_dir):
    data, _ = chef.cook(RECIPES / "Net_Conv_Float16_Weights_Int8_000")
    out, report = int8(data)
    assert report["ops_after"] == {"CONV_2D": 1}
    (entry,) = [e for e in report["rewrites"] if e["rule"] == "dequantize_float16_weights"]
    assert entry["tensors"] == ["ker"] and entry["ops"] == ["1 x DEQUANTIZE"]
    ok, lines = valuetest.run_value_test("float16_int8", data, out, build_dir / "normalize")
    assert ok, "\n".join(lines)
    assert_quantizes_and_runs(out)


def test_float16_values_are_kept_exactly():
    """Only the DEQUANTIZE goes: outputs equal the original's bit for bit (no rounding step)."""
    data, _ = chef.cook(RECIPES / "Net_Conv_Float16_Weights_Int8_000")
    out, report = int8(data, ["dequantize_float16_weights"])
    assert report["ops_after"] == {"CONV_2D": 1, "MUL": 1}
    for inputs in samples(data):
        expected, got = run_signature(data, inputs), run_signature(out, inputs)
        assert all(np.array_equal(expected[k], got[k]) for k in expected)


def test_float16_weights_are_kept_under_the_float_target():
    # the float target folds float16 weights and stores them as float16 again (float16.py)
    data, _ = chef.cook(RECIPES / "Net_Conv_Float16_Weights_000")
    _, report = tfl_fuse.optimize(data)
    assert report["ops_after"]["DEQUANTIZE"] == 2  # the folded weights and bias
    assert report["float16_constants_rewritten"] == 2
    assert "dequantize_float16_weights" not in report["rules"]


# signature -----------------------------------------------------------------------------------
def test_signature_is_added_and_quantizes():
    data, _ = chef.cook(RECIPES / "Net_No_Signature_000")
    assert verify.interpreter(data).get_signature_list() == {}
    out, report = int8(data)
    assert verify.interpreter(out).get_signature_list() == {
        SIGNATURE: {"inputs": ["ifm"], "outputs": ["ofm"]}
    }
    assert [e["rule"] for e in report["rewrites"]].count("add_signature_def") == 1
    assert_quantizes_and_runs(out)


def test_model_without_signature_does_not_quantize():
    data, _ = chef.cook(RECIPES / "Net_No_Signature_000")
    assert_does_not_quantize(data)


def test_existing_signature_is_kept():
    data, _ = chef.cook(RECIPES / "Net_Conv_Mul_000")
    out, report = int8(data, ["add_signature_def"])
    assert not report["rewrites"]
    assert (
        verify.interpreter(out).get_signature_list()
        == verify.interpreter(data).get_signature_list()
    )


def test_signature_is_not_added_under_the_float_target():
    data, _ = chef.cook(RECIPES / "Net_No_Signature_000")
    out, _ = tfl_fuse.optimize(data)
    assert verify.interpreter(out).get_signature_list() == {}


@pytest.mark.parametrize(
    ("tensor", "name"),
    [
        ("serving_default_image:0", "image"),  # what TF's converter writes for a Keras input
        ("input", "input"),
        ("conv/BiasAdd;dense:1", "conv_BiasAdd_dense"),
        ("StatefulPartitionedCall:0", ""),  # converter-internal: the fallback name is used
        ("Identity_2", ""),
        ("0abc", ""),
        ("", ""),
    ],
)
def test_signature_names_from_tensor_names(tensor, name):
    assert signature_name(tensor) == name


def test_signature_names_are_unique_and_fall_back():
    recipe = chef.load_recipe(RECIPES / "Net_Two_Outputs_000")
    recipe["signature"] = False
    model = chef.build_model(recipe)
    sg = model.subgraphs[0]
    sg.tensors[sg.inputs[0]].name = "serving_default_x:0"
    sg.tensors[sg.outputs[0]].name = "x:0"
    sg.tensors[sg.outputs[1]].name = "StatefulPartitionedCall:1"
    data = bytes(tfl_fuse.fb.encode(model))
    out, _ = int8(data, ["add_signature_def"])
    assert verify.interpreter(out).get_signature_list() == {
        SIGNATURE: {"inputs": ["x"], "outputs": ["output_1", "x_1"]}
    }


# operator codes ------------------------------------------------------------------------------
def test_old_opcodes_are_written_consistently_and_quantize(build_dir):
    data, _ = chef.cook(RECIPES / "Net_Conv_Mul_000")
    old = with_old_opcodes(data)
    assert sorted(opcode_fields(old)) == [(3, 0), (18, 0)]
    out, report = tfl_fuse.optimize(old, [])  # any target, any rules: the writer normalizes
    assert sorted(opcode_fields(out)) == [(3, 3), (18, 18)]
    assert len(report["normalized"]) == 2 and "CONV_2D" in report["normalized"][0]
    ok, lines = valuetest.run_value_test("old_opcodes", old, out, build_dir / "normalize")
    assert ok, "\n".join(lines)
    assert_quantizes_and_runs(out)


def test_model_with_old_opcodes_does_not_quantize():
    data, _ = chef.cook(RECIPES / "Net_Conv_Mul_000")
    assert_does_not_quantize(with_old_opcodes(data))


def test_consistent_opcodes_are_not_reported():
    data, _ = chef.cook(RECIPES / "Net_Conv_Mul_000")
    out, report = tfl_fuse.optimize(data, [])
    assert report["normalized"] == []
    assert opcode_fields(out) == opcode_fields(data)


def test_old_circle_opcodes_are_written_consistently():
    data, _ = chef.cook(RECIPES / "Net_Circle_Conv_BN_000")
    out, report = tfl_fuse.optimize(with_old_opcodes(data, "circle"), [])
    model = Circle.ModelT.InitFromPackedBuf(out, 0)
    fields = [(c.deprecatedBuiltinCode, c.builtinCode) for c in model.operatorCodes]
    assert fields and all(d == b for d, b in fields) and any(b > 0 for _, b in fields)
    assert report["normalized"]


def test_circle_negative_and_large_codes():
    circle = formats.CIRCLE
    code = circle.enum("BuiltinOperator")["BCQ_GATHER"]
    assert code < 0
    assert circle.op_codes("BCQ_GATHER") == (code, code)
    assert circle.op_name(code, 0) == circle.op_name(code, code) == "BCQ_GATHER"
    big = formats.TFLITE.enum("BuiltinOperator")["STABLEHLO_ADD"]
    assert formats.TFLITE.op_codes("STABLEHLO_ADD") == (127, big)


def test_cli_verbose_names_the_normalization(tmp_path):
    data, _ = chef.cook(RECIPES / "Net_Conv_Mul_000")
    src, dst = tmp_path / "old.tflite", tmp_path / "out.tflite"
    src.write_bytes(with_old_opcodes(data))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "tfl_fuse", str(src), str(dst), "--target", "int8", "-v"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "normalized operator code CONV_2D: deprecated_builtin_code/builtin_code 3/0" in (
        result.stderr
    )
