"""The Python API: optimize bytes, or a file, the way the command line does."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from . import engine, fb, formats, rules
from .model import ModelError


class VerificationError(Exception):
    """--verify found the optimized model computing something else; carries the comparison."""

    def __init__(self, message: str, result: dict[str, Any]) -> None:
        super().__init__(message)
        self.result = result


def optimize(
    data: bytes | bytearray | memoryview,
    rules_to_run: list[str] | None = None,
    disable: list[str] | None = None,
    exclude: list[str] | None = None,
    output_format: str | None = None,
    verify: bool = False,
    seed: int = 0,
) -> tuple[memoryview, dict[str, Any]]:
    """Optimize model bytes; return (output bytes, report).

    ``rules_to_run``: rule names, [] for none (a pure decode/encode), None for the defaults.
    Raises ModelError for bad input, KeyError for an unknown rule name, and
    VerificationError when ``verify`` finds a mismatch.
    """
    model = fb.decode(data)
    source_format = model.format
    chosen = rules.select(rules_to_run, disable)
    report = engine.run(model, chosen, exclude)
    target = output_format or source_format
    out = fb.encode(model, target)
    report["format"] = {"input": source_format, "output": target}
    report["size"] = {"input": len(data), "output": len(out)}
    if verify:
        from .verify import compare_models

        result = compare_models(data, out, seed=seed)
        report["verify"] = result
        if not result["match"]:
            raise VerificationError(f"--verify: outputs differ ({result['summary']})", result)
    return out, report


def write_atomically(path: str | os.PathLike, data: bytes | bytearray | memoryview) -> None:
    """Write ``data`` to ``path`` through a temp file in the same folder and a rename."""
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    fd, temp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
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


def read_model_file(path: str | os.PathLike) -> bytes:
    try:
        return Path(path).read_bytes()
    except IsADirectoryError:
        raise ModelError(f"cannot read {path}: it is a directory") from None
    except OSError as error:
        raise ModelError(f"cannot read {path}: {error.strerror or error}") from None


def optimize_file(src: str | os.PathLike, dst: str | os.PathLike, **options: Any) -> dict[str, Any]:
    """Optimize the model file ``src`` into ``dst`` (which may be the same path); return the report.

    The output format defaults to the one ``dst``'s suffix names, else the input's.
    """
    data = read_model_file(src)
    if options.get("output_format") is None:
        suffix_format = formats.for_path(str(dst))
        options["output_format"] = suffix_format.name if suffix_format else None
    out, report = optimize(data, **options)
    write_atomically(dst, out)
    return report
