"""BN folds in already-quantized models (rules/quantized.py, DESIGN.md 3b).

One Keras pre-activation residual net (tests/quantmodels.py) converted five ways; each
optimized model is compared with the float model on seeded inputs (dequantized outputs): no
MUL may remain, and its RMS error against float may not exceed the quantized input's own.
"""

from __future__ import annotations

import chef
import numpy as np
import pytest
import quantmodels

import tfl_fuse
from tfl_fuse import fb, verify
from tfl_fuse.cli import list_rules
from tfl_fuse.graph import Graph
from tfl_fuse.rules.predicates import LINEAR_OPS


def delegate_partitions(model: bytes) -> int:
    interp = verify.interpreter(model, threads=1, delegate=True)
    return sum(d["op_name"] == "DELEGATE" for d in interp._get_ops_details())


def leftover_linear_ops(model: bytes) -> list[str]:
    graph = Graph(fb.decode(model), 0)
    return [
        f"{op.opcode.name}:{graph.name(op.outputs[0])}"
        for op in graph.ops_of_type(*LINEAR_OPS)
        if any(t >= 0 and graph.is_constant(t) for t in op.inputs)
    ]


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["int8", "aeq_int8"])
def test_quantized_preactivation_net_loses_every_mul_and_no_accuracy(variant):
    reference = quantmodels.path("float").read_bytes()
    data = quantmodels.path(variant).read_bytes()
    out, report = tfl_fuse.optimize(data)
    assert report["ops_before"]["MUL"] == 3
    assert report["ops_after"].get("MUL", 0) == 0
    assert report["ops_after"]["DEPTHWISE_CONV_2D"] == 3
    assert report["ops_after"]["ADD"] == 3  # the residual adds
    before = quantmodels.rms_error(data, reference)
    after = quantmodels.rms_error(out, reference)
    print(f"{variant}: RMS error vs float {before:.5f} -> {after:.5f}, ratio {after / before:.3f}")
    assert after / before <= 1.0
    assert delegate_partitions(out) <= delegate_partitions(data)


@pytest.mark.slow
def test_dynamic_range_net_loses_every_mul_exactly():
    reference = quantmodels.path("float").read_bytes()
    data = quantmodels.path("dynamic").read_bytes()
    out, report = tfl_fuse.optimize(data)
    assert report["ops_before"]["MUL"] == 3 and report["ops_after"].get("MUL", 0) == 0
    fired = {r["rule"] for r in report["rewrites"]}
    assert "dynamic_range_bn_to_depthwise" in fired  # the BNs before int8-weight convs
    before = quantmodels.rms_error(data, reference)
    after = quantmodels.rms_error(out, reference)
    print(f"dynamic: RMS error vs float {before:.5f} -> {after:.5f}, ratio {after / before:.6f}")
    assert after / before <= 1.0 + 1e-4  # exact in float: float32 rounding only
    assert delegate_partitions(out) <= delegate_partitions(data)


@pytest.mark.slow
def test_float16_weight_net_folds_into_float16_weights():
    """Folded weights are rounded to float16 once more (float16.py): that rounding is as large
    as the model's own, so the error against float grows by about sqrt(2), not more."""
    reference = quantmodels.path("float").read_bytes()
    data = quantmodels.path("float16").read_bytes()
    out, report = tfl_fuse.optimize(data)
    assert report["ops_before"]["MUL"] == 3 and report["ops_after"].get("MUL", 0) == 0
    assert report["ops_after"]["DEQUANTIZE"] >= 5  # every layer's weights stay float16
    assert len(out) < len(data)
    before = quantmodels.rms_error(data, reference)
    after = quantmodels.rms_error(out, reference)
    print(f"float16: RMS error vs float {before:.2e} -> {after:.2e}, ratio {after / before:.3f}")
    assert after / before <= 1.5
    assert delegate_partitions(out) <= delegate_partitions(data)


