"""Command line: parse arguments, call the library, map failures to exit codes.

Exit codes: 0 ok, 1 bad input or processing error, 2 usage error, 3 --verify mismatch.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Any

from . import __version__, rules
from .api import VerificationError, open_model_file, optimize_image, write_atomically
from .formats import FORMATS, for_path
from .model import ModelError

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_MISMATCH = 0, 1, 2, 3


def _names(value: str) -> list[str]:
    return [n.strip() for n in value.split(",") if n.strip()]


def _regex(value: str) -> str:
    try:
        re.compile(value)
    except re.error as error:
        raise argparse.ArgumentTypeError(f"invalid regular expression {value!r}: {error}") from None
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tfl-fuse",
        description="Fold BatchNorm and per-channel MUL/ADD/SUB/DIV into neighbouring layers of a "
        ".tflite or .circle model. Every rewrite is exact; what cannot be folded exactly is left "
        "alone and reported.",
        epilog="exit codes: 0 ok, 1 bad input or processing error, 2 usage error, 3 --verify found a mismatch",
    )
    parser.add_argument("input", nargs="?", metavar="IN", help="model to read (.tflite or .circle)")
    parser.add_argument("output", nargs="?", metavar="OUT", help="model to write (may be IN)")
    parser.add_argument(
        "--rules",
        type=str,
        default=None,
        metavar="NAMES",
        help="comma-separated rules to run, or 'none' for a pure decode/encode (default: all exact rules)",
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
        default="channel",
        help="with --target int8 or dynamic: how the quantizer will quantize weights, one scale "
        "per output channel (the converters' default) or per tensor (default: channel)",
    )
    parser.add_argument(
        "--report", metavar="FILE|-", help="write the JSON report to FILE, or to stdout with '-'"
    )
    parser.add_argument("--dry-run", action="store_true", help="run everything but write no model")
    parser.add_argument(
        "--verify",
        action="store_true",
        help="run LiteRT on both models with seeded inputs; on a mismatch write nothing and exit 3",
    )
    parser.add_argument(
        "--output-format",
        choices=sorted(FORMATS),
        default=None,
        help="format to write (default: as OUT's suffix says, else as IN)",
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
        + f"; {len(report['rewrites'])} rewrites, {len(report['declined'])} declined"
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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list_rules:
        print(list_rules())
        return EXIT_OK
    if args.input is None or (args.output is None and not args.dry_run):
        parser.error("IN and OUT are required (OUT may be omitted with --dry-run)")
    if args.rules is None:
        chosen = None
    elif args.rules.strip().lower() == "none":
        chosen = []
    else:
        chosen = _names(args.rules)
    try:
        rules.select(chosen, _names(args.disable), args.target)
    except KeyError as error:
        parser.error(f"unknown rule {error.args[0]!r}; see --list-rules")

    output_format = args.output_format
    if output_format is None and args.output:
        suffix_format = for_path(args.output)
        output_format = suffix_format.name if suffix_format else None
    try:
        with open_model_file(args.input) as (data, source_fd):
            try:
                image, report = optimize_image(
                    data,
                    chosen,
                    _names(args.disable),
                    args.exclude,
                    output_format,
                    verify=args.verify,
                    target=args.target,
                    weight_granularity=args.weight_granularity,
                )
            except VerificationError as error:
                _emit_report(args, {"verify": error.result})
                return _fail(str(error), EXIT_MISMATCH)
            if not args.dry_run:
                try:
                    write_atomically(args.output, image, source_fd)
                except OSError as error:
                    return _fail(f"cannot write {args.output}: {error.strerror or error}")
    except ModelError as error:
        return _fail(f"{args.input}: {error}")
    except (MemoryError, RecursionError) as error:
        return _fail(f"{args.input}: cannot process the model ({type(error).__name__})")
    except Exception as error:  # noqa: BLE001 - a bug must still end in one line and exit 1
        return _fail(
            f"{args.input}: internal error, please report it: {type(error).__name__}: {error}"
        )
    report["output"] = None if args.dry_run else str(args.output)
    _emit_report(args, report)
    if args.verbose:
        for line in report.get("normalized", []):
            print(f"  normalized {line}", file=sys.stderr)
        for entry in report["rewrites"]:
            print(
                f"  rewrote  [{entry['rule']}] {' + '.join(entry['ops'])}: {entry['detail']}",
                file=sys.stderr,
            )
        for entry in report["declined"]:
            print(
                f"  declined [{entry['rule']}] {entry['where']}: {entry['reason']}", file=sys.stderr
            )
    if not args.quiet:
        print(summary(report), file=sys.stderr)
    return EXIT_OK


def _emit_report(args: argparse.Namespace, report: dict[str, Any]) -> None:
    if not args.report:
        return
    text = json.dumps(report, indent=2, sort_keys=True, default=str) + "\n"
    if args.report == "-":
        sys.stdout.write(text)
    else:
        try:
            write_atomically(args.report, text.encode())
        except OSError as error:
            print(
                f"tfl-fuse: warning: cannot write report {args.report}: {error.strerror or error}",
                file=sys.stderr,
            )


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
