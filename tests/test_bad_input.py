"""Bad input: one clear line on stderr, exit 1, no traceback, OUT neither created nor touched."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import chef
import numpy as np
import pytest
from ai_edge_litert.tools import flatbuffer_utils
from conftest import RECIPES, conv_mul_recipe

import tfl_fuse
from tfl_fuse import cli, fb
from tfl_fuse.model import ModelError

GOOD_RECIPE = RECIPES / "Net_Conv_Add_Mul_000"


@pytest.fixture(scope="module")
def good_model() -> bytes:
    return chef.cook(GOOD_RECIPE)[0]


def corrupt(data: bytes, change) -> bytes:
    model = flatbuffer_utils.read_model_from_bytearray(bytearray(data))
    change(model)
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def run_cli(capsys, args):
    code = cli.main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.err


def assert_refused(
    capsys, tmp_path, data: bytes | None, expect: str, existing: bytes | None = None
):
    src = tmp_path / "in.tflite"
    if data is not None:
        src.write_bytes(data)
    dst = tmp_path / "out.tflite"
    if existing is not None:
        dst.write_bytes(existing)
    code, err = run_cli(capsys, [src, dst])
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("tfl-fuse: error:") and expect in lines[0], lines[0]
    if existing is None:
        assert not dst.exists()
    else:
        assert dst.read_bytes() == existing
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left


def test_empty_file(capsys, tmp_path):
    assert_refused(capsys, tmp_path, b"", "too short")


@pytest.mark.parametrize("fraction", [0.02, 0.1, 0.3, 0.5, 0.8, 0.95])
def test_truncated_file(capsys, tmp_path, good_model, fraction):
    cut = max(8, int(len(good_model) * fraction))
    assert_refused(
        capsys,
        tmp_path,
        good_model[:cut],
        "truncated or not a tflite flatbuffer",
        existing=b"keep me",
    )


@pytest.mark.parametrize("seed", range(5))
def test_random_bytes(capsys, tmp_path, seed):
    data = np.random.default_rng(seed).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    assert_refused(capsys, tmp_path, data, "not a TFLite or circle model")


@pytest.mark.parametrize("seed", range(5))
def test_random_bytes_with_a_valid_identifier(capsys, tmp_path, seed):
    data = bytearray(np.random.default_rng(seed).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    data[4:8] = b"TFL3"
    data[0:4] = (64).to_bytes(4, "little")
    assert_refused(capsys, tmp_path, bytes(data), "tfl-fuse: error")


def test_wrong_identifier(capsys, tmp_path, good_model):
    assert_refused(
        capsys, tmp_path, good_model[:4] + b"ABCD" + good_model[8:], "file identifier b'ABCD'"
    )


def _set_tensor_buffer(m):
    m.subgraphs[0].tensors[1].buffer = 999


def _set_op_input(m):
    m.subgraphs[0].operators[0].inputs[0] = 999


def _set_opcode(m):
    m.subgraphs[0].operators[0].opcodeIndex = 57


def _set_graph_output(m):
    m.subgraphs[0].outputs = [77]


def _make_cycle(m):
    ops = m.subgraphs[0].operators
    ops[0].inputs[0] = ops[-1].outputs[0]


@pytest.mark.parametrize(
    "change, expect",
    [
        (_set_tensor_buffer, "buffer index is 999"),
        (_set_op_input, "input tensor index is 999"),
        (_set_opcode, "opcode index 57"),
        (_set_graph_output, "output tensor index is 77"),
        (_make_cycle, "cycle"),
    ],
    ids=["buffer", "tensor", "opcode", "graph-output", "cycle"],
)
def test_out_of_range_indices_and_cycles(capsys, tmp_path, good_model, change, expect):
    assert_refused(capsys, tmp_path, corrupt(good_model, change), expect)


def test_out_of_range_subgraph_index(capsys, tmp_path):
    import kerasmodels
    from test_roundtrip import multi_subgraph_model

    data = kerasmodels.cached("cond_while.tflite", multi_subgraph_model).read_bytes()

    def change(m):
        for op in m.subgraphs[0].operators:
            options = op.builtinOptions
            if options is not None and hasattr(options, "bodySubgraphIndex"):
                options.bodySubgraphIndex = 42
                return
            if options is not None and hasattr(options, "thenSubgraphIndex"):
                options.thenSubgraphIndex = 42
                return
        raise AssertionError("no control-flow op")

    assert_refused(capsys, tmp_path, corrupt(data, change), "SubgraphIndex is 42")


def test_missing_input_path(capsys, tmp_path):
    assert_refused(capsys, tmp_path, None, "cannot read")


def test_input_is_a_directory_needs_a_folder_output(capsys, tmp_path):
    folder = tmp_path / "models"
    folder.mkdir()
    out = tmp_path / "out.tflite"
    out.write_bytes(b"a file")
    code, err = run_cli(capsys, [folder, out])
    assert code == 1 and "must be a folder" in err and len(err.strip().splitlines()) == 1


def test_unwritable_output_folder(capsys, tmp_path, good_model):
    src = tmp_path / "in.tflite"
    src.write_bytes(good_model)
    blocker = tmp_path / "file"
    blocker.write_bytes(b"x")
    for dst in (tmp_path / "missing" / "out.tflite", blocker / "out.tflite"):
        code, err = run_cli(capsys, [src, dst])
        assert code == 1 and "cannot write" in err and len(err.strip().splitlines()) == 1
        assert not dst.exists()


def test_usage_errors_exit_2(capsys, tmp_path, good_model):
    src = tmp_path / "in.tflite"
    src.write_bytes(good_model)
    for args in (
        [src, tmp_path / "o.tflite", "--rules", "no_such_rule"],
        [src],
        ["--exclude", "(", src, src],
    ):
        with pytest.raises(SystemExit) as exit_info:
            cli.main([str(a) for a in args])
        assert exit_info.value.code == 2
    capsys.readouterr()


def test_real_process_prints_no_traceback(tmp_path):
    src = tmp_path / "in.tflite"
    src.write_bytes(b"TFL3" * 3)
    result = subprocess.run(
        [sys.executable, "-m", "tfl_fuse", str(src), str(tmp_path / "out.tflite")],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out.tflite").exists()


def test_in_and_out_may_be_the_same_path(capsys, tmp_path, good_model):
    path = tmp_path / "model.tflite"
    path.write_bytes(good_model)
    code, _ = run_cli(capsys, [path, path])
    assert code == 0 and path.read_bytes() != good_model
    assert Path(path).stat().st_size > 0


@pytest.mark.parametrize(
    "recipe",
    [
        "Net_Preactivation_Residual_MaxPool_000",
        "Net_Decomposed_BN_000",
        "Net_Concat_BN_Relu_Conv_000",
    ],
)
def test_corrupted_bytes_never_crash(capsys, tmp_path, recipe):
    """Seeded byte flips in valid models: each run ends in 0 or a one-line error, never a crash."""
    import random

    data, _ = chef.cook(RECIPES / recipe)
    rng = random.Random(recipe)
    src, dst = tmp_path / "in.tflite", tmp_path / "out.tflite"
    outcomes = {0: 0, 1: 0}
    for _ in range(150):
        corrupted = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            corrupted[rng.randrange(8, len(corrupted))] = rng.randrange(256)
        src.write_bytes(corrupted)
        code, err = run_cli(capsys, [src, dst, "-q"])
        outcomes[code] += 1
        if code:
            assert len(err.strip().splitlines()) == 1 and "internal error" not in err, err
    assert outcomes[1] > 0


# Structural validation: every inconsistency the fuzzer found is refused before any rule runs.
# Tensors of Net_Conv_Add_Mul_000: 0 ifm, 1 ker, 2 bias, 3 conv, 4 scale, 5 mul, 6 shift, 7 ofm;
# operators: 0 CONV_2D, 1 MUL, 2 ADD.
def _tensor(m, name):
    return next(t for t in m.subgraphs[0].tensors if t.name in (name, name.encode()))


def _large_custom_options(m):
    m.subgraphs[0].operators[0].largeCustomOptionsOffset = 2**63
    m.subgraphs[0].operators[0].largeCustomOptionsSize = 16


def _large_custom_options_size(m):
    m.subgraphs[0].operators[0].largeCustomOptionsOffset = 16
    m.subgraphs[0].operators[0].largeCustomOptionsSize = 2**64 - 1


def _buffer_offset_past_end(m):
    buffer = m.buffers[_tensor(m, "ker").buffer]
    buffer.data, buffer.offset, buffer.size = None, 2**40, 128


def _buffer_data_and_offset(m):
    buffer = m.buffers[_tensor(m, "ker").buffer]
    buffer.offset, buffer.size = 16, len(buffer.data)


def _stride_zero(m):
    m.subgraphs[0].operators[0].builtinOptions.strideW = 0


def _dilation_zero(m):
    m.subgraphs[0].operators[0].builtinOptions.dilationHFactor = 0


def _options_of_another_op(m):
    conv, mul = m.subgraphs[0].operators[0], m.subgraphs[0].operators[1]
    conv.builtinOptionsType, conv.builtinOptions = mul.builtinOptionsType, mul.builtinOptions


def _options_on_an_op_without_options(m):
    m.subgraphs[0].operators[1].builtinOptionsType = 1  # MUL with Conv2DOptions
    m.subgraphs[0].operators[1].builtinOptions = m.subgraphs[0].operators[0].builtinOptions


def _quantization(**fields):
    def change(m):
        from ai_edge_litert import schema_py_generated as schema

        q = schema.QuantizationParametersT()
        q.scale = fields.get("scale", [0.5] * 8)
        q.zeroPoint = fields.get("zeroPoint", [0] * len(q.scale))
        q.quantizedDimension = fields.get("quantizedDimension", 0)
        _tensor(m, "ker").quantization = q

    return change


def _no_outputs(m):
    m.subgraphs[0].outputs = []


def _constant_size(m):
    _tensor(m, "ker").shape = [8, 1, 1, 5]


def _negative_dimension(m):
    _tensor(m, "conv").shape = [1, -8, 8, 8]


def _string_weights(m):  # fuzz seed 108: LiteRT read past them, re-encoding moved what it read
    from ai_edge_litert import schema_py_generated as schema

    _tensor(m, "ker").type = schema.TensorType.STRING


@pytest.mark.parametrize(
    "change, expect",
    [
        (_large_custom_options, "large custom options at offset 9223372036854775808"),
        (_large_custom_options_size, "lie past the end of the file"),
        (_buffer_offset_past_end, "data at offset 1099511627776, size 128 lie past the end"),
        (_buffer_data_and_offset, "has both inline data and an offset"),
        (_stride_zero, "Conv2DOptions.strideW is 0, must be >= 1"),
        (_dilation_zero, "Conv2DOptions.dilationHFactor is 0, must be >= 1"),
        (_options_of_another_op, "carries MulOptions, but CONV_2D takes Conv2DOptions"),
        (_options_on_an_op_without_options, "carries Conv2DOptions, but MUL takes MulOptions"),
        (_quantization(scale=[0.5] * 3), "3 quantization scales, but shape [8, 1, 1, 4] has 8"),
        (_quantization(scale=[0.5, float("nan")] + [1.0] * 6), "scale that is not finite"),
        (_quantization(quantizedDimension=7), "quantizedDimension 7 is out of range"),
        (_quantization(zeroPoint=[0, 0]), "8 quantization scales but 2 zero points"),
        (_no_outputs, "has no outputs"),
        (_constant_size, "constant of 128 bytes, but shape [8, 1, 1, 5] of FLOAT32 needs 160"),
        (_negative_dimension, "negative dimension"),
        (_string_weights, "(CONV_2D): its weights are of type STRING, not numbers"),
    ],
    ids=[
        "large-custom-options-offset",
        "large-custom-options-size",
        "buffer-offset",
        "buffer-data-and-offset",
        "stride-0",
        "dilation-0",
        "options-of-another-op",
        "options-on-mul",
        "quant-length",
        "quant-nan-scale",
        "quant-dimension",
        "quant-zero-points",
        "no-outputs",
        "constant-size",
        "negative-dimension",
        "string-weights",
    ],
)
def test_structural_validation(capsys, tmp_path, good_model, change, expect):
    assert_refused(capsys, tmp_path, corrupt(good_model, change), expect)
    with pytest.raises(ModelError, match="^[^\n]+$"):  # the API: a ModelError, one line
        tfl_fuse.optimize(corrupt(good_model, change))


def test_constant_graph_input_is_not_folded():
    """A graph input with data is the caller's to overwrite (LiteRT allows it): never folded."""
    from ai_edge_litert.interpreter import Interpreter

    recipe = {
        "inputs": ["x", "c"],
        "outputs": ["out"],
        "operand": [
            {"name": "x", "shape": [1, 4]},
            {"name": "c", "shape": [1, 4], "filler": {"kind": "gaussian"}},
            {"name": "k", "shape": [1, 4], "filler": {"kind": "gaussian"}},
            {"name": "ck", "shape": [1, 4]},
            {"name": "out", "shape": [1, 4]},
        ],
        "operation": [
            {"type": "ADD", "inputs": ["c", "k"], "outputs": ["ck"]},
            {"type": "MUL", "inputs": ["x", "ck"], "outputs": ["out"]},
        ],
    }
    data = fb.encode(chef.build_model(recipe))
    optimized, report = tfl_fuse.optimize(data)
    assert report["ops_after"] == {"ADD": 1, "MUL": 1}

    def run(model: bytes) -> np.ndarray:
        interpreter = Interpreter(model_content=model)
        interpreter.allocate_tensors()
        for detail, value in zip(interpreter.get_input_details(), ([[1, 2, 3, 4]], [[5, 6, 7, 8]])):
            interpreter.set_tensor(detail["index"], np.asarray(value, dtype=np.float32))
        interpreter.invoke()
        return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])

    expected = run(data)
    k = chef.fill({"kind": "gaussian"}, [1, 4], np.dtype("<f4"), 2, "k")
    np.testing.assert_allclose(expected, [[1, 2, 3, 4]] * ([[5, 6, 7, 8]] + k), rtol=1e-6)
    np.testing.assert_allclose(run(optimized), expected, rtol=1e-6)


