"""The Python API: optimize bytes, or a file, the way the command line does."""

from __future__ import annotations

import atexit
import contextlib
import functools
import mmap
import os
import queue
import re
import stat
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from . import engine, fb, formats, rules
from .model import FoldedOverflow, ModelError
from .report import entry_text
from .rules.predicates import overflow_checks_at_write


class VerificationError(Exception):
    """--verify found the optimized model computing something else.

    ``result`` is the comparison (with ``culprit``: the first rewrite after which the outputs
    differ, when one is found); ``report`` the whole report of the run, nothing written.
    """

    def __init__(
        self, message: str, result: dict[str, Any], report: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        self.result = result
        self.report = report if report is not None else {"verify": result}


# Default --verify tolerance: an output element matches when
# |optimized - original| <= tolerance * |original| + tolerance * max |original output|.
DEFAULT_TOLERANCE = 1e-5
# --target int8: how equalize_cross_layer decides (rules/equalize.py): by simulated int8 error
# (quantsim.py), by the data-free noise model, or "auto": simulated when it fits a budget
EQUALIZE_MODES = ("auto", "measure", "predict")
# Float16-weight models, float target: how a weight that a fold changed is stored (float16.py):
# rounded to float16 again (the model stays small) or kept float32 (exact, larger)
FLOAT16_FOLDS = ("float16", "float32")


class UnknownRuleError(ValueError, KeyError):
    """An unknown rule name (a ValueError; also a KeyError, as earlier versions raised)."""

    def __str__(self) -> str:
        return str(self.args[0])


def _names_argument(value: Any, parameter: str, allow_none: bool = True) -> list[str] | None:
    """A list of names from ``value``; TypeError naming ``parameter`` for a bare string."""
    if value is None and allow_none:
        return None
    if isinstance(value, (str, bytes)):
        raise TypeError(
            f"{parameter} must be a list of names, not a string (did you mean [{value!r}]?)"
        )
    try:
        names = list(value)
    except TypeError:
        raise TypeError(
            f"{parameter} must be a list of names, not {type(value).__name__}"
        ) from None
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"{parameter} must hold strings, not {type(name).__name__}")
    return names


def check_options(
    rules_to_run: Any = None,
    disable: Any = None,
    exclude: Any = None,
    output_format: Any = None,
    target: Any = "float",
    weight_granularity: Any = "channel",
    tolerance: Any = DEFAULT_TOLERANCE,
    equalize: Any = "auto",
    input_range: Any = None,
    float16_folds: Any = "float16",
) -> tuple[list[str] | None, list[str], list[str]]:
    """Validate the public options; ValueError/TypeError name the parameter that is wrong."""
    chosen = _names_argument(rules_to_run, "rules_to_run")
    disabled = _names_argument(disable, "disable") or []
    patterns = _names_argument(exclude, "exclude") or []
    for parameter, names in (("rules_to_run", chosen or []), ("disable", disabled)):
        for name in names:
            if name not in rules.RULES_BY_NAME:
                raise UnknownRuleError(
                    f"{parameter}: unknown rule {name!r} (known: {', '.join(rules.RULES_BY_NAME)})"
                )
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as error:
            raise ValueError(f"exclude: invalid regular expression {pattern!r}: {error}") from None
    if output_format is not None and output_format not in formats.FORMATS:
        raise ValueError(
            f"output_format must be None or one of {', '.join(sorted(formats.FORMATS))}, "
            f"not {output_format!r}"
        )
    if target not in rules.TARGETS:
        raise ValueError(f"target must be one of {', '.join(rules.TARGETS)}, not {target!r}")
    if weight_granularity not in rules.WEIGHT_GRANULARITIES:
        raise ValueError(
            f"weight_granularity must be one of {', '.join(rules.WEIGHT_GRANULARITIES)}, "
            f"not {weight_granularity!r}"
        )
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)):
        raise TypeError(f"tolerance must be a number, not {type(tolerance).__name__}")
    if not 0 <= tolerance < 1:
        raise ValueError(f"tolerance must be in [0, 1), not {tolerance!r}")
    if equalize not in EQUALIZE_MODES:
        raise ValueError(f"equalize must be one of {', '.join(EQUALIZE_MODES)}, not {equalize!r}")
    if input_range is not None:
        try:
            low, high = (float(v) for v in input_range)
        except (TypeError, ValueError):
            raise TypeError(
                f"input_range must be None or two numbers (low, high), not {input_range!r}"
            ) from None
        if not (np.isfinite(low) and np.isfinite(high) and low < high):
            raise ValueError(f"input_range must be finite with low < high, not {input_range!r}")
    if float16_folds not in FLOAT16_FOLDS:
        raise ValueError(
            f"float16_folds must be one of {', '.join(FLOAT16_FOLDS)}, not {float16_folds!r}"
        )
    return chosen, disabled, patterns


