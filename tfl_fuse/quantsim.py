"""A small int8 quantization simulator: what a post-training quantizer will make of a float model.

``--target int8`` decides some exact rewrites (cross-layer equalization) by their effect on the
quantized model, so it needs an estimate of that effect. This module builds a float model that
computes what the int8 model would, up to the integer kernels' own rounding:

* every float weight of a layer (CONV_2D, DEPTHWISE_CONV_2D, FULLY_CONNECTED, TRANSPOSE_CONV,
  CONV_3D) is rounded to the grid a symmetric int8 quantizer uses: step max|w| / 127 per output
  channel (``granularity="channel"``) or per tensor, values -127..127 (ai-edge-quantizer's and
  TFLite's converter's scheme);
* every float activation (the graph inputs and every op output) passes through a FAKE_QUANT op
  (a TFLite builtin) with the tensor's calibrated min/max (widened to hold 0), 256 levels: the
  asymmetric per-tensor int8 scheme of static quantization. The calibration is
  ai-edge-quantizer's: a moving average of each sample's min and max.

The error of the simulated model against the float model's outputs, on inputs other than the
calibration ones, predicts the quantized model's error: on mediapipe's trained models the
simulated ratio of two candidate models tracks ai-edge-quantizer's measured ratio (Pearson
0.98 on face_detection_short_range's 17 equalization groups, 0.91 on palm_detection_lite's 24).

Inputs are synthetic: smooth images (upsampled low-resolution noise plus sinusoids) spanning
``input_range`` for image-like inputs [1, H, W, C<=4], N(0, 1) otherwise. They are seeded, so a
run is deterministic. Everything runs on LiteRT's built-in kernels, one thread.

LiteRT runs inside this process, where a native crash (a segfault in a kernel) or a hang would
take tfl_fuse down with it. So :func:`probe` first runs the reference's simulation in a child
process: if LiteRT crashes or hangs there, the simulation is not attempted here and
equalization falls back to its data-free rule, with that reason in the report.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from . import fb
from .graph import Graph
from .model import Model, Table
from .verify import litert_reason, private_copy, require_readable_names

# weight input and output-channel axis of each layer kind (as the quantizers quantize them)
WEIGHT_AXIS = {
    "CONV_2D": 0,
    "DEPTHWISE_CONV_2D": 3,
    "FULLY_CONNECTED": 0,
    "TRANSPOSE_CONV": 0,
    "CONV_3D": 4,
}
WEIGHT_INPUT = {"TRANSPOSE_CONV": 1}
DEFAULT_INPUT_RANGE = (-1.0, 1.0)
CALIBRATION_SEED, EVALUATION_SEED = 101, 102  # not the quantization bench's seeds
SIMULATED_INVOKES = 32  # per simulated model: 2 draws of 8 calibration + 8 evaluation inputs
SMOOTHING = 0.95  # ai-edge-quantizer's moving average of calibrated min/max


class SimulationError(Exception):
    """The model cannot be simulated (non-float inputs, an op LiteRT cannot run, ...)."""


# The child process of probe(): the reference's first simulation, as Simulator runs it here.
PROBE_CODE = (
    "import sys\n"
    "from tfl_fuse import quantsim\n"
    "data = open(sys.argv[1], 'rb').read()\n"
    "low, high = (float(v) for v in sys.argv[3].split(','))\n"
    "try:\n"
    "    quantsim.Simulator(data, sys.argv[2], (low, high)).errors(data)\n"
    "except quantsim.SimulationError:\n"
    "    pass  # a clean failure: the caller meets it again in its own process\n"
)
PROBE_TIMEOUT = 600.0  # seconds; the largest simulation the budget allows takes about 30 s


def probe(
    data: bytes,
    granularity: str = "channel",
    input_range: tuple[float, float] | None = None,
    timeout: float | None = None,
) -> None:
    """Simulate ``data`` once in a child process; SimulationError if LiteRT crashes there
    (a signal) or does not finish within ``timeout`` seconds (default PROBE_TIMEOUT).
    Python-level errors are left to the caller's own run, which reports them as
    SimulationError with LiteRT's message."""
    timeout = PROBE_TIMEOUT if timeout is None else timeout
    low, high = input_range or DEFAULT_INPUT_RANGE
    package_parent = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_parent, env.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory(prefix="tfl_fuse-probe-") as folder:
        path = Path(folder) / "model.tflite"
        path.write_bytes(data)
        command = [sys.executable, "-c", PROBE_CODE, str(path), granularity, f"{low!r},{high!r}"]
        try:
            done = subprocess.run(
                command, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout, env=env
            )
        except subprocess.TimeoutExpired:
            raise SimulationError(
                f"LiteRT did not finish running the model within {timeout:g} s "
                "(tried in a child process)"
            ) from None
    if done.returncode < 0:
        try:
            name = signal.Signals(-done.returncode).name
        except ValueError:
            name = f"signal {-done.returncode}"
        raise SimulationError(
            f"LiteRT crashed ({name}) running the model (tried in a child process)"
        )


