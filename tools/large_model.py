#!/usr/bin/env python3
"""Build a model over 2 GB whose weights lie after the flatbuffer (Buffer offset/size).

    python tools/large_model.py build/large.tflite --gb 2.4

The model has two outputs: ``y = FULLY_CONNECTED(x) * s`` (a MUL that fold_into_preceding_layer
folds into the small FC) and ``g = GATHER(table, [0])``, where ``table`` is a zero float32
constant of the requested size that LiteRT only reads one row of. The table is written as a
hole (a sparse file), so building takes no time and little disk until the model is copied.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT))

import chef  # noqa: E402

from tfl_fuse import fb  # noqa: E402

ROW = 1024  # floats per table row


def recipe(rows: int) -> dict:
    return {
        "inputs": ["x"],
        "outputs": ["y", "g"],
        "operand": [
            {"name": "x", "shape": [1, 4]},
            {"name": "w", "shape": [4, 4], "filler": {"kind": "gaussian"}},
            {"name": "b", "shape": [4], "filler": {"kind": "gaussian"}},
            {"name": "fc", "shape": [1, 4]},
            {"name": "s", "shape": [4], "filler": {"kind": "uniform", "low": 0.5, "high": 2}},
            {"name": "y", "shape": [1, 4]},
            {"name": "table", "shape": [rows, ROW], "filler": {"kind": "constant", "value": 0}},
            {"name": "index", "shape": [1], "type": "int32", "filler": {"kind": "constant"}},
            {"name": "g", "shape": [1, ROW]},
        ],
        "operation": [
            {"type": "FULLY_CONNECTED", "inputs": ["x", "w", "b"], "outputs": ["fc"]},
            {"type": "MUL", "inputs": ["fc", "s"], "outputs": ["y"]},
            {"type": "GATHER", "inputs": ["table", "index"], "outputs": ["g"]},
        ],
    }


def build(path: str | Path, gigabytes: float = 2.4, big: str = "table") -> int:
    """Write the model to ``path`` (the big constant as a hole); return its size in bytes.

    ``big``: "table" (the GATHER table is big; the fold changes 64 bytes) or "weights" (the
    FC weights are big, [N, 1024]: the fold changes all of them).
    """
    size = int(gigabytes * 1e9) // (4 * ROW) * (4 * ROW)
    model = chef.build_model(recipe(1))
    tensors = {t.name: t for t in model.subgraphs[0].tensors}
    if big == "table":
        tensors["table"].shape = [size // (4 * ROW), ROW]
        large = tensors["table"]
    else:
        channels = size // (4 * ROW)
        tensors["x"].shape, tensors["w"].shape = [1, ROW], [channels, ROW]
        for name in ("b", "s", "fc", "y"):
            tensors[name].shape = [channels] if name in ("b", "s") else [1, channels]
        model.buffers[tensors["b"].buffer].data = np.zeros(4 * channels, np.uint8)
        scale = np.linspace(0.5, 2, channels, dtype=np.float32)
        model.buffers[tensors["s"].buffer].data = scale.view(np.uint8)
        large = tensors["w"]
    # A zero array the size of the constant that costs no memory: one zero page, broadcast.
    model.buffers[large.buffer].data = np.broadcast_to(np.zeros(1, np.uint8), (size,))
    image = fb.encode_image(model, external=True)
    with open(path, "wb") as out:
        out.write(image.image)  # the tables; every buffer's data lies after them
        for start, data, _ in image.holes:
            if data.strides != (0,):  # the zero constant stays a hole
                out.seek(start)
                out.write(np.ascontiguousarray(data).tobytes())
        out.truncate(image.size)
    return os.path.getsize(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path")
    parser.add_argument("--gb", type=float, default=2.4)
    parser.add_argument("--big", choices=["table", "weights"], default="table")
    args = parser.parse_args()
    print(f"{args.path}: {build(args.path, args.gb, args.big)} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
