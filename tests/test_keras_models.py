"""Whole Keras models and small Keras cases converted with tensorflow-cpu: op counts and LiteRT outputs.

Every BatchNormalization gets random statistics (kerasmodels.randomize_batchnorm), so a wrong fold
shows in the outputs. Logits are compared (classifier_activation=None) with rtol 1e-4.
"""

from __future__ import annotations

import kerasmodels
import numpy as np
import pytest
from leftovers import unexplained_leftovers

import tfl_fuse
from tfl_fuse import fb, rules, verify
from tfl_fuse.graph import Graph

pytestmark = pytest.mark.slow
RTOL = 1e-4


def optimize(path):
    data = path.read_bytes()
    out, report = tfl_fuse.optimize(data)
    assert unexplained_leftovers(bytes(out), report) == [], report["declined"]
    return data, bytes(out), report


def assert_outputs_match(original: bytes, optimized: bytes, rtol: float = RTOL) -> float:
    result = verify.compare_models(original, optimized, rtol=rtol)
    assert result["match"], result["summary"]
    return max(result["max_abs_diff"].values())


def residual_adds(model_bytes: bytes) -> tuple[int, list[str]]:
    """(ADDs of two computed tensors, output names of ADDs with a constant operand)."""
    graph = Graph(fb.decode(model_bytes), 0)
    residual, constant = 0, []
    for op in graph.ops_of_type("ADD"):
        if any(graph.is_constant(t) for t in op.inputs):
            constant.append(graph.name(op.outputs[0]))
        else:
            residual += 1
    return residual, constant


def explained(report, names):
    declined_where = " ".join(" ".join(d["ops"]) for d in report["declined"])
    return [n for n in names if n not in declined_where]


@pytest.mark.parametrize("name, residual", [("ResNet50V2", 16), ("ResNet101V2", 33)])
def test_resnet_v2_folds_all_preactivation_bn(name, residual):
    path = kerasmodels.application(name, input_shape=(64, 64, 3), classifier_activation=None)
    data, out, report = optimize(path)
    assert report["ops_before"]["MUL"] == {16: 17, 33: 34}[residual]
    assert report["ops_after"].get("MUL", 0) == 0
    n_residual, constant_adds = residual_adds(out)
    assert n_residual == residual
    assert len(constant_adds) <= 1  # the BN after the stem's zero PAD + MAX_POOL
    assert explained(report, constant_adds) == []
    assert any("zero PAD" in d["reason"] for d in report["declined"])
    assert_outputs_match(data, out)


def test_densenet121_folds_every_mul_and_explains_every_add():
    path = kerasmodels.application(
        "DenseNet121", input_shape=(64, 64, 3), classifier_activation=None
    )
    data, out, report = optimize(path)
    assert report["ops_before"]["MUL"] == 62
    assert report["ops_after"].get("MUL", 0) == 0
    n_residual, constant_adds = residual_adds(out)
    assert n_residual == 0 and len(constant_adds) == report["ops_after"].get("ADD", 0)
    assert explained(report, constant_adds) == []
    assert_outputs_match(data, out)


def test_nasnet_mobile_folds_the_bn_after_each_concat_into_its_convs():
    """NASNetMobile: two 1x1 convs -> CONCATENATION -> MUL -> ADD, four times; both ops go by
    slice into the convs (before this, three of the four BNs stayed)."""
    path = kerasmodels.application(
        "NASNetMobile", input_shape=(96, 96, 3), classifier_activation=None
    )
    data, out, report = optimize(path)
    assert report["ops_before"]["MUL"] == 4
    assert report["ops_after"].get("MUL", 0) == 0
    _, constant_adds = residual_adds(out)
    assert constant_adds == []
    assert sum(r["rule"] == "fold_into_preceding_layer" for r in report["rewrites"]) == 8
    assert_outputs_match(data, out)


