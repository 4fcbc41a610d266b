"""Pre-activation BatchNorm (ResNet-V2, DenseNet): move the scale forward, push the shift back.

Math (DESIGN.md 3.3). A BN before a ReLU is ``relu(s * x + t)``. Where every s > 0::

    relu(s * x + t) = s * relu(x + t / s)

1. ``move_scale_forward``: the MUL goes, the ADD keeps its ReLU with the constant t / s, and
   s is absorbed by every consumer: into the input channels of CONV_2D, DEPTHWISE_CONV_2D,
   FULLY_CONNECTED, CONV_3D, TRANSPOSE_CONV (exact for any padding, a padded zero stays zero),
   also through ops that commute with a positive per-channel scale (MAX_POOL_2D,
   AVERAGE_POOL_2D, MEAN over spatial axes, PAD with zeros, RESHAPE keeping the channel axis).
   Without a ReLU (``s * x + t`` before a padded conv) the same holds for any s != 0:
   s * x + t = s * (x + t / s). A ReLU fused in the MUL alone: relu(s * x) = s * relu(x).
2. ``push_shift_backward``: an ADD of a per-channel constant d (with ReLU or none) disappears
   when x + d can be produced upstream: d is added to the bias of the layer producing x, also
   through a residual ADD (into one branch) and MAX_POOL_2D / AVERAGE_POOL_2D (which commute
   with a per-channel shift) or a channel CONCATENATION (slice by slice). Every other consumer
   of a shifted tensor is compensated exactly: a residual ADD subtracts d from the layer bias
   on its other branch, a following BN's ADD constant takes -s2 * d, an unpadded conv's bias
   takes -W . d; pools pass the compensation on to their consumers. A shift never crosses a
   zero PAD (the padded border would change). The ADD becomes a plain RELU (or vanishes).

What cannot be proven exact stays, and the report says which BN, which step and why.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field

import numpy as np

from ..graph import Graph
from ..model import Table
from .backward import layer_bias, set_layer_bias
from .base import Context, Decline, Rule
from .chain import make_linear
from .forward import is_uniform, plan_consumer
from .predicates import (
    LAYERS,
    Affine,
    activation_code,
    affine_of,
    fused_activation,
    has_fused_activation_slot,
    is_float_constant,
    layer_weight_shape,
    require_finite,
    require_float32,
    spatial_padding_is_zero,
)

SCALE_COMMUTING = ("MAX_POOL_2D", "AVERAGE_POOL_2D", "MEAN", "PAD", "RESHAPE")
SHIFT_COMMUTING = ("MAX_POOL_2D", "AVERAGE_POOL_2D")
MAX_DEPTH = 64


@dataclass
class Plan:
    """Constant changes to make together once every check has passed (keyed by id of the op)."""

    # new weights, new bias of layers that absorb a scale
    weights: dict[int, tuple[Table, np.ndarray]] = field(default_factory=dict)
    biases: dict[int, tuple[Table, np.ndarray]] = field(default_factory=dict)
    # additions to layer biases and to ADD constants that carry or compensate a shift
    bias_deltas: dict[int, tuple[Table, np.ndarray]] = field(default_factory=dict)
    constant_deltas: dict[int, tuple[Table, np.ndarray]] = field(default_factory=dict)
    visited: set[int] = field(default_factory=set)
    target: str = "float"

    def add_bias(self, layer: Table, delta: np.ndarray) -> None:
        old = self.bias_deltas.get(id(layer), (layer, 0.0))[1]
        self.bias_deltas[id(layer)] = (layer, old + delta)

    def add_constant(self, op: Table, delta: np.ndarray) -> None:
        old = self.constant_deltas.get(id(op), (op, 0.0))[1]
        self.constant_deltas[id(op)] = (op, old + delta)


class Structural(Decline):
    """A refusal of a shift walk that depends only on the graph and on which channels of the
    shift are nonzero, never on the shift's values, the walk's depth or the tensors it has
    visited: the same walk from the same tensor refuses again, the same way, until the graph
    changes. Every other Decline in a walk is taken as depending on more (see :class:`Walks`)."""


@dataclass
class Walks:
    """Shift walks that failed, remembered by one pass of push_shift_backward until a rewrite
    changes the graph (``forget``).

    In a DenseNet block every BN's shift walks down the same chain of concatenations to the
    block's input and fails there (a RELU also reads it); remembering the failed walk below
    each concatenation makes the block linear instead of quadratic in its layers.

    A walk's failure is kept only when it is :class:`Structural` and no other refusal was met
    on the way (``contextual`` counts those, caught or not: a residual ADD whose first branch
    failed for a contextual reason may take that branch elsewhere). With the tensors the walk
    looked at and how deep it went, a remembered failure is raised again only where the walk
    itself would reach it: no tensor of it visited already and no step beyond MAX_DEPTH. The
    decision and its message are then the walk's own.
    """

    failed: dict[tuple, tuple[tuple, int, frozenset]] = field(default_factory=dict)
    contextual: int = 0
    trace: list[int] = field(default_factory=list)  # tensors the walks looked at, in order
    deepest: int = 0

    def forget(self) -> None:
        self.failed.clear()


# scale -------------------------------------------------------------------------------------
def crosses_with_the_scale(graph: Graph, op: Table, tensor: int) -> bool:
    """Whether a per-channel scale on ``tensor`` moves through ``op`` (one of SCALE_COMMUTING,
    taking ``tensor`` as its data input and keeping the channel axis) on its way forward."""
    return (
        op.opcode.name in SCALE_COMMUTING and op.inputs[0] == tensor and _channel_keeping(graph, op)
    )


def _channel_keeping(graph: Graph, op: Table) -> bool:
    kind = op.opcode.name
    x, y = op.inputs[0], op.outputs[0]
    if graph.shape(x)[-1:] != graph.shape(y)[-1:]:
        return False
    if kind == "MEAN":
        axes = graph.constant(op.inputs[1]).reshape(-1) if graph.is_constant(op.inputs[1]) else None
        rank = len(graph.shape(x))
        return axes is not None and rank > 0 and all(0 < (a % rank) < rank - 1 for a in axes)
    if kind == "PAD":
        if not graph.is_constant(op.inputs[1]):
            return False
        paddings = graph.constant(op.inputs[1])
        return paddings.shape[0] == len(graph.shape(x)) and not np.any(paddings[-1])
    if kind in ("MAX_POOL_2D", "AVERAGE_POOL_2D"):
        return fused_activation(op) in ("NONE", "RELU")
    return kind == "RESHAPE"


def plan_scale(
    graph: Graph,
    tensor: int,
    scale: np.ndarray,
    plan: Plan,
    depth: int = 0,
    constant: np.ndarray | None = None,
) -> None:
    """Plan for every consumer of ``tensor`` to absorb a non-negative per-channel ``scale``.

    ``constant``: the value a channel with scale 0 holds everywhere (relu(t)); consumers add
    its contribution to their bias, which is exact only where they apply no padding.
    """
    constant = np.zeros_like(scale) if constant is None else constant
    if depth > MAX_DEPTH:
        raise Decline("the scale would travel too far")
    if graph.is_graph_output(tensor):
        raise Decline(f"{graph.name(tensor)!r} is a graph output")
    consumers = graph.consumers_of(tensor)
    if not consumers:
        raise Decline(f"{graph.name(tensor)!r} has no consumers")
    for consumer in consumers:
        kind = consumer.opcode.name
        if kind in LAYERS:
            if id(consumer) in plan.weights:
                raise Decline(f"{kind} reads the scaled tensor twice")
            affine = Affine(consumer, tensor, scale, constant)
            weights, bias = plan_consumer(graph, consumer, affine, tensor, plan.target)
            plan.weights[id(consumer)] = (consumer, weights)
            if np.any(constant):
                plan.biases[id(consumer)] = (consumer, bias)
        elif crosses_with_the_scale(graph, consumer, tensor):
            require_float32(graph, consumer.outputs[0], f"{kind} output")
            order_based = kind == "MAX_POOL_2D" or fused_activation(consumer) == "RELU"
            if order_based and (scale < 0).any():
                raise Decline(f"{kind} (max or fused RELU) does not commute with a negative scale")
            if kind == "PAD" and np.any(constant):
                raise Decline(
                    "a channel with scale 0 holds a constant, which a zero PAD changes at the border"
                )
            plan_scale(graph, consumer.outputs[0], scale, plan, depth + 1, constant)
        elif kind == "MUL" and _is_product_passing(graph, consumer, tensor):
            # a * (s * b) = s * (a * b): the scale passes a product of two tensors
            if np.any(constant):
                raise Decline(
                    "a channel with scale 0 holds a constant, which a product does not keep"
                )
            if fused_activation(consumer) == "RELU" and (scale < 0).any():
                raise Decline("MUL with fused RELU does not commute with a negative scale")
            plan_scale(graph, consumer.outputs[0], scale, plan, depth + 1)
        else:
            raise Decline(
                f"consumer {kind} of {graph.name(tensor)!r} cannot absorb a per-channel scale"
            )


def _is_product_passing(graph: Graph, mul: Table, tensor: int) -> bool:
    """A MUL of two computed tensors, one of them ``tensor``, keeping the channel axis."""
    if len(mul.inputs) != 2 or list(mul.inputs).count(tensor) != 1 or len(mul.outputs) != 1:
        return False
    if any(graph.is_constant(t) for t in mul.inputs) or fused_activation(mul) not in (
        "NONE",
        "RELU",
    ):
        return False
    out = mul.outputs[0]
    return graph.dtype(out) == "FLOAT32" and graph.shape(out)[-1:] == graph.shape(tensor)[-1:]


def apply_weights(graph: Graph, plan: Plan) -> None:

    for layer, weights in plan.weights.values():
        position = LAYERS[layer.opcode.name].weight_input
        graph.set_constant(layer, position, weights.astype(np.float32, copy=False))
    for layer, bias in plan.biases.values():
        set_layer_bias(graph, layer, bias)


def _widens(plan: Plan, scale: np.ndarray) -> bool:
    """Whether a non-uniform scale went into input channels of per-output-channel weights."""
    return not is_uniform(scale) and any(
        layer.opcode.name != "DEPTHWISE_CONV_2D" for layer, _ in plan.weights.values()
    )


def _relu_would_stay_alone(graph: Graph, tensor: int) -> str | None:
    """Why a RELU reading ``tensor`` could not be fused into its producer, or None."""
    producer = graph.producer_of(tensor)
    if producer is None:
        return f"{graph.name(tensor)!r} is a graph input"
    if not has_fused_activation_slot(producer) or fused_activation(producer) != "NONE":
        return (
            f"{producer.opcode.name} producing {graph.name(tensor)!r} has no free activation slot"
        )
    if graph.is_graph_output(tensor) or len(graph.consumers_of(tensor)) != 1:
        return f"{graph.name(tensor)!r} has other consumers"
    return None


class MoveScaleForward(Rule):
    bare_only = False
    name = "move_scale_forward"
    summary = "pre-activation BN: relu(s*x+t) = s*relu(x+t/s) for s>0; s goes into the following layers (through pools, MEAN, zero PAD, RESHAPE)"

    def apply(self, graph: Graph, ctx: Context) -> int:
        count = 0
        for mul in graph.live_ops("MUL"):
            try:
                affine = affine_of(graph, mul)
            except Decline:
                continue
            shift_op, shift_affine = self._following_shift_affine(graph, mul)
            mul_act = fused_activation(mul)
            bare = shift_op is None and mul_act == "NONE"  # e.g. a hard-swish's 1/6
            if (shift_op is None and mul_act not in ("RELU", "NONE")) or bare != self.bare_only:
                continue
            try:
                labels = self.labels(graph, [mul] + ([shift_op] if shift_op else []))
                reason = ctx.excluded(graph, mul, *([shift_op] if shift_op else []))
                if reason:
                    raise Decline(reason)
                scale = affine.scale
                relu = mul_act == "RELU" or (
                    shift_op is not None and fused_activation(shift_op) == "RELU"
                )
                if relu and (scale < 0).any():
                    bad = np.flatnonzero(scale < 0)
                    raise Decline(
                        f"scale is not positive in {len(bad)} channel(s) (first: {int(bad[0])}: "
                        f"{scale[bad[0]]:.3g}), so it cannot pass the RELU"
                    )
                zero = scale == 0
                if zero.any() and not relu:
                    raise Decline("scale is zero in some channel")
                plan = Plan(target=ctx.target)
                if shift_op is None:  # relu(0 * x) = 0: a zero-scale channel holds 0
                    plan_scale(graph, mul.outputs[0], scale, plan)
                else:
                    # relu(0 * x + t) = relu(t): a zero-scale channel holds that constant
                    shift = shift_affine.shift
                    new_shift = np.where(zero, 0.0, shift / np.where(zero, 1.0, scale))
                    require_finite(new_shift)
                    constant = np.where(zero, np.maximum(shift, 0.0), 0.0)
                    plan_scale(graph, shift_op.outputs[0], scale, plan, constant=constant)
                reason = ctx.excluded(graph, *(layer for layer, _ in plan.weights.values()))
                if reason:
                    raise Decline(reason)
            except Decline as decline:
                if not bare:  # a bare MUL's refusals are the forward and backward folds' to report
                    self.declined(
                        graph,
                        ctx,
                        shift_op or mul,
                        f"scale {graph.name(mul.outputs[0])!r} not moved forward: {decline}",
                    )
                continue
            apply_weights(graph, plan)
            if bare:
                graph.replace_uses(mul.outputs[0], affine.data)
                graph.remove_op(mul)
            elif shift_op is None:
                graph.set_op_type(mul, "RELU", 1)
                mul.builtinOptions = None
                graph.replace_input(mul, 0, affine.data)
                graph.replace_input(mul, 1, -1)
                mul.inputs = [affine.data]
            else:
                make_linear(
                    graph,
                    shift_op,
                    "ADD",
                    affine.data,
                    new_shift,
                    activation_code(shift_op),
                )
                graph.remove_op(mul)
            self.rewrote(
                graph,
                ctx,
                labels,
                f"scale moved into {len(plan.weights)} following layer(s)",
                changed=self.labels(graph, [layer for layer, _ in plan.weights.values()]),
                **({"scaled_input_channels": True} if _widens(plan, scale) else {}),
            )
            count += 1
        return count

    @staticmethod
    def _following_shift(graph: Graph, mul: Table) -> Table | None:
        """The ADD/SUB by a constant that alone consumes a MUL without activation."""
        return MoveScaleForward._following_shift_affine(graph, mul)[0]

    @staticmethod
    def _following_shift_affine(graph: Graph, mul: Table) -> tuple[Table | None, Affine | None]:
        """:meth:`_following_shift` and, when there is one, its reading as an affine map."""
        if fused_activation(mul) != "NONE" or graph.is_graph_output(mul.outputs[0]):
            return None, None
        users = graph.consumers_of(mul.outputs[0])
        if len(users) != 1 or users[0].opcode.name not in ("ADD", "SUB"):
            return None, None
        try:
            affine = affine_of(graph, users[0])
        except Decline:
            return None, None
        if (affine.scale != 1).any() or fused_activation(users[0]) not in ("NONE", "RELU"):
            return None, None
        return users[0], affine


class MoveBareScaleForward(MoveScaleForward):
    """The same move for a MUL by a constant with no ADD and no RELU after it (a hard-swish's 1/6).

    Off by default: on MobileNetV3Large (224x224) it removes 9 of 17 MULs, exactly, yet LiteRT's
    XNNPACK runs the result about 5% slower (0.95x at 1 thread), so it is for other runtimes.
    """

    bare_only = True
    default = False
    name = "move_bare_scale_forward"
    summary = "a MUL by a constant without ADD or RELU (hard-swish's 1/6) moves through products into the next layers; off by default: 0.95x on XNNPACK for MobileNetV3"


# shift -------------------------------------------------------------------------------------
def push_shift(
    graph: Graph,
    tensor: int,
    delta: np.ndarray,
    plan: Plan,
    exclude: Table | None,
    depth: int = 0,
    walks: Walks | None = None,
) -> None:
    """Plan for ``tensor`` to become tensor + delta, with every consumer but ``exclude`` compensated.

    ``walks``: failed walks to remember and to raise again without walking (a rule pass's own).
    """
    if walks is None:
        walks = Walks()
    key = (tensor, id(exclude), (delta != 0).tobytes())
    known = walks.failed.get(key)
    if known is not None:
        args, reach, seen = known
        if depth + reach <= MAX_DEPTH and seen.isdisjoint(plan.visited):
            walks.trace.extend(seen)
            walks.deepest = max(walks.deepest, depth + reach)
            raise Structural(*args)
    contextual, start, deepest = walks.contextual, len(walks.trace), walks.deepest
    walks.deepest = depth
    try:
        _push_shift(graph, tensor, delta, plan, exclude, depth, walks)
    except Structural as error:
        if walks.contextual == contextual:
            seen = frozenset(walks.trace[start:])
            # its words, not the exception: that holds the walk's frames, which hold ``walks``
            # (a cycle keeping the whole model alive until the cycle collector runs)
            walks.failed[key] = (error.args, walks.deepest - depth, seen)
        raise
    finally:
        walks.deepest = max(deepest, walks.deepest)


def _push_shift(
    graph: Graph,
    tensor: int,
    delta: np.ndarray,
    plan: Plan,
    exclude: Table | None,
    depth: int,
    walks: Walks,
) -> None:
    if depth > MAX_DEPTH:
        raise Decline("the shift would travel too far")
    walks.trace.append(tensor)
    if tensor in plan.visited:
        raise Decline(f"the shift reaches {graph.name(tensor)!r} twice")
    plan.visited.add(tensor)
    producer = graph.producer_of(tensor)
    if producer is None:
        raise Structural(f"{graph.name(tensor)!r} is a graph input or constant")
    kind = producer.opcode.name
    if (
        fused_activation(producer) not in ("NONE",)
        and producer.get("builtinOptions") is not None
        and "fusedActivationFunction" in producer.builtinOptions.fields()
    ):
        raise Structural(
            f"{kind} producing {graph.name(tensor)!r} has fused {fused_activation(producer)}"
        )
    if kind in LAYERS:
        require_float32(graph, tensor, f"{kind} output")
        layer_weight_shape(graph, producer)  # not its values: folded ones would be computed
        plan.add_bias(producer, delta)
    elif kind in ("ADD", "SUB") and all(
        t >= 0 and not graph.is_constant(t) for t in producer.inputs
    ):
        # a residual sum: shift one branch (SUB: only its first operand)
        branches = (
            producer.inputs[:1]
            if kind == "SUB"
            else sorted(producer.inputs, key=lambda t: _branch_preference(graph, t))
        )
        errors = []
        for branch in branches:
            trial = _copy_plan(plan)
            try:
                push_shift(graph, branch, delta, trial, producer, depth + 1, walks)
            except Decline as decline:
                errors.append(str(decline))  # not the exception: it holds this frame
                if not isinstance(decline, Structural):
                    walks.contextual += 1  # another walk may take this branch
                continue
            _adopt(plan, trial)
            break
        else:
            raise Structural(
                f"no branch of the residual {kind} {graph.name(tensor)!r} takes the shift ({'; '.join(errors)})"
            )
    elif (
        kind in ("ADD", "SUB")
        and len(producer.inputs) == 2
        and any(graph.is_constant(t) for t in producer.inputs)
    ):
        affine = affine_of(graph, producer)
        plan.add_constant(producer, delta)
        if (affine.scale != 1).any():
            raise Decline("SUB from a constant")
    elif kind in SHIFT_COMMUTING:
        push_shift(graph, producer.inputs[0], delta, plan, producer, depth + 1, walks)
    elif kind == "CONCATENATION":
        _push_through_concat(graph, producer, delta, plan, depth, walks)
    elif kind in ("PAD", "PADV2"):
        raise Structural(
            f"the shift cannot cross the zero PAD {graph.name(tensor)!r}: the padded border would change"
        )
    else:
        source = producer.inputs[0] if producer.inputs else -1
        if source >= 0 and graph.producer_of(source) is None and not graph.is_constant(source):
            raise Structural(
                f"above {kind} {graph.name(tensor)!r} is the graph input {graph.name(source)!r}, "
                "and no layer there to take a shift"
            )
        raise Structural(f"{kind} producing {graph.name(tensor)!r} cannot take a shift")
    compensate(graph, tensor, delta, plan, exclude, depth + 1, walks)


def _branch_preference(graph: Graph, tensor: int) -> int:
    producer = graph.producer_of(tensor)
    if (
        producer is not None
        and producer.opcode.name in LAYERS
        and len(graph.consumers_of(tensor)) == 1
    ):
        return 0
    return 1


def _is_channel_concat(graph: Graph, concat: Table) -> bool:
    rank = len(graph.shape(concat.outputs[0]))
    return (
        rank > 0
        and (concat.get("builtinOptions") or Table("ConcatenationOptions")).get("axis", 0) % rank
        == rank - 1
        and fused_activation(concat) == "NONE"
    )


def _concat_delta(graph: Graph, concat: Table, tensor: int, delta: np.ndarray) -> np.ndarray:
    """The shift a channel CONCATENATION's output carries when its input ``tensor`` carries ``delta``."""
    out = np.zeros(graph.shape(concat.outputs[0])[-1])
    start = 0
    for part in concat.inputs:
        width = graph.shape(part)[-1]
        if part == tensor:
            out[start : start + width] += delta
        start += width
    return out


def _push_through_concat(
    graph: Graph, concat: Table, delta: np.ndarray, plan: Plan, depth: int, walks: Walks
) -> None:
    if not _is_channel_concat(graph, concat):
        raise Structural("CONCATENATION is not along the channel axis")
    start = 0
    for part in concat.inputs:
        width = graph.shape(part)[-1]
        piece = delta[start : start + width]
        start += width
        if piece.any():
            push_shift(graph, part, piece, plan, concat, depth + 1, walks)


def compensate(
    graph: Graph,
    tensor: int,
    delta: np.ndarray,
    plan: Plan,
    exclude: Table | None,
    depth: int,
    walks: Walks,
) -> None:
    """``tensor`` now carries +delta: keep every consumer but ``exclude`` computing what it did."""
    if graph.is_graph_output(tensor):
        raise Structural(f"the shifted tensor {graph.name(tensor)!r} is a graph output")
    for consumer in graph.consumers_of(tensor):
        if consumer is exclude:
            continue
        kind = consumer.opcode.name
        others = [t for t in consumer.inputs if t != tensor]
        if (
            kind in ("ADD", "SUB")
            and len(consumer.inputs) == 2
            and others
            and not graph.is_constant(others[0])
        ):
            # a residual sum: take delta back out of the other branch
            sign = -1.0 if kind == "ADD" else 1.0  # a - (b + d) and (a + d) - b both need b + d
            push_shift(graph, others[0], sign * delta, plan, consumer, depth + 1, walks)
        elif kind in ("ADD", "SUB") and len(others) == 1 and graph.is_constant(others[0]):
            affine = affine_of(graph, consumer)
            if (affine.scale != 1).any():
                raise Decline("SUB from a constant reads the shifted tensor")
            plan.add_constant(consumer, -delta)
        elif (
            kind == "MUL"
            and len(others) == 1
            and is_float_constant(graph, others[0])
            and fused_activation(consumer) == "NONE"
        ):
            affine = affine_of(graph, consumer)
            compensate(
                graph, consumer.outputs[0], affine.scale * delta, plan, None, depth + 1, walks
            )
        elif kind in SHIFT_COMMUTING and fused_activation(consumer) == "NONE":
            compensate(graph, consumer.outputs[0], delta, plan, None, depth + 1, walks)
        elif kind == "CONCATENATION" and _is_channel_concat(graph, consumer):
            compensate(
                graph,
                consumer.outputs[0],
                _concat_delta(graph, consumer, tensor, delta),
                plan,
                None,
                depth + 1,
                walks,
            )
        elif (
            kind in LAYERS
            and kind != "TRANSPOSE_CONV"
            and consumer.inputs[LAYERS[kind].data_input] == tensor
        ):
            if kind != "FULLY_CONNECTED" and not spatial_padding_is_zero(graph, consumer):
                raise Structural(
                    f"{kind} reading {graph.name(tensor)!r} pads its input, so a shift cannot be compensated there"
                )
            _, bias = plan_consumer(
                graph, consumer, Affine(consumer, tensor, np.ones_like(delta), -delta), tensor
            )
            shape = layer_weight_shape(graph, consumer)
            plan.add_bias(
                consumer,
                bias - layer_bias(graph, consumer, shape[LAYERS[kind].output_channel_axis]),
            )
        elif kind in ("RELU", "RELU6", "RELU_N1_TO_1"):
            raise Structural(
                f"{kind} {graph.name(consumer.outputs[0])!r} also reads {graph.name(tensor)!r} "
                "(a BN whose own shift already went upstream), and an activation cannot be compensated"
            )
        else:
            raise Structural(
                f"consumer {kind} of the shifted tensor {graph.name(tensor)!r} cannot be compensated"
            )


def _copy_plan(plan: Plan) -> Plan:
    return Plan(**{f.name: copy.copy(getattr(plan, f.name)) for f in dataclasses.fields(plan)})


def _adopt(plan: Plan, trial: Plan) -> None:
    for f in dataclasses.fields(plan):
        setattr(plan, f.name, getattr(trial, f.name))


Change = tuple[str, Table, np.ndarray, int]  # (bias or shift, op, new values, a shift's data)


def materialize(graph: Graph, plan: Plan) -> list[Change]:
    """The new bias and ADD constants a plan makes, checked finite, before anything changes."""

    changes = []
    for layer, delta in plan.bias_deltas.values():
        layout = LAYERS[layer.opcode.name]
        channels = graph.shape(layer.inputs[layout.weight_input])[layout.output_channel_axis]
        bias = layer_bias(graph, layer, channels) + delta
        require_finite(bias)
        changes.append(("bias", layer, bias, -1))
    for op, delta in plan.constant_deltas.values():
        affine = affine_of(graph, op)
        shift = affine.shift + delta
        require_finite(shift)
        changes.append(("shift", op, shift, affine.data))
    return changes


def apply_changes(graph: Graph, changes: list[Change]) -> None:
    """Make the changes :func:`materialize` planned (each op's own inputs: none changes another's)."""
    for kind, op, value, data in changes:
        if kind == "bias":
            set_layer_bias(graph, op, value)
        else:
            make_linear(graph, op, "ADD", data, value, activation_code(op))


def _after_own_scale(graph: Graph, tensor: int) -> bool:
    """Whether ``tensor`` is the output of a MUL/DIV by a per-channel constant (a BN's first half)."""
    producer = graph.producer_of(tensor)
    if producer is None or producer.opcode.name not in ("MUL", "DIV"):
        return False
    try:
        affine_of(graph, producer)
    except Decline:
        return False
    return True


class PushShiftBackward(Rule):
    name = "push_shift_backward"
    summary = "an ADD of a per-channel constant (with or without RELU) goes into the biases upstream, across residual ADDs, pools and concats, compensated exactly on the other consumers"

    def apply(self, graph: Graph, ctx: Context) -> int:
        count = 0
        walks = Walks()
        for op in graph.live_ops("ADD", "SUB"):
            try:
                affine = affine_of(graph, op)
            except Decline:
                continue
            if fused_activation(op) not in ("NONE", "RELU") or (
                op.opcode.name == "SUB" and (affine.scale != 1).any()  # constant - x
            ):
                continue
            if _after_own_scale(graph, affine.data):
                continue  # the BN's MUL is still there: move_scale_forward says why
            try:
                reason = ctx.excluded(graph, op)
                if reason:
                    raise Decline(reason)
                if graph.is_graph_output(op.outputs[0]) and fused_activation(op) == "NONE":
                    raise Decline(f"{graph.name(op.outputs[0])!r} is a graph output")
                if ctx.target == "int8" and fused_activation(op) == "RELU":
                    alone = _relu_would_stay_alone(graph, affine.data)
                    if alone:
                        raise Decline(
                            f"--target int8: its RELU would be left as an op of its own "
                            f"({alone}), which int8 delegates run as a separate partition"
                        )
                plan = Plan()
                push_shift(graph, affine.data, affine.shift, plan, op, walks=walks)
                if id(op) in plan.constant_deltas:
                    raise Decline("the compensation would reach this ADD itself")
                changes = materialize(graph, plan)
                reason = ctx.excluded(graph, *(change[1] for change in changes))
                if reason:
                    raise Decline(reason)
            except Decline as decline:
                self.declined(graph, ctx, op, f"shift not pushed backward: {decline}")
                continue
            labels = self.labels(graph, [op])
            changed = self.labels(graph, [change[1] for change in changes])
            walks.forget()  # the graph changes: what failed may pass now
            apply_changes(graph, changes)
            if fused_activation(op) == "RELU":
                graph.set_op_type(op, "RELU", 1)
                op.builtinOptions = None
                constant_position = 1 if op.inputs[0] == affine.data else 0
                graph.replace_input(op, constant_position, -1)
                op.inputs = [affine.data]
            else:
                graph.replace_uses(op.outputs[0], affine.data)
                graph.remove_op(op)
            self.rewrote(
                graph,
                ctx,
                labels,
                f"shift pushed into {len(plan.bias_deltas)} bias(es) upstream, {len(plan.constant_deltas)} constant(s) compensated",
                changed=changed,
            )
            count += 1
        return count


POSITIVE_EPSILON = 1e-10


class MakeGammaPositive(Rule):
    """APPROXIMATE, off by default (Samsung ONE's make_batchnorm_gamma_positive).

    In a pre-activation BN ``x -> MUL s -> ADD t (RELU)``, every s <= 0 is replaced by a tiny
    positive value so that ``move_scale_forward`` can fold the BN. This changes what the model
    computes in those channels (relu(s*x + t) becomes about relu(t)); run with --verify to see
    the maximum output difference it causes.
    """

    name = "make_gamma_positive"
    summary = "APPROXIMATE: in a pre-activation BN, replace scales <= 0 by 1e-10 so it folds (ONE's make_batchnorm_gamma_positive); check with --verify"
    approximate = True
    default = False

    def apply(self, graph: Graph, ctx: Context) -> int:

        count = 0
        for mul in graph.live_ops("MUL"):
            shift_op = MoveScaleForward._following_shift(graph, mul)
            if (
                shift_op is None
                or fused_activation(shift_op) != "RELU"
                or ctx.excluded(graph, mul, shift_op)
            ):
                continue
            try:
                affine = affine_of(graph, mul)
            except Decline:
                continue
            bad = affine.scale <= 0
            if not np.any(bad):
                continue
            labels = self.labels(graph, [mul, shift_op])
            make_linear(
                graph, mul, "MUL", affine.data, np.where(bad, POSITIVE_EPSILON, affine.scale), 0
            )
            self.rewrote(
                graph,
                ctx,
                labels,
                f"APPROXIMATE: {int(bad.sum())} scale(s) <= 0 replaced by {POSITIVE_EPSILON:g}",
                approximate=True,
            )
            count += 1
        return count
