#!/usr/bin/env python3
"""`make bench-quant`: how well tfl_fuse's output quantizes with ai-edge-quantizer, and how fast.

The deployment build is float ``.tflite`` -> tfl_fuse -> ai-edge-quantizer -> device. For each
model, three float variants go through the quantizer:

* (a) the model untouched (a trained mediapipe model: only the quantizer-readiness
  normalizations ``dequantize_float16_weights`` and ``add_signature_def`` applied, since the
  file as shipped, float16 weights behind DEQUANTIZE and no SignatureDef, is not accepted);
* (b) tfl_fuse with the default target (``target="float"``);
* (c) tfl_fuse with ``target="int8"``;

and, where tfl_fuse has a target matched to the recipe, (d): ``target="dynamic"`` for
dynamic-range quantization, ``target="int8", weight_granularity="tensor"`` for per-tensor
weights. Recipes: static int8 with per-channel weights (``recipe.static_wi8_ai8()``), dynamic
range (``recipe.dynamic_wi8_afp32()``) and, for the trained models, static int8 with per-tensor
weights (the same static config with ``QuantGranularity.TENSORWISE`` weights).

Figures per quantized variant:

* error: for each output, the mean over the evaluation inputs of mean|q - f| / max|f|, where f
  is the float model's output (LiteRT built-in kernels) and q the quantized model's (LiteRT with
  the XNNPACK delegate, as deployed);
* XNNPACK partitions (delegate nodes in the interpreter's graph) and the ops left to LiteRT's
  own kernels (the ops no partition covers);
* latency: XNNPACK, 1 thread, median of interleaved invokes (at least 50 rounds and 2 s), the
  order of the variants reversed every other round; noise: |1 - ratio| of two interpreters of
  the same model (a) measured the same way (an A/A test). The machine may be shared: a run
  with more than 3% A/A spread is repeated (up to 3 attempts) and the quietest one kept.

Calibration uses 32 inputs, evaluation 64 others (different seeds): smooth synthetic images
(upsampled low-resolution noise plus a few low-frequency sinusoids) scaled to the model's input
range. Keras models: weights=None with random BatchNorm statistics (tests/kerasmodels.py, cached
in build/cache), 224x224 input (the size `make bench` uses, so the cache is shared), logits.
Mediapipe models come from the mediapipe 0.10.21 wheel (``pip download``, unzipped into
build/cache/mediapipe, never committed; ``make mediapipe-models``). Their input ranges are those
of mediapipe's graphs: [-1, 1] for the face detector, [0, 1] for face landmarks and palms.

Writes bench/quant_results.json, replaces the quantization section of bench/results.md, and
prints the tables and whether each target of the issues holds. Never fails on a figure.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import io
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TQDM_DISABLE", "1")  # the quantizer's progress bars

import kerasmodels  # noqa: E402

import tfl_fuse  # noqa: E402
from tfl_fuse import quantsim, rules, verify  # noqa: E402

KERAS_MODELS = ("ResNet50V2", "DenseNet121", "MobileNetV2")
KERAS_SIZE = 224
KERAS_RANGE = (-1.0, 1.0)  # keras.applications' "tf" preprocessing (DenseNet's "torch" is close)
MEDIAPIPE_VERSION = "0.10.21"
# name: (path in the wheel, input range of mediapipe's ImageToTensorCalculator for the model)
MEDIAPIPE_MODELS = {
    "face_detection_short_range": (
        "mediapipe/modules/face_detection/face_detection_short_range.tflite",
        (-1.0, 1.0),
    ),
    "face_landmark": ("mediapipe/modules/face_landmark/face_landmark.tflite", (0.0, 1.0)),
    "palm_detection_lite": (
        "mediapipe/modules/palm_detection/palm_detection_lite.tflite",
        (0.0, 1.0),
    ),
}
NORMALIZATIONS = ["dequantize_float16_weights", "add_signature_def"]
CALIBRATION_SEED, EVALUATION_SEED = 1, 2
NOISY, ATTEMPTS = 0.03, 3  # an A/A latency spread above 3% is measured again, up to 3 times
RECIPES = {
    "static_channel": "static int8, per-channel weights",
    "dynamic": "dynamic range (int8 weights, float activations)",
    "static_tensor": "static int8, per-tensor weights",
}
# The variant tfl_fuse offers for a recipe beyond (c): its name and optimize() options.
MATCHED = {
    "dynamic": ("d", {"target": "dynamic"}),
    "static_tensor": ("d", {"target": "int8", "weight_granularity": "tensor"}),
}


# ----------------------------------------------------------------------------- inputs


# The bench's images are tfl_fuse's own synthetic calibration images (quantsim.py), drawn with
# other seeds than the ones --target int8 simulates with.
smooth_images = quantsim.smooth_images


# ----------------------------------------------------------------------------- models


def mediapipe_models(cache: Path = kerasmodels.CACHE) -> dict[str, Path]:
    """The trained mediapipe models, unzipped from the mediapipe wheel into cache/mediapipe.

    The wheel (for this Python) is fetched once with ``pip download`` into cache/wheels.
    """
    folder = cache / "mediapipe"
    paths = {name: folder / Path(member).name for name, (member, _) in MEDIAPIPE_MODELS.items()}
    if all(p.exists() for p in paths.values()):
        return paths
    wheels = cache / "wheels"
    pattern = str(wheels / f"mediapipe-{MEDIAPIPE_VERSION}-*.whl")
    if not glob.glob(pattern):
        wheels.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps"]
            + [f"mediapipe=={MEDIAPIPE_VERSION}", "-d", str(wheels)],
            check=True,
        )
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    candidates = sorted(glob.glob(pattern))
    wheel = next((w for w in candidates if f"-{tag}-" in w), candidates[0])
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as archive:
        for name, (member, _) in MEDIAPIPE_MODELS.items():
            temp = paths[name].with_suffix(".tmp")
            temp.write_bytes(archive.read(member))
            os.replace(temp, paths[name])
    return paths


def normalizations_available() -> bool:
    return all(name in rules.RULES_BY_NAME for name in NORMALIZATIONS)


def keras_model(name: str, size: int = KERAS_SIZE) -> Path:
    return kerasmodels.application(name, input_shape=(size, size, 3), classifier_activation=None)


def float_variants(
    original: bytes, trained: bool, value_range: tuple[float, float] = KERAS_RANGE
) -> dict[str, dict[str, bytes]]:
    """Per recipe, the float models to quantize: {recipe: {variant: bytes}}.

    ``--target int8`` is told the input range the bench's images span (``--input-range``), as a
    user would tell it the range of their data."""
    base = (
        tfl_fuse.optimize(original, rules_to_run=NORMALIZATIONS, target="int8")[0]
        if trained
        else original
    )
    common = {
        "a": base,
        "b": tfl_fuse.optimize(base)[0],
        "c": tfl_fuse.optimize(original, target="int8", input_range=value_range)[0],
    }
    chosen = {}
    for recipe_name in ("static_channel", "dynamic", "static_tensor"):
        if recipe_name == "static_tensor" and not trained:
            continue
        models = dict(common)
        if recipe_name in MATCHED:
            variant, options = MATCHED[recipe_name]
            if options["target"] == "int8":
                options = {**options, "input_range": value_range}
            models[variant] = tfl_fuse.optimize(original, **options)[0]
        chosen[recipe_name] = models
    return chosen


# ----------------------------------------------------------------------------- quantizer


def quantization_recipe(name: str):
    from ai_edge_quantizer import qtyping, recipe, recipe_manager

    if name == "static_channel":
        return recipe.static_wi8_ai8()
    if name == "dynamic":
        return recipe.dynamic_wi8_afp32()
    if name == "static_tensor":
        manager = recipe_manager.RecipeManager()
        manager.add_static_config(
            regex=".*",
            operation_name=qtyping.TFLOperationName.ALL_SUPPORTED,
            activation_num_bits=8,
            weight_num_bits=8,
            weight_granularity=qtyping.QuantGranularity.TENSORWISE,
        )
        return manager.get_quantization_recipe()
    raise KeyError(name)


def signature_inputs(model: bytes) -> tuple[str, list[str]]:
    interp = verify.interpreter(model)
    signatures = interp.get_signature_list()
    if not signatures:
        raise ValueError("the model has no SignatureDef: ai-edge-quantizer needs one")
    key = next(iter(signatures))
    return key, list(signatures[key]["inputs"])


def quantize(model: bytes, recipe_name: str, calibration: list[np.ndarray]) -> bytes:
    """The model quantized by ai-edge-quantizer with the named recipe (calibrated if static)."""
    from ai_edge_quantizer import quantizer

    with (
        warnings.catch_warnings(),
        contextlib.redirect_stdout(io.StringIO()),
        contextlib.redirect_stderr(io.StringIO()),
    ):
        warnings.simplefilter("ignore")
        qt = quantizer.Quantizer(bytearray(model), quantization_recipe(recipe_name))
        result = {}
        if qt.need_calibration:
            key, names = signature_inputs(model)
            if len(names) != 1:
                raise ValueError(f"{len(names)} inputs: the bench feeds one image input")
            data = {key: [{names[0]: image} for image in calibration]}
            result = qt.calibrate(data, num_threads=1)
        return bytes(qt.quantize(result, enable_progress_report=False).quantized_model)


# ----------------------------------------------------------------------------- measuring


def set_input(interp: Any, image: np.ndarray) -> None:
    detail = interp.get_input_details()[0]
    value = image
    if np.dtype(detail["dtype"]).kind == "i":
        scale, zero_point = detail["quantization"]
        info = np.iinfo(detail["dtype"])
        value = np.clip(np.round(image / scale + zero_point), info.min, info.max)
    interp.set_tensor(detail["index"], value.astype(detail["dtype"]))


def get_outputs(interp: Any) -> list[np.ndarray]:
    values = []
    for detail in interp.get_output_details():
        value = np.array(interp.get_tensor(detail["index"]))
        if np.dtype(detail["dtype"]).kind == "i":
            scale, zero_point = detail["quantization"]
            value = (value.astype(np.float64) - zero_point) * scale
        values.append(value.astype(np.float64))
    return values


def outputs_for(model: bytes, images: list[np.ndarray], delegate: bool) -> list[list[np.ndarray]]:
    interp = verify.interpreter(model, threads=1, delegate=delegate)
    results = []
    for image in images:
        set_input(interp, image)
        interp.invoke()
        results.append(get_outputs(interp))
    return results


def relative_errors(
    reference: list[list[np.ndarray]], quantized: list[list[np.ndarray]]
) -> list[float]:
    """Per output: mean over inputs of mean|q - f| / max|f|."""
    errors = []
    for k in range(len(reference[0])):
        per_input = []
        for f_outputs, q_outputs in zip(reference, quantized, strict=True):
            f, q = f_outputs[k], q_outputs[k]
            if f.shape != q.shape:
                raise ValueError(
                    f"output {k}: shape {q.shape} after quantization, {f.shape} before"
                )
            per_input.append(float(np.mean(np.abs(q - f)) / max(float(np.max(np.abs(f))), 1e-12)))
        errors.append(float(np.mean(per_input)))
    return errors


def partitions(model: bytes) -> tuple[int, dict[str, int]]:
    """(XNNPACK delegate nodes, {op: count} of the ops no delegate node covers).

    A delegate node lists the tensors entering and leaving its partition; walking back from its
    outputs to its inputs finds the nodes it replaced.
    """
    interp = verify.interpreter(model, threads=1, delegate=True)
    details = interp._get_ops_details()
    delegates = [d for d in details if d["op_name"] == "DELEGATE"]
    plain = {d["index"]: d for d in details if d["op_name"] != "DELEGATE"}
    producer = {int(t): index for index, d in plain.items() for t in d["outputs"]}
    covered: set[int] = set()
    for node in delegates:
        boundary = {int(t) for t in node["inputs"]}
        stack = [int(t) for t in node["outputs"]]
        seen: set[int] = set()
        while stack:
            tensor = stack.pop()
            if tensor in boundary or tensor in seen or tensor not in producer:
                continue
            seen.add(tensor)
            index = producer[tensor]
            if index not in covered:
                covered.add(index)
                stack.extend(int(t) for t in plain[index]["inputs"] if t >= 0)
    left: dict[str, int] = {}
    for index, d in plain.items():
        if index not in covered:
            left[d["op_name"]] = left.get(d["op_name"], 0) + 1
    return len(delegates), dict(sorted(left.items()))


def latencies(
    models: dict[str, bytes], image: np.ndarray, rounds: int, seconds: float = 2.0
) -> dict[str, Any]:
    """Median ms per model (XNNPACK, 1 thread), interleaved; plus an A/A noise estimate.

    At least ``rounds`` rounds and ``seconds`` of measuring. The machine is shared, so a run
    whose A/A spread exceeds ``NOISY`` is measured again (up to ``ATTEMPTS`` times) and the
    least noisy attempt is kept; its spread is what the tables report.
    """
    names = list(models)
    twin = names[0] + "'"
    order = [*names, twin]
    interps = {}
    for name in order:
        interps[name] = verify.interpreter(models[name.rstrip("'")], threads=1, delegate=True)
        set_input(interps[name], image)
    best: dict[str, Any] = {}
    for attempt in range(ATTEMPTS):
        for _ in range(3):
            for name in order:
                interps[name].invoke()
        times: dict[str, list[float]] = {name: [] for name in order}
        start = time.perf_counter()
        i = 0
        while i < rounds or (time.perf_counter() - start < seconds and i < 20 * rounds):
            for name in order if i % 2 == 0 else order[::-1]:
                begin = time.perf_counter()
                interps[name].invoke()
                times[name].append(time.perf_counter() - begin)
            i += 1
        median = {name: statistics.median(values) * 1e3 for name, values in times.items()}
        result = {
            "ms": {name: median[name] for name in names},
            "noise": abs(1.0 - median[names[0]] / median[twin]),
            "rounds": i,
            "attempts": attempt + 1,
        }
        if not best or result["noise"] < best["noise"]:
            best = result
        if best["noise"] <= NOISY:
            break
    return best


# ----------------------------------------------------------------------------- one model


def bench_model(
    name: str, original: bytes, trained: bool, value_range, rounds: int, seeds: int = 1
) -> dict[str, Any]:
    """Every figure of one model. With ``seeds`` > 1 the errors are the mean over that many
    calibration/evaluation seed pairs, and each variant also gets its x(a) per seed pair."""
    start = time.perf_counter()
    shape = tuple(int(d) for d in verify.interpreter(original).get_input_details()[0]["shape"])
    variants = float_variants(original, trained, value_range)
    base = variants["static_channel"]["a"]
    pairs = [(CALIBRATION_SEED + 2 * k, EVALUATION_SEED + 2 * k) for k in range(seeds)]
    calibrations = [smooth_images(shape, 32, c, value_range) for c, _ in pairs]
    evaluations = [smooth_images(shape, 64, e, value_range) for _, e in pairs]
    references = [outputs_for(base, images, delegate=False) for images in evaluations]
    _, output_names = verify.output_names(base)
    result: dict[str, Any] = {
        "input_shape": list(shape),
        "input_range": list(value_range),
        "outputs": output_names,
        "seed_pairs": pairs,
        "recipes": {},
    }
    for recipe_name, models in variants.items():
        rows: dict[str, Any] = {}
        quantized: dict[str, bytes] = {}
        per_seed: dict[str, list[list[float]]] = {}
        for variant, model in models.items():
            try:
                for k in range(seeds):
                    q = quantize(model, recipe_name, calibrations[k])
                    quantized.setdefault(variant, q)  # the first seed's model is timed
                    outputs = outputs_for(q, evaluations[k], True)
                    per_seed.setdefault(variant, []).append(relative_errors(references[k], outputs))
            except Exception as error:  # a figure, not a failure: report what the quantizer said
                rows[variant] = {"error": f"quantizer: {type(error).__name__}: {error}"[:300]}
                quantized.pop(variant, None)
                continue
            count, left = partitions(quantized[variant])
            rows[variant] = {
                "errors": np.mean(per_seed[variant], axis=0).tolist(),
                "errors_per_seed": per_seed[variant],
                "partitions": count,
                "undelegated": left,
            }
        if "a" in per_seed:
            for variant, row in rows.items():
                if variant in per_seed:
                    row["ratio_per_seed"] = [
                        max(e / max(b, 1e-12) for e, b in zip(ev, ea, strict=True))
                        for ev, ea in zip(per_seed[variant], per_seed["a"], strict=True)
                    ]
        if quantized:
            timing = latencies(quantized, evaluations[0][0], rounds)
            for variant, ms in timing["ms"].items():
                rows[variant]["ms"] = ms
            noise = timing["noise"]
        else:
            noise = float("nan")
        result["recipes"][recipe_name] = {"variants": rows, "latency_noise": noise}
        print(f"[quantbench] {name}: {recipe_name} done ({time.perf_counter() - start:.0f} s)")
    # The float (c) model: exact (verify), and its float latency against the default output (b).
    try:
        _, report = tfl_fuse.optimize(original, target="int8", verify=True)
        verified = {"match": True, "summary": report["verify"]["summary"]}
    except tfl_fuse.VerificationError as error:
        verified = {"match": False, "summary": error.result["summary"]}
    floats = {"b": variants["static_channel"]["b"], "c": variants["static_channel"]["c"]}
    timing = latencies(floats, evaluations[0][0], rounds)
    result["float"] = {"verify": verified, "ms": timing["ms"], "noise": timing["noise"]}
    result["seconds"] = time.perf_counter() - start
    return result


# ----------------------------------------------------------------------------- targets


def worst_ratio(rows: dict[str, Any], variant: str) -> float | None:
    """max over outputs of error(variant) / error(a); None when either is missing."""
    a, v = rows.get("a", {}), rows.get(variant, {})
    if "errors" not in a or "errors" not in v:
        return None
    return max(e / max(b, 1e-12) for e, b in zip(v["errors"], a["errors"], strict=True))


def seed_range(rows: dict[str, Any], variant: str) -> str:
    """ " (0.66-0.76)": the lowest and highest x(a) over the seed pairs, when there are several."""
    ratios = rows.get(variant, {}).get("ratio_per_seed", [])
    return f" ({min(ratios):.2f}-{max(ratios):.2f})" if len(ratios) > 1 else ""


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, one row each: (model, target, measured, holds)."""
    checks: list[dict[str, Any]] = []

    def add(model: str, target: str, measured: str, holds: bool | None) -> None:
        checks.append({"model": model, "target": target, "measured": measured, "holds": holds})

    tensor_ratios = {}
    for model, r in results["models"].items():
        if "skipped" in r:
            continue
        trained = r["trained"]
        static = r["recipes"]["static_channel"]["variants"]
        ratio = worst_ratio(static, "c")
        fmt = "n/a" if ratio is None else f"{ratio:.3f}x{seed_range(static, 'c')}"
        if trained:
            limit = 0.7 if model == "face_detection_short_range" else 1.0
            add(
                model,
                f"static int8 per-channel error (c) <= {limit}x (a), every output",
                fmt,
                None if ratio is None else ratio <= limit,
            )
        else:
            limit = 0.9 if model in ("ResNet50V2", "DenseNet121") else 1.0
            add(
                model,
                f"static int8 error (c) <= {limit}x (a)",
                fmt,
                None if ratio is None else ratio <= limit,
            )
        a, c = static.get("a", {}), static.get("c", {})
        if "partitions" in a and "partitions" in c:
            add(
                model,
                "XNNPACK partitions (c) <= (a) (static int8)",
                f"{c['partitions']} vs {a['partitions']}",
                c["partitions"] <= a["partitions"],
            )
            noise = r["recipes"]["static_channel"]["latency_noise"]
            tolerance = max(noise, 0.02)
            speed = a["ms"] / c["ms"]
            add(
                model,
                f"int8 latency (c) no slower than (a) within noise (+-{tolerance:.1%})",
                f"{c['ms']:.2f} vs {a['ms']:.2f} ms ({speed:.3f}x speed)",
                c["ms"] <= a["ms"] * (1 + tolerance),
            )
        dynamic = r["recipes"]["dynamic"]["variants"]
        for variant in ("c", "d"):
            ratio = worst_ratio(dynamic, variant)
            label = "int8" if variant == "c" else "dynamic"
            add(
                model,
                f"dynamic-range error ({variant}: target={label}) <= (a)",
                "n/a" if ratio is None else f"{ratio:.3f}x{seed_range(dynamic, variant)}",
                None if ratio is None else ratio <= 1.0,
            )
        if trained:
            tensor = r["recipes"]["static_tensor"]["variants"]
            for variant in ("c", "d"):
                tensor_ratios.setdefault(variant, {})[model] = (
                    worst_ratio(tensor, variant),
                    seed_range(tensor, variant),
                )
        add(
            model,
            "float (c) passes --verify",
            r["float"]["verify"]["summary"][:80],
            r["float"]["verify"]["match"],
        )
    for variant, ratios in tensor_ratios.items():
        label = "target=int8" if variant == "c" else "target=int8, weight_granularity=tensor"
        measured = ", ".join(
            f"{m} {'n/a' if v is None else f'{v:.3f}x{spread}'}"
            for m, (v, spread) in ratios.items()
        )
        known = [v for v, _ in ratios.values() if v is not None]
        add(
            "trained models",
            f"per-tensor static int8 ({variant}: {label}): <= 0.8x (a) on >= 2 of 3, never worse",
            measured,
            None
            if len(known) < len(MEDIAPIPE_MODELS)
            else sum(v <= 0.8 for v in known) >= 2 and all(v <= 1.0 for v in known),
        )
    return checks


