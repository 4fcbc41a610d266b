"""Folder mode: optimize every model under IN_DIR into the same relative paths under OUT_DIR.

    tfl-fuse IN_DIR OUT_DIR [-j N] [--report FILE|-] [any single-model option]

Each .tflite / .circle file under IN_DIR (recursively; hidden files skipped) is optimized on its
own, in up to N processes. A model that fails (bad input, a --verify mismatch, an unwritable
output) fails alone, with its reason; the others are written. The summary table lists every
model; ``--report`` holds one JSON document for the batch, with each model's full report.
Exit code: 1 if any model failed, else 3 if any --verify mismatch, else (with --check) 4 if
rules would change any model, else 0.
"""

from __future__ import annotations

import argparse
import os
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .api import VerificationError, WriteError, open_model_file, optimize_and_write
from .formats import FORMATS
from .model import ModelError
from .report import entry_text, plural

if TYPE_CHECKING:
    from .cli import Options

MODEL_SUFFIXES = tuple(f.suffix for f in FORMATS.values())
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_MISMATCH, EXIT_CHANGES = 0, 1, 2, 3, 4


def find_models(root: Path) -> list[Path]:
    """Model files under ``root``, sorted, skipping hidden files and folders (temp files)."""
    found = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        for name in sorted(files):
            if name.endswith(MODEL_SUFFIXES) and not name.startswith("."):
                found.append(Path(folder) / name)
    return found


def output_path(source: Path, in_dir: Path, out_dir: Path, output_format: str | None) -> Path:
    """``source``'s place under ``out_dir``; with --output-format, that format's suffix."""
    target = out_dir / source.relative_to(in_dir)
    if output_format is not None:
        target = target.with_suffix(FORMATS[output_format].suffix)
    return target


def optimize_one(
    source: str, target: str | None, arguments: dict[str, Any], model: str, durable: bool = True
) -> dict[str, Any]:
    """Optimize one model (in a worker process); a row of the summary, never an exception."""
    row: dict[str, Any] = {"model": model, "input": source, "output": None}
    try:
        with open_model_file(source) as (data, fd):
            try:
                report = optimize_and_write(
                    data, fd, target, durable, make_folder=True, **arguments
                )
            except WriteError as error:
                raise ModelError(f"cannot write {target}: {error.strerror or error}") from None
            row["output"] = target
            report["output"] = target
        row.update(status="ok", report=report)
    except VerificationError as error:
        row.update(status="mismatch", error=str(error), report=error.report)
    except ModelError as error:
        row.update(status="failed", error=str(error))
    except (MemoryError, RecursionError) as error:
        row.update(status="failed", error=f"cannot process the model ({type(error).__name__})")
    except Exception as error:  # noqa: BLE001 - one bad model must not stop the batch
        row.update(
            status="failed",
            error=f"internal error, please report it: {type(error).__name__}: {error}",
        )
    return row


def _progress(total: int, enabled: bool) -> Any:
    """A tqdm bar on a terminal, else nothing."""
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm comes with LiteRT, but the bar is a nicety
        return None
    return tqdm(total=total, unit="model", file=sys.stderr, leave=False)


def table(rows: list[dict[str, Any]], check: bool) -> str:
    """The summary: model, ops before -> after, rewrites, declines, status."""
    header = ["model", "ops", "rewrites", "declined", "status"]
    lines = [header]
    for row in rows:
        report = row.get("report") or {}
        if "ops_before" in report:
            ops = f"{sum(report['ops_before'].values())} -> {sum(report['ops_after'].values())}"
            rewrites, declined = str(len(report["rewrites"])), str(len(report["declined"]))
        else:
            ops, rewrites, declined = "-", "-", "-"
        status = row["status"]
        if check and status == "ok":
            status = "would change" if report.get("rewrites") else "unchanged"
        lines.append([row["model"], ops, rewrites, declined, status])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(
            cell.ljust(width) if i == 0 or i == len(header) - 1 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(line, widths))
        ).rstrip()
        for line in lines
    )