@pytest.mark.parametrize("name", ["ResNet50V2", "DenseNet121"])
def test_negative_gammas_still_match_and_are_reported(name):
    path = kerasmodels.application(
        name, input_shape=(64, 64, 3), negative_fraction=0.1, classifier_activation=None, seed=1
    )
    data, out, report = optimize(path)
    assert_outputs_match(data, out)
    left = report["ops_after"].get("MUL", 0)
    assert left > 0
    not_positive = [d for d in report["declined"] if "not positive" in d["reason"]]
    assert len(not_positive) >= left
    assert all("bn" in " ".join(d["ops"]) for d in not_positive)


def keras():
    return kerasmodels.tf().keras


def small_bn_conv(padding):
    def make():
        k = keras()
        inp = k.Input((12, 12, 4))
        x = k.layers.BatchNormalization()(inp)
        return k.Model(inp, k.layers.Conv2D(6, 3, padding=padding)(x))

    return make


def small_conv_relu_bn():
    k = keras()
    inp = k.Input((12, 12, 3))
    x = k.layers.Conv2D(6, 3, padding="same", activation="relu")(inp)
    x = k.layers.BatchNormalization()(x)
    return k.Model(inp, k.layers.Conv2D(4, 1)(x))


def small_concat_bn_relu_conv():
    k = keras()
    inp = k.Input((12, 12, 3))
    a = k.layers.Conv2D(4, 3, padding="same")(inp)
    b = k.layers.Conv2D(2, 1)(inp)
    x = k.layers.Concatenate()([a, b])
    x = k.layers.ReLU()(k.layers.BatchNormalization()(x))
    return k.Model(inp, k.layers.Conv2D(5, 1)(x))


def small_dense_relu_bn_dense():
    k = keras()
    inp = k.Input((10,))
    x = k.layers.Dense(8, activation="relu")(inp)
    x = k.layers.BatchNormalization()(x)
    return k.Model(inp, k.layers.Dense(3)(x))


def small_conv3d_bn():
    k = keras()
    inp = k.Input((4, 6, 6, 2))
    x = k.layers.Conv3D(4, 3, padding="same")(inp)
    return k.Model(inp, k.layers.BatchNormalization()(x))


def small_dilated_conv_bn():
    k = keras()
    inp = k.Input((16, 16, 3))
    x = k.layers.Conv2D(4, 3, padding="same", dilation_rate=2)(inp)
    return k.Model(inp, k.layers.BatchNormalization()(x))


@pytest.mark.parametrize(
    "name, make, mul_after, add_after",
    [
        ("bn_conv_valid", small_bn_conv("valid"), 0, 0),
        ("bn_conv_same", small_bn_conv("same"), 0, 1),
        ("conv_relu_bn", small_conv_relu_bn, 0, 0),
        ("concat_bn_relu_conv", small_concat_bn_relu_conv, 0, 0),
        ("dense_relu_bn_dense", small_dense_relu_bn_dense, 0, 0),
        ("conv3d_bn", small_conv3d_bn, 0, 0),
        ("dilated_conv_bn", small_dilated_conv_bn, 0, 0),
    ],
)
def test_small_keras_cases(name, make, mul_after, add_after):
    data, out, report = optimize(kerasmodels.small(name, make))
    assert report["ops_before"].get("MUL", 0) >= 1, "the converter should have left the BN"
    assert report["ops_after"].get("MUL", 0) == mul_after
    assert report["ops_after"].get("ADD", 0) == add_after
    if add_after:
        _, constant_adds = residual_adds(out)
        assert explained(report, constant_adds) == []
    assert_outputs_match(data, out)


def test_a_second_run_changes_nothing():
    path = kerasmodels.application(
        "ResNet50V2", input_shape=(64, 64, 3), classifier_activation=None
    )
    once, _ = tfl_fuse.optimize(path.read_bytes())
    twice, report = tfl_fuse.optimize(once)
    assert report["rewrites"] == [] and twice == once


def _preact_model():
    k = keras()
    inp = k.Input((16, 16, 3))
    x = k.layers.Conv2D(8, 3, padding="same")(inp)
    y = k.layers.ReLU()(k.layers.BatchNormalization()(x))
    y = k.layers.Conv2D(8, 3, padding="same")(y)
    x = k.layers.Add()([x, y])
    x = k.layers.ReLU()(k.layers.BatchNormalization()(x))
    x = k.layers.GlobalAveragePooling2D()(x)
    return k.Model(inp, k.layers.Dense(4)(x))


