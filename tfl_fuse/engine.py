"""Runs rules to a fixed point over every subgraph, sweeps what they left dead, reports."""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

import numpy as np

from . import float16, quantsim
from .graph import Graph
from .model import Model, ModelError, Table
from .rules import Context, Decline, Rule
from .rules.base import StopRewriting, op_label, record_decline
from .rules.predicates import LINEAR_OPS, affine_of
from .rules.quantized import explain_quantized

MAX_PASSES = 100
CHANNELS_FIRST = 1


def op_counts(model: Model) -> dict[str, int]:
    counts: Counter[str] = Counter()
    for subgraph in model.subgraphs:
        counts.update(op.opcode.name for op in subgraph.operators)
    return dict(sorted(counts.items()))


def _apply(rule: Rule, graph: Graph, ctx: Context, step: str = "apply") -> int:
    try:
        return getattr(rule, step)(graph, ctx)
    except ModelError:
        raise
    except (ValueError, IndexError, KeyError, AttributeError, TypeError) as error:
        # Rules check what they rely on; a model inconsistent beyond those checks (shapes that
        # contradict each other, missing options) ends the run rather than risk a wrong rewrite.
        raise ModelError(
            f"subgraph {graph.index}: rule {rule.name} met an inconsistent model "
            f"({type(error).__name__}: {error})"
        ) from None


def explain_float16(graph: Graph, ctx: Context) -> None:
    """Say why a MUL/ADD/SUB/DIV by a float16 constant (DEQUANTIZE of FLOAT16) stays.

    The rules see no constant there, so nothing declined it; the report should still explain it.
    """
    for op in graph.live_ops("MUL", "ADD", "SUB", "DIV"):
        for tensor in op.inputs:
            producer = graph.producer_of(tensor) if tensor >= 0 else None
            if (
                producer is not None
                and producer.opcode.name == "DEQUANTIZE"
                and graph.is_constant(producer.inputs[0])
                and graph.dtype(producer.inputs[0]) == "FLOAT16"
            ):
                reason = (
                    f"its constant {graph.name(producer.inputs[0])!r} is float16 (DEQUANTIZE); "
                    "float16 constants are not folded (a float16 result would be rounded, a float32 one would undo the model's float16 compression)"
                )
                record_decline(ctx, "*", graph.index, [op_label(graph, op)], reason, graph, op)
                break


def _leftover_reason(graph: Graph, op: Table) -> str:
    """Why a MUL/ADD/SUB/DIV by a constant that no rule took or declined is still there."""
    try:
        affine = affine_of(graph, op, any_axis=True)
    except Decline as decline:
        return f"left as it is: {decline}"
    shape = graph.shape(affine.data)
    if affine.axis is not None and affine.axis % len(shape) != len(shape) - 1:
        return (
            f"left as it is: its constant runs along axis {affine.axis} of {shape}, and no op "
            "between it and a layer carries that axis to the layer's channel axis"
        )
    producer = graph.producer_of(affine.data)
    source = (
        f"{producer.opcode.name} {graph.name(affine.data)!r}"
        if producer is not None
        else f"graph input {graph.name(affine.data)!r}"
    )
    out = op.outputs[0]
    users = sorted({c.opcode.name for c in graph.consumers_of(out)})
    targets = ", ".join(users) if users else "nothing"
    if graph.is_graph_output(out):
        targets += " and is a graph output"
    return (
        f"left as it is: no layer to fold into: its input is {source}, its output goes to {targets}"
    )


def explain_leftovers(graph: Graph, ctx: Context) -> None:
    """Give every MUL/ADD/SUB/DIV by a constant still in the graph a decline that names it.

    Rules decline what matched their pattern; an op no pattern reached (no layer nearby, a
    constant along another axis, quantized) is explained here, so nothing stays silently.
    """
    said = {
        label for d in ctx.declines.values() if d["subgraph"] == graph.index for label in d["ops"]
    }
    reasons = " ".join(d["reason"] for d in ctx.declines.values())
    for op in graph.live_ops(*LINEAR_OPS):
        if len(op.outputs) != 1 or not any(graph.is_constant(t) for t in op.inputs if t >= 0):
            continue
        label = op_label(graph, op)
        if label in said or repr(graph.name(op.outputs[0])) in reasons:
            continue  # a rule already said why
        record_decline(ctx, "*", graph.index, [label], _leftover_reason(graph, op), graph, op)


