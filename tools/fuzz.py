#!/usr/bin/env python3
"""Fuzz tfl_fuse.optimize with mutated recipe models; report crash signatures and reproducers.

    python tools/fuzz.py --count 100000 --jobs 2 --out build/fuzz

Seeds are the recipe models (``tools/chef.py`` builds them). Each input is a seed changed by
byte mutations (flips, interesting 32-bit values, truncation, chunk removal or duplication)
or by structural edits through LiteRT's object API (indices, shapes, tensor types, option
fields and tables, quantization, buffer offsets and data, operator lists, operator codes,
graph inputs and outputs). Each input is optimized in-process with random rules, target and
output format. A share of them (``--verify-share``, default 0.1) is optimized with ``verify``:
LiteRT runs the input and the output on the same seeded inputs, so a rewrite that changes what
a model LiteRT accepts computes is a failure too (a differential check). Those run in a forked
child, since LiteRT may crash on a malformed model; a crash is a failure of its own signature.

An outcome is fine when ``optimize`` returns or raises ``ModelError`` with one line that is
not the engine's catch-all ("met an inconsistent model": validation should have refused the
model before any rule ran), and no warning reaches the caller (the CLI would print it on
stderr beside its one line). Anything else is a failure, grouped by signature (exception type
and the innermost tfl_fuse frame, or the catch-all's inner error); the first input of each
signature is written to ``OUT/<signature>.tflite`` and the run exits 1. Under ``verify``,
a ``VerificationError`` is a failure named after the rewrite it blames; LiteRT refusing the
input (a ``ModelError``) is fine.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import json
import multiprocessing
import os
import random
import resource
import signal
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT))

import chef  # noqa: E402
from ai_edge_litert import schema_py_generated as schema  # noqa: E402
from ai_edge_litert.tools import flatbuffer_utils  # noqa: E402

import tfl_fuse  # noqa: E402
from tfl_fuse import api, fb, verify  # noqa: E402
from tfl_fuse.model import ModelError  # noqa: E402
from tfl_fuse.rules import predicates  # noqa: E402

CATCH_ALL = "met an inconsistent model"
INTERESTING_INTS = [0, 1, 2, 3, 4, 7, 8, 16, 127, 128, 255, 256, -1, -2, -128, 2**15, 2**16]
INTERESTING_INTS += [2**31 - 1, -(2**31), 2**32 - 1, 2**40, 2**63 - 1, 2**64 - 1]
INTERESTING_FLOATS = [0.0, -0.0, 1e-45, 1e-30, 1e30, 3.4e38, float("inf"), -1.0, float("nan")]
TIMEOUT_SECONDS = 20
MEMORY_LIMIT = 6 << 30  # a fold that allocates without bound becomes a MemoryError


class Timeout(Exception):
    pass


def seed_models(recipes: Path = ROOT / "recipes") -> list[bytes]:
    return [chef.cook(p)[0] for p in sorted(recipes.iterdir()) if (p / "recipe.toml").is_file()]


# byte mutations -------------------------------------------------------------------------------
def mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    kind = rng.randrange(5)
    if kind == 0:  # random bytes
        for _ in range(rng.randint(1, 8)):
            out[rng.randrange(8, len(out))] = rng.randrange(256)
    elif kind == 1:  # an interesting 32-bit value at an aligned position
        position = rng.randrange(8, len(out) - 4) & ~3
        value = rng.choice(INTERESTING_INTS) & 0xFFFFFFFF
        out[position : position + 4] = value.to_bytes(4, "little")
    elif kind == 2:  # truncation
        del out[rng.randrange(8, len(out)) :]
    elif kind == 3:  # a chunk removed
        start = rng.randrange(8, len(out))
        del out[start : start + rng.randint(1, 64)]
    else:  # a chunk duplicated
        start = rng.randrange(8, len(out))
        chunk = out[start : start + rng.randint(1, 64)]
        out[start:start] = chunk
    return bytes(out)


# structural mutations (LiteRT object API) -----------------------------------------------------
def _pick_int(rng: random.Random, limit: int) -> int:
    """An index: in range, just past it, -1, or an interesting int32."""
    value = rng.choice(
        [rng.randrange(max(limit, 1)), limit, limit + 1, -1, rng.choice(INTERESTING_INTS)]
    )
    return (value + 2**31) % 2**32 - 2**31


def _options_classes() -> list[type]:
    return [
        getattr(schema, name + "T")
        for name in vars(schema.BuiltinOptions)
        if not name.startswith("_") and hasattr(schema, name + "T")
    ]


OPTIONS_CLASSES = _options_classes()
OPTIONS_TYPES = {
    cls.__name__[:-1]: getattr(schema.BuiltinOptions, cls.__name__[:-1]) for cls in OPTIONS_CLASSES
}


def _mutate_options(op: Any, ops: list, rng: random.Random) -> None:
    kind = rng.randrange(4)
    if kind == 0 or op.builtinOptions is None:  # a table of some other type
        cls = rng.choice(OPTIONS_CLASSES)
        op.builtinOptions = cls()
        op.builtinOptionsType = OPTIONS_TYPES[cls.__name__[:-1]]
    elif kind == 1:  # another operator's table
        other = rng.choice(ops)
        op.builtinOptions, op.builtinOptionsType = other.builtinOptions, other.builtinOptionsType
    elif kind == 2:  # no table
        op.builtinOptions, op.builtinOptionsType = None, 0
    else:  # one field set to an interesting value
        fields = [k for k, v in vars(op.builtinOptions).items() if isinstance(v, (int, float))]
        if fields:
            name = rng.choice(fields)
            options = copy.copy(op.builtinOptions)
            current = getattr(options, name)
            if isinstance(current, float):
                setattr(options, name, rng.choice(INTERESTING_FLOATS))
            elif isinstance(current, bool):
                setattr(options, name, not current)
            else:
                setattr(options, name, rng.choice(INTERESTING_INTS[:17] + [2**31 - 1, -(2**31)]))
            op.builtinOptions = options


def _mutate_quantization(tensor: Any, rng: random.Random) -> None:
    q = schema.QuantizationParametersT()
    n = rng.choice([0, 1, 2, 3, 4, 8, 16, len(tensor.shape if tensor.shape is not None else [])])
    q.scale = [rng.choice([0.5, 0.1, *INTERESTING_FLOATS]) for _ in range(n)]
    q.zeroPoint = [rng.choice([0, 1, -128, 127]) for _ in range(rng.choice([n, n, 0, 1]))]
    q.quantizedDimension = rng.choice([0, 0, 1, 2, 3, 4, -1, 7, 2**31 - 1])
    if rng.random() < 0.3:
        q.min, q.max = [rng.choice(INTERESTING_FLOATS)], [rng.choice(INTERESTING_FLOATS)]
    tensor.quantization = q


def mutate_structure(model: Any, rng: random.Random) -> None:
    sg = rng.choice(model.subgraphs)
    tensors, ops = sg.tensors, sg.operators
    n_tensors = len(tensors)
    kind = rng.randrange(19)
    if kind == 0 and ops:  # an operator input or output index
        op = rng.choice(ops)
        which = op.inputs if rng.random() < 0.6 or op.outputs is None else op.outputs
        if which is not None and len(which):
            which[rng.randrange(len(which))] = _pick_int(rng, n_tensors)
    elif kind == 1 and tensors:  # a shape
        t = rng.choice(tensors)
        shape = list(t.shape if t.shape is not None else [])
        edit = rng.randrange(4)
        if edit == 0 and shape:
            shape[rng.randrange(len(shape))] = rng.choice([0, 1, 2, 3, -1, 40000, 2**31 - 1])
        elif edit == 1:
            shape.append(rng.choice([1, 2, 40000]))
        elif edit == 2 and shape:
            shape.pop(rng.randrange(len(shape)))
        else:
            shape = list(reversed(shape))
        t.shape = np.asarray(shape, dtype=np.int32)
    elif kind == 2 and tensors:  # a tensor type
        rng.choice(tensors).type = rng.randrange(0, 20)
    elif kind == 3 and ops:
        _mutate_options(rng.choice(ops), ops, rng)
    elif kind == 4 and tensors:
        _mutate_quantization(rng.choice(tensors), rng)
    elif kind == 5 and model.buffers:  # buffer offset / size
        b = rng.choice(model.buffers)
        b.offset = rng.choice([0, 1, 2, 16, 2**31, 2**63, 2**64 - 1, rng.randrange(1 << 12)])
        b.size = rng.choice([0, 1, 4, 16, 2**31, 2**63, 2**64 - 1, rng.randrange(1 << 12)])
        if rng.random() < 0.5:
            b.data = None
    elif kind == 6 and model.buffers:  # buffer data shortened, lengthened or dropped
        b = rng.choice(model.buffers)
        data = bytes(np.asarray(b.data if b.data is not None else [], dtype=np.uint8))
        edit = rng.randrange(3)
        data = (
            data[: rng.randrange(len(data) + 1)] if edit == 0 else data + data if edit == 1 else b""
        )
        b.data = np.frombuffer(data, dtype=np.uint8) if data else None
    elif kind == 7 and ops:  # operator list: drop, duplicate, swap
        edit = rng.randrange(3)
        i = rng.randrange(len(ops))
        if edit == 0:
            ops.pop(i)
        elif edit == 1:
            ops.insert(rng.randrange(len(ops) + 1), copy.deepcopy(ops[i]))
        else:
            j = rng.randrange(len(ops))
            ops[i], ops[j] = ops[j], ops[i]
    elif kind == 8 and ops:  # opcode index
        rng.choice(ops).opcodeIndex = _pick_int(rng, len(model.operatorCodes or []))
    elif kind == 9 and model.operatorCodes:  # what an operator code names
        code = rng.choice(model.operatorCodes)
        value = rng.choice([0, 1, 2, 3, 4, 9, 14, 18, 22, 28, 41, 67, 127, 200, 1000, -1])
        code.builtinCode = value
        code.deprecatedBuiltinCode = min(value, 127) if rng.random() < 0.8 else value
    elif kind == 10:  # graph inputs / outputs
        target = sg.inputs if rng.random() < 0.5 else sg.outputs
        edit = rng.randrange(3)
        if edit == 0:
            values: list[int] = []
        elif edit == 1:
            values = list(target if target is not None else []) + [rng.randrange(max(n_tensors, 1))]
        else:
            values = [_pick_int(rng, n_tensors)]
        if target is sg.inputs:
            sg.inputs = np.asarray(values, dtype=np.int32)
        else:
            sg.outputs = np.asarray(values, dtype=np.int32)
    elif kind == 11 and tensors:  # tensor buffer index
        rng.choice(tensors).buffer = _pick_int(rng, len(model.buffers or []))
    elif kind == 12 and tensors:  # variable flag
        t = rng.choice(tensors)
        t.isVariable = not t.isVariable
    elif kind == 13 and ops:  # large custom options
        op = rng.choice(ops)
        op.largeCustomOptionsOffset = rng.choice([0, 1, 2, 16, 2**31, 2**63, 2**64 - 1])
        op.largeCustomOptionsSize = rng.choice([0, 1, 16, 2**31, 2**63, 2**64 - 1])
    elif kind == 14 and tensors and sg.inputs is not None:  # a constant becomes a graph input
        constants = [i for i, t in enumerate(tensors) if t.buffer]
        if constants:
            sg.inputs = np.asarray([*sg.inputs, rng.choice(constants)], dtype=np.int32)
    elif kind == 15 and tensors:  # two tensors share a buffer
        a, b = rng.choice(tensors), rng.choice(tensors)
        a.buffer = b.buffer
    elif kind == 16 and tensors:  # a constant declared sparse
        t = rng.choice([t for t in tensors if t.buffer] or tensors)
        sparsity = schema.SparsityParametersT()
        sparsity.traversalOrder = list(range(len(t.shape if t.shape is not None else [])))
        t.sparsity = sparsity
    elif kind == 17 and model.signatureDefs:  # a signature's tensor index
        entries = [*(model.signatureDefs[0].inputs or []), *(model.signatureDefs[0].outputs or [])]
        if entries:
            rng.choice(entries).tensorIndex = _pick_int(rng, n_tensors)
    elif kind == 18 and tensors:  # a constant's type
        t = rng.choice([t for t in tensors if t.buffer] or tensors)
        t.type = rng.choice([0, 1, 2, 3, 4, 5, 7, 9, 16, 17])  # float32, float16, int32, ...


def mutate(seeds: list[bytes], objects: list[Any], rng: random.Random) -> bytes:
    index = rng.randrange(len(seeds))
    if rng.random() < 0.35:
        return mutate_bytes(seeds[index], rng)
    model = copy.deepcopy(objects[index])
    try:
        for _ in range(rng.choice([1, 1, 1, 2, 3])):
            mutate_structure(model, rng)
        return bytes(flatbuffer_utils.convert_object_to_bytearray(model))
    except Exception:  # noqa: BLE001 - a value the schema cannot hold: mutate bytes instead
        return mutate_bytes(seeds[index], rng)


# running ---------------------------------------------------------------------------------------
def signature(error: BaseException) -> str | None:
    """None for an accepted outcome, else the failure's signature."""
    frames = [f for f in traceback.extract_tb(error.__traceback__) if "tfl_fuse" in f.filename]
    where = (
        f"{Path(frames[-1].filename).name}:{frames[-1].lineno} {frames[-1].name}" if frames else "?"
    )
    if isinstance(error, ModelError):
        message = str(error)
        if "\n" in message:
            return "ModelError with a multi-line message"
        if CATCH_ALL in message:
            rule = message.split("rule ", 1)[1].split(" ", 1)[0]
            inner = message.split("(", 1)[1].split(":", 1)[0]
            return f"catch-all: rule {rule} met {inner}"
        if any("/rules/" in f.filename for f in frames):  # validation should have refused it
            return f"ModelError inside a rule at {where}"
        return None
    return f"{type(error).__name__} at {where}"


