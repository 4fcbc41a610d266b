"""Move a per-channel MUL / ADD / SUB / DIV up past an op that only rearranges elements per channel.

Math (DESIGN.md 3.7). BATCH_TO_SPACE_ND (a dilated conv as the converter emits it:
SPACE_TO_BATCH_ND -> CONV_2D -> BATCH_TO_SPACE_ND) and a RESHAPE that keeps the last axis only
move, or crop, elements without mixing channels, so for a per-channel affine map f
(and any fused activation, which is elementwise)::

    f(rearrange(y)) = rearrange(f(y))

Moving the op above the rearrangement puts it right after the layer, where
``fold_into_preceding_layer`` takes it.

Exact when the rearrangement's output has no other consumer and is not a graph output, the
constant is per-channel, and the channel axis is the last axis on both sides. The op keeps
its output tensor (name, shape) at the end of the pattern.
"""

from __future__ import annotations

import numpy as np

from ..graph import Graph
from .base import Context, Decline, Rule
from .chain import make_linear
from .predicates import LAYERS, LINEAR_OPS, activation_code, affine_of, has_one_consumer

REARRANGING = ("BATCH_TO_SPACE_ND", "RESHAPE")


class MoveBeforeRearrangement(Rule):
    name = "move_before_rearrangement"
    summary = "a per-channel MUL/ADD/SUB/DIV after BATCH_TO_SPACE_ND (dilated conv) or a channel-keeping RESHAPE moves above it, next to the layer"

    def apply(self, graph: Graph, ctx: Context) -> int:
        count = 0
        for op in graph.live_ops(*LINEAR_OPS):
            try:
                affine = affine_of(graph, op)
            except Decline:
                continue
            mover = graph.producer_of(affine.data)
            if mover is None or mover.opcode.name not in REARRANGING:
                continue
            source = mover.inputs[0]
            producer = graph.producer_of(source)
            if producer is None or producer.opcode.name not in LAYERS:
                continue  # only worth it when a layer waits above
            try:
                reason = ctx.excluded(graph, op, mover)
                if reason:
                    raise Decline(reason)
                if not has_one_consumer(graph, affine.data):
                    raise Decline(
                        f"{graph.name(affine.data)!r} has other consumers or is a graph output"
                    )
                if (
                    graph.shape(source)[-1:] != graph.shape(affine.data)[-1:]
                    or graph.dtype(source) != "FLOAT32"
                ):
                    raise Decline(f"{mover.opcode.name} does not keep the channel axis")
                if np.any(affine.shift) and np.any(affine.scale != 1):
                    raise Decline("SUB from a constant is left where it is")
            except Decline as decline:
                self.declined(graph, ctx, op, f"not moved above {mover.opcode.name}: {decline}")
                continue
            labels = self.labels(graph, [mover, op])
            out = op.outputs[0]
            moved = graph.add_tensor_like(
                source, f"{graph.name(out)}/before_{mover.opcode.name.lower()}"
            )
            # rewritten with a [C] constant: the old one may have more dimensions than ``source``
            kind, vector = ("ADD", affine.shift) if np.any(affine.shift) else ("MUL", affine.scale)
            make_linear(graph, op, kind, source, vector, activation_code(op))
            graph.set_output(op, 0, moved)
            graph.replace_input(mover, 0, moved)
            graph.set_output(mover, 0, out)
            graph.move_before(op, mover)
            self.rewrote(graph, ctx, labels, f"{op.opcode.name} moved above {mover.opcode.name}")
            count += 1
        return count