def _range(value: Any) -> tuple[float, float] | None:
    return None if value is None else (float(value[0]), float(value[1]))


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
    tolerance: float = DEFAULT_TOLERANCE,
    equalize: str = "auto",
    input_range: tuple[float, float] | None = None,
    float16_folds: str = "float16",
) -> tuple[fb.Encoded, dict[str, Any]]:
    """Like :func:`optimize`, but the output is an :class:`~tfl_fuse.fb.Encoded` image to write."""
    chosen_names, disabled, patterns = check_options(
        rules_to_run,
        disable,
        exclude,
        output_format,
        target,
        weight_granularity,
        tolerance,
        equalize,
        input_range,
        float16_folds,
    )
    chosen = rules.select(chosen_names, disabled, target)
    tuning = {
        "equalize": equalize,
        "input_range": _range(input_range),
        "float16_folds": float16_folds,
    }
    image, report = _run(
        data, chosen, patterns, output_format, target, weight_granularity, **tuning
    )
    if verify:
        from .verify import compare_models

        result = compare_models(data, image.tobytes(), seed=seed, **_tolerances(tolerance, report))
        result["tolerance"] = _tolerances(tolerance, report)["rtol"]
        report["verify"] = result
        if not result["match"]:
            message = (
                f"--verify: outputs differ beyond tolerance {tolerance:g} ({result['summary']})"
            )
            culprit = find_culprit(
                data,
                report["rewrites"],
                chosen,
                patterns,
                output_format,
                target,
                weight_granularity,
                seed,
                tolerance,
                **tuning,
            )
            if culprit is not None:
                result["culprit"] = culprit
                message += (
                    f"; first after rewrite {culprit['index']} of {len(report['rewrites'])}: "
                    f"{entry_text(culprit)}"
                )
                earlier = [
                    (i, entry)
                    for i, entry in enumerate(report["rewrites"][: culprit["index"] - 1], 1)
                    if entry.get("approximate")
                ]
                if earlier and not culprit.get("approximate"):
                    # an exact rewrite can magnify what an approximate one changed before it
                    i, entry = earlier[-1]
                    message += f", after approximate rewrite {i}: {entry_text(entry)}"
            else:
                message += "; with no rewrite to blame: decoding and re-encoding changed them"
            raise VerificationError(message, result, report)
    return image, report


def _tolerances(tolerance: float, report: dict[str, Any] | None = None) -> dict[str, float]:
    if report is not None and report.get("float16_constants_rewritten"):
        from .verify import FLOAT16_TOLERANCE

        tolerance = max(tolerance, FLOAT16_TOLERANCE)
    if report is not None and any(
        entry["rule"] == "equalize_cross_layer" for entry in report.get("rewrites", ())
    ):
        from .verify import EQUALIZE_TOLERANCE

        tolerance = max(tolerance, EQUALIZE_TOLERANCE)
    return {"rtol": tolerance, "atol_scale": tolerance}


def _run(
    data: bytes | bytearray | memoryview | mmap.mmap,
    chosen: list[rules.Rule],
    exclude: list[str],
    output_format: str | None,
    target: str,
    weight_granularity: str,
    stop_after: int | None = None,
    **tuning: Any,
) -> tuple[fb.Encoded, dict[str, Any]]:
    """Decode, run the rules, encode. ``tuning``: engine.run's keyword options."""
    with fb.collector_paused():  # on many-op models its passes cost a sixth of the run
        model = fb.decode(data)
        source_format = model.format
        fb.check_size(model, output_format)  # before any rule runs
        normalized = fb.inconsistent_opcodes(model)
        report = engine.run(
            model,
            chosen,
            exclude,
            target,
            weight_granularity,
            stop_after=stop_after,
            **tuning,
        )
        report["normalized"] = normalized
        written_format = output_format or source_format
        unchanged = report.pop("unchanged") and not normalized and written_format == source_format
        if unchanged and stop_after is None and fb.aligned_as_written(model):
            # No rule changed anything and the input is laid out as this writer would (buffer
            # data 16-byte aligned): the output is the input, byte for byte (the file copied in
            # the kernel), not a re-encoding of it
            image = fb.Encoded.copy_of(data)
            report["identical_to_input"] = True
        else:
            image = fb.encode_image(model, written_format)
    report["format"] = {"input": source_format, "output": written_format}
    report["size"] = {"input": len(data), "output": len(image)}
    return image, report


