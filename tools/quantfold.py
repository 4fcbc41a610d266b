#!/usr/bin/env python3
"""Measure BN folding in already-quantized Keras ResNet50V2 models (rules/quantized.py).

    python tools/quantfold.py [--size 64] [--model ResNet50V2]

Builds (cached under build/cache, or $TFL_FUSE_CACHE) the Keras model with random BN statistics
as tests/kerasmodels.py does, converts it to full int8 (TFLiteConverter, representative dataset,
int8 input and output), to ai-edge-quantizer static int8 (``static_wi8_ai8``) of the float
model, to TF's dynamic range and to TF's float16 weights; optimizes each with tfl_fuse (the
float16 one also with ``float16_folds="float32"``) and prints MUL and op counts before and
after, the RMS error of each against the float model on seeded inputs (dequantized), its ratio,
the output difference to the unfolded model in quanta (quantized outputs), XNNPACK
partitions, size, and latency (XNNPACK, 1 thread, interleaved median, with an A/A noise figure).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import kerasmodels  # noqa: E402
import quantbench  # noqa: E402  (tools/, this script's folder)

import tfl_fuse  # noqa: E402
from tfl_fuse import api, verify  # noqa: E402


def calibration(shape: tuple[int, ...], count: int = 16) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.normal(size=(1, *shape)).astype(np.float32) for _ in range(count)]


def keras_model(name: str, shape: tuple[int, ...]):
    tf = kerasmodels.tf()
    model = getattr(tf.keras.applications, name)(
        weights=None, input_shape=shape, classifier_activation=None
    )
    kerasmodels.randomize_batchnorm(model, 0)
    return model


def tf_int8(name: str, shape: tuple[int, ...]) -> bytes:
    tf = kerasmodels.tf()
    converter = tf.lite.TFLiteConverter.from_keras_model(keras_model(name, shape))
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([x] for x in calibration(shape))
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.int8
    converter.inference_output_type = tf.int8
    return converter.convert()


def tf_weights_only(name: str, shape: tuple[int, ...], kind: str) -> bytes:
    """TF's dynamic-range (``int8`` weights) or float16-weight conversion of the float model."""
    tf = kerasmodels.tf()
    converter = tf.lite.TFLiteConverter.from_keras_model(keras_model(name, shape))
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if kind == "float16":
        converter.target_spec.supported_types = [tf.float16]
    return converter.convert()


def ai_edge_int8(float_model: bytes, shape: tuple[int, ...]) -> bytes:
    from ai_edge_quantizer import quantizer, recipe

    qt = quantizer.Quantizer(float_model, recipe.static_wi8_ai8())
    interp = verify.interpreter(float_model)
    name = interp.get_signature_list()["serving_default"]["inputs"][0]
    result = qt.calibrate({"serving_default": [{name: x} for x in calibration(shape)]})
    return bytes(qt.quantize(result, enable_progress_bar=False).quantized_model)


def run_real(model: bytes, x: np.ndarray) -> np.ndarray:
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


def rms(model: bytes, reference: bytes, shape: tuple[int, ...], count: int) -> float:
    rng = np.random.default_rng(7)
    total, n = 0.0, 0
    for _ in range(count):
        x = rng.normal(size=(1, *shape)).astype(np.float32)
        d = run_real(model, x) - run_real(reference, x)
        total += float(np.sum(d * d))
        n += d.size
    return float(np.sqrt(total / n))


def partitions(model: bytes) -> int:
    interp = verify.interpreter(model, threads=1, delegate=True)
    return sum(d["op_name"] == "DELEGATE" for d in interp._get_ops_details())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ResNet50V2")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--inputs", type=int, default=8, help="seeded inputs for the error")
    parser.add_argument("--rounds", type=int, default=30, help="latency rounds (at least)")
    args = parser.parse_args(argv)
    shape = (args.size, args.size, 3)
    float_path = kerasmodels.application(args.model, shape, classifier_activation=None)
    reference = float_path.read_bytes()
    stem = f"{args.model}-{args.size}x{args.size}x3-s0"
    models = {
        "TF int8": kerasmodels.cached(f"{stem}-tfint8.tflite", lambda: tf_int8(args.model, shape)),
        "ai-edge-quantizer int8": kerasmodels.cached(
            f"{stem}-aeqint8.tflite", lambda: ai_edge_int8(reference, shape)
        ),
        "TF dynamic range": kerasmodels.cached(
            f"{stem}-tfdynamic.tflite", lambda: tf_weights_only(args.model, shape, "dynamic")
        ),
        "TF float16": kerasmodels.cached(
            f"{stem}-float16.tflite", lambda: tf_weights_only(args.model, shape, "float16")
        ),
    }
    runs = [(label, path, {}) for label, path in models.items()]
    runs.append(
        (
            "TF float16, `--float16-folds float32`",
            models["TF float16"],
            {"float16_folds": "float32"},
        )
    )
    print(f"{args.model} {args.size}x{args.size}, error = RMS vs float on {args.inputs} inputs")
    print(
        "| model | MUL before -> after | ops before -> after | error before | after | ratio "
        "| max diff vs unfolded (quanta) | share > 1 quantum | mean (quanta) | --verify passes "
        "| XNNPACK partitions | size MB | latency ms (1 thread, A/A noise) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    image = np.random.default_rng(3).normal(size=(1, *shape)).astype(np.float32)
    for label, path, options in runs:
        data = path.read_bytes()
        out, report = tfl_fuse.optimize(data, **options)
        comparison = verify.compare_models(
            data, out, **api._tolerances(api.DEFAULT_TOLERANCE, report)
        )
        before, after = report["ops_before"], report["ops_after"]
        e0 = rms(data, reference, shape, args.inputs)
        e1 = rms(out, reference, shape, args.inputs)
        quanta = comparison.get("quanta", {})
        worst = max((q["max"] for q in quanta.values()), default=0)
        share = max((q["share_over_1"] for q in quanta.values()), default=0.0)
        mean = max((q["mean"] for q in quanta.values()), default=0.0)
        speed = quantbench.latencies({"in": data, "out": out}, image, args.rounds)
        print(
            f"| {label} | {before.get('MUL', 0)} -> {after.get('MUL', 0)} "
            f"| {sum(before.values())} -> {sum(after.values())} | {e0:.4f} | {e1:.4f} "
            f"| {e1 / e0:.3f} | {worst} | {share:.2%} | {mean:.2f} | {comparison['match']} "
            f"| {partitions(data)} -> {partitions(out)} "
            f"| {len(data) / 1e6:.1f} -> {len(out) / 1e6:.1f} "
            f"| {speed['ms']['in']:.2f} -> {speed['ms']['out']:.2f} (+-{speed['noise']:.1%}) |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
