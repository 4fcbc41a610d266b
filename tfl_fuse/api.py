"""The Python API: optimize bytes, or a file, the way the command line does."""

from __future__ import annotations

import contextlib
import mmap
import os
import stat
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
    fb.check_size(model, output_format)
    chosen = rules.select(rules_to_run, disable, target)
    report = engine.run(model, chosen, exclude, target, weight_granularity)
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


TEMP_MARK = ".tfl_fuse-"  # temp files: .<OUT name>.tfl_fuse-<pid>.<random>.tmp in OUT's folder
MAX_PIPE_BYTES = fb.MAX_FLATBUFFER_SIZE  # what a pipe may bring; larger models come as files


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # it exists, under another user
    return True


def remove_stale_temp_files(folder: Path) -> None:
    """Remove temp files that an earlier tfl_fuse run (a process no longer alive) left behind."""
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        if not (name.startswith(".") and name.endswith(".tmp") and TEMP_MARK in name):
            continue
        pid_text = name.rsplit(TEMP_MARK, 1)[1].split(".", 1)[0]
        if pid_text.isdigit() and int(pid_text) != os.getpid() and not _pid_alive(int(pid_text)):
            with contextlib.suppress(OSError):
                os.unlink(folder / name)


def write_atomically(
    path: str | os.PathLike,
    data: bytes | bytearray | memoryview | fb.Encoded,
    source_fd: int | None = None,
) -> None:
    """Write ``data`` to ``path`` through a temp file in the same folder and a rename.

    A symlink at ``path`` is written through: its target gets the new contents and the link
    stays. Temp files carry the writer's PID, so a later run removes those a killed run left.
    """
    target = Path(os.path.realpath(path)) if os.path.islink(path) else Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    remove_stale_temp_files(folder)
    fd, temp = tempfile.mkstemp(
        prefix=f".{target.name}{TEMP_MARK}{os.getpid()}.", suffix=".tmp", dir=folder
    )
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
def open_model_file(path: str | os.PathLike) -> Iterator[tuple[bytes | mmap.mmap, int | None]]:
    """The model file mapped read-only (zero-copy), and its descriptor for file-to-file copies.

    A pipe or FIFO is read into memory (at most MAX_PIPE_BYTES) and gives no descriptor, as
    it cannot be copied from at an offset. It is opened non-blocking, so a FIFO without a
    writer reads as empty instead of hanging. Devices and other special files are refused.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except IsADirectoryError:
        raise ModelError(f"cannot read {path}: it is a directory") from None
    except OSError as error:
        raise ModelError(f"cannot read {path}: {error.strerror or error}") from None
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise ModelError(f"cannot read {path}: it is a directory")
        if stat.S_ISFIFO(info.st_mode) or stat.S_ISSOCK(info.st_mode):
            os.set_blocking(fd, True)
            data: bytes | mmap.mmap = _read_pipe(fd, path)
            yield data, None
            return
        if not stat.S_ISREG(info.st_mode):
            raise ModelError(
                f"cannot read {path}: not a regular file or a pipe (a device or special file)"
            )
        os.set_blocking(fd, True)
        try:
            if info.st_size >= 1 << 16:
                data = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
            else:
                data = _read_pipe(fd, path)
        except OSError as error:
            raise ModelError(f"cannot read {path}: {error.strerror or error}") from None
        yield data, fd
    finally:
        os.close(fd)


def _read_pipe(fd: int, path: str | os.PathLike) -> bytes:
    chunks, total = [], 0
    try:
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                return b"".join(chunks)
            total += len(chunk)
            if total > MAX_PIPE_BYTES:
                raise ModelError(
                    f"cannot read {path}: more than {MAX_PIPE_BYTES} bytes from a pipe "
                    "(a larger model must be given as a file)"
                )
            chunks.append(chunk)
    except OSError as error:
        raise ModelError(f"cannot read {path}: {error.strerror or error}") from None


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