def run_batch(args: argparse.Namespace, options: Options) -> int:
    """Folder IN: optimize each model; print the table; write the batch report; exit code."""
    in_dir = Path(args.input)
    out_dir = Path(args.output) if args.output is not None else None
    write = out_dir is not None and not (args.dry_run or args.check)
    if out_dir is not None:
        if out_dir.exists() and not out_dir.is_dir():
            return _fail(f"{out_dir}: OUT must be a folder when IN is a folder")
        resolved_in, resolved_out = in_dir.resolve(), out_dir.resolve()
        if resolved_out != resolved_in and resolved_in in resolved_out.parents:
            print(
                f"tfl-fuse: error: OUT_DIR {out_dir} is inside IN_DIR {in_dir}: a second run would "
                "optimize its own output (use a folder outside IN_DIR, or IN_DIR itself)",
                file=sys.stderr,
            )
            return EXIT_USAGE
    if not args.quiet:
        for message in options.warnings:
            print(f"tfl-fuse: warning: {message}", file=sys.stderr)
    models = find_models(in_dir)
    if not models:
        if not args.quiet:
            print(
                f"tfl-fuse: warning: no {' or '.join(MODEL_SUFFIXES)} file under {in_dir}",
                file=sys.stderr,
            )
        return _write_batch_report(args, [], options) or EXIT_OK

    tasks = []
    for source in models:
        model = str(source.relative_to(in_dir))
        target = (
            str(output_path(source, in_dir, out_dir, options.output_format))
            if write and out_dir is not None
            else None
        )
        arguments = options.library_arguments(options.output_format)
        tasks.append((str(source), target, arguments, model, options.durable))

    jobs = min(args.jobs or 1, len(tasks))
    bar = _progress(len(tasks), sys.stderr.isatty() and not args.quiet)
    rows: dict[str, dict[str, Any]] = {}
    if jobs == 1:
        for task in tasks:
            rows[task[3]] = optimize_one(*task)
            if bar is not None:
                bar.update()
    else:
        # spawn: workers start clean (no copy of a parent that may hold LiteRT threads)
        with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
            futures = {pool.submit(optimize_one, *task): task for task in tasks}
            for future in as_completed(futures):
                task = futures[future]
                try:
                    rows[task[3]] = future.result()
                except Exception as error:  # noqa: BLE001 - a worker that died
                    rows[task[3]] = {
                        "model": task[3],
                        "input": task[0],
                        "output": None,
                        "status": "failed",
                        "error": f"the worker process failed ({type(error).__name__}: {error})",
                    }
                if bar is not None:
                    bar.update()
    if bar is not None:
        bar.close()
    ordered = [rows[task[3]] for task in tasks]

    code = _write_batch_report(args, ordered, options)
    if code:
        return code
    failed = [r for r in ordered if r["status"] == "failed"]
    mismatched = [r for r in ordered if r["status"] == "mismatch"]
    changed = [r for r in ordered if r["status"] == "ok" and r["report"]["rewrites"]]
    if not args.quiet:
        counts: dict[str, int] = {}
        for row in ordered:
            for message in (row.get("report") or {}).get("warnings", []):
                counts[message] = counts.get(message, 0) + 1
        for message, count in counts.items():
            print(
                f"tfl-fuse: warning: {message} (in {count} of {plural(len(ordered), 'model')})",
                file=sys.stderr,
            )
        print(table(ordered, args.check), file=sys.stderr)
        if args.verbose or args.check:
            for row in ordered:
                entries = (row.get("report") or {}).get("rewrites", [])
                declines = (row.get("report") or {}).get("declined", []) if args.verbose else []
                for entry in entries:
                    print(f"  {row['model']}: rewrote  {entry_text(entry)}", file=sys.stderr)
                for entry in declines:
                    print(f"  {row['model']}: declined {entry_text(entry)}", file=sys.stderr)
        verb = "would change" if args.check else "changed"
        print(
            f"tfl-fuse: {plural(len(ordered), 'model')}: {len(changed)} {verb}, "
            f"{len(failed)} failed"
            + (f", {len(mismatched)} --verify mismatch(es)" if mismatched else ""),
            file=sys.stderr,
        )
    for row in failed + mismatched:
        print(f"tfl-fuse: error: {row['model']}: {row['error']}", file=sys.stderr)
    if failed:
        return EXIT_ERROR
    if mismatched:
        return EXIT_MISMATCH
    if args.check and changed:
        return EXIT_CHANGES
    return EXIT_OK


def _write_batch_report(
    args: argparse.Namespace, rows: list[dict[str, Any]], options: Options
) -> int:
    if not args.report:
        return EXIT_OK
    document = {
        "input": str(args.input),
        "output": None if (args.dry_run or args.check) else args.output,
        "models": rows,
        "summary": {
            "models": len(rows),
            "failed": sum(r["status"] == "failed" for r in rows),
            "mismatch": sum(r["status"] == "mismatch" for r in rows),
            "changed": sum(r["status"] == "ok" and bool(r["report"]["rewrites"]) for r in rows),
        },
        "options": options.library_arguments(options.output_format),
    }
    from .cli import _emit_report  # the CLI module imports this one when IN is a folder

    return _emit_report(args, document)


def _fail(message: str) -> int:
    print(f"tfl-fuse: error: {message}", file=sys.stderr)
    return EXIT_ERROR