def _bilinear(coarse: np.ndarray, height: int, width: int) -> np.ndarray:
    rows, cols = coarse.shape[:2]
    y = np.linspace(0.0, rows - 1, height)
    x = np.linspace(0.0, cols - 1, width)
    y0 = np.floor(y).astype(int)
    x0 = np.floor(x).astype(int)
    y1 = np.minimum(y0 + 1, rows - 1)
    x1 = np.minimum(x0 + 1, cols - 1)
    wy = (y - y0)[:, None, None]
    wx = (x - x0)[None, :, None]
    top = coarse[y0][:, x0] * (1 - wx) + coarse[y0][:, x1] * wx
    bottom = coarse[y1][:, x0] * (1 - wx) + coarse[y1][:, x1] * wx
    return top * (1 - wy) + bottom * wy


def smooth_images(
    shape: tuple[int, ...], count: int, seed: int, value_range: tuple[float, float]
) -> list[np.ndarray]:
    """Seeded smooth images [1, H, W, C] spanning ``value_range``: not white noise.

    Each is upsampled low-resolution noise (a 3x3 to 8x8 grid) plus three sinusoids of 0.5 to 4
    periods across the image with random per-channel amplitudes.
    """
    _, height, width, channels = shape
    rng = np.random.default_rng(seed)
    yy, xx = np.meshgrid(np.linspace(0.0, 1.0, height), np.linspace(0.0, 1.0, width), indexing="ij")
    low, high = value_range
    images = []
    for _ in range(count):
        grid = int(rng.integers(3, 9))
        image = _bilinear(rng.normal(size=(grid, grid, channels)), height, width)
        for _ in range(3):
            fy, fx = rng.uniform(0.5, 4.0, 2)
            wave = np.sin(2 * np.pi * (fy * yy + fx * xx) + rng.uniform(0, 2 * np.pi))
            image += rng.uniform(0.2, 0.6) * wave[..., None] * rng.uniform(-1, 1, channels)
        image = (image - image.min()) / max(float(image.max() - image.min()), 1e-12)
        images.append((low + (high - low) * image)[None].astype(np.float32))
    return images


def synthetic_inputs(
    details: list[dict[str, Any]], count: int, seed: int, value_range: tuple[float, float]
) -> list[list[np.ndarray]]:
    """``count`` input sets (one array per graph input) for an interpreter's input details."""
    per_input = []
    for k, detail in enumerate(details):
        shape = tuple(int(d) for d in detail["shape"])
        if np.dtype(detail["dtype"]) != np.float32:
            raise SimulationError(
                f"graph input {detail['name']!r} is {detail['dtype']}, not float32"
            )
        if len(shape) == 4 and shape[0] == 1 and shape[3] <= 4 and min(shape[1:3]) >= 2:
            per_input.append(smooth_images(shape, count, seed + 7919 * k, value_range))
        else:
            rng = np.random.default_rng(seed + 7919 * k)
            per_input.append([rng.normal(size=shape).astype(np.float32) for _ in range(count)])
    return [list(values) for values in zip(*per_input)]


def multiply_adds(graph: Graph) -> int:
    """Multiply-adds of one invoke of the graph's layers (a deterministic cost estimate)."""
    total = 0
    for op in graph.ops:
        kind = op.opcode.name
        position = WEIGHT_INPUT.get(kind, 1)
        if kind not in WEIGHT_AXIS or len(op.inputs) <= position or not op.outputs:
            continue
        weights, output = op.inputs[position], op.outputs[0]
        if weights < 0 or output < 0:
            continue
        shape = graph.shape(weights)
        fan_in = int(np.prod(shape)) // max(shape[WEIGHT_AXIS[kind]] if shape else 1, 1)
        total += int(np.prod(graph.shape(output) or [1])) * fan_in
    return total


def _interpreter(data: bytes, preserve: bool = False) -> Any:
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    try:
        interp = Interpreter(
            model_content=private_copy(data),
            num_threads=1,
            experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
            experimental_preserve_all_tensors=preserve,
        )
        interp.allocate_tensors()
        require_readable_names(interp)
    except (RuntimeError, ValueError) as error:
        raise SimulationError(f"LiteRT cannot run the model: {litert_reason(error)}") from None
    return interp