def non_finite_constants(data: bytes) -> int:
    """How many float32 constant values of a model are NaN or infinite."""
    model = fb.decode(data)
    count = 0
    for subgraph in model.subgraphs:
        for tensor in subgraph.tensors:
            payload = model.buffers[tensor.buffer].data
            if tensor.type == "FLOAT32" and payload is not None and len(payload) % 4 == 0:
                count += int(np.count_nonzero(~np.isfinite(np.frombuffer(payload, "<f4"))))
    return count


def check(
    data: bytes,
    rng: random.Random,
    verify_share: float = 0.0,
    write_share: float = 0.0,
    folder: Path | None = None,
) -> tuple[str | None, str]:
    """Optimize one input: (failure signature or None, message). ``write_share`` of the inputs
    are also written to a file as optimize_file writes them, which must give the same bytes and
    report as optimize() (which checks folds for overflow as it folds, the write path as it
    writes), into ``folder`` (by default the system's temp folder)."""
    options: dict[str, Any] = {"target": rng.choice(["float", "float", "int8"])}
    if rng.random() < 0.1:
        options["output_format"] = rng.choice(["tflite", "circle"])
    if rng.random() < verify_share:
        try:
            return in_child(_check, data, {**options, "verify": True})
        except Timeout:
            return "Timeout", f"over {TIMEOUT_SECONDS} s (with verify)"
    write = rng.random() < write_share
    return _check(data, options, (folder or Path(tempfile.gettempdir())) if write else None)


