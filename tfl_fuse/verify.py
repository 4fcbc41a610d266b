"""Run LiteRT on two models with the same seeded inputs and compare every output (DESIGN.md 5).

Circle models run through an in-memory circle -> tflite conversion. Float outputs compare
with ``rtol`` and an ``atol`` scaled to the output's magnitude; quantized outputs in quanta
(QUANTA_MAX, QUANTA_MEAN); other integer outputs exactly.

LiteRT cannot run custom ops it does not know. Rules never change a custom op nor rename the
tensors it reads and writes, so both models are then compared around them: each custom op is
cut out, its outputs become graph inputs (fed seeded values like the others) and its inputs
graph outputs (compared like the others). Every rewritten region sits in what remains.
"""

from __future__ import annotations

import faulthandler
import os
import pickle
import signal
import sys
import warnings
from typing import Any

import numpy as np

from . import fb
from .model import Model, ModelError

RTOL = 1e-5
KINDS = ("normal", "zeros", "large")  # the seeded inputs (random_inputs)
# Quantized outputs after folds that removed roundings (DESIGN.md 3b): none more than
# QUANTA_MAX quanta apart and on average at most QUANTA_MEAN. A single fold moves its own output
# by at most 1 quantum; through a deep network those moves spread: on Keras ResNet50V2 in int8
# (17 BN pairs folded) the logits differ by at most 4 quanta, 0.84 on average, 16% of them by
# more than 1. A wrong fold (a wrong scale or sign in a channel) moves values by tens of quanta.
QUANTA_MAX = 8
QUANTA_MEAN = 1.0
# Where the original clips an intermediate tensor that a fold removed, the optimized model no
# longer clips there and is closer to the float function (DESIGN.md 3b): on such an input,
# without a float reference, only the mean bound applies (and the report names the tensors).
# Float16 weights a fold rewrote are rounded to float16 once more (float16.py): outputs move by
# about that rounding, relative 2^-11 per weight.
FLOAT16_TOLERANCE = 1e-2
# Cross-layer equalization rounds every rescaled weight and bias to float32 again; through a
# deep residual stream that adds up to about 1.5e-5 of the output range where the outputs are
# smallest (palm_detection_lite, all-zero input; 1e-6 on images): --verify allows 1e-4 then.
EQUALIZE_TOLERANCE = 1e-4
ATOL_SCALE = 1e-5
# NAN_NOTE: an output value that is NaN in the original is not compared. LiteRT's kernels
# clamp NaN as they please (a fused RELU gives NaN, 0 or FLT_MAX by kernel), so a rewrite that
# moves an activation from one kernel to another changes what NaN becomes; the report counts
# those values (``nan_not_compared``).
# An input on which the original's float outputs overflow, or come within this share of their
# type's largest value, is not compared: rescaling weights (folds, moved scales, equalization)
# moves where float arithmetic overflows, and LiteRT turns NaN into that largest value (a
# MAX_POOL_2D of NaN is -FLT_MAX). The report lists those inputs.
FLOAT_LIMIT_SHARE = 2.0**-20


def as_tflite(data: bytes | bytearray | memoryview) -> bytes:
    """The model as TFL3 bytes (a circle model is converted in memory)."""
    if fb.detect_format(data).name == "tflite":
        return bytes(data)
    return bytes(fb.encode(fb.decode(data), "tflite"))


def interpreter(
    data: bytes | bytearray | memoryview,
    threads: int = 1,
    delegate: bool = False,
    keep_all: bool = False,
) -> Any:
    """A LiteRT interpreter; by default on LiteRT's built-in kernels, without the XNNPACK delegate.

    Verification compares what two models compute, so it runs the reference kernels: a
    delegate's own bugs would otherwise fake or hide a difference. (LiteRT 2.3.0's XNNPACK
    delegate, for one, returns garbage for a standalone RELU or RELU6 followed by a 1x1
    AVERAGE_POOL_2D, in any model.) The benchmark measures latency with the delegate.
    ``keep_all``: every intermediate tensor stays readable after ``invoke``.
    """
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    options: dict[str, Any] = (
        {}
        if delegate
        else {"experimental_op_resolver_type": OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES}
    )
    with warnings.catch_warnings():
        # LiteRT warns that keeping every tensor is meant for debugging: it is, here
        warnings.simplefilter("ignore", UserWarning)
        interp = Interpreter(
            model_content=private_copy(as_tflite(data)),
            num_threads=threads,
            experimental_preserve_all_tensors=keep_all,
            **options,
        )
    interp.allocate_tensors()
    require_readable_names(interp)
    return interp


