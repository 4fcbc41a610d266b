#!/usr/bin/env python3
"""`make bench-cle`: check equalize_cross_layer's criterion against measured int8 errors.

For every group the rule considers in a model (layers writing into tensors joined by ADD,
RELU, PRELU, pools, resizes and channel PADs, and the layers reading them), this equalizes that
group alone on top of ``--target int8`` without equalization, quantizes the result with
ai-edge-quantizer (per-channel and per-tensor weights; the quantization bench's calibration and
evaluation images) and measures the int8 error against the float model. It prints, per group,
the gain the noise model predicts and the error ratio measured (worst output; < 1 is better),
whether the rule applies the group at its threshold, and for each weight granularity:

* hits: groups the rule applies that measure better (ratio < 1), and misses: applied but worse;
* spared: groups left alone that would have measured worse;
* the rank correlation between predicted gain and measured improvement (1 / ratio);
* the simulated ratio of each group (tfl_fuse.quantsim, what ``--equalize measure`` decides by:
  worst output, on its own synthetic calibration and evaluation images) and its Pearson and rank
  correlation with the measured ratio.

Models: the trained mediapipe ones of the quantization bench (``make mediapipe-models``). Writes
bench/cle_results.json and the "Equalization criterion" section of bench/results.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import quantbench  # noqa: E402

import tfl_fuse  # noqa: E402
from tfl_fuse import fb, quantsim, verify  # noqa: E402
from tfl_fuse.graph import Graph  # noqa: E402
from tfl_fuse.model import Model  # noqa: E402
from tfl_fuse.rules import equalize  # noqa: E402
from tfl_fuse.rules.activation_stats import activation_statistics  # noqa: E402
from tfl_fuse.rules.base import Context  # noqa: E402

GRANULARITIES = {"channel": "static_channel", "tensor": "static_tensor"}
SECTION = "Equalization criterion"


def candidate_groups(model: Model, granularity: str) -> list[tuple[str, int, int, float]]:
    """(label, producers, consumers, predicted gain) of every group, in the rule's order."""
    graph = Graph(model, 0)
    ctx = Context(target="int8", weight_granularity=granularity)
    found = []
    for first, group in equalize.groups_in(graph):
        plan = equalize.plan_group(graph, ctx, group, 0.0, activation_statistics(graph))
        if plan is not None:
            label = graph.name(first.outputs[0])
            found.append((label, len(group.producers), len(group.consumers), plan[1]))
    return found


def equalize_one(base: bytes, index: int, granularity: str) -> bytes:
    """``base`` with only its ``index``-th candidate group equalized."""
    model = fb.decode(base)
    graph = Graph(model, 0)
    ctx = Context(target="int8", weight_granularity=granularity)
    seen = 0
    for _, group in equalize.groups_in(graph):
        plan = equalize.plan_group(graph, ctx, group, 0.0, activation_statistics(graph))
        if plan is None:
            continue
        if seen == index:
            equalize.apply_plan(graph, plan[0])
            graph.sweep()
            return fb.encode(model)
        seen += 1
    raise IndexError(index)


