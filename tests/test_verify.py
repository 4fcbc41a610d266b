"""verify.compare_arrays and compare_models on what LiteRT can return or raise (fuzz --verify)."""

from __future__ import annotations

import sys
import warnings

import chef
import numpy as np
import pytest
from conftest import RECIPES

import tfl_fuse
from tfl_fuse import cli, fb, verify
from tfl_fuse.model import ModelError

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    "expected, actual, match",
    [
        ([1.0, NAN, 3.0], [1.0, NAN, 3.0], True),
        # where the original is NaN anything goes: LiteRT's kernels clamp NaN differently
        ([1.0, NAN, 3.0], [1.0, 2.0, 3.0], True),
        ([1.0, NAN, 3.0], [1.0, 3.4e38, 3.0], True),
        ([1.0, NAN, 3.0], [1.5, 2.0, 3.0], False),  # the other values are still compared
        ([1.0, 2.0, 3.0], [1.0, NAN, 3.0], False),
        ([1.0, INF, -INF], [1.0, INF, -INF], True),
        ([1.0, INF, 3.0], [1.0, -INF, 3.0], False),
        ([1.0, INF, 3.0], [1.0, 3e38, 3.0], False),
        ([1.0, NAN, 3.0], [1.0, INF, 3.0], True),
        ([1.0, 2.0, INF], [1.0, 2.0, NAN], False),
        # atol scales with the largest finite value (1e-5 * 1e6 = 10), not with NaN or infinity
        ([1e6, NAN, INF, 0.0], [1e6, NAN, INF, 9.0], True),
        ([1e6, NAN, INF, 0.0], [1e6, NAN, INF, 11.0], False),
        ([NAN, NAN], [NAN, NAN], True),
    ],
)
def test_compare_arrays_with_nan_and_infinity(expected, actual, match):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy said "atol: nan is not valid" before
        ok, diff = verify.compare_arrays(
            np.array(expected, np.float32), np.array(actual, np.float32)
        )
    assert ok is match
    if match:
        assert np.isfinite(diff)


