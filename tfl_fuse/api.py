"""The Python API: optimize bytes, or a file, the way the command line does."""

from __future__ import annotations

import contextlib
import mmap
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import engine, fb, formats, rules
from .model import ModelError


class VerificationError(Exception):
    """--verify found the optimized model computing something else; carries the comparison."""

    def __init__(self, message: str, result: dict[str, Any]) -> None:
        super().__init__(message)
        self.result = result


def optimize_image(
    data: bytes | bytearray | memoryview | mmap.mmap,
    rules_to_run: list[str] | None = None,
    disable: list[str] | None = None,
    exclude: list[str] | None = None,
    output_format: str | None = None,
    verify: bool = False,
    seed: int = 0,
    target: str = "float",
    weight_granularity: str = "channel",
) -> tuple[fb.Encoded, dict[str, Any]]:
    """Like :func:`optimize`, but the output is an :class:`~tfl_fuse.fb.Encoded` image to write."""
    if target not in rules.TARGETS:
        raise ValueError(f"target must be one of {', '.join(rules.TARGETS)}, not {target!r}")
    if weight_granularity not in rules.WEIGHT_GRANULARITIES:
        raise ValueError(
            f"weight_granularity must be one of {', '.join(rules.WEIGHT_GRANULARITIES)}, "
            f"not {weight_granularity!r}"
        )
    model = fb.decode(data)
    source_format = model.format
    chosen = rules.select(rules_to_run, disable, target)
    normalized = fb.inconsistent_opcodes(model)
    report = engine.run(model, chosen, exclude, target, weight_granularity)
    report["normalized"] = normalized
    target = output_format or source_format
    image = fb.encode_image(model, target)
    report["format"] = {"input": source_format, "output": target}
    report["size"] = {"input": len(data), "output": len(image)}
    if verify:
        from .verify import compare_models

        result = compare_models(data, image.tobytes(), seed=seed)
        report["verify"] = result
        if not result["match"]:
            raise VerificationError(f"--verify: outputs differ ({result['summary']})", result)
    return image, report


def optimize(
    data: bytes | bytearray | memoryview,
    rules_to_run: list[str] | None = None,
    disable: list[str] | None = None,
    exclude: list[str] | None = None,
    output_format: str | None = None,
    verify: bool = False,
    seed: int = 0,
    target: str = "float",
    weight_granularity: str = "channel",
) -> tuple[bytes, dict[str, Any]]:
    """Optimize model bytes; return (output bytes, report).

    ``rules_to_run``: rule names, [] for none (a pure decode/encode), None for the defaults.
    ``target``: "float" (the output is the model to deploy), "int8" (a float model that a static
    int8 quantizer takes next: among exact forms, the rules choose the one that quantizes best)
    or "dynamic" (likewise, for dynamic-range quantization: int8 weights, float activations).
    ``weight_granularity``: how that quantizer quantizes weights, "channel" (one scale per output
    channel: TFLite's converter and ai-edge-quantizer by default) or "tensor".
    Raises ModelError for bad input, KeyError for an unknown rule name, and
    VerificationError when ``verify`` finds a mismatch.
    """
    image, report = optimize_image(
        data,
        rules_to_run,
        disable,
        exclude,
        output_format,
        verify,
        seed,
        target,
        weight_granularity,
    )
    return image.tobytes(), report


def write_atomically(
    path: str | os.PathLike,
    data: bytes | bytearray | memoryview | fb.Encoded,
    source_fd: int | None = None,
) -> None:
    """Write ``data`` to ``path`` through a temp file in the same folder and a rename."""
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    fd, temp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder)
    try:
        try:
            if isinstance(data, fb.Encoded):
                data.write(fd, source_fd)
            else:
                fb._write_all(fd, memoryview(data).cast("B"))
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            mode = os.stat(target).st_mode & 0o7777
        except FileNotFoundError:
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask
        os.chmod(temp, mode)
        os.replace(temp, target)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def open_model_file(path: str | os.PathLike) -> Iterator[tuple[bytes | mmap.mmap, int]]:
    """The model file mapped read-only (zero-copy), and its descriptor for file-to-file copies."""
    try:
        handle = open(path, "rb")  # noqa: SIM115 - closed below, after the mapping
    except IsADirectoryError:
        raise ModelError(f"cannot read {path}: it is a directory") from None
    except OSError as error:
        raise ModelError(f"cannot read {path}: {error.strerror or error}") from None
    with handle:
        try:
            size = os.fstat(handle.fileno()).st_size
            data: bytes | mmap.mmap = (
                mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
                if size >= 1 << 16
                else handle.read()
            )
        except OSError as error:
            raise ModelError(f"cannot read {path}: {error.strerror or error}") from None
        yield data, handle.fileno()


def read_model_file(path: str | os.PathLike) -> bytes:
    with open_model_file(path) as (data, _):
        return bytes(data)


def optimize_file(src: str | os.PathLike, dst: str | os.PathLike, **options: Any) -> dict[str, Any]:
    """Optimize the model file ``src`` into ``dst`` (which may be the same path); return the report.

    The output format defaults to the one ``dst``'s suffix names, else the input's.
    """
    if options.get("output_format") is None:
        suffix_format = formats.for_path(str(dst))
        options["output_format"] = suffix_format.name if suffix_format else None
    with open_model_file(src) as (data, fd):
        image, report = optimize_image(data, **options)
        write_atomically(dst, image, fd)
    return report
