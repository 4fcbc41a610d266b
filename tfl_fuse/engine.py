"""Runs rules to a fixed point over every subgraph, sweeps what they left dead, reports."""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

from .graph import Graph
from .model import Model, ModelError, Table
from .rules import Context, Decline, Rule
from .rules.predicates import LINEAR_OPS, affine_of

MAX_PASSES = 100
CHANNELS_FIRST = 1


def op_counts(model: Model) -> dict[str, int]:
    counts: Counter[str] = Counter()
    for subgraph in model.subgraphs:
        counts.update(op.opcode.name for op in subgraph.operators)
    return dict(sorted(counts.items()))


def _apply(rule: Rule, graph: Graph, ctx: Context) -> int:
    try:
        return rule.apply(graph, ctx)
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
                where = f"subgraph {graph.index}: {op.opcode.name} -> {graph.name(op.outputs[0])}"
                reason = (
                    f"its constant {graph.name(producer.inputs[0])!r} is float16 (DEQUANTIZE); "
                    "float16 constants are not folded (a float16 result would be rounded, a float32 one would undo the model's float16 compression)"
                )
                ctx.declines[("*", where, reason)] = {"rule": "*", "where": where, "reason": reason}
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
    wheres = [d["where"] for d in ctx.declines.values()]
    reasons = " ".join(d["reason"] for d in ctx.declines.values())
    for op in graph.live_ops(*LINEAR_OPS):
        if len(op.outputs) != 1 or not any(graph.is_constant(t) for t in op.inputs if t >= 0):
            continue
        name = graph.name(op.outputs[0])
        if any(w.endswith(f" -> {name}") for w in wheres) or repr(name) in reasons:
            continue  # a rule already said why
        where = f"subgraph {graph.index}: {op.opcode.name} -> {name}"
        reason = _leftover_reason(graph, op)
        ctx.declines[("*", where, reason)] = {"rule": "*", "where": where, "reason": reason}


def run(
    model: Model,
    rules: list[Rule],
    exclude: list[str] | None = None,
    target: str = "float",
    weight_granularity: str = "channel",
) -> dict[str, Any]:
    """Apply ``rules`` to ``model`` in place until nothing changes; return the report."""
    ctx = Context(
        exclude=[re.compile(p) for p in exclude or []],
        target=target,
        weight_granularity=weight_granularity,
    )
    before = op_counts(model)
    passes = 0
    for index, subgraph in enumerate(model.subgraphs):
        if subgraph.get("dataFormat", 0) == CHANNELS_FIRST:
            where = f"subgraph {index}"
            ctx.declines[("*", where, "fmt")] = {
                "rule": "*",
                "where": where,
                "reason": "circle subgraph in CHANNELS_FIRST data format: rules assume NHWC and skip it",
            }
            continue
        if not rules:
            continue
        graph = Graph(model, index)
        for _ in range(MAX_PASSES):
            passes += 1
            ctx.declines = {
                k: v for k, v in ctx.declines.items() if not k[1].startswith(f"subgraph {index}:")
            }
            changed = sum(_apply(rule, graph, ctx) for rule in rules)
            if not changed:
                break
        if rules:
            explain_float16(graph, ctx)
            explain_leftovers(graph, ctx)
        graph.sweep()
    return {
        "ops_before": before,
        "ops_after": op_counts(model),
        "rewrites": ctx.rewrites,
        "declined": list(ctx.declines.values()),
        "rules": [rule.name for rule in rules],
        "target": target,
        **({"weight_granularity": weight_granularity} if target != "float" else {}),
        "passes": passes,
    }