def private_copy(data: bytes | bytearray | memoryview) -> bytes:
    """The model bytes as a new object for one interpreter. LiteRT runs on the bytes it is
    given and writes what the caller sets into a graph input that has data in place, into
    those bytes: shared, the next interpreter (and the caller) would see other constants."""
    return bytes(bytearray(data))


def require_readable_names(interp: Any) -> None:
    """ValueError, in words, where LiteRT's Python API cannot read the model's graph input or
    output names: one is not UTF-8. LiteRT's runtime runs such a model, but its Python
    interpreter raises a bare UnicodeDecodeError on every question about those tensors."""
    try:
        interp.get_input_details()
        interp.get_output_details()
    except UnicodeDecodeError:
        raise ValueError(
            "a graph input or output name is not UTF-8 text, which LiteRT's Python API cannot read"
        ) from None


def litert_reason(error: BaseException) -> str:
    """The first line of what LiteRT said, or what kind of error it raised when it said nothing."""
    text = str(error).strip()
    return text.splitlines()[0] if text else f"{type(error).__name__} without a message"


def original_failed(error: BaseException) -> ModelError:
    """Bad input: LiteRT cannot run the model given to --verify (LiteRT's words)."""
    return ModelError(f"--verify: LiteRT cannot run the original model: {litert_reason(error)}")


def stored_inputs(data: bytes | bytearray | memoryview) -> set[int]:
    """The graph inputs (tensor indices) of the main subgraph that hold data in the model."""
    model = fb.decode(data)
    main = model.subgraphs[0]
    return {
        i
        for i in main.inputs
        if 0 <= i < len(main.tensors)
        and model.buffers[main.tensors[i].buffer].data is not None
        and len(model.buffers[main.tensors[i].buffer].data)
    }


def random_inputs(
    interp: Any, seed: int = 0, kind: str = "normal", stored: set[int] = frozenset()
) -> list[np.ndarray]:
    """Seeded inputs for every graph input: ``normal``, ``zeros`` or ``large`` magnitudes.

    A graph input in ``stored`` (it holds data in the model, see :func:`stored_inputs`) gets
    that data: it is often an operand (strides, a shape) no random values stand for, and the
    model's own value is the one it is run with unless the caller sets another.
    """
    rng = np.random.default_rng(seed)
    values = []
    for detail in interp.get_input_details():
        if detail.get("index") in stored:
            try:
                values.append(np.array(interp.get_tensor(detail["index"])))
            except ValueError as error:  # strings LiteRT cannot decode
                raise ModelError(
                    f"--verify: LiteRT cannot read the data of graph input {detail['name']!r}: "
                    f"{litert_reason(error)}"
                ) from None
            continue
        shape = [int(d) for d in detail["shape"]]
        dtype = np.dtype(detail["dtype"])
        if dtype.kind == "f":
            if kind == "zeros":
                value = np.zeros(shape)
            elif kind == "large":
                value = rng.normal(0.0, 1e3, shape)
            else:
                value = rng.normal(0.0, 1.0, shape)
        elif dtype.kind == "b":
            value = rng.integers(0, 2, shape) if kind != "zeros" else np.zeros(shape)
        elif dtype.kind not in "iu":
            raise ModelError(
                f"--verify: no seeded values of type {dtype} for graph input {detail['name']!r}"
            )
        else:
            info = np.iinfo(dtype)
            low, high = (
                (max(info.min, -128), min(info.max, 127))
                if kind == "large"
                else (max(info.min, -10), min(info.max, 10))
            )
            value = rng.integers(low, high + 1, shape) if kind != "zeros" else np.zeros(shape)
        values.append(np.asarray(value).astype(dtype))
    return values


