#!/usr/bin/env python3
"""`make bench`: tool cost, inference speed-up and fold coverage on Keras models, side by side.

For each model (Keras applications, weights=None, random BatchNorm statistics, converted with
tensorflow-cpu, cached in build/cache):

* tool cost: wall time and peak RSS of ``python -m tfl_fuse IN OUT`` and of LiteRT's own
  ``flatbuffer_utils.read_model`` + ``write_model`` round trip on the same file, each in a fresh
  process (median of 5), plus the in-process time of both (no interpreter start-up or imports;
  median of 9 interleaved runs: a 15-70 ms call varies by a few ms on this shared machine);
* coverage: MUL/ADD/SUB/DIV left by the converter and after tfl_fuse, max |output difference|;
* inference: LiteRT latency (XNNPACK, 1 and 2 threads, median of N invokes after warm-up,
  original and optimized interleaved) and the speed-up;
* scaling: optimize time per 1,000 ops of synthetic chains of conv+BN blocks built by the chef.

Writes bench/results.json, bench/results.md and bench/chart.png. Prints figures; never fails
on timing. ``--sections cost,scaling`` measures only those sections and replaces only their
tables in an existing bench/results.md (the other sections, and the quantization section
quantbench.py writes, stay as they are).
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tools"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import kerasmodels  # noqa: E402

import tfl_fuse  # noqa: E402
from tfl_fuse import fb, verify  # noqa: E402

MODELS = ["ResNet50V2", "ResNet101V2", "ResNet152V2", "DenseNet121", "MobileNetV2", "ResNet50"]
LINEAR = ("MUL", "ADD", "SUB", "DIV")
LITERT_ROUND_TRIP = (
    "import sys\n"
    "from ai_edge_litert.tools import flatbuffer_utils as f\n"
    "f.write_model(f.read_model(sys.argv[1]), sys.argv[2])\n"
)


# A small launcher measures the command: a child forked from this (large) process would count
# the parent's pages in its peak RSS.
MEASURE = (
    "import os, subprocess, sys, time\n"
    "start = time.perf_counter()\n"
    "p = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)\n"
    "_, status, usage = os.wait4(p.pid, 0)\n"
    "print(time.perf_counter() - start, usage.ru_maxrss * 1024, os.waitstatus_to_exitcode(status))\n"
)


IN_PROCESS_RUNS = 9


def settle() -> None:
    """Write out every file's dirty pages before a timed command (untimed). tfl_fuse fsyncs
    its output and ext4 then also writes what the command before left unwritten: LiteRT's
    14 MB output made every other MobileNetV2 run 16 -> 30 ms. Each tool pays for its own."""
    os.sync()


def run_measured(command: list[str]) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of a command run in a fresh process."""
    settle()
    result = subprocess.run(
        [sys.executable, "-c", MEASURE, *command], capture_output=True, text=True, check=True
    )
    wall, rss, code = result.stdout.split()
    if int(code) != 0:
        raise RuntimeError(f"{command[:4]} failed: {result.stderr[-500:]}")
    return float(wall), int(rss)


def startup_rss() -> int:
    """Peak RSS bytes of the tool starting and exiting (imports, no model): the baseline."""
    return max(run_measured([sys.executable, "-m", "tfl_fuse", "--version"])[1] for _ in range(3))