def test_compare_arrays_finite_difference_and_complex_values():
    ok, diff = verify.compare_arrays(np.array([1.0, 2.0]), np.array([1.0, 2.5]))
    assert not ok and diff == pytest.approx(0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no ComplexWarning: the imaginary part counts
        assert verify.compare_arrays(np.array([1 + 1j]), np.array([1 + 1j]))[0]
        assert not verify.compare_arrays(np.array([1 + 1j]), np.array([1 + 2j]))[0]


@pytest.fixture(scope="module")
def pair() -> tuple[bytes, bytes]:
    data, _ = chef.cook(RECIPES / "Net_Conv_Add_Mul_000")
    out, report = tfl_fuse.optimize(data)
    assert report["rewrites"]
    return data, out


def _failing_for(monkeypatch, target: bytes, error: Exception) -> None:
    run = verify.run

    def failing(data, inputs):
        if bytes(data) == target:
            raise error
        return run(data, inputs)

    monkeypatch.setattr(verify, "run", failing)


def test_litert_failing_on_the_original_is_bad_input(monkeypatch, pair):
    # fuzz: "Input tensor 2 lacks data" at invoke, "Tensor data is null" reading an output, an
    # allocation that succeeded once and failed the next time: a RuntimeError or ValueError
    # from LiteRT, which reached the CLI as "internal error"
    original, optimized = pair
    _failing_for(monkeypatch, original, ValueError("Tensor data is null. Run allocate_tensors()"))
    with pytest.raises(ModelError, match="^--verify: LiteRT cannot run the original model: Tensor"):
        verify.compare_models(original, optimized)


def test_litert_failing_on_the_optimized_model_only_is_a_mismatch(monkeypatch, pair):
    original, optimized = pair
    _failing_for(
        monkeypatch, optimized, RuntimeError("Node number 0 (MUL) failed to invoke.\nmore")
    )
    result = verify.compare_models(original, optimized)
    assert result["match"] is False
    assert result["summary"] == (
        "LiteRT cannot run the optimized model, which runs the original: "
        "Node number 0 (MUL) failed to invoke."
    )


def test_litert_runs_leave_the_callers_bytes_and_each_other_alone():
    """LiteRT writes what the caller sets into a graph input that has data, in the model bytes
    it was given (fuzz --verify): verify's runs then changed the caller's bytes object and each
    other's constants, and reported a mismatch with no rewrite to blame."""
    from ai_edge_litert.tools import flatbuffer_utils

    data, _ = chef.cook(RECIPES / "Net_Conv_Add_Mul_000")
    model = flatbuffer_utils.read_model_from_bytearray(bytearray(data))
    model.subgraphs[0].inputs = [0, 1]  # the kernel too: a graph input that has data
    data = bytes(flatbuffer_utils.convert_object_to_bytearray(model))
    before = bytes(bytearray(data))
    out, report = tfl_fuse.optimize(data, verify=True)
    assert data == before
    assert report["verify"]["match"]
    interp = verify.interpreter(data)
    inputs = verify.random_inputs(interp, 0)
    first = verify.run(data, inputs)
    verify.run(data, verify.random_inputs(interp, 1))
    assert all(np.array_equal(a, b) for a, b in zip(first, verify.run(data, inputs)))


def test_a_graph_input_that_holds_data_is_run_with_its_data():
    """A STRIDED_SLICE's strides as a graph input that holds [1, 1, 1, 1] (fuzz --verify): fed
    random integers, LiteRT sliced with strides like -9 and read memory no one wrote, so two
    runs of the same model differed ("no rewrite to blame"). verify runs it with its data."""
    from ai_edge_litert.tools import flatbuffer_utils

    data, _ = chef.cook(RECIPES / "Net_TConv_Crop_BN_000")
    model = flatbuffer_utils.read_model_from_bytearray(bytearray(data))
    main = model.subgraphs[0]
    strides = next(i for i, t in enumerate(main.tensors) if t.name in ("strides", b"strides"))
    main.inputs = [0, strides]
    data = bytes(flatbuffer_utils.convert_object_to_bytearray(model))
    assert verify.stored_inputs(data) == {strides}
    interp = verify.interpreter(data)
    inputs = verify.random_inputs(interp, 0, "normal", verify.stored_inputs(data))
    assert inputs[1].tolist() == [1, 1, 1, 1] and inputs[0].dtype == np.float32
    assert not np.array_equal(verify.random_inputs(interp, 0)[1], [1, 1, 1, 1])
    out, report = tfl_fuse.optimize(data, verify=True)
    assert report["verify"]["match"]


def test_no_seeded_values_for_a_string_input_is_a_clear_error():
    class Strings:  # what LiteRT's interpreter says of a STRING graph input
        def get_input_details(self):
            return [{"shape": np.array([2]), "dtype": np.object_, "name": "text"}]

    with pytest.raises(ModelError, match="no seeded values of type object for graph input 'text'"):
        verify.random_inputs(Strings())


def _with_bias(data: bytes, bias: list[int]) -> bytes:
    from ai_edge_litert.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model_from_bytearray(bytearray(data))
    tensor = next(t for t in model.subgraphs[0].tensors if t.name in ("bias", b"bias"))
    model.buffers[tensor.buffer].data = np.array(bias, "<i4").view(np.uint8)
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


@pytest.fixture(scope="module")
def clipping() -> bytes:
    """int8 CONV -> MUL -> ADD where a large bias makes the MUL's output clip at 127 on the
    'large' inputs: the fold removes that clip (DESIGN.md 3b)."""
    data, _ = chef.cook(RECIPES / "Net_Quant_Conv_Mul_Add_000")
    return _with_bias(data, [-238, -202, 38970, -408])


def test_a_fold_that_removes_a_clip_passes_verify_and_names_the_tensor(clipping):
    # fuzz --verify: 20 quanta apart where the original clipped 'mul', a mismatch before
    out, report = tfl_fuse.optimize(clipping, verify=True)
    result = report["verify"]
    assert [e["rule"] for e in report["rewrites"]] == ["fold_into_quantized_layer"] * 2
    assert result["match"] and result["clipped_intermediates"] == ["mul"]
    entry = result["quanta"]["ofm"]
    assert entry["max"] <= 1 < verify.QUANTA_MAX < entry["clipped_max"]
    assert "where the original clips 'mul'" in result["summary"]


def test_clipped_intermediates_are_removed_tensors_at_their_limits(clipping):
    out, _ = tfl_fuse.optimize(clipping)
    reference = verify.interpreter(clipping)
    small = verify.random_inputs(reference, 0, "normal")
    large = verify.random_inputs(reference, 2, "large")
    assert verify.clipped_intermediates(clipping, out, small) == []
    assert verify.clipped_intermediates(clipping, out, large) == ["mul"]
    assert verify.clipped_intermediates(clipping, clipping, large) == []  # nothing removed


def test_a_wrong_fold_is_still_a_mismatch_where_the_original_clips(clipping):
    # the excuse lifts only the max bound, on inputs where a removed tensor clipped: a channel
    # whose folded bias has the wrong sign is off on every input, and the mean bound catches it
    out, _ = tfl_fuse.optimize(clipping)
    model = fb.decode(out)
    bias = next(t for t in model.subgraphs[0].tensors if t.name == "bias")
    folded = np.frombuffer(model.buffers[bias.buffer].data, "<i4")
    wrong = _with_bias(out, list(folded * [1, 1, -1, 1]))
    assert verify.clipped_intermediates(
        clipping, wrong, verify.random_inputs(verify.interpreter(clipping), 2, "large")
    ) == ["mul"]
    result = verify.compare_models(clipping, wrong)
    assert not result["match"]
    assert result["quanta"]["ofm"]["mean"] > verify.QUANTA_MEAN


def _with_weight(data: bytes, name: str, index: tuple[int, ...], value: float) -> bytes:
    from ai_edge_litert.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model_from_bytearray(bytearray(data))
    tensor = next(t for t in model.subgraphs[0].tensors if t.name in (name, name.encode()))
    weights = np.frombuffer(bytes(model.buffers[tensor.buffer].data), "<f4").copy()
    weights.reshape(tensor.shape)[index] = value
    model.buffers[tensor.buffer].data = weights.view(np.uint8)
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def test_at_float_limit():
    assert not verify.at_float_limit([np.array([1e30, NAN], np.float32), np.array([2**31 - 1])])
    assert verify.at_float_limit([np.array([1.0, -3.4e38], np.float32)])
    assert verify.at_float_limit([np.array([1.0, INF], np.float32)])
    assert verify.at_float_limit([np.array([1.0, INF], np.float16)])
    assert not verify.at_float_limit([np.array([60000.0], np.float16)])  # only inf, in float16
    assert not verify.at_float_limit([np.array([NAN, NAN], np.float32)])


def test_inputs_where_the_original_reaches_floats_limit_are_not_compared():
    """A NaN weight (fuzz --verify): the conv's channel is NaN, MAX_POOL_2D turns it into
    -FLT_MAX, and the next conv multiplies that by weights equalization rescaled, 3e37 apart.
    Float arithmetic at its limit is no function a rewrite can keep: verify says so."""
    data, _ = chef.cook(RECIPES / "Net_Conv_Relu_BN_MaxPool_Conv_000")
    data = _with_weight(data, "k1", (1, 2, 2, 2), NAN)
    out, report = tfl_fuse.optimize(data, target="int8", verify=True)
    assert "equalize_cross_layer" in [e["rule"] for e in report["rewrites"]]
    result = report["verify"]
    assert result["match"] and result["not_compared"] == ["normal", "zeros", "large"]
    assert "not compared on the normal, zeros, large inputs" in result["summary"]
    # compared anyway, those outputs differ: the excuse is what lets them pass
    reference = verify.interpreter(data)
    inputs = verify.random_inputs(reference, 0)
    expected, actual = verify.run(data, inputs), verify.run(out, inputs)
    assert verify.at_float_limit(expected)
    assert not all(verify.compare_arrays(e, a)[0] for e, a in zip(expected, actual))


def test_inputs_below_floats_limit_are_still_compared(pair):
    data, out = pair
    result = verify.compare_models(data, out)
    assert result["match"] and "not_compared" not in result
    wrong = _with_weight(out, "ker", (0, 0, 0, 0), 5.0)
    assert not verify.compare_models(data, wrong)["match"]


def _crashing_for(monkeypatch, target: bytes) -> None:
    """LiteRT crashing (SIGSEGV) when it runs ``target``, as it does on some malformed models."""
    import os
    import signal

    run = verify.run

    def crashing(data, inputs):
        if bytes(data) == target:
            os.kill(os.getpid(), signal.SIGSEGV)  # in the verifying child
        return run(data, inputs)

    monkeypatch.setattr(verify, "run", crashing)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="contained by fork on Linux")