# numpy's floating-point warnings are off while rules run: every rule checks the values it
# computes (require_finite, the multiplier and bias checks) and declines with a reason, so a
# flag (a signaling NaN in a weight, x / 0 on the way to such a check) says nothing more, and
# the CLI would print it beside its one line.
@np.errstate(all="ignore")
def run(
    model: Model,
    rules: list[Rule],
    exclude: list[str] | None = None,
    target: str = "float",
    weight_granularity: str = "channel",
    stop_after: int | None = None,
    equalize: str = "auto",
    input_range: tuple[float, float] | None = None,
    float16_folds: str = "float16",
) -> dict[str, Any]:
    """Apply ``rules`` to ``model`` in place until nothing changes; return the report.

    ``float16_folds``: how a float16 weight a fold changed is stored (float16.lower).

    ``stop_after``: stop once that many rewrites are made (the run is deterministic, so they
    are the first rewrites of a full run).
    """
    ctx = Context(
        exclude=[re.compile(p) for p in exclude or []],
        target=target,
        weight_granularity=weight_granularity,
        equalize=equalize,
        input_range=input_range,
    )
    before = op_counts(model)
    warnings = unmatched_excludes(model, ctx.exclude)
    if stop_after == 0:
        rules = []
    ctx.stop_after = stop_after
    passes = 0
    float16_counts = {"rewritten": 0, "widened": 0}
    touched = False  # whether anything changed the model (every rule change is a rewrite entry)
    for index, subgraph in enumerate(model.subgraphs):
        if subgraph.get("dataFormat", 0) == CHANNELS_FIRST:
            record_decline(
                ctx,
                "*",
                index,
                [],
                "circle subgraph in CHANNELS_FIRST data format: rules assume NHWC and skip it",
            )
            continue
        if not rules:
            continue
        graph = Graph(model, index)
        for op in subgraph.operators:  # labels name ops as the input model did (op_label)
            if op.outputs and op.outputs[0] >= 0:
                op._origin = graph.name(op.outputs[0])
        # Float target: float16 weights fold like float32 ones and are stored as float16 again
        # (float16.py). Not when dequantize_float16_weights runs: it keeps them float32.
        lifting = target == "float" and not any(
            rule.name == "dequantize_float16_weights" for rule in rules
        )
        lifted = float16.lift(graph) if lifting else None
        touched = touched or bool(lifted and lifted.lifted)  # lowered again, but re-laid out
        stopped = False
        for _ in range(MAX_PASSES):
            passes += 1
            ctx.declines = {k: v for k, v in ctx.declines.items() if k[1] != index}
            try:
                changed = sum(_apply(rule, graph, ctx) for rule in rules)
            except StopRewriting:
                stopped = True
                break
            if not changed:
                break
        if not stopped:
            try:
                for rule in rules:  # decisions that need the whole rewritten model (equalize)
                    if hasattr(rule, "finish"):
                        _apply(rule, graph, ctx, "finish")
            except StopRewriting:
                stopped = True
        if lifted is not None:
            counts = float16.lower(graph, lifted, float16_folds)
            float16_counts["rewritten"] += counts["rewritten"]
            float16_counts["widened"] += counts["widened"]
        if not stopped:
            if lifted is None:
                explain_float16(graph, ctx)
            explain_quantized(graph, ctx)
            explain_leftovers(graph, ctx)
        graph.sweep()
        if stopped:
            break
    return {
        "ops_before": before,
        "ops_after": op_counts(model),
        "rewrites": ctx.rewrites,
        "declined": list(ctx.declines.values()),
        "rules": [rule.name for rule in rules],
        "target": target,
        **({"weight_granularity": weight_granularity} if target != "float" else {}),
        **(
            {
                "equalize": {
                    "mode": equalize,
                    "input_range": list(input_range or quantsim.DEFAULT_INPUT_RANGE),
                    **ctx.memo.get("equalize", {}),
                }
            }
            if target == "int8" and any(rule.name == "equalize_cross_layer" for rule in rules)
            else {}
        ),
        "passes": passes,
        "unchanged": not (touched or ctx.rewrites),
        **(
            {"float16_constants_rewritten": float16_counts["rewritten"]}
            if float16_counts["rewritten"]
            else {}
        ),
        **(
            {"float16_constants_kept_float32": float16_counts["widened"]}
            if float16_counts["widened"]
            else {}
        ),
        **({"warnings": warnings} if warnings else {}),
    }


def unmatched_excludes(model: Model, patterns: list[re.Pattern]) -> list[str]:
    """A warning for each --exclude pattern that matches no op's output tensor name."""
    if not patterns:
        return []
    names = [
        str(subgraph.tensors[t].get("name") or "")
        for subgraph in model.subgraphs
        for op in subgraph.operators
        for t in op.outputs
        if 0 <= t < len(subgraph.tensors)
    ]
    return [
        f"--exclude {p.pattern!r} matches no op's output tensor name, so it excludes nothing"
        for p in patterns
        if not any(p.search(name) for name in names)
    ]