# ----------------------------------------------------------------------------- report


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [
        "<!-- quantbench -->",
        "### Quantization (ai-edge-quantizer)",
        "",
        f"ai-edge-quantizer {m['ai_edge_quantizer']}, ai-edge-litert {m['ai_edge_litert']}, "
        f"tfl_fuse {m['tfl_fuse']} ({m['commit']}); {m['date']}; {m['cores']} cores. "
        f"Reproduce: `make bench-quant` ({results['seconds'] / 60:.1f} min).",
        "",
        "Variants: (a) the model as given (trained models: only `dequantize_float16_weights` and "
        "`add_signature_def`), (b) tfl_fuse default, (c) `--target int8`, (d) the target made for "
        "the recipe (`--target dynamic`; `--target int8 --weight-granularity tensor`). "
        f"error: per output, mean over {results['seeds']} seed pair(s) of the mean over 64 smooth "
        "synthetic images of mean|q - f| / max|f| against the float model (calibration: 32 "
        "other images); x(a): error / error of (a), worst output (in brackets: lowest-highest "
        "over the seed pairs); partitions: XNNPACK delegate nodes; undelegated: ops left to LiteRT's "
        "kernels; ms: XNNPACK, 1 thread, median of interleaved invokes; noise: A/A spread of (a).",
        "",
    ]
    for recipe_name, title in RECIPES.items():
        if not any(recipe_name in r.get("recipes", {}) for r in results["models"].values()):
            continue
        lines += [
            f"{title}:",
            "",
            "| model | variant | error per output | x(a) | partitions | undelegated | ms | speed vs (a) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for model, r in results["models"].items():
            if "skipped" in r or recipe_name not in r["recipes"]:
                continue
            recipe_result = r["recipes"][recipe_name]
            rows = recipe_result["variants"]
            for variant, row in rows.items():
                if "error" in row:
                    lines.append(f"| {model} | {variant} | {row['error']} | | | | | |")
                    continue
                ratio = worst_ratio(rows, variant)
                left = ", ".join(f"{k} {v}" for k, v in row["undelegated"].items()) or "-"
                speed = rows["a"]["ms"] / row["ms"] if "ms" in rows.get("a", {}) else float("nan")
                lines.append(
                    f"| {model} | {variant} | {' / '.join(f'{e:.4f}' for e in row['errors'])} | "
                    f"{'' if ratio is None else f'{ratio:.3f}{seed_range(rows, variant)}'} | "
                    f"{row['partitions']} | {left} | "
                    f"{row['ms']:.2f} | {speed:.3f} |"
                )
            lines.append(f"| {model} | noise | | | | | | +-{recipe_result['latency_noise']:.1%} |")
        lines.append("")
    lines += [
        "Float models (c) vs (b): exact (`verify=True`) and float latency (XNNPACK, 1 thread):",
        "",
        "| model | verify (c) | (b) ms | (c) ms | speed (b)/(c) | noise |",
        "|---|---|---|---|---|---|",
    ]
    for model, r in results["models"].items():
        if "skipped" in r:
            continue
        f = r["float"]
        lines.append(
            f"| {model} | {'match' if f['verify']['match'] else 'MISMATCH'} | {f['ms']['b']:.2f} | "
            f"{f['ms']['c']:.2f} | {f['ms']['b'] / f['ms']['c']:.3f} | +-{f['noise']:.1%} |"
        )
    skipped = [(m, r["skipped"]) for m, r in results["models"].items() if "skipped" in r]
    if skipped:
        lines += ["", *[f"{m}: skipped: {why}" for m, why in skipped]]
    lines += [
        "",
        "Targets (issues 9 and 14):",
        "",
        "| model | target | measured | holds |",
        "|---|---|---|---|",
    ]
    for check in results["targets"]:
        holds = {True: "yes", False: "**no**", None: "n/a"}[check["holds"]]
        measured = check["measured"].replace("|", "\\|")
        lines.append(f"| {check['model']} | {check['target']} | {measured} | {holds} |")
    lines += ["<!-- /quantbench -->", ""]
    return "\n".join(lines)


def replace_section(path: Path, section: str) -> None:
    """Put the quantization section into a results file, replacing an earlier one."""
    text = path.read_text() if path.exists() else ""
    begin, end = "<!-- quantbench -->", "<!-- /quantbench -->\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + section
    path.write_text(text)


def machine() -> dict[str, Any]:
    from importlib.metadata import version

    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    return {
        "ai_edge_quantizer": version("ai-edge-quantizer"),
        "ai_edge_litert": version("ai-edge-litert"),
        "tfl_fuse": tfl_fuse.__version__,
        "commit": commit or "?",
        "cores": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", default=",".join([*KERAS_MODELS, *MEDIAPIPE_MODELS]), help="comma-separated"
    )
    parser.add_argument("--size", type=int, default=KERAS_SIZE, help="Keras input size")
    parser.add_argument("--rounds", type=int, default=50, help="latency rounds")
    parser.add_argument(
        "--seeds",
        type=int,
        default=3,
        help="calibration/evaluation seed pairs the errors are averaged over (default 3)",
    )
    parser.add_argument("--out", default=str(ROOT / "bench"))
    parser.add_argument(
        "--fetch-only", action="store_true", help="fetch the mediapipe models and stop"
    )
    args = parser.parse_args(argv)
    if args.fetch_only:
        for name, path in mediapipe_models().items():
            print(f"{name}: {path}")
        return 0
    start = time.perf_counter()
    results: dict[str, Any] = {"machine": machine(), "seeds": args.seeds, "models": {}}
    for name in args.models.split(","):
        if name in MEDIAPIPE_MODELS:
            if not normalizations_available():
                why = (
                    f"tfl_fuse has no rules {', '.join(NORMALIZATIONS)} yet: the mediapipe file "
                    "(float16 weights behind DEQUANTIZE, no SignatureDef) cannot go through "
                    "ai-edge-quantizer without them"
                )
                print(f"[quantbench] {name}: skipped: {why}", flush=True)
                results["models"][name] = {"skipped": why}
                continue
            try:
                original = mediapipe_models()[name].read_bytes()
            except (OSError, subprocess.CalledProcessError, zipfile.BadZipFile) as error:
                why = f"cannot fetch the mediapipe {MEDIAPIPE_VERSION} wheel: {error}"
                print(f"[quantbench] {name}: skipped: {why}", flush=True)
                results["models"][name] = {"skipped": why}
                continue
            trained, value_range = True, MEDIAPIPE_MODELS[name][1]
        elif name in KERAS_MODELS:
            print(f"[quantbench] {name}: building (cached)", flush=True)
            original = keras_model(name, args.size).read_bytes()
            trained, value_range = False, KERAS_RANGE
        else:
            parser.error(f"unknown model {name!r}")
        r = bench_model(name, original, trained, value_range, args.rounds, args.seeds)
        r["trained"] = trained
        results["models"][name] = r
    results["seconds"] = time.perf_counter() - start
    results["targets"] = targets(results)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quant_results.json").write_text(json.dumps(results, indent=2) + "\n")
    text = markdown(results)
    replace_section(out / "results.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