def test_litert_crashing_on_the_optimized_model_is_a_mismatch(monkeypatch, pair):
    original, optimized = pair
    _crashing_for(monkeypatch, optimized)
    result = verify.compare_models(original, optimized)
    assert not result["match"]
    assert result["summary"] == (
        "LiteRT crashes (SIGSEGV) running the optimized model, which runs the original"
    )


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="contained by fork on Linux")
def test_a_crash_running_both_models_where_each_runs_alone_is_not_blamed_on_the_optimized(
    monkeypatch, pair
):
    """fuzz seed 108: a 2 GB output; the child running both models was killed (out of memory),
    and verify said the optimized model crashes. Each runs alone: it says so instead."""
    import os
    import signal

    original, optimized = pair
    run = verify.run
    ran = []

    def crashing_when_both_ran(data, inputs):
        ran.append(bytes(data))
        if bytes(data) == optimized and original in ran:  # memory that runs out the second time
            os.kill(os.getpid(), signal.SIGKILL)
        return run(data, inputs)

    monkeypatch.setattr(verify, "run", crashing_when_both_ran)
    with pytest.raises(ModelError, match=r"crashes \(SIGKILL\) running the two models one after"):
        verify.compare_models(original, optimized)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="contained by fork on Linux")
def test_litert_crashing_on_the_original_is_bad_input(monkeypatch, capsys, tmp_path, pair):
    original, optimized = pair
    _crashing_for(monkeypatch, original)
    with pytest.raises(ModelError, match=r"^--verify: LiteRT crashes \(SIGSEGV\) running the "):
        verify.compare_models(original, optimized)
    # the CLI lives on to say it in one line, and writes nothing
    source, out = tmp_path / "in.tflite", tmp_path / "out.tflite"
    source.write_bytes(original)
    assert cli.main([str(source), str(out), "--verify"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "LiteRT crashes (SIGSEGV) running the original model" in err
    assert not out.exists()


def test_errors_in_the_verifying_child_are_raised_in_the_caller(monkeypatch, pair):
    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(verify, "compare_in_process", broken)
    with pytest.raises(ZeroDivisionError, match="a bug"):
        verify.compare_models(*pair)


def test_a_graph_input_whose_data_litert_cannot_read_is_a_clear_error():
    # fuzz --verify: a kernel of type RESOURCE made a graph input; LiteRT's Python API raised
    # a bare ValueError reading its data ("internal error"). Validation now refuses a layer's
    # weights of that type, so the graph input here is a RESOURCE tensor of its own.
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    data, _ = chef.cook(RECIPES / "Net_Conv_Add_Mul_000")
    model = flatbuffer_utils.read_model_from_bytearray(bytearray(data))
    stored = schema.BufferT()
    stored.data = [1, 0, 0, 0, 0, 0, 0, 0]  # a graph input with data: verify reads it
    model.buffers.append(stored)
    handle = schema.TensorT()
    handle.name, handle.type, handle.shape = "handle", schema.TensorType.RESOURCE, [1]
    handle.buffer = len(model.buffers) - 1
    model.subgraphs[0].tensors.append(handle)
    model.subgraphs[0].inputs = [0, len(model.subgraphs[0].tensors) - 1]
    data = bytes(flatbuffer_utils.convert_object_to_bytearray(model))
    with pytest.raises(ModelError, match="^--verify: LiteRT cannot read the data of graph input"):
        tfl_fuse.optimize(data, verify=True)


def test_nan_outputs_of_the_original_are_not_compared():
    """A NaN weight in a TRANSPOSE_CONV (fuzz --verify, --target int8): the BN after it became a
    DEPTHWISE_CONV_2D whose fused RELU clamps NaN to FLT_MAX, where the ADD's kept NaN. The other
    values still match; the report counts the NaN ones."""
    data, _ = chef.cook(RECIPES / "Net_TConv_Crop_BN_000")
    negative_nan = np.array(0xFFFFFFFF, np.uint32).view(np.float32)  # the fuzzer's bytes
    data = _with_weight(data, "w", (4, 1, 2, 1), negative_nan)
    out, report = tfl_fuse.optimize(data, target="int8", verify=True)
    assert "standalone_bn_to_depthwise" in [e["rule"] for e in report["rewrites"]]
    result = report["verify"]
    assert result["match"] and result["nan_not_compared"]["ofm"] > 0
    assert "NaN value(s) of the original not compared" in result["summary"]
    inputs = verify.random_inputs(verify.interpreter(data), 0)
    expected, actual = verify.run(data, inputs)[0], verify.run(out, inputs)[0]
    nan = np.isnan(expected)
    assert np.isnan(actual[nan]).sum() < nan.sum()  # what NaN became differs
    assert np.allclose(expected[~nan], actual[~nan], rtol=1e-5, atol=1e-5)