def _invoke(interp: Any, inputs: list[np.ndarray]) -> None:
    try:
        for detail, value in zip(interp.get_input_details(), inputs, strict=True):
            interp.set_tensor(detail["index"], value)  # LiteRT may have left an input unallocated
        interp.invoke()
    except (RuntimeError, ValueError) as error:
        raise SimulationError(f"LiteRT cannot run the model: {litert_reason(error)}") from None


def _tensor(interp: Any, index: int) -> np.ndarray | None:
    try:
        return interp.get_tensor(index)
    except ValueError:  # no data: an op LiteRT skipped or a tensor it never allocated
        return None


def outputs(data: bytes, samples: list[list[np.ndarray]]) -> list[list[np.ndarray]]:
    interp = _interpreter(data)
    details = interp.get_output_details()
    if not samples or not details:
        raise SimulationError("the model has no graph inputs or no graph outputs")
    results = []
    for inputs in samples:
        _invoke(interp, inputs)
        values = [_tensor(interp, d["index"]) for d in details]
        if any(v is None for v in values):
            raise SimulationError("LiteRT computes no value for a graph output")
        results.append([np.array(v, np.float64) for v in values])
    return results


def _activations(model: Model) -> list[int]:
    """The float activation tensors of subgraph 0: its inputs and every op output."""
    subgraph = model.subgraphs[0]
    found = [t for t in subgraph.inputs if t >= 0]
    for op in subgraph.operators:
        found.extend(t for t in op.outputs if t >= 0)
    return [t for t in dict.fromkeys(found) if subgraph.tensors[t].type == "FLOAT32"]


def activation_ranges(
    data: bytes, samples: list[list[np.ndarray]]
) -> dict[int, tuple[float, float]]:
    """Calibrated (min, max) of every float activation tensor of subgraph 0, widened to hold 0.

    As ai-edge-quantizer calibrates: each sample's min and max, folded into a moving average
    (weight ``SMOOTHING`` on the values so far), not the extremes over all samples.
    """
    tensors = _activations(fb.decode(data))
    interp = _interpreter(data, preserve=True)
    low: dict[int, float] = {}
    high: dict[int, float] = {}
    for inputs in samples:
        _invoke(interp, inputs)
        for t in tensors:
            value = _tensor(interp, t)
            if value is None or not value.size:
                continue
            a, b = float(value.min()), float(value.max())
            if t in low:
                a = SMOOTHING * low[t] + (1 - SMOOTHING) * a
                b = SMOOTHING * high[t] + (1 - SMOOTHING) * b
            low[t], high[t] = a, b
    return {t: (min(low[t], 0.0), max(high[t], 0.0)) for t in low}


def channel_ranges(
    data: bytes, samples: list[list[np.ndarray]], tensors: list[int]
) -> dict[int, np.ndarray]:
    """Calibrated max |x| per channel (last axis) of ``tensors`` of subgraph 0 (moving average)."""
    interp = _interpreter(data, preserve=True)
    found: dict[int, np.ndarray] = {}
    for inputs in samples:
        _invoke(interp, inputs)
        for t in tensors:
            value = _tensor(interp, t)
            if value is None or value.ndim == 0 or not value.size:
                continue
            peak = np.max(np.abs(value.reshape(-1, value.shape[-1])), axis=0).astype(np.float64)
            found[t] = peak if t not in found else SMOOTHING * found[t] + (1 - SMOOTHING) * peak
    return found


def quantized_weights(weights: np.ndarray, axis: int, granularity: str) -> np.ndarray:
    """``weights`` rounded to the symmetric int8 grid (per output channel or per tensor)."""
    w = weights.astype(np.float64)
    if granularity == "tensor" or w.ndim == 0:
        step = np.asarray(np.max(np.abs(w)) / 127.0)
    else:
        others = tuple(i for i in range(w.ndim) if i != axis % w.ndim)
        step = np.max(np.abs(w), axis=others, keepdims=True) / 127.0
    step = np.where(step > 0, step, 1.0)
    return (np.clip(np.round(w / step), -127, 127) * step).astype(np.float32)