def find_culprit(
    data: bytes | bytearray | memoryview | mmap.mmap,
    rewrites: list[dict[str, Any]],
    chosen: list[rules.Rule],
    exclude: list[str],
    output_format: str | None,
    target: str,
    weight_granularity: str,
    seed: int,
    tolerance: float,
    **tuning: Any,
) -> dict[str, Any] | None:
    """The first of ``rewrites`` (a full run's, whose output differs) after which outputs differ.

    The engine is deterministic, so a run stopped after k rewrites holds exactly the first k
    rewrites of the full run. Bisection over k: the model after rewrites 1..k-1 matches the
    original, the one after 1..k does not, so rewrite k changed the outputs (given those before
    it). Returns that rewrite with its 1-based ``index``; None when there is no rewrite.
    """
    from .verify import compare_models

    def differs(k: int) -> bool:
        image, report = _run(
            data,
            chosen,
            exclude,
            output_format,
            target,
            weight_granularity,
            stop_after=k,
            **tuning,
        )
        result = compare_models(data, image.tobytes(), seed=seed, **_tolerances(tolerance, report))
        return not result["match"]

    if not rewrites:
        return None
    low, high = 0, len(rewrites)  # after `low` rewrites the outputs match; after `high` not
    while high - low > 1:
        middle = (low + high) // 2
        if differs(middle):
            high = middle
        else:
            low = middle
    if low == 0 and high == 1 and differs(0):
        return None  # the decode/encode alone changes the outputs
    return {"index": high, **rewrites[high - 1]}


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
    tolerance: float = DEFAULT_TOLERANCE,
    equalize: str = "auto",
    input_range: tuple[float, float] | None = None,
    float16_folds: str = "float16",
) -> tuple[bytes, dict[str, Any]]:
    """Optimize model bytes; return (output bytes, report).

    ``rules_to_run``: a list of rule names, [] for none (a pure decode/encode), None for the
    target's defaults; ``disable``: rule names not to run; ``exclude``: regular expressions of
    output tensor names whose ops are left alone.
    ``output_format``: "tflite", "circle" or None (the input's).
    ``target``: "float" (the output is the model to deploy), "int8" (a float model that a static
    int8 quantizer takes next: among exact forms, the rules choose the one that quantizes best)
    or "dynamic" (likewise, for dynamic-range quantization: int8 weights, float activations).
    ``weight_granularity``: how that quantizer quantizes weights, "channel" (one scale per output
    channel: TFLite's converter and ai-edge-quantizer by default) or "tensor".
    ``equalize`` (``target="int8"``): how cross-layer equalization decides which groups to
    equalize: "measure" (by the int8 error of a quantization simulation on synthetic inputs),
    "predict" (by a data-free noise model: no interpreter runs, less accurate) or "auto" (the
    default: measure when the simulation fits a compute budget, else predict).
    ``input_range``: (low, high) of the values the model's image inputs take, for the synthetic
    calibration images of that simulation (default (-1, 1)).
    ``float16_folds`` (float target, weights stored as float16 behind DEQUANTIZE): a weight a
    fold changed is rounded to float16 again ("float16", the default: the model stays as small;
    its outputs move by that rounding) or kept float32 ("float32": exact, the model grows by
    two bytes per changed weight).
    ``verify``: run LiteRT on both models with inputs seeded by ``seed``; an output element
    matches when |optimized - original| <= tolerance * |original| + tolerance * max |original|.
    Raises ModelError for bad input, TypeError/ValueError naming a wrong argument (an unknown
    rule name is an UnknownRuleError, both a ValueError and a KeyError), and
    VerificationError when ``verify`` finds a mismatch (it names the rewrite responsible).
    """
    options = {name: value for name, value in locals().items() if name != "data"}
    image, report = optimize_image(data, **options)  # every option, by name
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