def tool_cost(path: Path, work: Path, repeats: int, baseline_rss: int) -> dict:
    ours, round_trip, theirs = [], [], []
    for _ in range(repeats):  # interleaved, so disk and cache state hit all three alike
        ours.append(
            run_measured(
                [sys.executable, "-m", "tfl_fuse", str(path), str(work / "ours.tflite"), "-q"]
            )
        )
        round_trip.append(
            run_measured(
                [
                    sys.executable,
                    "-m",
                    "tfl_fuse",
                    str(path),
                    str(work / "rt.tflite"),
                    "-q",
                    "--rules",
                    "none",
                ]
            )
        )
        theirs.append(
            run_measured(
                [sys.executable, "-c", LITERT_ROUND_TRIP, str(path), str(work / "theirs.tflite")]
            )
        )
    from ai_edge_litert.tools import flatbuffer_utils

    in_ours, in_theirs = [], []
    for _ in range(max(repeats, IN_PROCESS_RUNS)):
        settle()
        start = time.perf_counter()
        tfl_fuse.optimize_file(path, work / "ours_inproc.tflite")
        in_ours.append(time.perf_counter() - start)
        settle()
        start = time.perf_counter()
        flatbuffer_utils.write_model(
            flatbuffer_utils.read_model(str(path)), str(work / "theirs_inproc.tflite")
        )
        in_theirs.append(time.perf_counter() - start)
    size = path.stat().st_size
    result = {
        "file_mb": size / 1e6,
        "ours_s": statistics.median(w for w, _ in ours),
        "round_trip_s": statistics.median(w for w, _ in round_trip),
        "theirs_s": statistics.median(w for w, _ in theirs),
        "ours_rss_mb": max(r for _, r in ours) / 1e6,
        "theirs_rss_mb": max(r for _, r in theirs) / 1e6,
        "ours_inproc_s": statistics.median(in_ours),
        "theirs_inproc_s": statistics.median(in_theirs),
    }
    result["ratio_process"] = result["ours_s"] / result["theirs_s"]
    result["ratio_round_trip"] = result["round_trip_s"] / result["theirs_s"]
    result["ratio_inproc"] = result["ours_inproc_s"] / result["theirs_inproc_s"]
    result["rss_over_file"] = result["ours_rss_mb"] * 1e6 / size
    result["baseline_rss_mb"] = baseline_rss / 1e6
    result["rss_above_baseline_over_file"] = (result["ours_rss_mb"] * 1e6 - baseline_rss) / size
    result["phases_ms"] = phases(path, work, repeats)
    return result


def phases(path: Path, work: Path, repeats: int) -> dict[str, float]:
    """Where the in-process time goes: median ms per phase of ``optimize_file``'s work (the
    same calls, timed one by one) and of LiteRT's read_model / write_model."""
    from ai_edge_litert.tools import flatbuffer_utils

    from tfl_fuse import api, engine, rules
    from tfl_fuse.rules.predicates import overflow_checks_at_write

    times: dict[str, list[float]] = {}

    def lap(name: str, start: float) -> float:
        now = time.perf_counter()
        times.setdefault(name, []).append((now - start) * 1e3)
        return now

    target = work / "phases.tflite"
    for _ in range(max(repeats, IN_PROCESS_RUNS)):
        target.unlink(missing_ok=True)  # optimize_file frees what it replaces in the background
        settle()
        with (
            api.open_model_file(path) as (data, fd),
            fb.collector_paused(),
            overflow_checks_at_write(),  # as optimize_file runs: folds checked as written
        ):
            start = time.perf_counter()
            model = fb.decode(data)  # validation included
            fb.check_size(model, None)
            fb.inconsistent_opcodes(model)
            start = lap("decode", start)
            engine.run(model, rules.select(None))
            start = lap("rules", start)
            image = fb.encode_image(model, model.format)
            start = lap("encode", start)
            out = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                fb.reserve(out, len(image))
                image.write(out, fd, writeback=True)  # as optimize_file writes
                start = lap("write", start)
                os.fsync(out)
                lap("fsync", start)
            finally:
                os.close(out)
        settle()
        start = time.perf_counter()
        model_t = flatbuffer_utils.read_model(str(path))
        start = lap("litert_read", start)
        flatbuffer_utils.write_model(model_t, str(work / "phases_litert.tflite"))
        lap("litert_write", start)
    return {name: statistics.median(values) for name, values in times.items()}


def coverage(path: Path) -> tuple[dict, bytes, bytes]:
    data = path.read_bytes()
    out, report = tfl_fuse.optimize(data)
    comparison = verify.compare_models(data, out, rtol=1e-4, kinds=("normal",))
    result = {
        "before": {k: report["ops_before"].get(k, 0) for k in LINEAR},
        "after": {k: report["ops_after"].get(k, 0) for k in LINEAR},
        "ops_before": sum(report["ops_before"].values()),
        "ops_after": sum(report["ops_after"].values()),
        "max_abs_diff": max(comparison["max_abs_diff"].values()),
        "match": comparison["match"],
        "declined": len(report["declined"]),
    }
    return result, data, out


