"""What every rule shares: the Rule base class, the Decline signal and the run context."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from ..graph import Graph
from ..model import Table

QUANTIZED_TARGETS = ("int8", "dynamic")


class Decline(Exception):
    """A pattern matched but a condition for an exact rewrite does not hold; says why."""


class StopRewriting(Exception):
    """Raised after the rewrite that used up ``Context.stop_after``: the engine stops there.

    Rules record a rewrite only once the graph is consistent again, so stopping at that point
    leaves a valid model holding exactly the first ``stop_after`` rewrites (--verify uses it
    to find the rewrite that changed the outputs).
    """


def op_label(graph: Graph, op: Table) -> str:
    """``TYPE:name``, the name being the op's output tensor when the run began.

    Folds re-point a layer's output to the tensor of the op folded into it; the label keeps the
    name the user saw in the input model. Ops created by a rule are named by their output.
    """
    name = op.__dict__.get("_origin")
    if name is None:
        name = graph.name(op.outputs[0]) if op.outputs else "?"
    return f"{op.opcode.name}:{name}"


@dataclass
class Context:
    """Collects what rules did and refused, and carries the user's options."""

    exclude: list[re.Pattern] = field(default_factory=list)
    # "float": the output is the model to deploy; "int8" (static, integer activations) and
    # "dynamic" (int8 weights, float activations): a float model a quantizer takes next, so
    # among exact forms the rules choose the one that quantizes best (README, --target).
    target: str = "float"

    @property
    def quantized_next(self) -> bool:
        return self.target in QUANTIZED_TARGETS

    rewrites: list[dict[str, Any]] = field(default_factory=list)
    declines: dict[tuple, dict[str, Any]] = field(default_factory=dict)
    # how the quantizer that comes next quantizes weights: "channel" (per output channel, the
    # default of TFLite's converter and ai-edge-quantizer) or "tensor"
    weight_granularity: str = "channel"
    memo: dict[str, Any] = field(default_factory=dict)  # what a rule remembers across passes
    # --target int8: how equalize_cross_layer decides, "measure" (simulated int8 error,
    # quantsim.py), "predict" (the data-free noise model) or "auto" (measure within a compute
    # budget, else predict); the value range of the synthetic
    # calibration images the simulation feeds image-like inputs (None: -1..1)
    equalize: str = "auto"
    input_range: tuple[float, float] | None = None
    stop_after: int | None = None  # stop the run after this many rewrites (None: run to the end)

    def excluded(self, graph: Graph, *ops: Table) -> str | None:
        """The first --exclude pattern that matches an output tensor name of ``ops``."""
        for op in ops:
            for t in op.outputs:
                name = graph.name(t)
                for pattern in self.exclude:
                    if pattern.search(name):
                        return (
                            f"output tensor {name!r} is excluded by --exclude {pattern.pattern!r}"
                        )
        return None


class Rule:
    """A rewrite family. Subclasses set ``name``/``summary`` and implement ``apply``.

    ``apply`` makes one pass over a graph and returns the number of rewrites; the engine
    repeats passes until no rule changes anything.
    """

    name: str = ""
    summary: str = ""
    approximate: bool = False  # changes the function computed; never on by default
    default: bool = True
    # on by default when a quantizer comes next (--target int8 or dynamic); None: as ``default``
    int8_default: bool | None = None
    quantized: bool = False  # reads and writes quantized tensors (scales, zero points, int bias)

    def is_default(self, target: str = "float") -> bool:
        if self.approximate:
            return False
        if target in QUANTIZED_TARGETS and self.int8_default is not None:
            return self.int8_default
        return self.default

    def apply(self, graph: Graph, ctx: Context) -> int:
        raise NotImplementedError

    # reporting helpers -------------------------------------------------------------------
    @staticmethod
    def labels(graph: Graph, ops: list[Table]) -> list[str]:
        """``TYPE:name`` of each op (see :func:`op_label`); take them before a rewrite."""
        return [op_label(graph, op) for op in ops]

    def rewrote(
        self, graph: Graph, ctx: Context, labels: list[str], detail: str, **extra: Any
    ) -> None:
        """Record a rewrite; call it once the graph is consistent again."""
        entry = {"rule": self.name, "subgraph": graph.index, "ops": labels, "detail": detail}
        entry.update(extra)
        ctx.rewrites.append(entry)
        if ctx.stop_after is not None and len(ctx.rewrites) >= ctx.stop_after:
            raise StopRewriting

    def declined(self, graph: Graph, ctx: Context, op: Table, reason: str) -> None:
        record_decline(ctx, self.name, graph.index, [op_label(graph, op)], reason, graph, op)


def record_decline(
    ctx: Context,
    rule: str,
    subgraph: int,
    labels: list[str],
    reason: str,
    graph: Graph | None = None,
    op: Table | None = None,
) -> None:
    """A refusal, in the same shape as a rewrite: rule, subgraph, ops, and a reason.

    With ``op``, also ``outputs``: its output tensors' names as the written model has them (an
    op a rule moved has a new output tensor; ``ops`` keeps the input model's name).
    """
    entry = {"rule": rule, "subgraph": subgraph, "ops": labels, "reason": reason}
    if graph is not None and op is not None:
        entry["outputs"] = [graph.name(t) for t in op.outputs]
    ctx.declines[(rule, subgraph, tuple(labels), reason)] = entry