def simulated_model(data: bytes, granularity: str, ranges: dict[int, tuple[float, float]]) -> bytes:
    """``data`` as its int8 quantization would compute it, in float (module docstring)."""
    model = fb.decode(data)
    graph = Graph(model, 0)
    subgraph = model.subgraphs[0]
    for op in subgraph.operators:
        kind = op.opcode.name
        position = WEIGHT_INPUT.get(kind, 1)
        if kind in WEIGHT_AXIS and len(op.inputs) > position and op.inputs[position] >= 0:
            tensor = op.inputs[position]
            if graph.is_constant(tensor) and graph.dtype(tensor) == "FLOAT32":
                weights = graph.constant(tensor)
                graph.set_constant(
                    op, position, quantized_weights(weights, WEIGHT_AXIS[kind], granularity)
                )
    code = model.opcode("FAKE_QUANT", 1)
    renamed: dict[int, int] = {}
    operators: list[Table] = []

    def fake_quant(tensor: int) -> None:
        low, high = ranges[tensor]
        new = graph.add_tensor_like(tensor, graph.name(tensor) + "/simulated")
        options = Table("FakeQuantOptions", min=low, max=high, numBits=8, narrowRange=False)
        operators.append(
            Table("Operator", opcode=code, inputs=[tensor], outputs=[new], builtinOptions=options)
        )
        renamed[tensor] = new

    for t in subgraph.inputs:
        if t in ranges:
            fake_quant(t)
    for op in subgraph.operators:
        op.inputs = [renamed.get(t, t) for t in op.inputs]
        operators.append(op)
        for t in op.outputs:
            if t in ranges and t not in renamed:
                fake_quant(t)
    subgraph.operators = operators
    subgraph.outputs = [renamed.get(t, t) for t in subgraph.outputs]
    model.root.signatureDefs = []  # the signature names the float outputs; the simulation reads by index
    return bytes(fb.encode(model, "tflite"))


def output_scales(reference: list[list[np.ndarray]]) -> np.ndarray:
    """Per output: max |f| over all samples (one scale for the whole evaluation set)."""
    scales = np.zeros(len(reference[0]))
    for f_outputs in reference:
        for k, f in enumerate(f_outputs):
            scales[k] = max(scales[k], float(np.max(np.abs(f))) if f.size else 0.0)
    return np.maximum(scales, 1e-30)


def sample_errors(reference: list[list[np.ndarray]], results: list[list[np.ndarray]]) -> np.ndarray:
    """[sample, output]: mean |q - f| / (max |f| over all samples).

    One scale per output for the whole evaluation set: a per-sample max|f| would make a
    one-element output (a score) a relative error that explodes where the score is near 0.
    """
    scales = output_scales(reference)
    return (
        np.array(
            [
                [float(np.mean(np.abs(q - f))) for f, q in zip(f_outputs, q_outputs, strict=True)]
                for f_outputs, q_outputs in zip(reference, results, strict=True)
            ]
        )
        / scales
    )


def relative_errors(
    reference: list[list[np.ndarray]], results: list[list[np.ndarray]]
) -> np.ndarray:
    """Per output: the mean of :func:`sample_errors` over the samples."""
    return np.mean(sample_errors(reference, results), axis=0)


class Simulator:
    """The simulated int8 error of models computing the same float function as ``reference``.

    ``sets`` independent draws of calibration and evaluation inputs: a change is judged on each,
    so that one lucky draw does not decide it.
    """

    def __init__(
        self,
        reference: bytes,
        granularity: str = "channel",
        input_range: tuple[float, float] | None = None,
        calibration: int = 8,
        evaluation: int = 8,
        sets: int = 2,
    ) -> None:
        self.granularity = granularity
        details = _interpreter(reference).get_input_details()
        value_range = input_range or DEFAULT_INPUT_RANGE
        self.draws = []
        for k in range(sets):
            seed = 1000 * k
            calibration_inputs = synthetic_inputs(
                details, calibration, CALIBRATION_SEED + seed, value_range
            )
            evaluation_inputs = synthetic_inputs(
                details, evaluation, EVALUATION_SEED + seed, value_range
            )
            self.draws.append(
                (calibration_inputs, evaluation_inputs, outputs(reference, evaluation_inputs))
            )
        self.runs = 0

    def errors(self, data: bytes, granularity: str | None = None) -> np.ndarray:
        """[sample, output]: the simulated int8 error of ``data`` (the reference's function),
        sample by sample over every draw's evaluation inputs; weights quantized per
        ``granularity`` (default: the simulator's)."""
        self.runs += 1
        found = []
        for calibration_inputs, evaluation_inputs, reference in self.draws:
            ranges = activation_ranges(data, calibration_inputs)
            simulated = simulated_model(data, granularity or self.granularity, ranges)
            found.append(sample_errors(reference, outputs(simulated, evaluation_inputs)))
        return np.concatenate(found)


def compare(trial: np.ndarray, base: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per output: the error ratio trial / base, and an upper bound of it (paired, 2 standard
    errors of the per-sample differences): ``trial`` and ``base`` are :meth:`Simulator.errors`.
    """
    base_mean = np.maximum(np.mean(base, axis=0), 1e-30)
    difference = trial - base
    spread = np.std(difference, axis=0, ddof=1) / np.sqrt(len(difference))
    ratio = np.mean(trial, axis=0) / base_mean
    return ratio, ratio + 2 * spread / base_mean