def latency(original: bytes, optimized: bytes, threads: int, invokes: int) -> dict:
    interpreters = []
    for data in (original, optimized):
        interp = verify.interpreter(data, threads=threads, delegate=True)
        for detail, value in zip(
            interp.get_input_details(), verify.random_inputs(interp, 0), strict=True
        ):
            interp.set_tensor(detail["index"], value)
        interpreters.append(interp)
    for _ in range(3):
        for interp in interpreters:
            interp.invoke()
    times: list[list[float]] = [[], []]
    for i in range(invokes):
        for k in (0, 1) if i % 2 == 0 else (1, 0):  # alternate which model runs first
            start = time.perf_counter()
            interpreters[k].invoke()
            times[k].append(time.perf_counter() - start)
    original_ms = statistics.median(times[0]) * 1e3
    optimized_ms = statistics.median(times[1]) * 1e3
    return {
        "original_ms": original_ms,
        "optimized_ms": optimized_ms,
        "speedup": original_ms / optimized_ms,
    }


def chain_recipe(blocks: int, channels: int = 8) -> dict:
    operands = [{"name": "x0", "shape": [1, 4, 4, channels]}]
    operations = []
    for i in range(blocks):
        operands += [
            {
                "name": f"k{i}",
                "shape": [channels, 1, 1, channels],
                "filler": {"kind": "gaussian", "stddev": 0.3, "seed": i},
            },
            {"name": f"b{i}", "shape": [channels], "filler": {"kind": "gaussian", "seed": i}},
            {"name": f"c{i}", "shape": [1, 4, 4, channels]},
            {
                "name": f"s{i}",
                "shape": [channels],
                "filler": {"kind": "uniform", "low": 0.9, "high": 1.1, "seed": i},
            },
            {"name": f"m{i}", "shape": [1, 4, 4, channels]},
            {
                "name": f"t{i}",
                "shape": [channels],
                "filler": {"kind": "gaussian", "stddev": 0.1, "seed": i},
            },
            {"name": f"x{i + 1}", "shape": [1, 4, 4, channels]},
        ]
        operations += [
            {
                "type": "CONV_2D",
                "inputs": [f"x{i}", f"k{i}", f"b{i}"],
                "outputs": [f"c{i}"],
                "options": {"padding": "VALID"},
            },
            {"type": "MUL", "inputs": [f"c{i}", f"s{i}"], "outputs": [f"m{i}"]},
            {
                "type": "ADD",
                "inputs": [f"m{i}", f"t{i}"],
                "outputs": [f"x{i + 1}"],
                "options": {"activation": "RELU"},
            },
        ]
    return {
        "name": f"chain{blocks}",
        "inputs": ["x0"],
        "outputs": [f"x{blocks}"],
        "operand": operands,
        "operation": operations,
    }


def scaling(sizes: list[int]) -> list[dict]:
    import chef

    rows = []
    for blocks in sizes:
        data = fb.encode(chef.build_model(chain_recipe(blocks)))
        start = time.perf_counter()
        _, report = tfl_fuse.optimize(data)
        seconds = time.perf_counter() - start
        ops = sum(report["ops_before"].values())
        rows.append(
            {
                "blocks": blocks,
                "ops": ops,
                "ops_after": sum(report["ops_after"].values()),
                "seconds": seconds,
                "ms_per_1000_ops": seconds * 1e3 / (ops / 1000),
            }
        )
    return rows


def machine() -> dict:
    import ai_edge_litert
    import flatbuffers
    import tensorflow as tf

    def version(module):
        return getattr(module, "__version__", "?")

    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "flatbuffers": version(flatbuffers),
        "tensorflow": tf.__version__,
        "ai_edge_litert": version(ai_edge_litert),
        "tfl_fuse": tfl_fuse.__version__,
        "commit": subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        or "?",
        "date": time.strftime("%Y-%m-%d"),
    }