def test_variable_tensor_is_not_folded(good_model):
    def change(m):
        for t in m.subgraphs[0].tensors:
            if t.name in (b"shift", "shift"):
                t.isVariable = True

    _, report = tfl_fuse.optimize(corrupt(good_model, change))
    assert report["ops_after"].get("ADD") == 1 and "MUL" not in report["ops_after"]


# Reproducer classes of tools/fuzz.py, each built here -----------------------------------------
def _mul_one_input(m):
    m.subgraphs[0].operators[1].inputs = m.subgraphs[0].operators[1].inputs[:1]


def _mul_absent_input(m):
    m.subgraphs[0].operators[1].inputs[1] = -1


def _mul_shapes_do_not_broadcast(m):
    _tensor(m, "scale").shape = [1, 1, 2, 4]
    m.buffers[_tensor(m, "scale").buffer].data = m.buffers[_tensor(m, "scale").buffer].data


def _conv_without_options(m):
    m.subgraphs[0].operators[0].builtinOptionsType = 0
    m.subgraphs[0].operators[0].builtinOptions = None


def _add_output_shape(m):
    _tensor(m, "ofm").shape = [1, 8, 8, 8, 40000]  # ADD's output, now of another shape


def _add_output_shape_unknown(m):
    _tensor(m, "ofm").shape = []