@pytest.mark.slow
def test_float16_folds_float32_keeps_the_float16_model_exact():
    """--float16-folds float32: the changed weights stay float32, so the model computes what
    the float16 input did (float32 rounding aside) and passes --verify at the default tolerance.
    A layer whose weights end float32 takes a float32 bias too (XNNPACK does not delegate the
    mix): here every layer's."""
    reference = quantmodels.path("float").read_bytes()
    data = quantmodels.path("float16").read_bytes()
    out, report = tfl_fuse.optimize(data, float16_folds="float32", verify=True)
    assert report["ops_before"]["MUL"] == 3 and report["ops_after"].get("MUL", 0) == 0
    assert report["verify"]["match"] and report["verify"]["tolerance"] == 1e-5
    assert report["float16_constants_kept_float32"] == 9  # 8 folded + 1 bias beside them
    assert "float16_constants_rewritten" not in report
    assert "DEQUANTIZE" not in report["ops_after"]
    assert len(out) > len(data)  # two more bytes per changed weight
    before = quantmodels.rms_error(data, reference)
    after = quantmodels.rms_error(out, reference)
    assert after / before <= 1.0 + 1e-3
    with pytest.raises(ValueError, match="float16_folds must be one of"):
        tfl_fuse.optimize(data, float16_folds="bfloat16")


def test_every_quantized_constant_op_left_is_explained():
    data, _ = chef.cook("recipes/Net_Quant_Conv_PerTensor_Mul_000")
    out, report = tfl_fuse.optimize(data)
    left = leftover_linear_ops(out)
    assert left
    for name in left:
        kind, tensor = name.split(":", 1)
        assert any(
            f"{kind}:{tensor}" in d["ops"] and d["rule"] in ("fold_into_quantized_layer", "*")
            for d in report["declined"]
        ), (name, report["declined"])


def _conv_mul(weights: list[int], scale: list[int]) -> bytes:
    """int8 conv 1x1 (2 channels, per-axis) -> int8 MUL, weights and scale given."""
    recipe = {
        "name": "conv_mul",
        "inputs": ["ifm"],
        "outputs": ["ofm"],
        "operand": [
            {"name": "ifm", "shape": [1, 2, 2, 2], "type": "int8", "quant": {"scale": [0.05]}},
            {
                "name": "ker",
                "shape": [2, 1, 1, 2],
                "type": "int8",
                "filler": {"kind": "explicit", "values": weights},
                "quant": {"scale": [0.01, 0.02], "zero_point": [0, 0]},
            },
            {
                "name": "bias",
                "shape": [2],
                "type": "int32",
                "filler": {"kind": "explicit", "values": [10, -20]},
                "quant": {"scale": [0.0005, 0.001], "zero_point": [0, 0]},
            },
            {"name": "conv", "shape": [1, 2, 2, 2], "type": "int8", "quant": {"scale": [0.1]}},
            {
                "name": "s",
                "shape": [2],
                "type": "int8",
                "filler": {"kind": "explicit", "values": scale},
                "quant": {"scale": [0.02]},
            },
            {"name": "ofm", "shape": [1, 2, 2, 2], "type": "int8", "quant": {"scale": [0.1]}},
        ],
        "operation": [
            {"type": "CONV_2D", "inputs": ["ifm", "ker", "bias"], "outputs": ["conv"]},
            {"type": "MUL", "inputs": ["conv", "s"], "outputs": ["ofm"]},
        ],
    }
    return bytes(fb.encode(chef.build_model(recipe)))


def test_negative_scale_negates_integers_and_keeps_their_magnitudes():
    out, report = tfl_fuse.optimize(_conv_mul([100, -50, 20, 127], [-50, 25]))
    assert report["ops_after"].get("MUL", 0) == 0
    graph = Graph(fb.decode(out), 0)
    conv = graph.ops_of_type("CONV_2D")[0]
    weights = graph.constant(conv.inputs[1]).reshape(2, 2)
    assert weights.tolist() == [[-100, 50], [20, 127]]  # channel 0 negated, integers kept
    q = graph.tensors[conv.inputs[1]].quantization
    np.testing.assert_allclose(q.scale, [0.01 * 1.0, 0.02 * 0.5], rtol=1e-6)
    assert graph.constant(conv.inputs[2]).tolist() == [-10, -20]
    np.testing.assert_allclose(
        graph.tensors[conv.inputs[2]].quantization.scale, [0.05 * 0.01, 0.05 * 0.01], rtol=1e-6
    )


def test_a_channel_holding_minus_128_is_not_negated():
    out, report = tfl_fuse.optimize(_conv_mul([-128, 5, 20, 30], [-50, 25]))
    assert report["ops_after"]["MUL"] == 1
    assert any("-128" in d["reason"] for d in report["declined"]), report["declined"]


