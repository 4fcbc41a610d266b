"""One small pre-activation residual Keras net, converted five ways, and error against float.

The net (fixed seeds, random BN statistics) holds the BN placements a quantized ResNet-V2 has:
a BN after MAX_POOL_2D, a BN after a residual ADD that feeds two convs, and a BN before the
MEAN head. Conversions (cached like every Keras model, never committed): ``float``, ``int8``
(TFLiteConverter, representative dataset, int8 input and output), ``dynamic`` (dynamic range),
``float16`` (float16 weights) and ``aeq_int8`` (ai-edge-quantizer ``static_wi8_ai8`` of the
float model).
"""

from __future__ import annotations

import kerasmodels
import numpy as np

from tfl_fuse import verify

SHAPE = (16, 16, 3)
VARIANTS = ("float", "int8", "dynamic", "float16", "aeq_int8")


def _keras_net():
    k = kerasmodels.tf().keras
    inp = k.Input(SHAPE)
    x = k.layers.Conv2D(16, 3, padding="same")(inp)
    x = k.layers.MaxPooling2D(2)(x)
    y = k.layers.ReLU()(k.layers.BatchNormalization()(x))  # BN after MAX_POOL_2D
    y = k.layers.Conv2D(16, 3, padding="same")(y)
    x = k.layers.Add()([x, y])
    z = k.layers.ReLU()(k.layers.BatchNormalization()(x))  # after a residual ADD, two convs
    a = k.layers.Conv2D(16, 1)(z)
    b = k.layers.Conv2D(16, 3, padding="same")(z)
    x = k.layers.Add()([x, a, b])
    x = k.layers.ReLU()(k.layers.BatchNormalization()(x))  # before the head
    x = k.layers.GlobalAveragePooling2D()(x)
    return k.Model(inp, k.layers.Dense(8)(x))


def calibration(count: int = 16, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(1, *SHAPE)).astype(np.float32) for _ in range(count)]


def _convert(variant: str) -> bytes:
    tf = kerasmodels.tf()
    if variant == "aeq_int8":
        return _ai_edge_int8(path("float").read_bytes())
    tf.keras.utils.set_random_seed(0)
    model = _keras_net()
    kerasmodels.randomize_batchnorm(model, 0)
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if variant != "float":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if variant == "int8":
        converter.representative_dataset = lambda: ([x] for x in calibration())
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
    elif variant == "float16":
        converter.target_spec.supported_types = [tf.float16]
    return converter.convert()


def _ai_edge_int8(float_model: bytes) -> bytes:
    from ai_edge_quantizer import quantizer, recipe

    qt = quantizer.Quantizer(float_model, recipe.static_wi8_ai8())
    interp = verify.interpreter(float_model)
    name = interp.get_signature_list()["serving_default"]["inputs"][0]
    samples = [{name: x} for x in calibration()]
    result = qt.calibrate({"serving_default": samples})
    return bytes(qt.quantize(result, enable_progress_bar=False).quantized_model)


def path(variant: str):
    return kerasmodels.cached(f"preact-quant-{variant}.tflite", lambda: _convert(variant))


def _run_real(model: bytes, x: np.ndarray) -> np.ndarray:
    """Run on a float input; quantize it when the model takes integers, dequantize the output."""
    interp = verify.interpreter(model)
    detail = interp.get_input_details()[0]
    value = x
    if np.dtype(detail["dtype"]).kind == "i":
        scale, zero = detail["quantization"]
        info = np.iinfo(detail["dtype"])
        value = np.clip(np.round(x / scale) + zero, info.min, info.max).astype(detail["dtype"])
    interp.set_tensor(detail["index"], value)
    interp.invoke()
    out = interp.get_output_details()[0]
    y = interp.get_tensor(out["index"]).astype(np.float64)
    if np.dtype(out["dtype"]).kind == "i":
        scale, zero = out["quantization"]
        y = scale * (y - zero)
    return y


def rms_error(model: bytes, reference: bytes, count: int = 32, seed: int = 7) -> float:
    """RMS difference of the dequantized outputs of ``model`` and ``reference`` on seeded inputs."""
    rng = np.random.default_rng(seed)
    total, n = 0.0, 0
    for _ in range(count):
        x = rng.normal(size=(1, *SHAPE)).astype(np.float32)
        d = _run_real(model, x) - _run_real(reference, x)
        total += float(np.sum(d * d))
        n += d.size
    return float(np.sqrt(total / n))
