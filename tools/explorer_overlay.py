#!/usr/bin/env python3
"""Turn a tfl_fuse report into node data for Google's Model Explorer, to load over the INPUT model.

    tfl-fuse in.tflite out.tflite --report report.json
    python tools/explorer_overlay.py report.json -o overlay.json
    # Model Explorer: open in.tflite, then "Add per-node data" with overlay.json

Model Explorer matches a node-data key against a node's output tensor names, and the report
names every op by its output tensor in the input model (``TYPE:name``), so the overlay marks
the input model's ops: 1 = rewritten away or into a neighbour (green), 2 = declined, left as
is (orange), 3 = a layer whose weights or biases took a fold (blue). An op both declined by one
rule and rewritten by another counts as rewritten.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

REWRITTEN, DECLINED, ABSORBED = 1, 2, 3
COLORS = {REWRITTEN: "#93c47d", DECLINED: "#f6b26b", ABSORBED: "#6fa8dc"}


def tensor_name(label: str) -> str:
    """``TYPE:name`` -> name (a tensor name may itself hold colons, an op type never does)."""
    return label.split(":", 1)[1] if ":" in label else label


def overlay(report: dict[str, Any]) -> dict[str, Any]:
    """Model Explorer's per-graph node data: ``results`` by output tensor name, ``thresholds``."""
    if "models" in report:
        raise ValueError("a folder run's report: make an overlay from one model's report")
    values: dict[str, int] = {}

    def mark(labels: list[str], value: int) -> None:
        for label in labels:
            name = tensor_name(label)
            if value == REWRITTEN or name not in values:
                values[name] = value

    for entry in report.get("declined", []):
        mark(entry.get("ops", []), DECLINED)
    for entry in report.get("rewrites", []):
        mark(entry.get("changed", []), ABSORBED)
    for entry in report.get("rewrites", []):
        mark(entry.get("ops", []), REWRITTEN)
    return {
        "results": {name: {"value": value} for name, value in sorted(values.items())},
        "thresholds": [{"value": v, "bgColor": COLORS[v]} for v in sorted(COLORS)],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", help="a tfl-fuse --report file of one model")
    parser.add_argument("-o", "--output", required=True, help="node data JSON to write")
    args = parser.parse_args(argv)
    try:
        data = overlay(json.loads(Path(args.report).read_text()))
    except (OSError, ValueError) as error:
        print(f"explorer_overlay: error: {args.report}: {error}", file=sys.stderr)
        return 1
    Path(args.output).write_text(json.dumps(data, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
