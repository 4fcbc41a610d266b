#!/usr/bin/env python3
"""Regenerate README.md's examples from real runs, so they never drift from the code.

    python tools/readme_examples.py           # rewrite the generated blocks of README.md
    python tools/readme_examples.py --check   # exit 1 (and say which) if a block is out of date

A generated block sits between ``<!-- generated: NAME -->`` and ``<!-- end generated -->``;
NAME is one of EXAMPLES below. Each example runs the command line in-process on models the
chef builds from recipes, in a scratch folder, and shows the command and what it printed.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shlex
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import chef  # noqa: E402

from tfl_fuse import cli  # noqa: E402

README = ROOT / "README.md"
BLOCK = re.compile(
    r"(<!-- generated: (?P<name>[a-z_]+) -->\n)(?P<body>.*?)(<!-- end generated -->)", re.S
)
USAGE_COLUMNS = "100"


def usage() -> str:
    """The usage block, exactly as ``tfl-fuse --help`` prints it at 100 columns."""
    return "```\n" + usage_text() + "```\n"


def usage_text() -> str:
    previous = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = USAGE_COLUMNS
    try:
        return cli.build_parser().format_usage()
    finally:
        if previous is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = previous


def run(*args: str) -> tuple[int, str, str]:
    """``tfl-fuse ARGS`` in-process: exit code, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(list(args))
        except SystemExit as exit_info:
            code = int(exit_info.code or 0)
    return code, out.getvalue(), err.getvalue()


def session(*args: str, show_exit: bool = False) -> str:
    """A shell transcript of one command: the prompt line and what it printed."""
    code, out, err = run(*args)
    text = f"$ tfl-fuse {shlex.join(args)}\n{out}{err}"
    if show_exit:
        text += f"$ echo $?\n{code}\n"
    return text


def cook(recipe: str, path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(chef.cook(ROOT / "recipes" / recipe)[0])


def demo() -> str:
    cook("Demo_Residual_Preact_BN", "example.tflite")
    text = session(
        "example.tflite", "example.opt.tflite", "--verify", "-v", "--report", "report.json"
    )
    return "```\n" + text + "```\n"


def report() -> str:
    cook("Demo_Residual_Preact_BN", "example.tflite")
    cook("Net_Conv_Relu_NegMul_000", "declines.tflite")
    run("example.tflite", "example.opt.tflite", "--verify", "--report", "report.json")
    document = json.loads(Path("report.json").read_text())
    _, out, _ = run("declines.tflite", "declines.opt.tflite", "--report", "-")
    document["declined"] = json.loads(out)["declined"]  # the demo declines nothing
    return "```json\n" + compact_json(document) + "\n```\n"


def compact_json(document: dict) -> str:
    """JSON with one line per top-level key and per entry of a list of tables."""
    lines = []
    for key in sorted(document):
        value = document[key]
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            items = [json.dumps(v, sort_keys=True) for v in value]
            text = "[\n    " + ",\n    ".join(items) + "\n  ]"
        else:
            text = json.dumps(value, sort_keys=True)
        lines.append(f"  {json.dumps(key)}: {text}")
    return "{\n" + ",\n".join(lines) + "\n}"


def check() -> str:
    cook("Demo_Residual_Preact_BN", "example.tflite")
    run("example.tflite", "example.opt.tflite", "-q")
    return (
        "```\n"
        + session("example.tflite", "--check", show_exit=True)
        + session("example.opt.tflite", "--check", show_exit=True)
        + "```\n"
    )


def verify_failure() -> str:
    cook("Net_Preactivation_NegGamma_000", "neg_gamma.tflite")
    text = session(
        "neg_gamma.tflite",
        "out.tflite",
        "--rules",
        "make_gamma_positive,move_scale_forward",
        "--verify",
        show_exit=True,
    )
    return "```\n" + text + "```\n"


def folder() -> str:
    cook("Demo_Residual_Preact_BN", "models/demo.tflite")
    cook("Net_Conv_Add_Mul_000", "models/vision/conv.tflite")
    cook("Net_Circle_Conv_BN_000", "models/vision/net.circle")
    cook("Net_Conv_Relu_NegMul_000", "models/vision/relu_neg.tflite")
    data = Path("models/vision/conv.tflite").read_bytes()
    Path("models/broken/cut.tflite").parent.mkdir(parents=True, exist_ok=True)
    Path("models/broken/cut.tflite").write_bytes(data[: len(data) // 2])
    text = session("models", "optimized", "-j", "2", "--report", "batch.json", show_exit=True)
    return "```\n" + text + "```\n"


def bad_input() -> str:
    cook("Net_Conv_Add_Mul_000", "good.tflite")
    data = Path("good.tflite").read_bytes()
    Path("cut.tflite").write_bytes(data[: len(data) // 2])
    return (
        "```\n"
        + session("cut.tflite", "out.tflite", show_exit=True)
        + session("missing.tflite", "out.tflite")
        + "```\n"
    )


EXAMPLES: dict[str, Callable[[], str]] = {
    "usage": usage,
    "demo": demo,
    "report": report,
    "check": check,
    "verify_failure": verify_failure,
    "folder": folder,
    "bad_input": bad_input,
}


def generate(names: set[str]) -> dict[str, str]:
    """Each named example, produced in its own scratch folder."""
    produced = {}
    start = Path.cwd()
    for name in sorted(names):
        if name not in EXAMPLES:
            raise SystemExit(f"readme_examples: README.md names an unknown example {name!r}")
        with tempfile.TemporaryDirectory() as scratch:
            os.chdir(scratch)
            try:
                produced[name] = EXAMPLES[name]()
            finally:
                os.chdir(start)
    return produced


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only say whether README is current")
    args = parser.parse_args(argv)
    text = README.read_text()
    names = {m.group("name") for m in BLOCK.finditer(text)}
    produced = generate(names)
    new = BLOCK.sub(lambda m: m.group(1) + produced[m.group("name")] + m.group(4), text)
    if args.check:
        stale = [
            m.group("name")
            for m in BLOCK.finditer(text)
            if m.group("body") != produced[m.group("name")]
        ]
        if stale:
            print(
                f"README.md: out-of-date examples: {', '.join(stale)} "
                "(run python tools/readme_examples.py)",
                file=sys.stderr,
            )
            return 1
        return 0
    if new != text:
        README.write_text(new)
        print(f"README.md: regenerated {', '.join(sorted(names))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