def _written_differs(
    data: bytes, output: bytes, report: dict[str, Any], options: dict, folder: Path
) -> bool:
    """Whether the write path (api.optimize_and_write, as optimize_file) writes other bytes or
    reports otherwise than optimize() did."""
    target = folder / f"written-{os.getpid()}"
    try:
        written = api.optimize_and_write(data, None, target, durable=False, **options)
        return target.read_bytes() != bytes(output) or _comparable(written) != _comparable(report)
    finally:
        target.unlink(missing_ok=True)


@contextlib.contextmanager
def _every_fold_a_product() -> Iterator[None]:
    """Folds of any size made as ScaledProducts, not only those of 4 KiB or more: the recipe
    models' weights are small, and only a ScaledProduct's overflow check waits for the write."""
    eager_below = predicates.EAGER_BELOW_BYTES
    predicates.EAGER_BELOW_BYTES = 0
    try:
        yield
    finally:
        predicates.EAGER_BELOW_BYTES = eager_below


def _comparable(report: dict[str, Any]) -> str:
    return json.dumps(
        {k: v for k, v in report.items() if k != "timing"}, sort_keys=True, default=str
    )


def _check(
    data: bytes, options: dict[str, Any], write_to: Path | None = None
) -> tuple[str | None, str]:
    try:
        with (
            warnings.catch_warnings(record=True) as caught,
            _every_fold_a_product() if write_to else contextlib.nullcontext(),
        ):
            warnings.simplefilter("always")
            output, report = tfl_fuse.optimize(data, **options)
            if write_to and _written_differs(data, output, report, options, write_to):
                return "the written output differs from optimize()'s", str(options)
        if caught:
            where = f"{Path(caught[0].filename).name}:{caught[0].lineno}"
            return f"{caught[0].category.__name__} at {where}", str(caught[0].message)[:300]
    except Timeout:
        return "Timeout", f"over {TIMEOUT_SECONDS} s"
    except tfl_fuse.VerificationError as error:
        rules = sorted({entry["rule"] for entry in error.report.get("rewrites", ())})
        culprit = error.result.get("culprit")
        blamed = culprit["rule"] if culprit else "no rewrite: " + ", ".join(rules or ["none"])
        return f"--verify: outputs differ ({blamed})", str(error)[:300]
    except BaseException as error:  # noqa: BLE001 - every outcome is classified
        if isinstance(error, KeyboardInterrupt):
            raise
        return signature(error), f"{type(error).__name__}: {str(error)[:300]}"
    try:
        written = non_finite_constants(output)
    except ModelError as error:
        return "the output does not decode", str(error)[:300]
    # Folds refuse non-finite results: the output has no more NaN/inf constants than the input.
    if written > non_finite_constants(data):
        rules = sorted({entry["rule"] for entry in report["rewrites"]})
        return f"non-finite constant written ({', '.join(rules)})", str(report["rewrites"])[:300]
    return None, ""