COST_COLUMNS = [
    "Columns: *tfl_fuse s* is `python -m tfl_fuse IN OUT` (default rules), *tfl_fuse --rules none s*",
    "a pure decode/encode, *LiteRT read+write s* `flatbuffer_utils.write_model(read_model(IN))`, each",
    "a fresh process; *ratio* = tfl_fuse s / LiteRT read+write s and *round-trip ratio* = tfl_fuse",
    "--rules none s / LiteRT read+write s (below 1: tfl_fuse is faster); *in-process ratio* the same as",
    "*ratio* without process start-up and imports; *x file* = tfl_fuse peak RSS / file size.",
]
INFERENCE_COLUMNS = [
    "Columns: *MUL/ADD/SUB/DIV before* and *after* count those ops in the converter's model and after",
    "tfl_fuse; *max abs diff* is the largest output difference on seeded inputs; *speed-up* =",
    "original latency / optimized latency (above 1: faster), at 1 and 2 threads.",
]


def machine_line(m: dict) -> str:
    return (
        f"Machine: {m['cores']} cores ({m['cpu']}), Python {m['python']}, numpy {m['numpy']}, tensorflow {m['tensorflow']}, "
        f"ai-edge-litert {m['ai_edge_litert']}, tfl_fuse {m['tfl_fuse']}; {m['date']}. Reproduce: `make bench`."
    )