def _conv_input_channels(m):
    _tensor(m, "ifm").shape = [1, 16, 16, 2**31 - 1]


def _conv_input_zero_channels(m):
    _tensor(m, "ifm").shape = [1, 16, 16, 0]  # no group at all: LiteRT divides by 0 groups


def _conv_input_taller(m):
    _tensor(m, "ifm").shape = [1, 4849670, 16, 4]  # LiteRT would compute a far larger output


def _conv_input_batch(m):
    _tensor(m, "ifm").shape = [2147483647, 16, 16, 4]  # LiteRT gives the output that batch


def _graph_input_computed(m):
    m.subgraphs[0].inputs = [m.subgraphs[0].tensors.index(_tensor(m, "conv"))]


def _conv_output_channels(m):
    _tensor(m, "conv").shape = [1, 8, 8, 2**31 - 1]


def _conv_bias_length(m):
    _tensor(m, "bias").shape = [4]
    m.buffers[_tensor(m, "bias").buffer].data = m.buffers[_tensor(m, "bias").buffer].data[:16]


@pytest.mark.parametrize(
    "change, expect",
    [
        (_add_output_shape, "output shape [1, 8, 8, 8, 40000] is not the operands' [1, 8, 8, 8]"),
        (_add_output_shape_unknown, "output shape [] is not the operands' [1, 8, 8, 8]"),
        (_conv_input_channels, "input shape [1, 16, 16, 2147483647] does not fit weights"),
        (_conv_input_zero_channels, "input shape [1, 16, 16, 0] does not fit weights"),
        (
            _conv_input_taller,
            "output shape [1, 8, 8, 8] is not the [1, 2424835, 8, 8] LiteRT computes from its input",
        ),
        (_conv_output_channels, "has 2147483647 channels, weights of shape [8, 1, 1, 4] have 8"),
        (_graph_input_computed, "operator 0 (CONV_2D) writes tensor 3, a graph input"),
        (_conv_input_batch, "output shape [1, 8, 8, 8] is not the [2147483647, 8, 8, 8]"),
        (_conv_bias_length, "bias of shape [4] for 8 channels"),
        (_mul_one_input, "operator 1 (MUL) has 1 inputs and 1 outputs"),
        (_mul_absent_input, "operator 1 (MUL) input 1 is absent (-1)"),
        (_mul_shapes_do_not_broadcast, "operand shapes [1, 8, 8, 8] and [1, 1, 2, 4] do not"),
        (_conv_without_options, "has no Conv2DOptions, which CONV_2D needs"),
    ],
    ids=[
        "elementwise-output-shape",
        "elementwise-output-shape-unknown",
        "conv-input-channels",
        "conv-input-zero-channels",
        "conv-output-spatial",
        "conv-output-channels",
        "graph-input-computed",
        "conv-output-batch",
        "conv-bias-length",
        "operand-count",
        "absent-operand",
        "broadcast",
        "conv-without-options",
    ],
)
def test_fuzz_reproducer_classes(capsys, tmp_path, good_model, change, expect):
    assert_refused(capsys, tmp_path, corrupt(good_model, change), expect)


# Reproducer classes of tools/fuzz.py --verify-share (LiteRT runs input and output): models LiteRT
# runs on memory no one wrote, or crashes on, so that the optimized model computed something else.
def _ops_out_of_order(m):
    ops = m.subgraphs[0].operators
    ops[1], ops[2] = ops[2], ops[1]  # the ADD now runs before the MUL that computes its input


def _bias_without_data(m):
    _tensor(m, "bias").buffer = 0  # the empty buffer: no data, no producer, not a graph input


def _variable_written(m):
    _tensor(m, "mul").isVariable = True  # MUL's output (LiteRT crashes on this one)


def _float_op_writes_integers(m):
    from ai_edge_litert import schema_py_generated as schema

    _tensor(m, "mul").type = schema.TensorType.INT64  # MUL of two float32 operands


def _binary_operand_types(m):
    from ai_edge_litert import schema_py_generated as schema

    _tensor(m, "shift").type = schema.TensorType.INT32  # ADD of FLOAT32 and INT32


def _graph_output_without_value(m):
    m.subgraphs[0].operators = m.subgraphs[0].operators[:2]  # nothing computes 'ofm' now


def _input_shares_buffer(m):
    scale = m.subgraphs[0].tensors.index(_tensor(m, "scale"))
    m.subgraphs[0].inputs = [0, scale]  # a graph input with data, whose buffer 'shift' reads
    _tensor(m, "shift").buffer = _tensor(m, "scale").buffer


def _output_holds_data(m):
    from ai_edge_litert import schema_py_generated as schema

    buffer = schema.BufferT()
    buffer.data = np.zeros(8 * 8 * 8 * 4, np.uint8)
    m.buffers.append(buffer)
    _tensor(m, "ofm").buffer = len(m.buffers) - 1  # the ADD would write into constant data


