#!/usr/bin/env python3
"""Value test: run LiteRT on an original and an optimized model, dump both through h5, compare.

For each input kind (seeded normal values, zeros, large magnitudes) it writes
``<name>[-kind].input.h5``, ``<name>[-kind].expected.h5`` (original outputs) and
``<name>[-kind].opt.h5`` (optimized outputs) in ONE's layout, then compares the last two
with ``h5compare``. Custom ops that LiteRT cannot run are cut out of both models first (their
outputs become inputs, their inputs outputs: tfl_fuse.verify). Circle models run through tfl_fuse's in-memory circle -> tflite conversion.

    python tools/valuetest.py original.tflite optimized.tflite --out build/values --name Net
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import h5compare  # noqa: E402

from tfl_fuse import verify  # noqa: E402

KINDS = ("normal", "zeros", "large")


def run_value_test(
    name: str,
    original: bytes,
    optimized: bytes,
    out_dir: str | Path,
    rtol: float = h5compare.DEFAULT_RTOL,
    seed: int = 0,
    quanta: int | dict[str, int] = 0,
    quanta_share: float = 0.0,
    atol_scale: float = h5compare.ATOL_SCALE,
) -> tuple[bool, list[str]]:
    """``quanta``: integer outputs may differ by that many quanta (a dict: per output name)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # custom ops LiteRT cannot run are cut out of both models (verify.runnable_pair)
    original, optimized, _ = verify.runnable_pair(original, optimized)
    reference = verify.interpreter(original)
    stored = verify.stored_inputs(original)
    input_names = [d["name"] for d in reference.get_input_details()]
    output_names = [d["name"] for d in reference.get_output_details()]
    ok, report = True, []
    for k, kind in enumerate(KINDS):
        stem = name if kind == "normal" else f"{name}-{kind}"
        inputs = verify.random_inputs(reference, seed + k, kind, stored)
        h5compare.write_dump(out_dir / f"{stem}.input.h5", input_names, inputs)
        h5compare.write_dump(
            out_dir / f"{stem}.expected.h5", output_names, verify.run(original, inputs)
        )
        h5compare.write_dump(
            out_dir / f"{stem}.opt.h5", output_names, verify.run(optimized, inputs)
        )
        same, lines = h5compare.compare_files(
            out_dir / f"{stem}.expected.h5",
            out_dir / f"{stem}.opt.h5",
            rtol,
            quanta=quanta,
            quanta_share=quanta_share,
            atol_scale=atol_scale,
        )
        ok = ok and same
        report.extend(f"[{kind}] {line}" for line in lines)
    return ok, report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="LiteRT value test of two models through h5 dumps")
    parser.add_argument("original")
    parser.add_argument("optimized")
    parser.add_argument("--out", default="build/values")
    parser.add_argument("--name", default=None)
    parser.add_argument("--rtol", type=float, default=h5compare.DEFAULT_RTOL)
    args = parser.parse_args(argv)
    name = args.name or Path(args.original).stem
    ok, lines = run_value_test(
        name,
        Path(args.original).read_bytes(),
        Path(args.optimized).read_bytes(),
        args.out,
        args.rtol,
    )
    print("\n".join(lines))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