def run(data: bytes | bytearray | memoryview, inputs: list[np.ndarray]) -> list[np.ndarray]:
    interp = interpreter(data)
    for detail, value in zip(interp.get_input_details(), inputs):
        interp.set_tensor(detail["index"], value)
    interp.invoke()
    return [np.array(interp.get_tensor(d["index"])) for d in interp.get_output_details()]


def at_float_limit(outputs: list[np.ndarray]) -> bool:
    """Whether a float output is infinite or, in float32 and float64, within FLOAT_LIMIT_SHARE
    of its type's limit (float16's is too near the values models compute)."""
    for value in outputs:
        if value.dtype.kind != "f" or not value.size or np.all(np.isnan(value)):
            continue
        limit = np.finfo(value.dtype).max * (FLOAT_LIMIT_SHARE if value.itemsize >= 4 else 1)
        if np.nanmax(np.abs(value)) >= limit:
            return True
    return False


def clipped_intermediates(
    original: bytes | bytearray | memoryview,
    optimized: bytes | bytearray | memoryview,
    inputs: list[np.ndarray],
) -> list[str]:
    """Quantized tensors of ``original`` that ``optimized`` no longer has (a fold removed them)
    and that reach their integer type's limit on ``inputs``: where the original clipped."""
    try:
        kept = {d["name"] for d in interpreter(optimized).get_tensor_details()}
        interp = interpreter(original, keep_all=True)
        for detail, value in zip(interp.get_input_details(), inputs):
            interp.set_tensor(detail["index"], value)
        interp.invoke()
        clipped = []
        for detail in interp.get_tensor_details():
            dtype = np.dtype(detail["dtype"])
            if detail["name"] in kept or dtype.kind not in "iu" or not detail["quantization"][0]:
                continue
            try:
                value = interp.get_tensor(detail["index"])
            except ValueError:  # a tensor LiteRT holds no values for (a constant it dropped)
                continue
            info = np.iinfo(dtype)
            zero = detail["quantization"][1]  # a limit that stands for 0 is a RELU's, no clip
            low = value.size and value.min() == info.min != zero
            if low or (value.size and value.max() == info.max != zero):
                clipped.append(detail["name"])
        return clipped
    except (RuntimeError, ValueError, UnicodeDecodeError):
        return []  # no excuse where the tensors cannot be read


def output_names(data: bytes | bytearray | memoryview) -> tuple[list[str], list[str]]:
    interp = interpreter(data)
    return [d["name"] for d in interp.get_input_details()], [
        d["name"] for d in interp.get_output_details()
    ]


def compare_arrays(
    expected: np.ndarray,
    actual: np.ndarray,
    rtol: float = RTOL,
    atol: float | None = None,
    atol_scale: float = ATOL_SCALE,
) -> tuple[bool, float]:
    """(match, max abs difference); float atol defaults to atol_scale * max |expected| (at least 1e-6)."""
    if expected.shape != actual.shape or expected.dtype != actual.dtype:
        return False, float("inf")
    if expected.dtype.kind not in "fc":
        diff = (
            float(np.max(np.abs(expected.astype(np.int64) - actual.astype(np.int64))))
            if expected.size
            else 0.0
        )
        return diff == 0.0, diff
    # Where the original is NaN anything goes (NAN_NOTE); an infinity where the other has the
    # same one; the finite values within tolerance, atol scaled to the largest finite magnitude.
    known = ~np.isnan(expected)
    expected, actual = expected[known], actual[known]
    finite = np.isfinite(expected)
    if not np.array_equal(finite, np.isfinite(actual)) or not np.array_equal(
        expected[~finite], actual[~finite]
    ):
        return False, float("inf")
    wide = np.complex128 if expected.dtype.kind == "c" else np.float64
    e, a = expected[finite].astype(wide), actual[finite].astype(wide)
    if atol is None:
        atol = max(atol_scale * float(np.max(np.abs(e))) if e.size else 0.0, 1e-6)
    diff = float(np.max(np.abs(e - a))) if e.size else 0.0
    return bool(np.all(np.abs(a - e) <= atol + rtol * np.abs(e))), diff