@pytest.mark.parametrize(
    "change, expect",
    [
        (_output_holds_data, "operator 2 (ADD) writes tensor 7, which holds constant data"),
        (_binary_operand_types, "operator 2 (ADD): operands of types FLOAT32 and INT32"),
        (
            _graph_output_without_value,
            "graph output 7 ('ofm') has no value: no operator computes it, no caller sets it",
        ),
        (
            _input_shares_buffer,
            "graph input 4 shares buffer 3 with tensor 6 ('shift') of subgraph 0: what the "
            "caller sets would change that tensor too",
        ),
        (
            _ops_out_of_order,
            "operator 1 (ADD) reads tensor 5 ('mul') before operator 2 computes it: LiteRT runs "
            "operators in the order listed",
        ),
        (
            _bias_without_data,
            "operator 0 (CONV_2D) reads tensor 2 ('bias'), which has no data and which no "
            "operator computes and no caller sets",
        ),
        (_variable_written, "operator 1 (MUL) writes tensor 5, a variable tensor"),
        (_float_op_writes_integers, "operator 1 (MUL) reads FLOAT32 data and writes INT64"),
    ],
    ids=[
        "output-holds-data",
        "operand-types",
        "output-without-value",
        "input-shares-buffer",
        "out-of-order",
        "no-data",
        "variable-written",
        "float-to-integer",
    ],
)
def test_verify_fuzz_reproducer_classes(capsys, tmp_path, good_model, change, expect):
    assert_refused(capsys, tmp_path, corrupt(good_model, change), expect)


def test_fully_connected_output_shape_must_be_the_one_litert_computes(capsys, tmp_path):
    # keep_num_dims: LiteRT gives the output the input's rank ([2, 5]); a stored [1, 2, 5] let
    # the MUL by a [1, 1, 5] constant fold, and the graph output lost an axis (fuzz --verify)
    data, _ = chef.cook(RECIPES / "Net_FullyConnected_Mul_003")

    def change(m):
        m.subgraphs[0].operators[0].builtinOptions.keepNumDims = True
        _tensor(m, "fc").shape = [1, 2, 5]

    assert_refused(
        capsys,
        tmp_path,
        corrupt(data, change),
        "operator 0 (FULLY_CONNECTED): output shape [1, 2, 5] is not the [2, 5] LiteRT computes "
        "from input [2, 6] and weights [5, 6]",
    )

    def flattened(m):  # without keep_num_dims the input is flattened to [input size / 6, 6]
        _tensor(m, "ifm").shape = [1, 2, 6]

    tfl_fuse.optimize(corrupt(data, flattened))  # [2, 5] is what LiteRT computes: accepted


def test_quantized_add_needs_its_scales(capsys, tmp_path):
    # LiteRT divides by the scales to requantize; it aborted (SIGABRT) on an INT16 ADD whose
    # output had empty scale arrays (fuzz --verify)
    data, _ = chef.cook(RECIPES / "Net_Quant_FC_Mul_Add_000")

    def change(m):
        _tensor(m, "ofm").quantization.scale = []
        _tensor(m, "ofm").quantization.zeroPoint = []

    assert_refused(
        capsys,
        tmp_path,
        corrupt(data, change),
        "operator 2 (ADD): INT8 tensor 7 ('ofm') has no quantization scale",
    )


@pytest.mark.parametrize(
    "tensor, zero_point, expect",
    [
        ("scale", 2**48, "zero point 281474976710656, outside INT16's -32768..32767"),
        ("ifm", 40000, "zero point 40000, outside INT16's -32768..32767"),
        ("bias", 2**31, "zero point 2147483648, outside INT64's -2147483648..2147483647"),
    ],
    ids=["int16-constant", "int16-activation", "int64-bias"],
)
def test_a_zero_point_outside_its_type_is_refused(capsys, tmp_path, tensor, zero_point, expect):
    # LiteRT keeps zero points as int32 and truncated 2**48 to 0, while the quantized MUL fold
    # dequantized with 2**48: 232 quanta apart on every element (fuzz --verify)
    data, _ = chef.cook(RECIPES / "Net_Quant16_Conv_Mul_Add_000")
    tfl_fuse.optimize(data)  # the recipe itself is accepted

    def change(m):
        q = _tensor(m, tensor).quantization
        q.zeroPoint = [zero_point] * len(q.scale)

    assert_refused(capsys, tmp_path, corrupt(data, change), expect)


def test_a_binary_op_writes_its_operands_type(capsys, tmp_path):
    # fuzz --verify: an int8 MUL writing INT32; LiteRT picked int32 arithmetic and misread the
    # int8 operands, so two runs of the same model differed by billions of quanta
    from ai_edge_litert import schema_py_generated as schema

    data, _ = chef.cook(RECIPES / "Net_Quant_Conv_Mul_Add_000")

    def change(m):
        _tensor(m, "mul").type = schema.TensorType.INT32

    assert_refused(
        capsys,
        tmp_path,
        corrupt(data, change),
        "operator 1 (MUL): operands of type INT8 and an output of INT32",
    )
    # LiteRT's int16 MUL may requantize into int8 (LSTM cells): accepted
    data16, _ = chef.cook(RECIPES / "Net_Quant16_Conv_Mul_Add_000")

    def narrowing(m):
        _tensor(m, "mul").type = schema.TensorType.INT8

    # the MUL (operator 1) passes; the ADD after it, reading INT8 and INT16, does not
    with pytest.raises(ModelError, match="operator 2 \\(ADD\\): operands of types INT8 and INT16"):
        tfl_fuse.optimize(corrupt(data16, narrowing))


def test_a_nan_constant_is_not_moved(capsys):
    # 0 * NaN is NaN: a MUL by NaN moved above a zero PAD made the border 0 (fuzz --verify)
    data, _ = chef.cook(RECIPES / "Net_Conv_Add_Mul_000")

    def change(m):
        scale = _tensor(m, "scale")
        values = np.frombuffer(bytes(m.buffers[scale.buffer].data), "<f4").copy()
        values[0] = np.nan
        m.buffers[scale.buffer].data = np.frombuffer(values.tobytes(), np.uint8)

    out, report = tfl_fuse.optimize(corrupt(data, change), verify=True)
    assert report["rewrites"] == [] or all(
        "mul" not in entry["ops"] for entry in report["rewrites"]
    )
    assert any("holds NaN or infinity" in entry["reason"] for entry in report["declined"])


def test_variable_tensor_read_before_it_is_written_is_no_ordering_error(good_model):
    """A variable tensor carries state between runs: reading it first is what it is for."""

    def change(m):
        _tensor(m, "bias").buffer = 0
        _tensor(m, "bias").isVariable = True

    tfl_fuse.optimize(corrupt(good_model, change))