def rank_correlation(a: list[float], b: list[float]) -> float:
    if len(a) < 3:
        return float("nan")
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def pearson(a: list[float], b: list[float]) -> float:
    if len(a) < 3:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def study(name: str, path: Path, value_range: tuple[float, float]) -> dict[str, Any]:
    original = tfl_fuse.optimize(path.read_bytes(), quantbench.NORMALIZATIONS, target="int8")[0]
    shape = tuple(int(d) for d in verify.interpreter(original).get_input_details()[0]["shape"])
    calibration = quantbench.smooth_images(shape, 32, quantbench.CALIBRATION_SEED, value_range)
    evaluation = quantbench.smooth_images(shape, 64, quantbench.EVALUATION_SEED, value_range)
    reference = quantbench.outputs_for(original, evaluation, delegate=False)
    result: dict[str, Any] = {}
    for granularity, recipe in GRANULARITIES.items():
        base = tfl_fuse.optimize(
            original,
            target="int8",
            weight_granularity=granularity,
            disable=["equalize_cross_layer"],
        )[0]

        def error(model: bytes, recipe: str = recipe) -> list[float]:
            quantized = quantbench.quantize(model, recipe, calibration)
            return quantbench.relative_errors(
                reference, quantbench.outputs_for(quantized, evaluation, delegate=True)
            )

        base_error = error(base)
        simulator = quantsim.Simulator(base, granularity, value_range)
        simulated_base = simulator.errors(base)
        threshold = equalize.MIN_GAIN[granularity]
        rows = []
        for index, (label, producers, consumers, gain) in enumerate(
            candidate_groups(fb.decode(base), granularity)
        ):
            candidate = equalize_one(base, index, granularity)
            measured = error(candidate)
            ratio = max(m / b for m, b in zip(measured, base_error))
            simulated = quantsim.compare(simulator.errors(candidate), simulated_base)[0]
            rows.append(
                {
                    "group": label,
                    "producers": producers,
                    "consumers": consumers,
                    "predicted_gain": float(gain),
                    "measured_ratio": float(ratio),
                    "simulated_ratio": float(np.max(simulated)),
                    "applied": bool(gain >= threshold),
                }
            )
        applied = [r for r in rows if r["applied"]]
        result[granularity] = {
            "threshold": threshold,
            "base_error": base_error,
            "groups": rows,
            "hits": int(sum(r["measured_ratio"] < 1 for r in applied)),
            "misses": int(sum(r["measured_ratio"] >= 1 for r in applied)),
            "spared": int(sum(r["measured_ratio"] > 1 for r in rows if not r["applied"])),
            "correlation": rank_correlation(
                [r["predicted_gain"] for r in rows], [1 / r["measured_ratio"] for r in rows]
            ),
            "simulated_rank": rank_correlation(
                [r["simulated_ratio"] for r in rows], [r["measured_ratio"] for r in rows]
            ),
            "simulated_pearson": pearson(
                [r["simulated_ratio"] for r in rows], [r["measured_ratio"] for r in rows]
            ),
        }
    return result


def group_cell(group: dict[str, Any]) -> str:
    cell = f"{group['predicted_gain']:.2f}->{group['measured_ratio']:.2f}"
    if "simulated_ratio" in group:
        cell += f" [{group['simulated_ratio']:.2f}]"
    return cell + ("*" if group["applied"] else "")


def markdown(results: dict[str, Any], header: str) -> str:
    lines = [header, ""]
    lines.append(
        "| model | weights | groups | applied: better / worse | left alone that measure worse "
        "| rank correlation (predicted gain, measured gain) "
        "| simulated vs measured ratio: Pearson / rank |"
    )
    lines.append("|---|---|---|---|---|---|---|")
    for name, by_granularity in results.items():
        for granularity, r in by_granularity.items():
            lines.append(
                f"| {name} | per-{granularity} (threshold {r['threshold']}) | {len(r['groups'])} "
                f"| {r['hits']} / {r['misses']} | {r['spared']} | {r['correlation']:.2f} "
                f"| {r.get('simulated_pearson', float('nan')):.2f} / "
                f"{r.get('simulated_rank', float('nan')):.2f} |"
            )
    lines.append("")
    lines.append(
        "Per group (predicted gain -> measured error ratio, worst output [simulated ratio]; "
        "* = applied by the noise-model rule):"
    )
    lines.append("")
    for name, by_granularity in results.items():
        for granularity, r in by_granularity.items():
            cells = ", ".join(
                group_cell(g) for g in sorted(r["groups"], key=lambda g: -g["predicted_gain"])
            )
            lines.append(f"- {name}, per-{granularity}: {cells}")
    return "\n".join(lines) + "\n"


def write_section(path: Path, section: str) -> None:
    """Put this study's section into a results file, replacing an earlier one."""
    begin, end = "<!-- cle_study -->\n", "<!-- /cle_study -->\n"
    text = path.read_text() if path.exists() else ""
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + begin + section + end + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + begin + section + end
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(quantbench.MEDIAPIPE_MODELS))
    args = parser.parse_args(argv)
    paths = quantbench.mediapipe_models()
    started = time.time()
    results = {}
    for name in args.models.split(","):
        _, value_range = quantbench.MEDIAPIPE_MODELS[name]
        print(f"{name}: ...", flush=True)
        results[name] = study(name, paths[name], value_range)
    header = (
        f"ai-edge-quantizer static int8, tfl_fuse {tfl_fuse.__version__}; "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Reproduce: `make bench-cle` "
        f"({(time.time() - started) / 60:.1f} min)."
    )
    text = markdown(results, header)
    print(text)
    (ROOT / "bench" / "cle_results.json").write_text(json.dumps(results, indent=2) + "\n")
    write_section(ROOT / "bench" / "results.md", f"## {SECTION}\n\n{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