def _converted(name, configure):
    def build() -> bytes:
        tf = kerasmodels.tf()
        tf.keras.utils.set_random_seed(0)
        model = _preact_model()
        kerasmodels.randomize_batchnorm(model, 0)
        converter = tf.lite.TFLiteConverter.from_keras_model(model)
        configure(converter, tf)
        return converter.convert()

    return kerasmodels.cached(name, build)


def _int8(converter, tf):
    def representative():
        rng = np.random.default_rng(0)
        for _ in range(8):
            yield [rng.normal(size=(1, 16, 16, 3)).astype(np.float32)]

    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.int8
    converter.inference_output_type = tf.int8


def _float16(converter, tf):
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.target_spec.supported_types = [tf.float16]


def test_fully_int8_model_bn_pairs_become_depthwise():
    data, out, report = optimize(_converted("preact-int8.tflite", _int8))
    graph = Graph(fb.decode(data), 0)
    assert graph.dtype(graph.subgraph.inputs[0]) == "INT8"
    assert report["ops_before"]["MUL"] == 2 and report["ops_after"].get("MUL", 0) == 0
    assert report["ops_after"]["DEPTHWISE_CONV_2D"] == 2
    # one rounding per BN is gone: the int8 logits move by a few quanta at most
    # (tests/test_quantized.py measures the error against the float model)
    interp = verify.interpreter(data)
    for seed in range(3):
        inputs = verify.random_inputs(interp, seed)
        a, b = verify.run(data, inputs)[0], verify.run(out, inputs)[0]
        assert np.max(np.abs(a.astype(int) - b.astype(int))) <= 3


def test_float16_weight_model_folds_and_stays_float16():
    data, out, report = optimize(_converted("preact-fp16.tflite", _float16))
    assert report["ops_before"].get("DEQUANTIZE", 0) > 0 and report["ops_before"]["MUL"] > 0
    assert report["ops_after"].get("MUL", 0) == 0
    assert report["float16_constants_rewritten"] > 0
    graph = Graph(fb.decode(out), 0)
    for layer in graph.ops_of_type("CONV_2D", "FULLY_CONNECTED"):
        weights = graph.producer_of(layer.inputs[1])
        assert weights is not None and weights.opcode.name == "DEQUANTIZE"
        assert graph.dtype(weights.inputs[0]) == "FLOAT16"
    # the folded weights are rounded to float16 once more: outputs move by that rounding
    result = verify.compare_models(data, out, rtol=1e-2)
    assert max(result["max_rel_diff"].values()) < 5e-3, result["summary"]


def test_resnet50_v1_strides_move_up_exactly():
    path = kerasmodels.application("ResNet50", input_shape=(64, 64, 3), classifier_activation=None)
    data, out, report = optimize(path)
    moved = [r for r in report["rewrites"] if r["rule"] == "move_stride_up"]
    assert len(moved) == 3  # the first block of stages 3, 4 and 5
    assert report["ops_after"]["MAX_POOL_2D"] == report["ops_before"]["MAX_POOL_2D"] + 3
    assert assert_outputs_match(data, out) == 0.0  # pixels are only selected: bit-exact


def test_mobilenet_v3_hard_swish_scales_move_into_the_next_layers():
    path = kerasmodels.application(
        "MobileNetV3Small", input_shape=(64, 64, 3), classifier_activation=None
    )
    data = path.read_bytes()
    _, default = tfl_fuse.optimize(data)
    assert default["ops_after"]["MUL"] == 18  # only the input rescaling folds by default
    chosen = [r.name for r in rules.default_rules()] + ["move_bare_scale_forward"]
    out, report = tfl_fuse.optimize(data, chosen)
    assert report["ops_before"]["MUL"] == 19
    assert (
        report["ops_after"]["MUL"] == 9
    )  # the products x * relu6(x + 3) remain; every 1/6 is gone
    assert_outputs_match(data, out)