# Every operator type a rule reads has its LiteRT operand counts checked (fuzz: a STRIDED_SLICE
# with no inputs, producing a per-channel MUL's input, reached move_before_rearrangement).
@pytest.mark.parametrize(
    "kind",
    [
        "STRIDED_SLICE",
        "SLICE",
        "GATHER",
        "MIRROR_PAD",
        "PADV2",
        "RESIZE_BILINEAR",
        "RESIZE_NEAREST_NEIGHBOR",
        "DEQUANTIZE",
        "QUANTIZE",
        "FAKE_QUANT",
    ],
)
def test_an_operator_rules_read_without_its_operands_is_refused(capsys, tmp_path, good_model, kind):
    from ai_edge_litert import schema_py_generated as schema

    def change(m):
        code = getattr(schema.BuiltinOperator, kind)
        opcode = schema.OperatorCodeT()
        opcode.builtinCode, opcode.deprecatedBuiltinCode, opcode.version = code, min(code, 127), 1
        m.operatorCodes.append(opcode)
        op = m.subgraphs[0].operators[0]  # the CONV_2D that feeds the MUL
        op.opcodeIndex, op.inputs = len(m.operatorCodes) - 1, []
        op.builtinOptionsType, op.builtinOptions = 0, None

    assert_refused(capsys, tmp_path, corrupt(good_model, change), f"({kind}) has 0 inputs")


def test_stored_spatial_shapes_are_checked_only_where_they_are_static(good_model):
    """Fuzz (an int8 simulation of a 4.8 M-row image): a conv's stored output shape must be the
    one LiteRT computes. Axes a shape signature marks dynamic (-1) are left to runtime, as the
    converter stores 1 there."""

    def dynamic(m, signature):
        for name, channels in (("ifm", 4), ("conv", 8), ("mul", 8), ("ofm", 8)):
            t = _tensor(m, name)
            t.shape = [1, 1, 1, 4] if name == "ifm" else [1, 5, 5, 8]
            t.shapeSignature = [1, -1, -1, channels] if signature else None

    with pytest.raises(ModelError, match=r"output shape \[1, 5, 5, 8\] is not the \[1, 1, 1, 8\]"):
        tfl_fuse.optimize(corrupt(good_model, lambda m: dynamic(m, False)))
    _, report = tfl_fuse.optimize(corrupt(good_model, lambda m: dynamic(m, True)))
    assert report["ops_after"] == {"CONV_2D": 1}


def test_degenerate_figures_decline_without_numpy_warnings():
    """Fuzz: a scale of 0 and a tensor without channels printed numpy's RuntimeWarnings on
    stderr under --target int8. The checks decide on them quietly."""
    import warnings

    from tfl_fuse.rules import activation_stats, quantized
    from tfl_fuse.rules.base import Decline

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mean, variance = activation_stats._flat((np.zeros(0), np.zeros(0)), 3)
        np.testing.assert_array_equal(mean, [0, 0, 0])
        np.testing.assert_array_equal(variance, [1, 1, 1])
        for weight_scales in ([0.25, 1.0], [0.25, 0.0]):  # x / 0 and 0 / 0
            with pytest.raises(Decline, match="multiplier would be too small"):
                quantized.check_multiplier(0.5, np.array(weight_scales), 0.0)


@pytest.mark.parametrize("target", ["float", "int8"])
def test_a_signaling_nan_weight_declines_without_numpy_warnings(good_model, target):
    """Fuzz: a weight whose bits are a signaling NaN raises numpy's "invalid value" flag when a
    rule reads it as float64. The folds decline it (not finite), and no warning escapes."""
    import warnings

    def change(m):
        ker = _tensor(m, "ker")
        raw = bytearray(bytes(m.buffers[ker.buffer].data))
        raw[0:4] = (0x7F800001).to_bytes(4, "little")
        m.buffers[ker.buffer].data = np.frombuffer(bytes(raw), np.uint8)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, report = tfl_fuse.optimize(corrupt(good_model, change), target=target)
    assert all(r["rule"] != "fold_into_preceding_layer" for r in report["rewrites"])
    assert any("would not be finite" in d["reason"] for d in report["declined"])


def test_activation_figures_skip_a_tensor_with_more_channels_than_any_layer(good_model):
    """Fuzz: a graph input of 1.36 G channels made the noise model allocate 10 GiB for its
    figures. Such a tensor gets none; the layers after it fall back to flat figures."""
    from tfl_fuse.graph import Graph
    from tfl_fuse.rules import activation_stats

    model = fb.decode(good_model)
    graph = Graph(model, 0)
    ifm = graph.subgraph.inputs[0]
    graph.tensors[ifm].shape = [1, 16, 16, activation_stats.MAX_CHANNELS + 1]
    stats = activation_stats.activation_statistics(graph)
    assert ifm not in stats
    conv = graph.ops[0].outputs[0]
    assert len(stats[conv][0]) == 8 and np.all(np.isfinite(stats[conv][0]))


def test_litert_errors_are_said_in_one_line_even_without_a_message():
    """Fuzz: LiteRT raised an error with an empty message, and taking its first line failed."""
    from tfl_fuse.verify import litert_reason

    assert litert_reason(RuntimeError("")) == "RuntimeError without a message"
    assert litert_reason(ValueError("  \n")) == "ValueError without a message"
    assert litert_reason(RuntimeError("first\nsecond")) == "first"


def test_an_input_litert_leaves_unallocated_is_a_simulation_error():
    """Fuzz: LiteRT refused to set an input it had not allocated (a ValueError that reached the
    engine's catch-all); the simulation says so, and equalization falls back to its rule."""
    from tfl_fuse import quantsim

    class Unallocated:
        def get_input_details(self):
            return [{"index": 0}]

        def set_tensor(self, index, value):
            raise ValueError("Cannot set tensor: Tensor is unallocated.")

    with pytest.raises(quantsim.SimulationError, match="Tensor is unallocated"):
        quantsim._invoke(Unallocated(), [np.zeros(1, np.float32)])


@pytest.mark.parametrize("strides", ["float weights", "too short"])
def test_strides_that_are_no_int_vector_of_the_rank_are_not_read(strides):
    """Fuzz: a STRIDED_SLICE whose strides input was the float weights [6, 3, 3, 3] (or an int
    vector shorter than the rank) reached move_before_rearrangement, which indexed it. Such a
    slice is not known to keep the channel axis: the BN stays below it, with that reason."""
    data = chef.cook(RECIPES / "Net_TConv_Crop_BN_000")[0]

    def change(m):
        ops = m.subgraphs[0].operators
        if strides == "float weights":
            ops[1].inputs[3] = ops[0].inputs[1]
        else:
            _tensor(m, "strides").shape = [2]
            buffer = m.buffers[_tensor(m, "strides").buffer]
            buffer.data = buffer.data[:8]

    _, report = tfl_fuse.optimize(corrupt(data, change))
    assert report["ops_after"]["MUL"] == 1
    assert any(
        "STRIDED_SLICE does not keep the channel axis whole" in d["reason"]
        for d in report["declined"]
    )