def custom_op_names(model: Model) -> list[str]:
    """The custom codes of the CUSTOM ops a model uses, in order of first use."""
    names: list[str] = []
    for subgraph in model.subgraphs:
        for op in subgraph.operators:
            code = op.opcode.custom_code if op.opcode.name == "CUSTOM" else None
            if code is not None and code not in names:
                names.append(code)
    return names


def without_custom_ops(data: bytes | bytearray | memoryview) -> tuple[bytes, list[str]]:
    """The model with its CUSTOM ops cut out (their outputs become graph inputs, their computed
    inputs graph outputs), and the custom codes cut; ModelError when that cannot be done."""
    model = fb.decode(data)
    names = custom_op_names(model)
    if not names:
        return as_tflite(data), []
    if any(
        op.opcode.name == "CUSTOM" for subgraph in model.subgraphs[1:] for op in subgraph.operators
    ):
        raise ModelError(
            f"--verify: LiteRT cannot run custom op {names[0]!r}, and it sits in a nested subgraph"
        )
    main = model.subgraphs[0]
    produced = {t for op in main.operators for t in op.outputs}
    inputs, outputs = list(main.inputs), list(main.outputs)
    kept = []
    for op in main.operators:
        if op.opcode.name != "CUSTOM":
            kept.append(op)
            continue
        for t in op.inputs:
            if t >= 0 and t in produced and t not in outputs:
                outputs.append(t)
        for t in op.outputs:
            shape = list(main.tensors[t].shape or [])
            if t >= 0 and t not in inputs:
                if not shape or any(d <= 0 for d in shape):
                    raise ModelError(
                        f"--verify: LiteRT cannot run custom op {op.opcode.custom_code!r}, and "
                        f"its output {main.tensors[t].name!r} has no static shape to feed instead"
                    )
                inputs.append(t)
    main.operators, main.inputs, main.outputs = kept, inputs, outputs
    model.root.signatureDefs = None  # the cut model has other inputs and outputs
    return bytes(fb.encode(model, "tflite")), names


def runnable_pair(
    original: bytes | bytearray | memoryview, optimized: bytes | bytearray | memoryview
) -> tuple[bytes | bytearray | memoryview, bytes | bytearray | memoryview, list[str]]:
    """Both models as LiteRT can run them: as they are, or with their custom ops cut out."""
    if not custom_op_names(fb.decode(original)):
        return original, optimized, []
    try:
        interpreter(original)
        return original, optimized, []  # LiteRT knows these custom ops
    except (RuntimeError, ValueError):
        pass
    cut_original, names = without_custom_ops(original)
    cut_optimized, _ = without_custom_ops(optimized)
    try:
        original_names = output_names(cut_original)
    except (RuntimeError, ValueError) as error:
        raise original_failed(error) from None
    try:
        optimized_names = output_names(cut_optimized)
    except (RuntimeError, ValueError):
        return cut_original, cut_optimized, names  # compare_models says it cannot run
    if original_names != optimized_names:
        raise ModelError(
            f"--verify: LiteRT cannot run custom op {names[0]!r}, and the two models differ "
            "around it"
        )
    return cut_original, cut_optimized, names


def compare_models(
    original: bytes | bytearray | memoryview,
    optimized: bytes | bytearray | memoryview,
    **options: Any,
) -> dict[str, Any]:
    """:func:`compare_in_process` in a forked child on Linux, so that LiteRT crashing on a model
    (a signal) ends the child, not the caller: then a crash on the original is a ModelError, a
    crash on the optimized model only is a mismatch, and a crash where each model runs alone
    (running both exhausted memory) is a ModelError. Elsewhere it runs in this process."""
    if not sys.platform.startswith("linux"):
        return compare_in_process(original, optimized, **options)
    crash, answer = in_child(compare_in_process, original, optimized, **options)
    if crash is None:
        return answer
    kinds = options.get("kinds", KINDS)
    again, _ = in_child(run_kinds, original, options.get("seed", 0), kinds)
    if again is not None:
        raise ModelError(f"--verify: LiteRT crashes ({again}) running the original model")
    alone, _ = in_child(run_kinds, optimized, options.get("seed", 0), kinds)
    if alone is None:
        # each runs alone: what ended the child was running both (memory: the kernel's
        # out-of-memory killer sends SIGKILL), not the optimized model (fuzz seed 108)
        raise ModelError(
            f"--verify: LiteRT crashes ({crash}) running the two models one after the other, "
            "though each runs alone (out of memory?): they cannot be compared here"
        )
    return {
        "match": False,
        "summary": f"LiteRT crashes ({crash}) running the optimized model, which runs the original",
        "max_abs_diff": {},
    }


