"""circle files built directly with circle_schema: lossless round trip, conversion to tflite."""

from __future__ import annotations

import flatbuffers
import numpy as np
import pytest

import tfl_fuse
from tfl_fuse import fb, verify
from tfl_fuse.model import ModelError

Circle = __import__("circle_schema.v0_10.circle", fromlist=["x"])


def _cls(name):
    return getattr(__import__(f"circle_schema.v0_10.circle.{name}", fromlist=[name]), name + "T")


def _enum(name):
    return getattr(__import__(f"circle_schema.v0_10.circle.{name}", fromlist=[name]), name)


def build_circle(
    op_name: str = "FULLY_CONNECTED", data_format: int = 0
) -> tuple[bytes, np.ndarray, np.ndarray]:
    """x[1,4] -> FULLY_CONNECTED(W[3,4], b[3]) -> y[1,3], as a CIR0 file."""
    rng = np.random.default_rng(0)
    weights = rng.normal(size=(3, 4)).astype(np.float32)
    bias = rng.normal(size=3).astype(np.float32)
    model = _cls("Model")()
    model.version = 0
    model.description = "built by circle_schema"
    model.buffers = [_cls("Buffer")() for _ in range(3)]
    model.buffers[1].data = np.frombuffer(weights.tobytes(), np.uint8)
    model.buffers[2].data = np.frombuffer(bias.tobytes(), np.uint8)
    code = _cls("OperatorCode")()
    builtin = getattr(_enum("BuiltinOperator"), op_name)
    code.builtinCode = builtin
    code.deprecatedBuiltinCode = (
        builtin if 0 <= builtin < 127 else (builtin if builtin < 0 else 127)
    )
    code.version = 1
    model.operatorCodes = [code]

    def tensor(name, shape, buffer=0):
        t = _cls("Tensor")()
        t.name, t.shape, t.buffer, t.type = name, shape, buffer, 0
        return t

    sg = _cls("SubGraph")()
    sg.tensors = [
        tensor("x", [1, 4]),
        tensor("w", [3, 4], 1),
        tensor("b", [3], 2),
        tensor("y", [1, 3]),
    ]
    op = _cls("Operator")()
    op.opcodeIndex, op.inputs, op.outputs = 0, [0, 1, 2], [3]
    if op_name == "FULLY_CONNECTED":
        op.builtinOptionsType = _enum("BuiltinOptions").FullyConnectedOptions
        op.builtinOptions = _cls("FullyConnectedOptions")()
    sg.operators, sg.inputs, sg.outputs, sg.name = [op], [0], [3], "main"
    model.subgraphs = [sg]
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"CIR0")
    data = bytes(builder.Output())
    if data_format:
        decoded = fb.decode(data)
        decoded.subgraphs[0].dataFormat = data_format
        data = bytes(fb.encode(decoded))
    return data, weights, bias


def circle_fields(data: bytes):
    return _cls("Model").InitFromObj(Circle.Model.Model.GetRootAs(data, 0))


def _data(model, index):
    data = model.buffers[index].data
    return b"" if data is None else bytes(np.asarray(data, np.uint8))


def test_circle_round_trip_is_lossless():
    data, _, _ = build_circle()
    out = bytes(tfl_fuse.optimize(data, [])[0])
    assert out[4:8] == b"CIR0"
    a, b = circle_fields(data), circle_fields(out)
    assert a.description == b.description
    assert [t.name for t in a.subgraphs[0].tensors] == [t.name for t in b.subgraphs[0].tensors]
    for ta, tb in zip(a.subgraphs[0].tensors, b.subgraphs[0].tensors, strict=True):
        assert list(ta.shape) == list(tb.shape) and ta.type == tb.type
        assert _data(a, ta.buffer) == _data(b, tb.buffer)
    assert (b.operatorCodes[0].builtinCode, b.operatorCodes[0].version) == (
        a.operatorCodes[0].builtinCode,
        1,
    )
    assert list(b.subgraphs[0].operators[0].inputs) == [0, 1, 2]


def test_circle_converts_to_tflite_and_runs_in_litert():
    data, weights, bias = build_circle()
    tflite = bytes(tfl_fuse.optimize(data, [], output_format="tflite")[0])
    assert tflite[4:8] == b"TFL3"
    x = np.random.default_rng(1).normal(size=(1, 4)).astype(np.float32)
    (y,) = verify.run(tflite, [x])
    np.testing.assert_allclose(y, x @ weights.T + bias, rtol=1e-5, atol=1e-6)
    (y_circle,) = verify.run(data, [x])  # verify converts circle in memory
    np.testing.assert_array_equal(y, y_circle)
    back = bytes(tfl_fuse.optimize(tflite, [], output_format="circle")[0])
    assert (
        back[4:8] == b"CIR0"
        and fb.decode(back).subgraphs[0].operators[0].opcode.name == "FULLY_CONNECTED"
    )


def test_circle_only_operator_cannot_become_tflite():
    data, _, _ = build_circle("INSTANCE_NORM")
    assert fb.decode(data).subgraphs[0].operators[0].opcode.name == "INSTANCE_NORM"
    with pytest.raises(ModelError, match="INSTANCE_NORM"):
        tfl_fuse.optimize(data, [], output_format="tflite")


def test_circle_channels_first_is_kept_and_skipped():
    data, _, _ = build_circle(data_format=1)
    model = fb.decode(data)
    assert model.subgraphs[0].dataFormat == 1
    out, report = tfl_fuse.optimize(data)
    assert fb.decode(out).subgraphs[0].dataFormat == 1
    assert any("CHANNELS_FIRST" in d["reason"] for d in report["declined"])