def test_list_rules_tags_the_quantized_rules():
    lines = {line.split()[0]: line for line in list_rules().splitlines()}
    assert "[quantized tensors]" in lines["fold_into_quantized_layer"]
    assert "[quantized tensors]" in lines["quantized_bn_to_depthwise"]
    assert "[quantized tensors]" in lines["dynamic_range_bn_to_depthwise"]
    assert "[quantized tensors]" not in lines["fold_into_preceding_layer"]


def test_verify_compares_quantized_outputs_in_quanta():
    data, _ = chef.cook("recipes/Net_Quant_Conv_Mul_NegZero_000")
    out, report = tfl_fuse.optimize(data, verify=True)
    quanta = report["verify"]["quanta"]["ofm"]
    assert quanta["max"] == 1  # one rounding fewer: values move by one quantum at most
    assert 0 < quanta["mean"] < 0.5 and quanta["share_over_1"] == 0
    assert "quanta apart" in report["verify"]["summary"]


def test_verify_still_catches_a_wrong_quantized_model():
    data, _ = chef.cook("recipes/Net_Quant_Conv_Mul_000")
    other = fb.decode(data)
    graph = Graph(other, 0)
    scale = graph.tensors[graph.ops_of_type("MUL")[0].inputs[1]]
    scale.quantization.scale = scale.quantization.scale * 1.5  # a different model
    result = verify.compare_models(data, bytes(fb.encode(other)))
    assert not result["match"]


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["int8", "aeq_int8", "dynamic", "float16"])
def test_a_second_run_changes_nothing(variant):
    once, _ = tfl_fuse.optimize(quantmodels.path(variant).read_bytes())
    twice, report = tfl_fuse.optimize(once)
    assert report["rewrites"] == [] and twice == once


def _with_mul_scale(recipe: str, scale: float) -> bytes:
    data, _ = chef.cook(f"recipes/{recipe}")
    model = fb.decode(data)
    graph = Graph(model, 0)
    tensor = graph.tensors[graph.ops_of_type("MUL")[0].inputs[1]]
    tensor.quantization.scale = np.array([scale], np.float32)
    return bytes(fb.encode(model))


def test_a_fold_whose_requantization_would_overflow_is_declined():
    # fuzz --verify: a MUL constant scaled 3.6e14 made the folded FULLY_CONNECTED's multiplier
    # 4e13; LiteRT shifts the int32 accumulator left by its exponent, which wrapped: outputs 117
    # quanta off on average, where the original saturates
    data = _with_mul_scale("Net_Quant_FC_Mul_Add_000", 3.6028796e14)
    out, report = tfl_fuse.optimize(data, verify=True)
    assert report["ops_after"]["MUL"] == 1
    reasons = [d["reason"] for d in report["declined"] if d["rule"] == "fold_into_quantized_layer"]
    assert any("would overflow LiteRT's 32-bit requantization" in r for r in reasons), reasons
    assert report["verify"]["match"]
    # an ordinary scale still folds
    out, report = tfl_fuse.optimize(_with_mul_scale("Net_Quant_FC_Mul_Add_000", 0.01))
    assert report["ops_after"].get("MUL", 0) == 0


def test_accumulator_reach_and_the_multiplier_bound():
    from tfl_fuse.rules import Decline
    from tfl_fuse.rules.quantized import accumulator_reach, check_multiplier

    weights = np.array([[1, -2, 3], [127, 0, -127]], np.int8)
    # |x - zero point| up to 127 + 5 for int8 inputs of zero point -5
    reach = accumulator_reach(weights, 0, np.array([10, -1000]), "INT8", -5)
    assert reach.tolist() == [6 * 132 + 10, 254 * 132 + 1000]
    check_multiplier(1.0, np.array([0.5, 1.0]), 1.0, reach)  # no left shift
    check_multiplier(1.0, np.array([2.0**10, 1.0]), 1.0, reach)  # 802 * 2**11 < 2**31
    with pytest.raises(Decline, match="would overflow LiteRT's 32-bit requantization"):
        check_multiplier(1.0, np.array([1.0, 2.0**15]), 1.0, reach)  # 34528 * 2**16 >= 2**31
    check_multiplier(1.0, np.array([1.0, 2.0**15]), 1.0, reach, "INT64")  # 64-bit: room
