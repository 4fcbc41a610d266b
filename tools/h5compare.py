#!/usr/bin/env python3
"""Write, read and compare tensor dumps in ONE's h5 layout, like ``h5diff -d``.

A dump has a group ``name`` (dataset "0", "1", ... holding each tensor's name) and a group
``value`` (dataset "0", "1", ... holding each tensor). ``<model>.input.h5`` holds inputs,
``<model>.expected.h5`` the original model's outputs, ``<model>.opt.h5`` the optimized one's.

    python tools/h5compare.py A.h5 B.h5 [--rtol R] [--atol A]

Float tensors compare with rtol (default 1e-5) and an atol scaled to the magnitude of A's
tensor (unless --atol is given); integer tensors exactly, or within --quanta (quantized
models whose folds removed a rounding: at most that many quanta apart, and at most
--quanta-share of the values more than 1 quantum apart). Prints the worst differences by
tensor; exits 0 on match, 1 on mismatch, 2 on unreadable files.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import h5py
import numpy as np

DEFAULT_RTOL = 1e-5
ATOL_SCALE = 1e-5


def write_dump(path: str | Path, names: list[str], values: list[np.ndarray]) -> None:
    with h5py.File(path, "w") as file:
        name_group = file.create_group("name")
        value_group = file.create_group("value")
        for i, (name, value) in enumerate(zip(names, values, strict=True)):
            name_group.create_dataset(str(i), data=name)
            value_group.create_dataset(str(i), data=np.asarray(value))


def read_dump(path: str | Path) -> tuple[list[str], list[np.ndarray]]:
    with h5py.File(path, "r") as file:
        count = len(file["value"])
        names = []
        for i in range(count):
            raw = file["name"][str(i)][()] if "name" in file and str(i) in file["name"] else str(i)
            names.append(raw.decode() if isinstance(raw, bytes) else str(raw))
        values = [np.array(file["value"][str(i)]) for i in range(count)]
    return names, values


def compare_tensors(
    expected: np.ndarray,
    actual: np.ndarray,
    rtol: float,
    atol: float | None,
    quanta: int = 0,
    quanta_share: float = 0.0,
    atol_scale: float = ATOL_SCALE,
) -> tuple[bool, str]:
    """Float: rtol/atol. Integer: exactly, or (``quanta`` > 0, for quantized models that a fold
    changed by a rounding) at most ``quanta`` apart with at most ``quanta_share`` of the values
    more than 1 apart."""
    if expected.shape != actual.shape:
        return False, f"shape {list(expected.shape)} vs {list(actual.shape)}"
    if expected.dtype != actual.dtype:
        return False, f"dtype {expected.dtype} vs {actual.dtype}"
    if expected.size == 0:
        return True, "empty"
    if expected.dtype.kind not in "fc":
        diff = np.abs(expected.astype(np.int64) - actual.astype(np.int64))
        worst = int(diff.max())
        far = int(np.count_nonzero(diff > 1))
        ok = worst <= quanta and far <= quanta_share * diff.size
        return (
            ok,
            f"max |diff| {worst} ({int(np.count_nonzero(diff))} of {diff.size} differ, "
            f"{far} by more than 1 quantum; allowed {quanta})",
        )
    scale = (
        float(np.max(np.abs(expected[np.isfinite(expected)])))
        if np.any(np.isfinite(expected))
        else 0.0
    )
    tolerance = atol if atol is not None else max(atol_scale * scale, 1e-6)
    e, a = expected.astype(np.float64), actual.astype(np.float64)
    with np.errstate(invalid="ignore"):
        diff = np.abs(e - a)
        bad = ~np.isclose(a, e, rtol=rtol, atol=tolerance, equal_nan=True)
    finite_diff = np.where(np.isnan(diff), -1.0, diff)
    worst_index = np.unravel_index(int(np.argmax(finite_diff)), diff.shape)
    text = (
        f"max |diff| {float(finite_diff.max()) if finite_diff.max() >= 0 else float('nan'):.3g} at {tuple(int(i) for i in worst_index)} "
        f"(expected {e[worst_index]:.6g}, got {a[worst_index]:.6g}); "
        f"{int(np.count_nonzero(bad))} of {diff.size} outside rtol {rtol:g} atol {tolerance:.3g}"
    )
    return not bool(np.any(bad)), text


def compare_files(
    path_a: str | Path,
    path_b: str | Path,
    rtol: float = DEFAULT_RTOL,
    atol: float | None = None,
    quanta: int | dict[str, int] = 0,
    quanta_share: float = 0.0,
    atol_scale: float = ATOL_SCALE,
) -> tuple[bool, list[str]]:
    """Compare two dumps tensor by tensor; ``quanta`` may name a tolerance per tensor."""
    names_a, values_a = read_dump(path_a)
    names_b, values_b = read_dump(path_b)
    if len(values_a) != len(values_b):
        return False, [f"{len(values_a)} tensors vs {len(values_b)}"]
    ok, lines = True, []
    for name, a, b in zip(names_a, values_a, values_b, strict=True):
        allowed = quanta.get(name, 0) if isinstance(quanta, dict) else quanta
        same, text = compare_tensors(a, b, rtol, atol, allowed, quanta_share, atol_scale)
        ok = ok and same
        lines.append(f"{'ok  ' if same else 'DIFF'} {name}: {text}")
    return ok, lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="compare two h5 tensor dumps (ONE layout)")
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("--rtol", type=float, default=DEFAULT_RTOL)
    parser.add_argument("--atol", type=float, default=None)
    parser.add_argument(
        "--quanta", type=int, default=0, help="integer tensors: allowed difference (default 0)"
    )
    parser.add_argument(
        "--quanta-share",
        type=float,
        default=0.0,
        help="integer tensors: allowed share of values more than 1 apart (default 0)",
    )
    args = parser.parse_args(argv)
    try:
        ok, lines = compare_files(
            args.a, args.b, args.rtol, args.atol, args.quanta, args.quanta_share
        )
    except (OSError, KeyError) as error:
        print(f"h5compare: error: {error}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