def run_kinds(data: bytes | bytearray | memoryview, seed: int, kinds: tuple[str, ...]) -> None:
    """Run ``data`` on the seeded inputs compare_models feeds it (errors end it early)."""
    data, _, _ = runnable_pair(data, data)
    reference = interpreter(data)
    stored = stored_inputs(data)
    for k, kind in enumerate(kinds):
        run(data, random_inputs(reference, seed + k, kind, stored))


def in_child(function: Any, *args: Any, **kwargs: Any) -> tuple[str | None, Any]:
    """``(None, function(*args, **kwargs))`` computed in a forked child, whose exceptions are
    raised here again; or ``(signal name, None)`` where a signal ended the child."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            os.close(read)
            faulthandler.disable()  # a crash here is the parent's to report, in one line
            try:
                answer: tuple[bool, Any] = (True, function(*args, **kwargs))
            except Exception as error:  # noqa: BLE001 - raised again in the parent
                answer = (False, error)
            with os.fdopen(write, "wb") as pipe:
                try:
                    pickle.dump(answer, pipe)
                except Exception as error:  # noqa: BLE001 - an exception pickle cannot carry
                    pickle.dump((False, RuntimeError(f"{type(error).__name__}: {error}")), pipe)
        except BaseException:  # noqa: BLE001 - the parent reports an empty answer
            code = 1
        os._exit(code)
    os.close(write)
    try:
        with os.fdopen(read, "rb") as pipe:
            data = pipe.read()
        _, status = os.waitpid(pid, 0)
    except BaseException:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        try:
            return signal.Signals(number).name, None
        except ValueError:
            return f"signal {number}", None
    if not data:
        raise RuntimeError(f"the verifying child process failed (exit status {status})")
    ok, answer = pickle.loads(data)
    if not ok:
        raise answer
    return None, answer


def compare_in_process(
    original: bytes | bytearray | memoryview,
    optimized: bytes | bytearray | memoryview,
    seed: int = 0,
    rtol: float = RTOL,
    kinds: tuple[str, ...] = KINDS,
    atol_scale: float = ATOL_SCALE,
    quanta: int = QUANTA_MAX,
    quanta_mean: float = QUANTA_MEAN,
) -> dict[str, Any]:
    """Run both models on seeded inputs of each kind and compare every output.

    Quantized outputs (integers with a scale) compare in quanta: a fold in a quantized model
    removes a rounding, so they match when none is more than ``quanta`` apart and the mean
    difference is at most ``quanta_mean``; the share more than 1 quantum apart is reported.
    Other integer outputs match exactly. Models with custom ops are compared around them (see
    the module docstring).
    """
    original, optimized, custom = runnable_pair(original, optimized)
    try:
        reference = interpreter(original)
    except (RuntimeError, ValueError) as error:
        raise original_failed(error) from None
    stored = stored_inputs(original)
    details = reference.get_output_details()
    names = [d["name"] for d in details]
    quantized = {
        d["name"] for d in details if np.dtype(d["dtype"]).kind in "iu" and d["quantization"][0]
    }
    in_quanta: dict[str, dict[str, Any]] = {
        name: {"max": 0, "over_1": 0, "sum": 0, "values": 0} for name in quantized
    }
    clipped: list[str] = []
    at_limit: list[str] = []
    nan: dict[str, int] = {}
    worst: dict[str, float] = {name: 0.0 for name in names}
    relative: dict[str, float] = {name: 0.0 for name in names}
    match = True
    for k, kind in enumerate(kinds):
        inputs = random_inputs(reference, seed + k, kind, stored)
        try:
            expected = run(original, inputs)
        except (RuntimeError, ValueError) as error:
            raise original_failed(error) from None
        try:
            actual = run(optimized, inputs)
        except (RuntimeError, ValueError) as error:
            return {
                "match": False,
                "summary": "LiteRT cannot run the optimized model, which runs the original: "
                + litert_reason(error),
                "max_abs_diff": {},
            }
        if len(expected) != len(actual):
            return {
                "match": False,
                "summary": "the models have different numbers of outputs",
                "max_abs_diff": {},
            }
        if at_float_limit(expected):
            at_limit.append(kind)
            continue
        clipped_here: list[str] | None = None
        for name, e, a in zip(names, expected, actual):
            ok, diff = compare_arrays(e, a, rtol, atol_scale=atol_scale)
            if e.dtype.kind in "fc" and np.any(np.isnan(e)):
                nan[name] = nan.get(name, 0) + int(np.count_nonzero(np.isnan(e)))
            if name in quantized and e.shape == a.shape and e.size:
                apart = np.abs(e.astype(np.int64) - a.astype(np.int64))
                entry = in_quanta[name]
                if int(apart.max()) > quanta and clipped_here is None:
                    clipped_here = clipped_intermediates(original, optimized, inputs)
                    clipped += [t for t in clipped_here if t not in clipped]
                if int(apart.max()) > quanta and clipped_here:
                    entry["clipped_max"] = max(entry.get("clipped_max", 0), int(apart.max()))
                else:
                    entry["max"] = max(entry["max"], int(apart.max()))
                entry["over_1"] += int(np.count_nonzero(apart > 1))
                entry["sum"] += int(apart.sum())
                entry["values"] += int(apart.size)
                ok = entry["max"] <= quanta and entry["sum"] <= quanta_mean * entry["values"]
            worst[name] = max(worst[name], diff)
            if e.dtype.kind == "f" and e.size and np.isfinite(diff) and np.any(np.isfinite(e)):
                scale = float(np.max(np.abs(e[np.isfinite(e)])))
                relative[name] = max(relative[name], diff / scale if scale else diff)
            match = match and ok
    for entry in in_quanta.values():
        values = max(entry.pop("values"), 1)
        entry["share_over_1"] = entry.pop("over_1") / values
        entry["mean"] = entry.pop("sum") / values
    summary = "; ".join(
        f"{n}: max {in_quanta[n]['max']} quanta apart, mean {in_quanta[n]['mean']:.2f}, "
        f"{in_quanta[n]['share_over_1']:.2%} more than 1"
        if n in in_quanta
        else f"{n}: {relative[n]:.2g} of max |output|, max |diff| {worst[n]:.3g}"
        for n in names
    )
    if nan:
        summary += (
            f" ({sum(nan.values())} NaN value(s) of the original not compared: LiteRT's kernels"
            " clamp NaN differently)"
        )
    if at_limit:
        summary += (
            f" (not compared on the {', '.join(at_limit)} inputs: the original's outputs reach"
            " float's limit there)"
        )
    if clipped:
        summary += (
            f" (more on inputs where the original clips {', '.join(map(repr, clipped[:3]))}"
            f"{', ...' if len(clipped) > 3 else ''}, which the optimized model does not have:"
            f" up to {max(e.get('clipped_max', 0) for e in in_quanta.values())} quanta)"
        )
    if custom:
        summary += f" (compared around custom op(s) {', '.join(custom)}, which LiteRT cannot run)"
    return {
        **({"quanta": in_quanta} if in_quanta else {}),
        "match": match,
        "summary": summary,
        "max_abs_diff": worst,
        "max_rel_diff": relative,
        "seed": seed,
        "inputs": list(kinds),
        **({"around_custom_ops": custom} if custom else {}),
        **({"clipped_intermediates": clipped} if clipped else {}),
        **({"not_compared": at_limit} if at_limit else {}),
        **({"nan_not_compared": nan} if nan else {}),
    }