RELEASE_IN_BACKGROUND_BYTES = 1 << 20


def _hold_replaced(target: Path) -> int | None:
    """A descriptor of the regular file at ``target`` of at least 1 MiB (the file a rename is
    about to replace), or None: the caller closes it once the rename is done.

    Replacing a file frees its pages and blocks when its last reference goes; in the rename
    itself that costs about 0.25 ms per MiB here (DenseNet121's 32 MB: 7.2 ms, a tenth of the
    run). Held open, the file outlives the rename and is freed when the descriptor is closed,
    which :func:`_release` hands to a background thread. Nothing is left behind if the process
    dies: the kernel closes the descriptor.
    """
    try:
        fd = os.open(target, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None  # no such file, or not ours to read: the rename frees it, as before
    try:
        info = os.fstat(fd)
    except OSError:
        info = None
    if info is None or not stat.S_ISREG(info.st_mode) or info.st_size < RELEASE_IN_BACKGROUND_BYTES:
        os.close(fd)
        return None
    return fd


class _Closer:
    """One background thread that lets go of what the kernel frees slowly: descriptors of
    replaced files (closing the last one frees the file) and the input's map (unmapping).

    Both calls run without the interpreter lock, so on a second core they cost the caller
    nothing. Started on first use (a thread start costs more than the hand-over: about
    0.2 ms); a daemon, so it never keeps the interpreter alive, and drained at exit (atexit)
    so that everything handed over is let go before the process ends. A forked child starts
    its own.
    """

    def __init__(self) -> None:
        self.queue: queue.Queue[Callable[[], None]] = queue.Queue()
        self.thread: threading.Thread | None = None
        self.lock = threading.Lock()

    def submit(self, release: Callable[[], None]) -> None:
        with self.lock:
            if self.thread is None:
                thread = threading.Thread(target=self._run, name="tfl_fuse-release", daemon=True)
                try:
                    thread.start()
                except RuntimeError:  # no thread can start (interpreter shutting down)
                    _quietly(release)
                    return
                self.thread = thread
        self.queue.put(release)

    def _run(self) -> None:
        while True:
            release = self.queue.get()
            try:
                _quietly(release)
            finally:
                del release  # the last reference goes here, not while waiting for the next
                self.queue.task_done()

    def wait(self) -> None:
        if self.thread is not None:
            self.queue.join()

    def forked(self) -> None:
        self.__init__()  # the parent's thread is not in the child; its queue is not ours


def _quietly(release: Callable[[], None]) -> None:
    with contextlib.suppress(OSError, BufferError, ValueError):
        release()


_closer = _Closer()
atexit.register(_closer.wait)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_closer.forked)


def _release(fd: int) -> None:
    """Close ``fd`` (a replaced file's last reference) in the background, which frees the file."""
    _closer.submit(functools.partial(os.close, fd))


def _unmap(data: object) -> None:
    """Unmap the input's map ``data`` in the background, once nothing views it any more.

    Unmapping a model's pages costs about 0.05 ms per MiB (DenseNet121's 32 MB: 1.6 ms). A map
    something still views (a buffer export) cannot be closed; it is then left to be unmapped
    when its last reference goes, as without this.
    """
    if isinstance(data, mmap.mmap) and len(data) >= RELEASE_IN_BACKGROUND_BYTES:
        _closer.submit(data.close)


def wait_for_releases() -> None:
    """Wait until every file replaced by :func:`write_atomically` so far has been freed."""
    _closer.wait()


