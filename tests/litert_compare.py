"""Field-by-field comparison of two models as LiteRT's own reader sees them.

Buffers are compared by content: a tensor's or metadata entry's buffer index is replaced by
the bytes it points to, so buffer numbering and alignment padding do not matter.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from ai_edge_litert.tools import flatbuffer_utils


def read(data: bytes) -> Any:
    return flatbuffer_utils.read_model_from_bytearray(bytearray(data))


def _buffer_bytes(model: Any, index: int) -> bytes:
    data = model.buffers[index].data
    return b"" if data is None else bytes(np.asarray(data, dtype=np.uint8))


def differences(a_bytes: bytes, b_bytes: bytes, limit: int = 20) -> list[str]:
    a, b = read(a_bytes), read(b_bytes)
    found: list[str] = []

    def walk(x: Any, y: Any, path: str) -> None:
        if len(found) >= limit:
            return
        if path.endswith(".buffers"):
            return  # compared through the references below
        if path.endswith(".buffer") and isinstance(x, (int, np.integer)):
            if _buffer_bytes(a, int(x)) != _buffer_bytes(b, int(y)):
                found.append(f"{path}: buffer contents differ")
            return
        if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
            if not np.array_equal(np.asarray(x), np.asarray(y)):
                found.append(f"{path}: {x!r} != {y!r}")
            return
        if type(x) is not type(y):
            found.append(f"{path}: {type(x).__name__} != {type(y).__name__}")
            return
        if isinstance(x, list):
            if len(x) != len(y):
                found.append(f"{path}: length {len(x)} != {len(y)}")
                return
            for i, (u, v) in enumerate(zip(x, y, strict=True)):
                walk(u, v, f"{path}[{i}]")
            return
        if hasattr(x, "__dict__"):
            for key in vars(x):
                walk(getattr(x, key), getattr(y, key), f"{path}.{key}")
            return
        if x != y:
            found.append(f"{path}: {x!r} != {y!r}")

    walk(a, b, "model")
    return found