def in_child(function: Any, *args: Any) -> tuple[str | None, str]:
    """``function(*args)`` in a forked child (LiteRT may crash on a malformed model): its
    result, or a failure naming the signal that ended the child."""
    crash, answer = verify.in_child(function, *args)
    if crash is not None:
        return f"crash under --verify ({crash})", "LiteRT or tfl_fuse ended the process"
    return answer


def _alarm(signum: int, frame: Any) -> None:
    raise Timeout()


def run(
    seed: int,
    count: int,
    out: Path | None,
    seeds: list[bytes] | None = None,
    verify_share: float = 0.0,
    write_share: float = 0.0,
) -> dict[str, Any]:
    """Fuzz ``count`` inputs from ``seed``; return counts and {signature: first example}."""
    seeds = seeds if seeds is not None else seed_models()
    objects = [flatbuffer_utils.read_model_from_bytearray(bytearray(s)) for s in seeds]
    rng = random.Random(seed)
    failures: dict[str, dict[str, Any]] = {}
    outcomes = {"ok": 0, "refused": 0, "failed": 0}
    old = signal.signal(signal.SIGALRM, _alarm)
    # written outputs go to a folder of the run's own, so that write_atomically's look for
    # stale temp files scans it and not all of the system's temp folder
    folder = tempfile.TemporaryDirectory(prefix="tfl_fuse-fuzz-")
    try:
        for i in range(count):
            data = mutate(seeds, objects, rng)
            signal.alarm(TIMEOUT_SECONDS)
            try:
                found, message = check(
                    data,
                    random.Random(f"{seed}/{i}"),
                    verify_share,
                    write_share,
                    Path(folder.name),
                )
            finally:
                signal.alarm(0)
            if found is None:
                outcomes["refused" if message else "ok"] += 1
                continue
            outcomes["failed"] += 1
            entry = failures.setdefault(found, {"count": 0, "message": message, "input": None})
            entry["count"] += 1
            if entry["input"] is None and out is not None:
                out.mkdir(parents=True, exist_ok=True)
                name = hashlib.sha1(found.encode()).hexdigest()[:12] + ".tflite"
                (out / name).write_bytes(data)
                entry["input"] = str(out / name)
    finally:
        signal.signal(signal.SIGALRM, old)
        folder.cleanup()
    return {"count": count, "outcomes": outcomes, "failures": failures}