def write_atomically(
    path: str | os.PathLike,
    data: bytes | bytearray | memoryview | fb.Encoded,
    source_fd: int | None = None,
    durable: bool = True,
) -> None:
    """Write ``data`` to ``path`` through a temp file in the same folder and a rename.

    ``durable``: fsync the temp file before the rename, so that after a power loss ``path`` holds
    the old or the new model, whole. Without it the rename is still atomic for every process
    (no reader ever sees half a model, a killed run leaves ``path`` as it was), but the new
    bytes may still be in the page cache when this returns, as after ``cp``.

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
            fb.reserve(fd, len(data))
            if isinstance(data, fb.Encoded):
                data.write(fd, source_fd, writeback=durable)
            else:
                fb._write_all(fd, memoryview(data).cast("B"))
            if durable:
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
        held = _hold_replaced(target)
        try:
            os.replace(temp, target)
        finally:
            if held is not None:
                _release(held)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def open_model_file(path: str | os.PathLike) -> Iterator[tuple[bytes | mmap.mmap, int | None]]:
    """The model file mapped read-only (zero-copy), and its descriptor for file-to-file copies.

    The map is unmapped in the background when the block ends (:func:`_unmap`): callers drop
    their views of it first, and do not read it after the block.

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
        try:
            yield data, fd
        finally:
            _unmap(data)
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


class WriteError(OSError):
    """Writing the output failed (the OSError it comes from is its cause), as opposed to a
    failure of reading or optimizing the model."""


def optimize_and_write(
    data: bytes | bytearray | memoryview | mmap.mmap,
    source_fd: int | None,
    dst: str | os.PathLike | None,
    durable: bool = True,
    make_folder: bool = False,
    **options: Any,
) -> dict[str, Any]:
    """:func:`optimize_image`, then, where ``dst`` is given, :func:`write_atomically`: the one
    path of optimize_file, the CLI and batch runs. Returns the report; a failed write is a
    :class:`WriteError`. ``make_folder``: create ``dst``'s folder first if need be (once the
    model is optimized, so that a model that fails leaves none).

    When the output is written, the folded weights are checked for overflow as their products
    are computed for the write (in a few rows at a time, in the CPU cache, on the thread that
    is not the one writing) instead of being read once more for that as the rules fold them
    (:func:`~tfl_fuse.rules.predicates.overflow_checks_at_write`): DenseNet121 -4 ms. Where
    a product is not finite or reaches float32's largest value (FoldedOverflow), nothing is
    kept (the temp file is removed) and the model is optimized again with the checks made as
    the rules fold, which decline that fold as they always have: the output and the report
    are those of a run that checked at the fold. A dry run checks at the fold.
    """
    if dst is None:
        return optimize_image(data, **options)[1]
    try:
        with overflow_checks_at_write():
            return _optimize_and_write(data, source_fd, dst, durable, make_folder, options)
    except FoldedOverflow:
        pass
    return _optimize_and_write(data, source_fd, dst, durable, make_folder, options)


def _optimize_and_write(
    data: bytes | bytearray | memoryview | mmap.mmap,
    source_fd: int | None,
    dst: str | os.PathLike,
    durable: bool,
    make_folder: bool,
    options: dict[str, Any],
) -> dict[str, Any]:
    image, report = optimize_image(data, **options)
    try:
        if make_folder:
            Path(dst).parent.mkdir(parents=True, exist_ok=True)
        write_atomically(dst, image, source_fd, durable)
    except OSError as error:
        raise WriteError(error.errno, error.strerror or str(error)) from error
    finally:
        del image  # its views of the input: without them the map can be unmapped at once
    return report


def optimize_file(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    rules_to_run: list[str] | None = None,
    disable: list[str] | None = None,
    exclude: list[str] | None = None,
    output_format: str | None = None,
    verify: bool = False,
    seed: int = 0,
    target: str = "float",
    weight_granularity: str = "channel",
    tolerance: float = DEFAULT_TOLERANCE,
    equalize: str = "auto",
    input_range: tuple[float, float] | None = None,
    float16_folds: str = "float16",
    durable: bool = True,
) -> dict[str, Any]:
    """Optimize the model file ``src`` into ``dst`` (which may be the same path); return the report.

    The options are :func:`optimize`'s. The output format defaults to the one ``dst``'s suffix
    names, else the input's. The report's ``output`` is ``dst``. ``durable``: as
    :func:`write_atomically` (False: no fsync).
    """
    options = {n: v for n, v in locals().items() if n not in ("src", "dst", "durable")}
    if output_format is None:
        suffix_format = formats.for_path(str(dst))
        options["output_format"] = suffix_format.name if suffix_format else None
    with open_model_file(src) as (data, fd):
        report = optimize_and_write(data, fd, dst, durable, **options)  # every option, by name
    report["output"] = str(dst)
    return report
