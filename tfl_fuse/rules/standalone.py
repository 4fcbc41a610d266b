"""Standalone BN as one op: a MUL s -> ADD t pair that cannot fold becomes DEPTHWISE_CONV_2D 1x1.

Math (DESIGN.md 3.10): a 1x1 depthwise convolution with weights s (shape [1, 1, 1, C]), bias t,
stride 1 and VALID padding computes s * x + t per channel, with the ADD's fused activation.
One op instead of two, and per-channel in int8 later. Off by default: use it where it
measures faster (``make bench`` shows the latency) or when the user asks.

On by default with ``--target int8`` (DESIGN.md 3b), for what the exact folds leave: a quantizer
gives the depthwise weights one int8 scale per channel, so s and t are represented exactly per
channel and the pair runs as one delegated op with one rounding, where an int8 MUL and ADD round
their constants to one per-tensor scale and round the tensor between them. There it also takes
the ADD's RELU6 or RELU_N1_TO_1, and a lone MUL or ADD whose constant differs across channels
(``x -> MUL s (act)`` = DW 1x1 with bias 0; ``x -> ADD t (act)`` = DW 1x1 with weights 1).

            x                          x
            |                          |
         MUL s           =>     DEPTHWISE_CONV_2D 1x1
            |                  (weights s, bias t, act)
       ADD t (act)                     |
            |                          y
            y

Exact when the MUL has no fused activation and one consumer (the ADD), the input is a rank-4
float32 NHWC tensor, and both constants are per-channel. With ``--target int8``, not where a
channel's scale is zero (or tiny) and its shift is not: a quantizer gives the bias a scale
proportional to the weight's, which could not hold the shift.
"""

from __future__ import annotations

import numpy as np

from ..graph import Graph
from ..model import Table
from .base import Context, Decline, Rule
from .forward import is_uniform
from .predicates import ACTIVATIONS, affine_of, fused_activation, has_one_consumer

DEPTHWISE_ACTIVATIONS = ("NONE", "RELU", "RELU6", "RELU_N1_TO_1")


def following_shift(graph: Graph, mul: Table, activations: tuple[str, ...]) -> Table | None:
    """The ADD/SUB by a per-channel constant that alone consumes a MUL without activation."""
    if fused_activation(mul) != "NONE" or not has_one_consumer(graph, mul.outputs[0]):
        return None
    user = graph.consumers_of(mul.outputs[0])[0]
    if user.opcode.name not in ("ADD", "SUB"):
        return None
    try:
        affine = affine_of(graph, user)
    except Decline:
        return None
    if np.any(affine.scale != 1) or fused_activation(user) not in activations:
        return None
    return user


# A quantizer gives the int32 bias of channel c the scale input_scale * |s[c]| / 127: where s[c]
# is zero (or tiny) and t[c] is not, t[c] cannot be represented (measured: a zero-scale channel
# with t = 0.8 made the int8 model 1.7x worse than the untouched one).
MIN_SCALE_PER_SHIFT = 1e-5


def require_representable_bias(scale: np.ndarray, shift: np.ndarray) -> None:
    bad = np.flatnonzero(np.abs(scale) < MIN_SCALE_PER_SHIFT * np.abs(shift))
    if bad.size:
        c = int(bad[0])
        raise Decline(
            f"--target int8: the scale is {'zero' if scale[c] == 0 else 'tiny'} where the shift "
            f"is not in {bad.size} channel(s) (first: {c}: s {scale[c]:.3g}, t {shift[c]:.3g}); "
            "an int8 bias at a scale proportional to s could not hold t"
        )


def become_depthwise(
    graph: Graph, last: Table, data: int, scale: np.ndarray, shift: np.ndarray
) -> None:
    """Turn ``last`` (the pair's last op) into a float DEPTHWISE_CONV_2D 1x1 reading ``data``:
    weights ``scale``, bias ``shift``, the op's own fused activation and output."""
    channels = len(scale)
    name = graph.name(last.outputs[0])
    weights = graph.add_constant(
        f"{name}/dw_weights", scale.reshape(1, 1, 1, channels).astype(np.float32)
    )
    bias = graph.add_constant(f"{name}/dw_bias", shift.astype(np.float32))
    activation = ACTIVATIONS[fused_activation(last)]
    graph.set_op_type(last, "DEPTHWISE_CONV_2D", 1)
    last.builtinOptions = Table(
        "DepthwiseConv2DOptions",
        padding=1,
        strideW=1,
        strideH=1,
        depthMultiplier=1,
        fusedActivationFunction=activation,
        dilationWFactor=1,
        dilationHFactor=1,
    )
    graph.replace_input(last, 0, data)
    graph.replace_input(last, 1, weights)
    graph.append_input(last, bias)


class StandaloneBnToDepthwise(Rule):
    name = "standalone_bn_to_depthwise"
    summary = "a MUL -> ADD pair that cannot fold becomes one DEPTHWISE_CONV_2D 1x1 (weights s, bias t); with --target int8 also a lone per-channel MUL or ADD"
    default = False

    def is_default(self, target: str = "float") -> bool:
        # with dynamic-range quantization next, the depthwise op would quantize its input on the
        # fly, which the float MUL and ADD never do (measured: 1.2x the error on ResNet50V2)
        return target == "int8"

    def apply(self, graph: Graph, ctx: Context) -> int:
        count = 0
        int8 = ctx.target == "int8"
        activations = DEPTHWISE_ACTIVATIONS if int8 else ("NONE", "RELU")
        for op in graph.live_ops("MUL", "ADD", "SUB", "DIV"):
            try:
                affine = affine_of(graph, op)
            except Decline:
                continue
            if op.opcode.name in ("MUL", "DIV"):
                add = following_shift(graph, op, activations)
                mul = op
            else:
                add, mul = op, None
                producer = graph.producer_of(affine.data)
                if producer is not None and following_shift(graph, producer, activations) is op:
                    continue  # the second half of a pair: taken with its MUL
            if add is None or mul is None:
                # a lone MUL or ADD: only with --target int8, where per-channel weights beat a
                # per-tensor int8 constant; a uniform constant quantizes exactly as it is
                if not int8 or fused_activation(op) not in DEPTHWISE_ACTIVATIONS:
                    continue
                if is_uniform(affine.scale) and np.ptp(affine.shift) == 0:
                    continue
            # x -> MUL s -> ADD t, x -> MUL s, x -> ADD t: scale from op, shift from the last op
            scale = affine.scale
            try:
                shift = affine_of(graph, add).shift if mul is not None and add else affine.shift
                if len(graph.shape(affine.data)) != 4:
                    raise Decline("the input is not a rank-4 NHWC tensor")
                if int8:
                    require_representable_bias(scale, shift)
                reason = ctx.excluded(graph, *(o for o in (mul, add) if o is not None))
                if reason:
                    raise Decline(reason)
            except Decline as decline:
                self.declined(
                    graph, ctx, add or op, f"not turned into DEPTHWISE_CONV_2D: {decline}"
                )
                continue
            last = add if add is not None else op
            pair = [o for o in (mul, add) if o is not None]
            labels = self.labels(graph, pair)
            what = " and ".join(o.opcode.name for o in pair)
            become_depthwise(graph, last, affine.data, scale, shift)
            if len(pair) == 2:
                graph.remove_op(mul)
            self.rewrote(graph, ctx, labels, f"{what} became one DEPTHWISE_CONV_2D 1x1")
            count += 1
        return count