def test_a_sparse_permutation_is_not_read_as_dense_values():
    """Fuzz: a TRANSPOSE permutation with a sparsity table and a 1-byte buffer reached
    np.frombuffer in validation (ValueError). Sparse bytes are not dense values: validation
    leaves them to LiteRT, and no rule reads them."""
    from ai_edge_litert import schema_py_generated as schema

    data = chef.cook(RECIPES / "Net_NCHW_BN_Transpose_Conv_000")[0]

    def change(m):
        op = next(
            o
            for o in m.subgraphs[0].operators
            if m.operatorCodes[o.opcodeIndex].builtinCode == schema.BuiltinOperator.TRANSPOSE
        )
        perm = m.subgraphs[0].tensors[op.inputs[1]]
        perm.sparsity = schema.SparsityParametersT()
        m.buffers[perm.buffer].data = np.zeros(1, np.uint8)

    _, report = tfl_fuse.optimize(corrupt(data, change))
    # the BN's [1, C, 1, 1] constants cannot cross a permutation no rule reads: a MUL stays
    # (with a readable one, only the ADD is left: test_recipes)
    assert report["ops_after"] == {"ADD": 1, "CONV_2D": 1, "MUL": 1, "TRANSPOSE": 1}
    assert any(
        "no op between it and a layer carries that axis" in d["reason"] for d in report["declined"]
    )


@pytest.mark.parametrize("name", ["b", "x"])
def test_a_tensor_quantized_per_spatial_axis_is_not_subsampled(name):
    """Fuzz: move_stride_up subsampled a float tensor carrying 8 scales along axis 1, and wrote
    a model its own decoder refuses (4 rows for 8 scales). It declines that now, and says why."""
    from ai_edge_litert import schema_py_generated as schema

    data = chef.cook(RECIPES / "Net_Stride_Residual_000")[0]

    def change(m):
        q = schema.QuantizationParametersT()
        q.scale, q.zeroPoint, q.quantizedDimension = [0.5] * 8, [0] * 8, 1
        _tensor(m, name).quantization = q

    output, report = tfl_fuse.optimize(corrupt(data, change))
    fb.decode(output)  # a valid model
    assert "MAX_POOL_2D" not in report["ops_after"]
    assert any(
        "quantization parameters per axis 1, which subsampling it would contradict" in d["reason"]
        for d in report["declined"]
    )


def test_a_name_litert_python_cannot_read_is_said_in_words(capsys, tmp_path, good_model):
    """A graph output named with bytes that are not UTF-8 (fuzz): LiteRT runs the model, but its
    Python interpreter raises a bare UnicodeDecodeError on every question about that tensor.
    --verify and the int8 simulation say why in one line; without them the model folds."""
    from tfl_fuse import quantsim

    def change(m):
        sg = m.subgraphs[0]
        sg.tensors[sg.outputs[0]].name = b"\xff\xfeout"

    data = corrupt(good_model, change)
    _, report = tfl_fuse.optimize(data)
    assert report["ops_after"].get("MUL", 0) == 0  # folded as without the name
    src, dst = tmp_path / "in.tflite", tmp_path / "out.tflite"
    src.write_bytes(data)
    code, err = run_cli(capsys, [src, dst, "--verify"])
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert "name is not UTF-8 text" in err and "internal error" not in err
    assert not dst.exists()
    with pytest.raises(quantsim.SimulationError, match="name is not UTF-8 text"):
        quantsim.outputs(data, [[np.zeros((1, 8, 8, 4), np.float32)]])


def test_elementwise_op_without_options_reads_as_no_activation(good_model):
    """LiteRT runs a MUL/ADD without options (no activation); so do the rules."""

    def change(m):
        for op in m.subgraphs[0].operators[1:]:
            op.builtinOptionsType, op.builtinOptions = 0, None

    _, report = tfl_fuse.optimize(corrupt(good_model, change))
    assert report["ops_after"] == {"CONV_2D": 1}


def _model(operands, operations, inputs, outputs) -> bytes:
    recipe = {"inputs": inputs, "outputs": outputs, "operand": operands, "operation": operations}
    return fb.encode(chef.build_model(recipe))


def test_fold_larger_than_the_bound_is_declined_before_allocating():
    """[40000, 1] + [1, 40000] would be 1.6 billion values (12.8 GB in float64): declined."""
    data = _model(
        [
            {"name": "x", "shape": [40000, 40000]},
            {"name": "a", "shape": [40000, 1], "filler": {"kind": "gaussian"}},
            {"name": "b", "shape": [1, 40000], "filler": {"kind": "gaussian"}},
            {"name": "ab", "shape": [40000, 40000]},
            {"name": "y", "shape": [40000, 40000]},
        ],
        [
            {"type": "ADD", "inputs": ["a", "b"], "outputs": ["ab"]},
            {"type": "MUL", "inputs": ["x", "ab"], "outputs": ["y"]},
        ],
        ["x"],
        ["y"],
    )
    _, report = tfl_fuse.optimize(data, rules_to_run=["fold_constants"])
    assert report["ops_after"] == {"ADD": 1, "MUL": 1}
    assert any("above the 33554432 folded at most" in d["reason"] for d in report["declined"])


# Reading and writing ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def large_buffer_model() -> bytes:
    """A model whose weights (4,608 bytes) are copied file to file when IN is a file."""
    return fb.encode(chef.build_model(conv_mul_recipe(16, 32)))


def _cli(args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tfl_fuse", *map(str, args)],
        capture_output=True,
        timeout=60,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
        **kwargs,
    )


def test_piped_input(tmp_path, large_buffer_model):
    src, from_file, from_pipe = tmp_path / "in.tflite", tmp_path / "a.tflite", tmp_path / "b.tflite"
    src.write_bytes(large_buffer_model)
    # --rules none: the weights stay unchanged input, which a file input copies file to file
    assert _cli([src, from_file, "-q", "--rules", "none"]).returncode == 0
    result = _cli(["/dev/stdin", from_pipe, "-q", "--rules", "none"], input=large_buffer_model)
    assert result.returncode == 0, result.stderr
    assert from_pipe.read_bytes() == from_file.read_bytes()