def cost_markdown(results: dict) -> list[str]:
    lines = [
        "Tool cost: each command in a fresh process, median of the runs (start-up and imports included, tfl_fuse",
        "byte-compiled as installed, output fsync'ed by tfl_fuse only); in-process: `optimize_file` vs `write_model(read_model())` without start-up,",
        "median of 9 interleaved runs. Every timed command starts with no unwritten pages (`os.sync()`, not timed), so that tfl_fuse's fsync does not also write LiteRT's output.",
        "",
        "| model | file MB | tfl_fuse s | tfl_fuse --rules none s | LiteRT read+write s | ratio | round-trip ratio | in-process ratio | tfl_fuse peak RSS MB | x file | x file above start-up | LiteRT RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results["models"].items():
        c = r["cost"]
        above = c.get("rss_above_baseline_over_file")
        lines.append(
            f"| {name} | {c['file_mb']:.1f} | {c['ours_s']:.2f} | {c['round_trip_s']:.2f} | {c['theirs_s']:.2f} | {c['ratio_process']:.2f} | "
            f"{c['ratio_round_trip']:.2f} | {c['ratio_inproc']:.2f} | {c['ours_rss_mb']:.0f} | {c['rss_over_file']:.2f} | "
            f"{'-' if above is None else f'{above:.2f}'} | {c['theirs_rss_mb']:.0f} |"
        )
    baselines = {
        round(r["cost"]["baseline_rss_mb"])
        for r in results["models"].values()
        if "baseline_rss_mb" in r["cost"]
    }
    lines += ["", *COST_COLUMNS]
    if baselines:
        lines[-1] += (
            f" *x file above start-up* = (tfl_fuse peak RSS - the peak RSS of `python -m tfl_fuse --version`, "
            f"{'/'.join(str(b) for b in sorted(baselines))} MB) / file size."
        )
    profiled = {
        name: r["cost"]["phases_ms"]
        for name, r in results["models"].items()
        if "phases_ms" in r["cost"]
    }
    if profiled:
        lines += [
            "",
            "Where the in-process time goes (ms, median of the runs; the phases of `optimize_file` timed one by one,",
            "then LiteRT's): *decode* includes structural validation; *write* reserves the file's space, writes",
            "unchanged weights from the input's map (copies them file to file over 64 MiB) and computes folded",
            "ones as it writes them, checking them for overflow there (not in *rules*, as `optimize_file` runs),",
            "into a new file: `optimize_file` frees the output it replaces in a background thread, so that",
            "is not timed here (LiteRT's write truncates the old file); *fsync* makes the output durable,",
            "which LiteRT's `write_model` does not do.",
            "",
            "| model | decode | rules | encode | write | fsync | tfl_fuse total | LiteRT read | LiteRT write | LiteRT total | ratio | ratio without fsync |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, ph in profiled.items():
            ours = sum(ph[k] for k in ("decode", "rules", "encode", "write", "fsync"))
            theirs = ph["litert_read"] + ph["litert_write"]
            lines.append(
                f"| {name} | {ph['decode']:.1f} | {ph['rules']:.1f} | {ph['encode']:.1f} | {ph['write']:.1f} | "
                f"{ph['fsync']:.1f} | {ours:.1f} | {ph['litert_read']:.1f} | {ph['litert_write']:.1f} | "
                f"{theirs:.1f} | {ours / theirs:.2f} | {(ours - ph['fsync']) / theirs:.2f} |"
            )
    per_mb = [
        (name, r["cost"]["ours_inproc_s"] / r["cost"]["file_mb"] * 100)
        for name, r in results["models"].items()
        if "ResNet" in name and "V2" in name
    ]
    if len(per_mb) > 1:
        lines += [
            "",
            "Linear in model size (in-process tfl_fuse seconds per 100 MB): "
            + ", ".join(f"{n} {v:.2f}" for n, v in per_mb),
        ]
    return lines


def inference_markdown(results: dict) -> list[str]:
    lines = [
        "Coverage and inference (LiteRT, XNNPACK, median latency, original/optimized interleaved):",
        "",
        "| model | MUL/ADD/SUB/DIV before | after | ops before -> after | max abs diff | 1 thread ms (orig -> opt) | speed-up | 2 threads ms | speed-up |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results["models"].items():
        v = r["coverage"]
        before = "/".join(str(v["before"][k]) for k in LINEAR)
        after = "/".join(str(v["after"][k]) for k in LINEAR)
        t1, t2 = r["latency"]["1"], r["latency"]["2"]
        lines.append(
            f"| {name} | {before} | {after} | {v['ops_before']} -> {v['ops_after']} | {v['max_abs_diff']:.2e} | "
            f"{t1['original_ms']:.1f} -> {t1['optimized_ms']:.1f} | {t1['speedup']:.3f} | "
            f"{t2['original_ms']:.1f} -> {t2['optimized_ms']:.1f} | {t2['speedup']:.3f} |"
        )
    lines += ["", *INFERENCE_COLUMNS]
    unchanged = [
        n
        for n, r in results["models"].items()
        if r["coverage"]["ops_before"] == r["coverage"]["ops_after"]
    ]
    if unchanged:
        lines += [
            "",
            f"{', '.join(unchanged)}: tfl_fuse changes nothing there (the converter folded every BN), so their "
            "latency ratio shows the noise of the measurement.",
        ]
    return lines


def scaling_markdown(results: dict) -> list[str]:
    lines = [
        "Scaling (synthetic chains of CONV_2D + MUL + ADD blocks built by the chef, in-process optimize):",
        "",
        "| blocks | ops | ops after | seconds | ms per 1,000 ops |",
        "|---|---|---|---|---|",
    ]
    for row in results["scaling"]:
        lines.append(
            f"| {row['blocks']} | {row['ops']} | {row['ops_after']} | {row['seconds']:.2f} | {row['ms_per_1000_ops']:.0f} |"
        )
    return lines


# Where each section's text begins in results.md (it ends where the next one begins).
SECTION_STARTS = {
    "cost": "Tool cost:",
    "inference": "Coverage and inference",
    "scaling": "Scaling (",
}
SECTION_WRITERS = {
    "cost": cost_markdown,
    "inference": inference_markdown,
    "scaling": scaling_markdown,
}
CHART = "![latency ratios and op counts](chart.png)"


def markdown(results: dict) -> str:
    lines = [machine_line(results["machine"]), ""]
    for name in SECTIONS:
        lines += [*SECTION_WRITERS[name](results), ""]
    lines += [CHART, ""]
    return "\n".join(lines)


def replace_sections(text: str, results: dict, sections: list[str]) -> str:
    """``text`` (a results.md) with the tables of ``sections`` made again from ``results``.

    A section runs from its first line (SECTION_STARTS) to the next section or the chart;
    everything else, including the quantization section after the chart, stays.
    """
    lines = text.split("\n")
    for name in sections:
        starts = [i for i, line in enumerate(lines) if line.startswith(SECTION_STARTS[name])]
        if not starts:
            raise SystemExit(f"{name}: no such section in the results file; run all sections")
        start = starts[0]
        ends = [
            i
            for i, line in enumerate(lines)
            if i > start
            and (line == CHART or any(line.startswith(s) for s in SECTION_STARTS.values()))
        ]
        end = ends[0] if ends else len(lines)
        m = results["machine"]
        note = (
            f"({name}: re-measured on {m['date']}, commit {m.get('commit', '?')}, with "
            f"`tools/bench.py --sections {','.join(sections)}`; the other tables are from the run "
            "dated at the top.)"
        )
        lines[start:end] = [*SECTION_WRITERS[name](results), "", note, ""]
    return "\n".join(lines)


def noise_band(results: dict) -> dict[str, float]:
    """Per thread count, the largest |speed-up - 1| of the models tfl_fuse leaves unchanged.

    Their original and optimized models are the same graph, so their ratio is pure measurement
    noise; a gain inside that band is not a gain.
    """
    band = {}
    for threads in ("1", "2"):
        deviations = [
            abs(r["latency"][threads]["speedup"] - 1.0)
            for r in results["models"].values()
            if r["coverage"]["ops_before"] == r["coverage"]["ops_after"]
        ]
        band[threads] = max(deviations) if deviations else 0.0
    return band


def chart(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["models"])
    x = np.arange(len(names))
    unchanged = [
        results["models"][n]["coverage"]["ops_before"]
        == results["models"][n]["coverage"]["ops_after"]
        for n in names
    ]
    band = noise_band(results)
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    colors = {"1": "tab:blue", "2": "tab:orange"}
    for k, threads in enumerate(("1", "2")):
        gains = [(results["models"][n]["latency"][threads]["speedup"] - 1.0) * 100 for n in names]
        offset = (k - 0.5) * 0.35
        left.bar(
            x + offset,
            gains,
            0.35,
            color=colors[threads],
            label=f"{threads} thread" + ("s" if threads != "1" else ""),
            zorder=2,
        )
        for i, flat in enumerate(unchanged):  # an unchanged model shows only the noise
            if flat:
                left.bar(
                    x[i] + offset, gains[i], 0.35, color="white", edgecolor=colors[threads],
                    hatch="//", zorder=2,
                )  # fmt: skip
        if band[threads]:
            left.axhspan(
                -band[threads] * 100,
                band[threads] * 100,
                color=colors[threads],
                alpha=0.12,
                zorder=0,
                label=f"noise, {threads} thread"
                + ("s" if threads != "1" else "")
                + f": ±{band[threads] * 100:.1f}%",
            )
    left.axhline(0.0, color="black", linewidth=0.8)
    gains_all = [
        abs(results["models"][n]["latency"][t]["speedup"] - 1.0) * 100
        for n in names
        for t in ("1", "2")
    ]
    limit = max(5.0, max(gains_all) + 1.0, max(band.values()) * 100 + 1.0)
    left.set_ylim(-limit, limit)
    left.set_xticks(x, [n + ("\n(unchanged)" if flat else "") for n, flat in zip(names, unchanged)],
                    rotation=20)  # fmt: skip
    left.set_ylabel("latency gain, % (original / optimized - 1)")
    left.set_title("LiteRT XNNPACK inference: gain over the converter's model")
    left.legend(fontsize=8, loc="lower left", ncol=2)
    before = [sum(results["models"][n]["coverage"]["before"].values()) for n in names]
    after = [sum(results["models"][n]["coverage"]["after"].values()) for n in names]
    right.bar(x - 0.175, before, 0.35, label="converter output")
    right.bar(x + 0.175, after, 0.35, label="after tfl_fuse")
    right.set_xticks(x, names, rotation=20)
    right.set_ylabel("MUL + ADD + SUB + DIV ops")
    right.set_title("Elementwise ops left")
    right.legend()
    m = results["machine"]
    fig.suptitle(
        f"tfl_fuse {m['tfl_fuse']} on {m['cores']} cores, LiteRT {m['ai_edge_litert']}, TF {m['tensorflow']} ({m['date']}); "
        "hatched: models tfl_fuse leaves unchanged (their bars are measurement noise)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


SECTIONS = ("cost", "inference", "scaling")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument(
        "--sections",
        default=",".join(SECTIONS),
        help="comma-separated sections to measure: cost (tool time and memory), inference "
        "(coverage and latency), scaling (synthetic chains); with fewer than all, only their "
        "tables in OUT/results.md are replaced",
    )
    parser.add_argument("--invokes", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--chains", default="1000,2000,5000")
    parser.add_argument("--out", default=str(ROOT / "bench"))
    parser.add_argument(
        "--replot", action="store_true", help="only redraw chart.png from OUT/results.json"
    )
    args = parser.parse_args(argv)
    sections = [s for s in SECTIONS if s in args.sections.split(",")]
    unknown = set(args.sections.split(",")) - set(SECTIONS)
    if unknown or not sections:
        parser.error(f"--sections: choose from {', '.join(SECTIONS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.replot:
        chart(json.loads((out / "results.json").read_text()), out / "chart.png")
        return 0
    results: dict = {"machine": machine(), "models": {}}
    if "cost" in sections:
        # the fresh-process figures time the tool as installed (make does this too), not a
        # compilation of its sources, which PYTHONDONTWRITEBYTECODE would repeat at every start
        compileall.compile_dir(Path(tfl_fuse.__file__).parent, quiet=1)
    if "cost" in sections or "inference" in sections:
        baseline_rss = startup_rss() if "cost" in sections else 0
        with tempfile.TemporaryDirectory() as work_dir:
            work = Path(work_dir)
            for name in args.models.split(","):
                print(f"[bench] {name}: building (cached)", flush=True)
                path = kerasmodels.application(
                    name, input_shape=(224, 224, 3), classifier_activation=None
                )
                entry = results["models"][name] = {}
                if "cost" in sections:
                    cost = entry["cost"] = tool_cost(path, work, args.repeats, baseline_rss)
                    print(
                        f"[bench] {name}: ratio {cost['ratio_process']:.2f} (in-process {cost['ratio_inproc']:.2f}), "
                        f"RSS {cost['rss_over_file']:.2f}x file ({cost['rss_above_baseline_over_file']:.2f}x above start-up)",
                        flush=True,
                    )
                if "inference" in sections:
                    cov, original, optimized = coverage(path)
                    lat = {str(t): latency(original, optimized, t, args.invokes) for t in (1, 2)}
                    entry["coverage"], entry["latency"] = cov, lat
                    print(
                        f"[bench] {name}: MUL {cov['before']['MUL']}->{cov['after']['MUL']}, "
                        f"ADD {cov['before']['ADD']}->{cov['after']['ADD']}, speed-up {lat['1']['speedup']:.3f}/{lat['2']['speedup']:.3f}",
                        flush=True,
                    )
    if "scaling" in sections:
        results["scaling"] = scaling([int(n) for n in args.chains.split(",")])
    if len(sections) == len(SECTIONS):
        (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        text = markdown(results)
        previous = (out / "results.md").read_text() if (out / "results.md").exists() else ""
        if CHART in previous:  # keep what other tools append after the chart (quantization)
            text = text.rstrip("\n") + previous.split(CHART, 1)[1]
        (out / "results.md").write_text(text)
        chart(results, out / "chart.png")
        print(text)
        return 0
    if (out / "results.json").exists():  # keep the sections not measured now
        merged = json.loads((out / "results.json").read_text())
        for name, entry in results["models"].items():
            merged.setdefault("models", {}).setdefault(name, {}).update(entry)
        if "scaling" in results:
            merged["scaling"] = results["scaling"]
        (out / "results.json").write_text(json.dumps(merged, indent=2) + "\n")
    if (out / "results.md").exists():
        text = replace_sections((out / "results.md").read_text(), results, sections)
    else:  # a fresh folder: only the sections measured now
        text = "\n".join(line for name in sections for line in SECTION_WRITERS[name](results))
    (out / "results.md").write_text(text)
    for name in sections:
        print("\n".join(SECTION_WRITERS[name](results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