def _worker(args: tuple[int, int, str | None, float, float]) -> dict[str, Any]:
    seed, count, out, verify_share, write_share = args
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    return run(
        seed,
        count,
        Path(out) if out else None,
        verify_share=verify_share,
        write_share=write_share,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=100_000, help="inputs in all (default 100000)")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "build" / "fuzz"), help="reproducer folder")
    parser.add_argument(
        "--verify-share",
        type=float,
        default=0.1,
        help="share of inputs also checked with verify: LiteRT runs input and output (default 0.1)",
    )
    parser.add_argument(
        "--write-share",
        type=float,
        default=0.2,
        help="share of inputs also written to a file as optimize_file does, which must give "
        "optimize()'s bytes and report (default 0.2)",
    )
    args = parser.parse_args(argv)
    start = time.monotonic()
    chunks = 4 * args.jobs
    tasks = [
        (
            args.seed * 1000 + k,
            args.count // chunks + (k < args.count % chunks),
            args.out,
            args.verify_share,
            args.write_share,
        )
        for k in range(chunks)
    ]
    with multiprocessing.get_context("fork").Pool(args.jobs, maxtasksperchild=1) as pool:
        results = pool.map(_worker, tasks)
    outcomes = {k: sum(r["outcomes"][k] for r in results) for k in ("ok", "refused", "failed")}
    failures: dict[str, dict[str, Any]] = {}
    for result in results:
        for name, entry in result["failures"].items():
            merged = failures.setdefault(name, {**entry, "count": 0})
            merged["count"] += entry["count"]
    elapsed = time.monotonic() - start
    print(
        f"fuzz: {args.count} inputs in {elapsed:.0f} s: {outcomes['ok']} optimized, "
        f"{outcomes['refused']} refused with ModelError, {outcomes['failed']} failures, "
        f"{len(failures)} signatures"
    )
    for name, entry in sorted(failures.items(), key=lambda item: -item[1]["count"]):
        print(
            f"  {entry['count']:6d}  {name}\n          {entry['message']}\n          {entry['input']}"
        )
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "summary.json").write_text(
        json.dumps({"outcomes": outcomes, "failures": failures, "seconds": elapsed}, indent=2)
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
