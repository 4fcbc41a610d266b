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
        """``TYPE:output-name`` of each op: take them before a rewrite renames outputs."""
        return [
            f"{op.opcode.name}:{graph.name(op.outputs[0]) if op.outputs else '?'}" for op in ops
        ]

    def rewrote(
        self, graph: Graph, ctx: Context, labels: list[str], detail: str, **extra: Any
    ) -> None:
        entry = {"rule": self.name, "subgraph": graph.index, "ops": labels, "detail": detail}
        entry.update(extra)
        ctx.rewrites.append(entry)

    def declined(self, graph: Graph, ctx: Context, op: Table, reason: str) -> None:
        where = f"subgraph {graph.index}: {op.opcode.name} -> {graph.name(op.outputs[0]) if op.outputs else '?'}"
        ctx.declines[(self.name, where, reason)] = {
            "rule": self.name,
            "where": where,
            "reason": reason,
        }