def test_fifo_without_a_writer_does_not_hang(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    result = _cli([fifo, tmp_path / "out.tflite"])
    assert result.returncode == 1 and b"0 bytes is too short" in result.stderr
    assert not (tmp_path / "out.tflite").exists()


def test_device_input_is_refused_without_reading(capsys, tmp_path):
    code, err = run_cli(capsys, ["/dev/zero", tmp_path / "out.tflite"])
    assert code == 1 and "not a regular file or a pipe" in err and len(err.splitlines()) == 1


def test_stale_temp_files_of_dead_runs_are_removed(capsys, tmp_path, good_model):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".out.tflite.tfl_fuse-{dead.pid}.x1y2.tmp"
    live = tmp_path / ".other.tflite.tfl_fuse-1.abcd.tmp"  # PID 1 is alive
    unrelated = tmp_path / ".notes.txt.12345.tmp"
    for path in (stale, live, unrelated):
        path.write_bytes(b"partial")
    src = tmp_path / "in.tflite"
    src.write_bytes(good_model)
    code, _ = run_cli(capsys, [src, tmp_path / "out.tflite", "-q"])
    assert code == 0
    assert not stale.exists() and live.exists() and unrelated.exists()


def test_output_symlink_is_written_through(capsys, tmp_path, good_model):
    src, real, link = tmp_path / "in.tflite", tmp_path / "real.tflite", tmp_path / "link.tflite"
    src.write_bytes(good_model)
    real.write_bytes(b"old")
    link.symlink_to(real.name)
    code, _ = run_cli(capsys, [src, link, "-q"])
    assert code == 0 and link.is_symlink() and os.readlink(link) == real.name
    assert real.read_bytes()[4:8] == b"TFL3"


def test_constant_of_a_type_rules_cannot_read_is_left_alone():
    """A MEAN whose axes are a STRING constant (fuzz): not read, no error, nothing folded there."""
    data, _ = chef.cook(RECIPES / "Net_Preactivation_Head_Mean_FC_000")

    def change(m):
        _tensor(m, "axes").type = 5  # STRING

    _, report = tfl_fuse.optimize(corrupt(data, change))
    assert "MEAN" in report["ops_after"]


@pytest.mark.parametrize(
    "kind, shapes, expect",
    [
        ("TRANSPOSE", ([1, 2, 3, 4], [4, 1], [4, 3, 2, 1]), "a permutation of shape [4, 1]"),
        ("CONCATENATION", ([1, 2, 3, 4], [], [1, 2, 3, 8]), "inputs of ranks [4, 0]"),
        ("TRANSPOSE", ([1, 2, 3, 4], [4], [4, 3, 2, 1]), "is not [1, 2, 3, 4] permuted by"),
        ("RESHAPE", ([1, 2, 3, 4], [2], [5, 5]), "[1, 2, 3, 4] cannot take the shape [5, 5]"),
    ],
    ids=["transpose-permutation-shape", "concatenation-ranks", "transpose-output", "reshape"],
)
def test_fuzz_reproducer_shapes(capsys, tmp_path, kind, shapes, expect):
    """Two more fuzz classes: operand shapes LiteRT's kernels refuse (transpose, concat)."""
    x, second, y = shapes
    operands = [
        {"name": "x", "shape": x},
        {
            "name": "c",
            "shape": second,
            "type": "int32",
            "filler": {"kind": "explicit", "values": list(range(math.prod(second)))},
        },
        {"name": "y", "shape": y},
    ]
    if kind == "CONCATENATION":
        operands[1] = {"name": "c", "shape": second}
    options = {"axis": 3} if kind == "CONCATENATION" else {}
    data = _model(
        operands,
        [{"type": kind, "inputs": ["x", "c"], "outputs": ["y"], "options": options}],
        ["x", "c"] if kind == "CONCATENATION" else ["x"],
        ["y"],
    )
    assert_refused(capsys, tmp_path, data, expect)


def test_sparse_constants_are_not_read_by_rules(good_model):
    """A sparse bias (fuzz): its bytes are not dense values; no rule reads them, nothing fails."""
    from ai_edge_litert import schema_py_generated as schema

    def change(m):
        sparsity = schema.SparsityParametersT()
        sparsity.traversalOrder = [0]
        _tensor(m, "bias").sparsity = sparsity

    _, report = tfl_fuse.optimize(corrupt(good_model, change))
    assert report["ops_after"] == {"ADD": 1, "CONV_2D": 1, "MUL": 1}
    assert "not folded into CONV_2D: the bias 'bias' is sparse" in [
        d["reason"] for d in report["declined"]
    ]
    tfl_fuse.optimize(corrupt(good_model, change), target="int8")  # reads the bias' statistics


def test_empty_scale_array_on_a_float_tensor():
    """A float16 constant whose DEQUANTIZE output has an empty scale array (fuzz)."""

    def change(m):
        from ai_edge_litert import schema_py_generated as schema

        q = schema.QuantizationParametersT()
        q.scale, q.zeroPoint = [], []
        _tensor(m, "w").quantization = q

    data = _model(
        [
            {"name": "x", "shape": [1, 4]},
            {"name": "w16", "shape": [1, 4], "type": "float16", "filler": {"kind": "gaussian"}},
            {"name": "w", "shape": [1, 4]},
            {"name": "y", "shape": [1, 4]},
        ],
        [
            {"type": "DEQUANTIZE", "inputs": ["w16"], "outputs": ["w"]},
            {"type": "ADD", "inputs": ["x", "w"], "outputs": ["y"]},
        ],
        ["x"],
        ["y"],
    )
    for target in ("float", "int8"):
        tfl_fuse.optimize(corrupt(data, change), target=target)


def test_standalone_depthwise_refuses_an_overflowing_scale():
    """x / 1e-45 is x * 7e44, beyond float32: no DEPTHWISE_CONV_2D with an infinite weight (fuzz)."""
    data = _model(
        [
            {"name": "x", "shape": [1, 2, 2, 2]},
            {"name": "d", "shape": [2], "filler": {"kind": "explicit", "values": [1e-45, 2.0]}},
            {"name": "q", "shape": [1, 2, 2, 2]},
            {"name": "t", "shape": [2], "filler": {"kind": "explicit", "values": [1.0, 2.0]}},
            {"name": "y", "shape": [1, 2, 2, 2]},
        ],
        [
            {"type": "DIV", "inputs": ["x", "d"], "outputs": ["q"]},
            {"type": "SUB", "inputs": ["q", "t"], "outputs": ["y"]},
        ],
        ["x"],
        ["y"],
    )
    for target in ("float", "int8"):
        _, report = tfl_fuse.optimize(
            data, rules_to_run=["standalone_bn_to_depthwise"], target=target
        )
        assert "DEPTHWISE_CONV_2D" not in report["ops_after"], report
        assert any("overflow float32" in d["reason"] for d in report["declined"]), report


@pytest.mark.parametrize("activation", [0, 1])  # NONE, RELU fused into the ADD
def test_layer_without_options_table(activation):
    """A FULLY_CONNECTED with no options table (LiteRT reads defaults; fuzz). A fold that needs
    no fused activation proceeds; one that would fuse the ADD's RELU declines: there is no table
    to take it."""
    data, _ = chef.cook(RECIPES / "Net_Quant_FC_Mul_Add_000")

    def change(m):
        m.subgraphs[0].operators[0].builtinOptions = None
        m.subgraphs[0].operators[0].builtinOptionsType = 0
        m.subgraphs[0].operators[2].builtinOptions.fusedActivationFunction = activation

    model = corrupt(data, change)
    for target in ("float", "int8"):
        out, report = tfl_fuse.optimize(model, target=target, verify=True)
        assert report["verify"]["match"]
        if activation:
            assert report["ops_after"].get("ADD", 0) == 1
            assert any("no options table" in d["reason"] for d in report["declined"])
        else:
            assert report["ops_after"].get("MUL", 0) == 0 and report["ops_after"].get("ADD", 0) == 0


def _strided_slice(begin, end, strides, masks, out_shape, in_shape=(1, 9, 9, 6)) -> bytes:
    recipe = {
        "name": "slice",
        "inputs": ["ifm"],
        "outputs": ["ofm"],
        "operand": [
            {"name": "ifm", "shape": list(in_shape)},
            *(
                {
                    "name": name,
                    "shape": [len(in_shape)],
                    "type": "int32",
                    "filler": {"kind": "explicit", "values": list(values)},
                }
                for name, values in (("begin", begin), ("end", end), ("strides", strides))
            ),
            {"name": "ofm", "shape": list(out_shape)},
        ],
        "operation": [
            {
                "type": "STRIDED_SLICE",
                "inputs": ["ifm", "begin", "end", "strides"],
                "outputs": ["ofm"],
                "options": dict(zip(("begin_mask", "end_mask", "shrink_axis_mask"), masks)),
            }
        ],
    }
    return bytes(fb.encode(chef.build_model(recipe)))


def test_strided_slice_output_shapes_are_litert_s():
    """validate computes a STRIDED_SLICE's output shape as LiteRT does (negative indices,
    clamping, masks, negative strides, shrunk axes): on 300 random slices, the shape LiteRT
    gives the output when it prepares the op is accepted, and any other is refused."""
    from tfl_fuse import verify

    rng = np.random.default_rng(5)
    refused = 0
    for _ in range(300):
        begin, end = rng.integers(-11, 12, 4), rng.integers(-11, 12, 4)
        strides = rng.choice([-3, -2, -1, 1, 2, 3], 4)
        masks = rng.integers(0, 16, 3) * (rng.random(3) < 0.5)
        # LiteRT's own shape: the stored one is what it resizes
        data = _strided_slice(begin, end, strides, masks, [1])
        try:
            shape = verify.interpreter(data).get_output_details()[0]["shape"].tolist()
        except (RuntimeError, ValueError):
            continue  # LiteRT refuses the slice itself
        tfl_fuse.optimize(_strided_slice(begin, end, strides, masks, shape))
        wrong = [*shape[:-1], shape[-1] + 1] if shape else [2]
        with pytest.raises(ModelError, match="is not the .* LiteRT computes from input"):
            tfl_fuse.optimize(_strided_slice(begin, end, strides, masks, wrong))
        refused += 1
    assert refused > 200


def test_a_strided_slice_whose_stored_shape_lies_is_refused(capsys, tmp_path):
    # fuzz --verify: end [1, 1, 1, 1] makes LiteRT's output [1, 0, 0, 1], the stored shape
    # said [1, 8, 8, 6]; move_before_rearrangement read the channel axis as kept whole
    data, _ = chef.cook(RECIPES / "Net_TConv_Crop_BN_000")

    def change(m):
        end = _tensor(m, "end")
        m.buffers[end.buffer].data = np.array([1, 1, 1, 1], "<i4").view(np.uint8)

    assert_refused(
        capsys,
        tmp_path,
        corrupt(data, change),
        "operator 1 (STRIDED_SLICE): output shape [1, 8, 8, 6] is not the [1, 0, 0, 1] LiteRT "
        "computes from input [1, 9, 9, 6]",
    )


@pytest.mark.parametrize(
    "begin, size, shape, expect",
    [
        ([0, 1, 1, 0], [1, -1, -1, 6], [1, 8, 8, 6], None),
        ([0, 1, 1, 0], [1, 8, 8, 6], [1, 8, 8, 3], "is not the [1, 8, 8, 6] LiteRT computes"),
        ([0, 2, 1, 0], [1, 8, 8, 6], [1, 8, 8, 6], "lie outside [1, 9, 9, 6]"),
    ],
)
def test_slice_output_shapes(begin, size, shape, expect):
    recipe = {
        "name": "slice",
        "inputs": ["ifm"],
        "outputs": ["ofm"],
        "operand": [
            {"name": "ifm", "shape": [1, 9, 9, 6]},
            {
                "name": "begin",
                "shape": [4],
                "type": "int32",
                "filler": {"kind": "explicit", "values": begin},
            },
            {
                "name": "size",
                "shape": [4],
                "type": "int32",
                "filler": {"kind": "explicit", "values": size},
            },
            {"name": "ofm", "shape": shape},
        ],
        "operation": [{"type": "SLICE", "inputs": ["ifm", "begin", "size"], "outputs": ["ofm"]}],
    }
    data = bytes(fb.encode(chef.build_model(recipe)))
    if expect is None:
        tfl_fuse.optimize(data, verify=True)
    else:
        with pytest.raises(ModelError, match=re.escape(expect)):
            tfl_fuse.optimize(data)


def _fallocate_failing_with(code: int):
    """fb's fallocate replaced by one that fails with ``code``, as the C library would."""
    import ctypes

    calls = []

    def fallocate(fd, mode, offset, length):
        calls.append((mode, offset, length))
        ctypes.set_errno(code)
        return -1

    real = fb._libc_call

    def libc_call(name, *argtypes):
        return fallocate if name == "fallocate" else real(name, *argtypes)

    return libc_call, calls


def test_a_disk_too_full_for_the_model_fails_before_anything_is_written(
    capsys, tmp_path, monkeypatch, good_model
):
    """The output's space is reserved first: a full disk is one line, OUT keeps what it had,
    no temp file is left and not one byte of the model was written."""
    import errno

    libc_call, calls = _fallocate_failing_with(errno.ENOSPC)
    monkeypatch.setattr(fb, "_libc_call", libc_call)
    writes = []
    for name in ("write", "writev"):
        real = getattr(os, name)
        monkeypatch.setattr(os, name, lambda *a, _real=real: writes.append(1) or _real(*a))
    src = tmp_path / "in.tflite"
    src.write_bytes(good_model)
    dst = tmp_path / "out.tflite"
    dst.write_bytes(b"previous")
    code, err = run_cli(capsys, [src, dst])
    assert code == 1
    assert err.strip().splitlines() == [
        f"tfl-fuse: error: cannot write {dst}: No space left on device"
    ]
    assert calls == [(0, 0, len(tfl_fuse.optimize(good_model)[0]))]  # the whole model, at once
    assert writes == []
    assert dst.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.tflite", "out.tflite"]
