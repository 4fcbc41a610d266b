"""Command line: parse arguments, call the library, map failures to exit codes.

Exit codes: 0 ok, 1 bad input or processing error, 2 usage error, 3 --verify mismatch,
4 --check found that rules would change the model.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import __version__, rules
from .api import (
    DEFAULT_TOLERANCE,
    EQUALIZE_MODES,
    FLOAT16_FOLDS,
    VerificationError,
    WriteError,
    open_model_file,
    optimize_and_write,
    write_atomically,
)
from .formats import FORMATS, for_path
from .model import ModelError
from .report import entry_text, plural

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_MISMATCH, EXIT_CHANGES = 0, 1, 2, 3, 4
EPILOG = (
    "exit codes: 0 ok (with --check: no rule would change the model), 1 bad input or "
    "processing error (in a folder run: any model failed), 2 usage error, "
    "3 --verify found a mismatch, 4 --check: rules would change the model"
)


def _names(value: str) -> list[str]:
    return [n.strip() for n in value.split(",") if n.strip()]


def _regex(value: str) -> str:
    try:
        re.compile(value)
    except re.error as error:
        raise argparse.ArgumentTypeError(f"invalid regular expression {value!r}: {error}") from None
    return value


def _tolerance(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None
    if not 0 <= number < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), not {value}")
    return number


def _jobs(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {number}")
    return number


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tfl-fuse",
        description="Fold BatchNorm and per-channel MUL/ADD/SUB/DIV into neighbouring layers of a "
        ".tflite or .circle model. Every rewrite is exact; what cannot be folded exactly is left "
        "alone and reported.",
        epilog=EPILOG,
    )
    parser.add_argument(
        "input",
        nargs="?",
        metavar="IN",
        help="model to read (.tflite or .circle), or a folder: every model under it",
    )
    parser.add_argument(
        "output",
        nargs="?",
        metavar="OUT",
        help="model to write (may be IN), or for a folder IN the folder to write into",
    )
    parser.add_argument(
        "--rules",
        type=str,
        default=None,
        metavar="NAMES",
        help="comma-separated rules to run instead of the defaults; 'all' for every exact rule "
        "(also those off by default), 'none' for a pure decode/encode",
    )
    parser.add_argument(
        "--enable",
        type=str,
        default="",
        metavar="NAMES",
        help="comma-separated rules to run in addition to the defaults",
    )
    parser.add_argument(
        "--disable", type=str, default="", metavar="NAMES", help="comma-separated rules not to run"
    )
    parser.add_argument(
        "--exclude",
        type=_regex,
        action="append",
        default=[],
        metavar="REGEX",
        help="leave alone ops whose output tensor name matches REGEX (repeatable)",
    )
    parser.add_argument(
        "--target",
        choices=rules.TARGETS,
        default="float",
        help="float: the output is the model to deploy; int8: a float model to quantize next "
        "with static int8 (scales stay on output-channel axes or become per-channel ops, "
        "quantizer-ready form); dynamic: likewise for dynamic-range quantization "
        "(int8 weights, float activations) (default: float)",
    )
    parser.add_argument(
        "--weight-granularity",
        choices=rules.WEIGHT_GRANULARITIES,
        default=None,
        help="with --target int8 or dynamic: how the quantizer will quantize weights, one scale "
        "per output channel (the converters' default) or per tensor (default: channel)",
    )
    parser.add_argument(
        "--equalize",
        choices=EQUALIZE_MODES,
        default=None,
        help="with --target int8: decide cross-layer equalization by the int8 error of a "
        "quantization simulation on synthetic inputs (measure), by a data-free noise model "
        "(predict: fast, less accurate), or by the simulation when it fits a compute budget "
        "(auto, the default)",
    )
    parser.add_argument(
        "--input-range",
        metavar="LOW,HIGH",
        type=_input_range,
        default=None,
        help="with --target int8: the values the model's image inputs take (e.g. 0,1 or -1,1), "
        "for the synthetic calibration images of --equalize measure (default: -1,1)",
    )
    parser.add_argument(
        "--float16-folds",
        choices=FLOAT16_FOLDS,
        default=None,
        help="with --target float, for weights stored as float16: store a weight that a fold "
        "changed as float16 again (the model stays as small; outputs move by that rounding) "
        "or as float32 (exact; two more bytes per changed weight) (default: float16)",
    )
    parser.add_argument(
        "--report", metavar="FILE|-", help="write the JSON report to FILE, or to stdout with '-'"
    )
    parser.add_argument("--dry-run", action="store_true", help="run everything but write no model")
    parser.add_argument(
        "--no-fsync",
        action="store_true",
        help="do not fsync OUT before renaming it into place: still atomic for every process, "
        "but not durable across a power loss (as cp); saves the disk write, about 1 s per GB",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="write nothing; exit 0 when no rule would change IN, 4 when some would (listed)",
    )
    parser.add_argument(
        "--verify",
        action="store_true",
        help="run LiteRT on both models with seeded inputs; on a mismatch write nothing, name the "
        "first rewrite after which the outputs differ, and exit 3",
    )
    parser.add_argument(
        "--tolerance",
        type=_tolerance,
        default=None,
        metavar="T",
        help="--verify: an output element matches when |opt - orig| <= T*|orig| + T*max|orig| "
        f"(default {DEFAULT_TOLERANCE:g})",
    )
    parser.add_argument(
        "--output-format",
        choices=sorted(FORMATS),
        default=None,
        help="format to write (default: as OUT's suffix says, else as IN)",
    )
    parser.add_argument(
        "-j",
        "--jobs",
        type=_jobs,
        default=None,
        metavar="N",
        help="folder IN: optimize N models at a time, in N processes (default 1)",
    )
    parser.add_argument("--list-rules", action="store_true", help="list the rules and exit")
    parser.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="print every rewrite and refusal"
    )
    parser.add_argument("--version", action="version", version=f"tfl-fuse {__version__}")
    return parser


def list_rules() -> str:
    lines = []
    for rule in rules.ALL_RULES:
        if rule.approximate:
            tag = " [approximate; off by default]"
        else:
            on = [t for t in rules.TARGETS if rule.is_default(t)]
            if len(on) == len(rules.TARGETS):
                tag = ""
            elif not on:
                tag = " [off by default]"
            else:
                tag = f" [on by default with --target {' or '.join(on)}]"
        if rule.quantized:
            tag += " [quantized tensors]"
        lines.append(f"{rule.name:32s} {rule.summary}{tag}")
    return "\n".join(lines)


def summary(report: dict[str, Any]) -> str:
    interesting = ("MUL", "ADD", "SUB", "DIV")
    before, after = report["ops_before"], report["ops_after"]
    changes = ", ".join(
        f"{k} {before.get(k, 0)}->{after.get(k, 0)}"
        for k in interesting
        if before.get(k, 0) or after.get(k, 0)
    )
    return (
        f"tfl-fuse: {sum(before.values())} -> {sum(after.values())} ops"
        + (f" ({changes})" if changes else "")
        + f"; {plural(len(report['rewrites']), 'rewrite')}, {len(report['declined'])} declined"
        + (f"; verify: {report['verify']['summary']}" if "verify" in report else "")
        + (
            "; scales went into input channels: to quantize this model next, "
            "optimize it with --target int8 (or dynamic) instead"
            if report.get("target", "float") == "float"
            and any(r.get("scaled_input_channels") for r in report["rewrites"])
            else ""
        )
        + (
            "; APPROXIMATE rules changed the outputs"
            if any(r.get("approximate") for r in report["rewrites"])
            else ""
        )
    )


def _fail(message: str, code: int = EXIT_ERROR) -> int:
    print(f"tfl-fuse: error: {message}", file=sys.stderr)
    return code


@dataclass
class Options:
    """What the command line asks of the library, after checking that it makes sense."""

    rules_to_run: list[str] | None
    disable: list[str]
    exclude: list[str]
    target: str
    weight_granularity: str
    equalize: str
    input_range: tuple[float, float] | None
    float16_folds: str
    durable: bool
    verify: bool
    tolerance: float
    output_format: str | None  # as --output-format says (None: by OUT's suffix, else IN's)
    warnings: list[str] = field(default_factory=list)

    def library_arguments(self, output_format: str | None) -> dict[str, Any]:
        return {
            "rules_to_run": self.rules_to_run,
            "disable": self.disable,
            "exclude": self.exclude,
            "output_format": output_format,
            "verify": self.verify,
            "target": self.target,
            "weight_granularity": self.weight_granularity,
            "tolerance": self.tolerance,
            "equalize": self.equalize,
            "input_range": self.input_range,
            "float16_folds": self.float16_folds,
        }


def resolve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Options:
    """Options from the arguments: usage errors for contradictions, warnings for no-ops."""
    warnings: list[str] = []
    if args.quiet and args.verbose:
        parser.error("-q and -v contradict each other")
    known = set(rules.RULES_BY_NAME)

    def names(option: str, value: str) -> list[str]:
        found = _names(value)
        for name in found:
            if name not in known:
                parser.error(f"{option}: unknown rule {name!r}; see --list-rules")
        return found

    enabled = names("--enable", args.enable)
    disabled = names("--disable", args.disable)
    if args.rules is None:
        chosen = None
        defaults = [r.name for r in rules.default_rules(args.target)]
        for name in enabled:
            if name in defaults:
                warnings.append(f"--enable {name}: it is on by default already")
        if enabled:
            chosen = defaults + [n for n in enabled if n not in defaults]
        running = chosen if chosen is not None else defaults
    else:
        if enabled:
            parser.error("--enable adds to the default rules; with --rules, name them all there")
        word = args.rules.strip().lower()
        if word == "none":
            chosen = []
        elif word == "all":
            chosen = [r.name for r in rules.ALL_RULES if not r.approximate]
        else:
            chosen = names("--rules", args.rules)
            if not chosen:
                parser.error(
                    f"--rules {args.rules!r} names no rule (use 'none' for a pure decode/encode)"
                )
            for name in disabled:
                if name in chosen:
                    parser.error(f"rule {name!r} is both in --rules and --disable")
        running = chosen
    for name in disabled:
        if name in enabled:
            parser.error(f"rule {name!r} is both in --enable and --disable")
        if name not in running:
            warnings.append(f"--disable {name}: it would not run anyway")
    if chosen != [] and not [n for n in running if n not in disabled]:
        warnings.append("no rule left to run: the model is only decoded and re-encoded")
    if args.weight_granularity is not None and args.target == "float":
        warnings.append(
            "--weight-granularity does nothing with --target float (it describes the quantizer "
            "that --target int8 or dynamic prepares for)"
        )
    for option, value in (("--equalize", args.equalize), ("--input-range", args.input_range)):
        if value is not None and (
            args.target != "int8"
            or "equalize_cross_layer" not in running
            or "equalize_cross_layer" in disabled
        ):
            warnings.append(
                f"{option} does nothing here (it tunes equalize_cross_layer under --target int8)"
            )
    if args.float16_folds is not None and (
        args.target != "float"
        or (
            "dequantize_float16_weights" in running and "dequantize_float16_weights" not in disabled
        )
    ):
        warnings.append(
            "--float16-folds does nothing here (float16 weights are stored as float32 "
            "when dequantize_float16_weights runs, as it does for --target int8 and dynamic)"
        )
    if args.tolerance is not None and not args.verify:
        warnings.append("--tolerance does nothing without --verify")
    if args.no_fsync and (args.dry_run or args.check):
        warnings.append("--no-fsync does nothing here: no model is written")
    if args.check and args.dry_run:
        warnings.append("--dry-run: --check writes nothing anyway")
    return Options(
        rules_to_run=chosen,
        disable=disabled,
        exclude=args.exclude,
        target=args.target,
        weight_granularity=args.weight_granularity or "channel",
        equalize=args.equalize or "auto",
        input_range=args.input_range,
        float16_folds=args.float16_folds or "float16",
        durable=not args.no_fsync,
        verify=args.verify,
        tolerance=DEFAULT_TOLERANCE if args.tolerance is None else args.tolerance,
        output_format=args.output_format,
        warnings=warnings,
    )


def _input_range(text: str) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not LOW,HIGH (two numbers)") from None
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise argparse.ArgumentTypeError(f"{text!r}: need finite LOW < HIGH")
    return low, high


def output_format_for(path: str | None, chosen: str | None, warnings: list[str]) -> str | None:
    """The format to write: --output-format, else OUT's suffix, else None (the input's)."""
    suffix_format = for_path(path) if path else None
    if chosen is None:
        return suffix_format.name if suffix_format else None
    if suffix_format is not None and suffix_format.name != chosen:
        warnings.append(
            f"--output-format {chosen}: writing a {chosen} model to {path}, "
            f"whose suffix says {suffix_format.name}"
        )
    return chosen


def report_writable(path: str | None) -> str | None:
    """Why the report cannot be written to ``path`` (None: it can, or it goes to stdout)."""
    if not path or path == "-":
        return None
    target = Path(path)
    if target.is_dir():
        return f"cannot write report {path}: it is a directory"
    folder = target.parent if str(target.parent) else Path(".")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".probe", dir=folder)
    except OSError as error:
        return f"cannot write report {path}: {error.strerror or error}"
    os.close(fd)
    os.unlink(probe)
    return None


def warn(message: str) -> None:
    print(f"tfl-fuse: warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list_rules:
        print(list_rules())
        return EXIT_OK
    if args.input is None:
        parser.error("IN is required (IN and OUT; OUT may be omitted with --dry-run or --check)")
    options = resolve(args, parser)
    folder = os.path.isdir(args.input)
    if args.check and args.output is not None:
        parser.error("--check writes nothing: give IN only")
    if args.output is None and not (args.dry_run or args.check):
        parser.error(
            ("IN_DIR and OUT_DIR are required" if folder else "IN and OUT are required")
            + " (OUT may be omitted with --dry-run or --check)"
        )
    if args.jobs is not None and not folder:
        options.warnings.append("-j does nothing for a single model (it applies to a folder IN)")
    problem = report_writable(args.report)
    if problem:
        return _fail(problem)
    if folder:
        from .batch import run_batch

        return run_batch(args, options)
    output_format = output_format_for(args.output, options.output_format, options.warnings)
    if not args.quiet:
        for message in options.warnings:
            warn(message)
    try:
        with open_model_file(args.input) as (data, source_fd):
            try:
                report = optimize_and_write(
                    data,
                    source_fd,
                    None if (args.dry_run or args.check) else args.output,
                    options.durable,
                    **options.library_arguments(output_format),
                )
            except VerificationError as error:
                error.report["output"] = None
                _verbose(args, error.report)
                code = _emit_report(args, error.report)
                return _fail(str(error), EXIT_MISMATCH) if code == EXIT_OK else code
            except WriteError as error:
                return _fail(f"cannot write {args.output}: {error.strerror or error}")
    except ModelError as error:
        message = str(error)
        return _fail(message if str(args.input) in message else f"{args.input}: {message}")
    except (MemoryError, RecursionError) as error:
        return _fail(f"{args.input}: cannot process the model ({type(error).__name__})")
    except Exception as error:  # noqa: BLE001 - a bug must still end in one line and exit 1
        return _fail(
            f"{args.input}: internal error, please report it: {type(error).__name__}: {error}"
        )
    report["output"] = None if (args.dry_run or args.check) else str(args.output)
    code = _emit_report(args, report)
    if code != EXIT_OK:
        return code
    if not args.quiet:
        for message in report.get("warnings", []):
            warn(message)
    if args.check:
        return _check_result(args, report)
    _verbose(args, report)
    if not args.quiet:
        print(summary(report), file=sys.stderr)
    return EXIT_OK


def _check_result(args: argparse.Namespace, report: dict[str, Any]) -> int:
    """--check: 0 when no rule would rewrite anything, 4 (and what) when some would."""
    rewrites = report["rewrites"]
    if not args.quiet:
        if rewrites:
            print(
                f"tfl-fuse: check: {args.input}: {plural(len(rewrites), 'rewrite')} would change "
                "the model:",
                file=sys.stderr,
            )
            for entry in rewrites:
                print(f"  {entry_text(entry)}", file=sys.stderr)
        else:
            print(f"tfl-fuse: check: {args.input}: no rule would change the model", file=sys.stderr)
    return EXIT_CHANGES if rewrites else EXIT_OK


def _verbose(args: argparse.Namespace, report: dict[str, Any]) -> None:
    if not args.verbose:
        return
    for line in report.get("normalized", []):
        print(f"  normalized {line}", file=sys.stderr)
    for entry in report.get("rewrites", []):
        print(f"  rewrote  {entry_text(entry)}", file=sys.stderr)
    for entry in report.get("declined", []):
        print(f"  declined {entry_text(entry)}", file=sys.stderr)


def _emit_report(args: argparse.Namespace, report: dict[str, Any]) -> int:
    """Write the report where --report says; EXIT_ERROR (and one line) when it cannot."""
    if not args.report:
        return EXIT_OK
    text = json.dumps(report, indent=2, sort_keys=True, default=str) + "\n"
    if args.report == "-":
        sys.stdout.write(text)
        return EXIT_OK
    try:
        write_atomically(args.report, text.encode())
    except OSError as error:
        return _fail(f"cannot write report {args.report}: {error.strerror or error}")
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
