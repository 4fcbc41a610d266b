"""Standalone BN as one op: a MUL s -> ADD t pair that cannot fold becomes DEPTHWISE_CONV_2D 1x1.

Math (DESIGN.md 3.10): a 1x1 depthwise convolution with weights s (shape [1, 1, 1, C]), bias t,
stride 1 and VALID padding computes s * x + t per channel, with the ADD's fused activation.
One op instead of two, and per-channel in int8 later. Off by default: use it where it
measures faster (``make bench`` shows the latency) or when the user asks.

Exact when the MUL has no fused activation and one consumer (the ADD), the input is a rank-4
float32 NHWC tensor, and both constants are per-channel.
"""

from __future__ import annotations

import numpy as np

from ..graph import Graph
from ..model import Table
from .base import Context, Decline, Rule
from .preactivation import MoveScaleForward
from .predicates import affine_of, fused_activation


class StandaloneBnToDepthwise(Rule):
    name = "standalone_bn_to_depthwise"
    summary = (
        "a MUL -> ADD pair that cannot fold becomes one DEPTHWISE_CONV_2D 1x1 (weights s, bias t)"
    )
    default = False

    def apply(self, graph: Graph, ctx: Context) -> int:
        count = 0
        for mul in graph.live_ops("MUL"):
            add = MoveScaleForward._following_shift(graph, mul)
            if add is None:
                continue
            try:
                affine = affine_of(graph, mul)
                shift = affine_of(graph, add).shift
                if len(graph.shape(affine.data)) != 4:
                    raise Decline("the input is not a rank-4 NHWC tensor")
                reason = ctx.excluded(graph, mul, add)
                if reason:
                    raise Decline(reason)
            except Decline as decline:
                self.declined(graph, ctx, add, f"not turned into DEPTHWISE_CONV_2D: {decline}")
                continue
            labels = self.labels(graph, [mul, add])
            channels = len(affine.scale)
            name = graph.name(add.outputs[0])
            weights = graph.add_constant(
                f"{name}/dw_weights", affine.scale.reshape(1, 1, 1, channels).astype(np.float32)
            )
            bias = graph.add_constant(f"{name}/dw_bias", shift.astype(np.float32))
            activation = (
                add.builtinOptions.fusedActivationFunction if fused_activation(add) != "NONE" else 0
            )
            graph.set_op_type(add, "DEPTHWISE_CONV_2D", 1)
            add.builtinOptions = Table(
                "DepthwiseConv2DOptions",
                padding=1,
                strideW=1,
                strideH=1,
                depthMultiplier=1,
                fusedActivationFunction=activation,
                dilationWFactor=1,
                dilationHFactor=1,
            )
            graph.replace_input(add, 0, affine.data)
            graph.replace_input(add, 1, weights)
            graph.append_input(add, bias)
            graph.remove_op(mul)
            self.rewrote(graph, ctx, labels, "MUL and ADD became one DEPTHWISE_CONV_2D 1x1")
            count += 1
        return count
