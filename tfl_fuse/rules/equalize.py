"""Cross-layer equalization (Nagel et al., "Data-Free Quantization Through Weight Equalization and
Bias Correction", ICCV 2019, section 4.1), for a float model that a quantizer takes next.

        x                                   x
        |                                   |
    L1 (W1, b1, RELU or none)          L1 (W1 / r, b1 / r)
        |                      =>           |
    (RELU / PRELU)                     (RELU / PRELU)
        |                                   |
    L2 (W2, b2)                        L2 (W2 * r on its input channels, b2)

Math (DESIGN.md 3b). For r > 0 per channel, relu(y / r) = relu(y) / r and prelu(y / r) =
prelu(y) / r (same alphas), so scaling output channel c of L1 (weights and bias) by 1 / r[c] and
input channel c of L2 by r[c] computes the same function. It changes only how a quantizer sees
the layers: the per-channel magnitudes of the tensors between (one int8 scale per tensor) and the
per-output-channel weight ranges of L2 (and of L1 with per-tensor weights).

Residual blocks carry the scale through both branches of their ADDs: a *group* is every layer
writing into a set of tensors joined by ops that commute with a positive per-channel scale (ADD
of two tensors, RELU, PRELU, MAX_POOL_2D, AVERAGE_POOL_2D, RESIZE_BILINEAR,
RESIZE_NEAREST_NEIGHBOR, PAD with zeros, also on the channel axis) and every layer reading from it. Each producer divides its output channel c by r[c], each
consumer multiplies its input channel c by r[c]; a channel joined by ADDs or pools has one r. A
plain pair is the group of one producer and one consumer.

    block input -> DW -> PW -> ADD -> PRELU -> DW -> PW -> ADD -> ...
         \\__________________/ (skip)      \\__________________/

Nagel's choice r[c] = sqrt(range1[c] * range2[c]) / range2[c] (range1: the largest weight of
channel c over the producers, range2: of input channel c over the consumers) makes both ranges
sqrt(range1 * range2).

When it helps: applied blindly it makes some trained networks worse (measured on mediapipe's
face_landmark: 1.03x-1.12x the int8 error). Two ways to decide, per group:

* measured (``--equalize auto``/``measure``, :meth:`EqualizeCrossLayer.finish`): once the other
  rules are done, each candidate group is equalized on a copy of the model and the copy's int8
  error simulated (``quantsim``: the quantizer's weight grid and activation calibration, on
  synthetic inputs, two independent draws). A group is kept when the mean error ratio over the
  outputs is at most 1 - ``MIN_MEASURED_GAIN`` and no output's ratio exceeds 1 + ``NOT_WORSE``
  at two standard errors of the paired per-sample differences. Groups are tried in the order of
  the noise model's predicted gain, each on top of those kept, then all the rest together once
  (small gains that add up). With one weight scale per channel each group is also tried with
  the producers' side of the balance taken halfway (geometric mean) between their weight ranges
  and the calibrated activation ranges of the tensor between (as SmoothQuant balances
  activations against weights), and the better of the two is kept, but only when a per-tensor
  quantizer would not be made more than ``PER_TENSOR_SAFETY`` worse by it (balancing towards
  activations spreads the producers' channels, which per-tensor weights pay for: 6x the error
  on face_detection_short_range without this check). ``make bench-quant`` measures the outcome
  with ai-edge-quantizer: see the README.
* predicted (``--equalize predict``; ``auto`` when the trials would cost more than
  ``SIMULATION_BUDGET``, and when the simulation cannot run): a group is equalized where a model
  of the quantization noise at the consumers' outputs predicts a gain of at least ``MIN_GAIN``.

The noise model sums, over the outputs o of every consumer L2, the variance each rounding adds
there. It needs the size of each channel: ``activation_stats`` estimates a per-channel mean mu[c]
and variance sigma[c]^2 of every tensor data-free, pushing them from the graph inputs through the
layers:

    the tensor L2 reads, one scale per tensor:  (max_c (3 sigma[c] + |mu[c]|) / 255)^2 * sum_c W2[o, c]^2
    L2's weights, step d2[o] = max |W2[o]| / 127: d2[o]^2 * sum_c (sigma[c]^2 + mu[c]^2)
    L1's weights, step d1[c] = max |W1[c]| / 127: sum_c W2[o, c]^2 * d1[c]^2 * sum E[x^2] over L1's inputs

each over 12 (uniform rounding); with per-tensor weights (``--weight-granularity tensor``) the
steps are the whole tensor's. With one scale per channel, L1's term does not change (scaling a
channel scales its step with it) and L2's widens where the activation term narrows. The gain is
the ratio of the sums before and after. ``make bench-cle`` checks the prediction group by group:
it ranks the groups that matter most (an outlier channel: measured 0.78x) but is blind to
effects of a few percent either way, and it misses the largest measured gain (palm_detection_lite's
residual stream, 0.74x with per-tensor weights, predicted 0.50x, i.e. worse) - hence the
simulation.

Exact when every producer has no fused activation or RELU (not RELU6: min(y, 6) / r !=
min(y / r, 6)), every tensor of the group is read only by ops of the group and is no graph
output, consumers read it as their data input, every r is finite and positive, weights and
biases are float32 constants, and consumers are not grouped convs (DEPTHWISE_CONV_2D: depth
multiplier 1, FULLY_CONNECTED: no flattening).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from .. import fb, quantsim
from ..graph import Graph
from ..model import ModelError, Table
from .activation_stats import Stats, activation_statistics
from .backward import layer_bias, scale_along_axis, set_layer_bias
from .base import Context, Decline, Rule
from .predicates import (
    LAYERS,
    fused_activation,
    layer_weights,
    per_channel_vector,
    require_finite,
)

LAYER_KINDS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")
# The predicted gain (noise before / after) a group must reach, by weight granularity: chosen on
# mediapipe's trained face_detection_short_range, face_landmark and palm_detection_lite
# (bench/results.md, make bench-cle). With one scale per channel, a face_landmark group
# predicted at 1.31 measured 1.13x worse alone; at 1.4 no output of the three is worse.
MIN_GAIN = {"channel": 1.4, "tensor": 1.1}
R_LIMIT = 1e3  # no channel scaled by more than this (a dead channel would otherwise explode)
MAX_TIMES = 4  # a group is decided again after its neighbours change, at most this often
MAX_TENSORS = 512  # a group larger than this is left alone (the search stays linear)
# Measured mode (the default of --target int8): a group is kept when its simulated int8 error
# falls by this much on the mean over outputs and grows on none; at most MAX_TRIALS groups are
# simulated, the noise model's most promising first.
MIN_MEASURED_GAIN = 0.05
NOT_WORSE = 0.01  # no output's error ratio may exceed 1 + this at 2 standard errors
# The activation balance (per-channel weights) is used only where a per-tensor quantizer would
# not make any output more than this much worse (simulated) than without the group
PER_TENSOR_SAFETY = 1.1
MAX_TRIALS = 64
# --equalize auto: simulate when the trials cost at most this many G multiply-adds (about 75 s on
# one core of the bench machine); larger models are decided by the noise model
SIMULATION_BUDGET = 500.0
# How a measured trial chooses r: equal weight ranges of the two layers (Nagel), or the tensor
# between against the consumers' weights (the producers' side halfway between their weight
# ranges and the calibrated activation ranges)
BALANCES = {
    "weights": lambda ranges: None,
    "activations": lambda ranges: ranges,
}


@dataclass
class Group:
    """Layers that take a per-channel scale together, and the tensors that carry it."""

    producers: list[Table] = field(default_factory=list)
    consumers: list[Table] = field(default_factory=list)
    between: list[Table] = field(default_factory=list)
    # for each tensor of the group, the class (one shared r) of each of its channels
    classes: dict[int, np.ndarray] = field(default_factory=dict)
    parent: list[int] = field(default_factory=list)

    def add_tensor(self, tensor: int, channels: int) -> None:
        start = len(self.parent)
        self.parent.extend(range(start, start + channels))
        self.classes[tensor] = np.arange(start, start + channels)

    def find(self, node: int) -> int:
        while self.parent[node] != node:
            self.parent[node] = self.parent[self.parent[node]]
            node = self.parent[node]
        return node

    def join(self, a: np.ndarray, b: np.ndarray) -> None:
        for x, y in zip(a.tolist(), b.tolist()):
            root_x, root_y = self.find(x), self.find(y)
            if root_x != root_y:
                self.parent[max(root_x, root_y)] = min(root_x, root_y)

    def class_of(self, tensor: int) -> np.ndarray:
        return np.array([self.find(int(n)) for n in self.classes[tensor]])


def _channels(graph: Graph, tensor: int) -> int:
    shape = graph.shape(tensor)
    return int(shape[-1]) if shape else 0


def _is_producer(graph: Graph, op: Table) -> bool:
    return (
        op.opcode.name in LAYER_KINDS
        and len(op.outputs) == 1
        and fused_activation(op) in ("NONE", "RELU")
    )


def _reads_channels(graph: Graph, layer: Table, tensor: int) -> bool:
    """``layer`` reads ``tensor`` as its data input, one weight slice per input channel."""
    kind = layer.opcode.name
    if kind not in LAYER_KINDS:
        return False
    layout = LAYERS[kind]
    if layer.inputs[layout.data_input] != tensor or list(layer.inputs).count(tensor) != 1:
        return False
    weights_shape = graph.shape(layer.inputs[layout.weight_input])
    channels = _channels(graph, tensor)
    if kind == "DEPTHWISE_CONV_2D":
        return len(weights_shape) == 4 and weights_shape[3] == channels
    return (
        len(weights_shape) > layout.input_channel_axis
        and weights_shape[layout.input_channel_axis] == channels
    )


def _passing_inputs(graph: Graph, op: Table) -> list[int] | None:
    """The data inputs of an op that passes a per-channel scale to its output, else None."""
    kind, out = op.opcode.name, op.outputs[0] if len(op.outputs) == 1 else -1
    if out < 0 or graph.dtype(out) != "FLOAT32":
        return None
    shape = graph.shape(out)
    if kind == "ADD":
        if len(op.inputs) != 2 or fused_activation(op) not in ("NONE", "RELU"):
            return None
        if any(graph.is_constant(t) or graph.shape(t) != shape for t in op.inputs):
            return None
        return list(op.inputs)
    if kind in ("RESIZE_BILINEAR", "RESIZE_NEAREST_NEIGHBOR"):
        return [op.inputs[0]]  # each output is a weighted mean of one channel's inputs
    if kind in ("MAX_POOL_2D", "AVERAGE_POOL_2D"):
        return [op.inputs[0]] if fused_activation(op) in ("NONE", "RELU") else None
    if kind == "RELU":
        return [op.inputs[0]]
    if kind == "PRELU":
        try:
            per_channel_vector(graph, op.inputs[1], shape[-1], len(shape))
        except Decline:
            return None  # alphas that vary along the spatial axes
        return [op.inputs[0]]
    if kind == "PAD" and len(op.inputs) == 2 and graph.is_constant(op.inputs[1]):
        paddings = graph.constant(op.inputs[1])
        if paddings.shape != (len(shape), 2) or paddings[-1][0] != 0:
            return None  # channels padded in front would shift the channel index
        return [op.inputs[0]]
    return None


def find_group(graph: Graph, first: Table) -> Group | None:
    """The group ``first`` writes into (module docstring), or None where it cannot be scaled."""
    group = Group()
    roles: dict[str, set[int]] = {"producer": set(), "consumer": set(), "between": set()}
    queue: list[int] = []

    def visit(tensor: int) -> None:
        if tensor not in group.classes:
            group.add_tensor(tensor, _channels(graph, tensor))
            queue.append(tensor)

    def add(role: str, op: Table) -> None:
        if id(op) not in roles[role]:
            roles[role].add(id(op))
            {"producer": group.producers, "consumer": group.consumers, "between": group.between}[
                role
            ].append(op)

    def add_between(op: Table) -> bool:
        if id(op) in roles["between"]:
            return True
        inputs = _passing_inputs(graph, op)
        if inputs is None:
            return False
        add("between", op)
        visit(op.outputs[0])
        for t in inputs:
            visit(t)
            _link(group, op, t)
        return True

    add("producer", first)
    visit(first.outputs[0])
    while queue:
        tensor = queue.pop()
        if len(group.classes) > MAX_TENSORS or graph.is_graph_output(tensor):
            return None
        if graph.dtype(tensor) != "FLOAT32" or not _channels(graph, tensor):
            return None
        producer = graph.producer_of(tensor)
        if producer is None:
            return None  # a graph input or a constant
        if _is_producer(graph, producer):
            add("producer", producer)
        elif not add_between(producer):
            return None
        for consumer in graph.consumers_of(tensor):
            if _reads_channels(graph, consumer, tensor):
                add("consumer", consumer)
            elif not add_between(consumer):
                return None
    return group if group.consumers else None


def _link(group: Group, op: Table, tensor: int) -> None:
    """Channel c of ``tensor`` and channel c of ``op``'s output take the same r."""
    inner, outer = group.classes[tensor], group.classes[op.outputs[0]]
    group.join(inner, outer[: len(inner)])  # a channel PAD adds zero channels at the end


def _weight_axis(layer: Table, role: str) -> int:
    layout = LAYERS[layer.opcode.name]
    if role == "output" or layer.opcode.name == "DEPTHWISE_CONV_2D":
        return layout.output_channel_axis
    return layout.input_channel_axis


def consumer_matrix(kind: str, weights: np.ndarray) -> np.ndarray:
    """A consumer's weights as [outputs, input channels, taps] (depthwise: one input per output)."""
    w = weights.astype(np.float64)
    if kind == "FULLY_CONNECTED":
        return w[:, :, None]
    if kind == "DEPTHWISE_CONV_2D":
        channels = w.shape[3]
        taps = w.reshape(-1, channels).T  # [C, KH*KW]
        matrix = np.zeros((channels, channels, taps.shape[1]))
        matrix[np.arange(channels), np.arange(channels)] = taps
        return matrix
    return np.moveaxis(w.reshape(w.shape[0], -1, w.shape[3]), 2, 1)  # [O, I, KH*KW]


@dataclass
class Side:
    """One layer's part in a group: its weights in the shape the noise model needs."""

    layer: Table
    tensor: int  # the group tensor it writes (producer) or reads (consumer)
    classes: np.ndarray  # class of each of that tensor's channels
    weights: np.ndarray  # producer: rows [channels, fan-in]; consumer: [outputs, channels, taps]
    # producer: sum of E[x^2] over the inputs one output channel reads;
    # consumer: per-channel mean and variance of the tensor it reads
    input_energy: np.ndarray | None = None
    mean: np.ndarray | None = None
    variance: np.ndarray | None = None


def predicted_noise(
    producers: list[Side], consumers: list[Side], r: dict[int, float], per_tensor: bool
) -> float:
    """Quantization noise summed over the consumers' outputs for the scaling ``r`` (docstring)."""
    first_weights: dict[int, float] = {}  # noise variance L1's rounding adds to each class
    for side in producers:
        scale = np.array([r[k] for k in side.classes.tolist()])
        rows = side.weights / scale[:, None]
        if per_tensor:
            step = np.full(len(rows), np.abs(rows).max() / 127)
        else:
            step = np.abs(rows).max(axis=1) / 127
        for k, noise in zip(side.classes.tolist(), step**2 * side.input_energy):
            first_weights[k] = first_weights.get(k, 0.0) + float(noise)
    total = 0.0
    for side in consumers:
        scale = np.array([r[k] for k in side.classes.tolist()])
        w2 = side.weights * scale[None, :, None]
        mean, variance = side.mean / scale, side.variance / scale**2
        energy = (w2**2).sum(axis=2)  # [O, C]
        activation_step = (3 * np.sqrt(variance) + np.abs(mean)).max() / 255
        step2 = (
            np.full(w2.shape[0], np.abs(w2).max() / 127)
            if per_tensor
            else np.abs(w2).max(axis=(1, 2)) / 127
        )
        upstream = np.array([first_weights.get(k, 0.0) for k in side.classes.tolist()])
        total += activation_step**2 * energy.sum()
        total += float((step2**2).sum() * (variance + mean**2).sum() * w2.shape[2])
        total += float((energy * upstream[None, :]).sum())
    return total / 12


def input_energy(graph: Graph, layer: Table, stats: dict[int, Stats], channels: int) -> np.ndarray:
    """Per output channel of ``layer``: sum of E[x^2] over the inputs that channel reads."""
    kind = layer.opcode.name
    layout = LAYERS[kind]
    data = layer.inputs[layout.data_input]
    mean, variance = stats.get(data, (np.zeros(1), np.ones(1)))
    square = variance + mean**2
    weights_shape = graph.shape(layer.inputs[layout.weight_input])
    taps = int(np.prod(weights_shape[1:3])) if kind in ("CONV_2D", "DEPTHWISE_CONV_2D") else 1
    if kind == "DEPTHWISE_CONV_2D" and len(square) == channels:
        return taps * square
    return np.full(
        channels, taps * float(square.sum()) if kind == "CONV_2D" else float(square.sum())
    )


class EqualizeCrossLayer(Rule):
    name = "equalize_cross_layer"
    summary = "cross-layer equalization of layers -> (RELU, PRELU, residual ADDs, pools) -> layers where a simulation of the int8 model (or, for large models, a noise model) finds it better (exact in float); on with --target int8"
    default = False

    def is_default(self, target: str = "float") -> bool:
        return target == "int8"

    def apply(self, graph: Graph, ctx: Context) -> int:
        if measuring(graph, ctx):
            return 0  # decided once the other rules are done: finish()
        return self.predicted_pass(graph, ctx)

    def predicted_pass(self, graph: Graph, ctx: Context) -> int:
        """One pass deciding each group by the data-free noise model (``MIN_GAIN``)."""
        count = 0
        times = ctx.memo.setdefault(self.name, {})
        stats: dict[int, Stats] | None = None
        for first, group in groups_in(graph):
            key = tuple(sorted(id(p) for p in group.producers))
            if times.get(key, 0) >= MAX_TIMES:
                continue
            if stats is None:
                stats = activation_statistics(graph)
            try:
                plan = plan_group(graph, ctx, group, MIN_GAIN[ctx.weight_granularity], stats)
            except Decline as decline:
                self.declined(graph, ctx, first, f"not equalized: {decline}")
                continue
            if plan is None:
                continue
            changes, gain = plan
            times[key] = times.get(key, 0) + 1
            labels = self.labels(graph, group.producers + group.between + group.consumers)
            apply_plan(graph, changes)
            stats = None  # the magnitudes downstream changed
            self.rewrote(
                graph,
                ctx,
                labels,
                f"{len(group.producers)} layer(s) equalized with {len(group.consumers)} "
                f"following (predicted quantization noise {gain:.2f}x lower)",
            )
            count += 1
        return count

    def finish(self, graph: Graph, ctx: Context) -> int:
        """Measured equalization: keep each group whose simulated int8 error is lower.

        Runs once the other rules reached their fixed point, on subgraph 0. Candidates are
        tried one at a time, the data-free noise model's most promising first, each on top of
        those kept: a group is kept when the simulated int8 error (``quantsim``) of no output
        grows and the mean over outputs falls by ``MIN_MEASURED_GAIN``.
        """
        if not measuring(graph, ctx):
            return 0
        graph.sweep()
        stats = activation_statistics(graph)
        candidates = []  # (predicted gain, graph order, first producer's output tensor)
        read: list[int] = []  # the tensors the candidates' consumers read
        for order, (first, group) in enumerate(groups_in(graph)):
            try:
                plan = plan_group(graph, ctx, group, 0.0, stats)
            except Decline as decline:
                self.declined(graph, ctx, first, f"not equalized: {decline}")
                continue
            if plan is not None and not _is_identity(plan[0], graph):
                candidates.append((-plan[1], order, first.outputs[0]))
                read.extend(
                    layer.inputs[LAYERS[layer.opcode.name].data_input] for layer in group.consumers
                )
        candidates = sorted(candidates)[:MAX_TRIALS]
        # per-tensor weights: the producers' weight ranges matter too (Nagel's balance)
        balances = ["weights"] if ctx.weight_granularity == "tensor" else list(BALANCES)
        trials = len(candidates) * len(balances) + 2
        work = trials * quantsim.SIMULATED_INVOKES * quantsim.multiply_adds(graph) / 1e9
        note = ctx.memo.setdefault("equalize", {})
        note.update(candidates=len(candidates))
        if not candidates:
            note.update(decided_by="simulation", simulations=0)
            return 0
        if ctx.equalize == "auto" and work > SIMULATION_BUDGET:
            reason = (
                f"simulating {len(candidates)} group(s) would take {work:.0f} G multiply-adds "
                f"(budget {SIMULATION_BUDGET:.0f} G; --equalize measure runs it anyway)"
            )
            return self._predicted_instead(graph, ctx, reason)
        try:
            current = bytes(fb.encode(graph.model))
            quantsim.probe(current, ctx.weight_granularity, ctx.input_range)
            simulator = quantsim.Simulator(current, ctx.weight_granularity, ctx.input_range)
            errors = simulator.errors(current)
        except (quantsim.SimulationError, ModelError) as error:
            return self._predicted_instead(graph, ctx, f"the int8 simulation failed: {error}")
        note.update(decided_by="simulation")
        # per-channel activation ranges (one calibration draw), for the activation-balanced r
        ranges = quantsim.channel_ranges(current, simulator.draws[0][0], list(dict.fromkeys(read)))

        def trial(tensors: list[int], balance: str) -> tuple[bytes, np.ndarray, np.ndarray] | None:
            """The model with these groups equalized too, its errors and ratios [draw, output]."""
            trial_model = fb.decode(current)
            trial_graph = Graph(trial_model, graph.index)
            changed = False
            for tensor in tensors:
                trial_plan = _plan_at(trial_graph, ctx, tensor, stats, BALANCES[balance](ranges))
                if trial_plan is not None:
                    apply_plan(trial_graph, trial_plan[0])
                    changed = True
            if not changed:
                return None
            data = bytes(fb.encode(trial_model))
            found = simulator.errors(data)
            return data, found, np.array(quantsim.compare(found, errors))

        def better(ratio: np.ndarray) -> bool:
            """``ratio``: [ratio, upper bound] per output."""
            return bool(
                np.max(ratio[1]) <= 1.0 + NOT_WORSE and np.mean(ratio[0]) <= 1.0 - MIN_MEASURED_GAIN
            )

        def keep(tensors: list[int], balance: str, ratio: np.ndarray) -> None:
            for tensor in tensors:
                first = graph.producer_of(tensor)
                plan = _plan_at(graph, ctx, tensor, stats, BALANCES[balance](ranges))
                if first is None or plan is None:
                    continue
                group = find_group(graph, first)
                labels = self.labels(graph, group.producers + group.between + group.consumers)
                apply_plan(graph, plan[0])
                together = f" with {len(tensors) - 1} other group(s)" if len(tensors) > 1 else ""
                self.rewrote(
                    graph,
                    ctx,
                    labels,
                    f"{len(group.producers)} layer(s) equalized with {len(group.consumers)} "
                    f"following{together}, r balancing {balance} (simulated int8 error "
                    f"{_ratios(ratio)} per output)",
                )

        per_tensor: list[np.ndarray | None] = [None]  # errors of `current`, per-tensor weights

        def safe_per_tensor(data: bytes) -> bool:
            """Per-channel weights were promised, but a per-tensor quantizer must not suffer
            much either: the activation balance can spread a producer's channels far apart."""
            if per_tensor[0] is None:
                per_tensor[0] = simulator.errors(current, "tensor")
            ratio, _ = quantsim.compare(simulator.errors(data, "tensor"), per_tensor[0])
            return bool(np.max(ratio) <= PER_TENSOR_SAFETY)

        count = 0
        left: list[tuple[int, np.ndarray]] = []  # groups not kept alone, and their ratios
        for _, _, tensor in candidates:
            results = [
                (result, balance)
                for balance in balances
                if (result := trial([tensor], balance)) is not None
                and (
                    balance != "activations" or not better(result[2]) or safe_per_tensor(result[0])
                )
            ]
            if not results:
                continue
            result, balance = min(results, key=lambda rb: float(np.mean(rb[0][2][0])))
            if better(result[2]):
                current, errors = result[0], result[1]
                per_tensor[0] = None
                keep([tensor], balance, result[2])
                count += 1
            else:
                left.append((tensor, result[2]))
        # Small gains that no group reaches alone can add up: the rest, all together, once.
        if len(left) > 1:
            rest = [tensor for tensor, _ in left]
            for balance in balances:
                result = trial(rest, balance)
                if (
                    result is not None
                    and better(result[2])
                    and (balance != "activations" or safe_per_tensor(result[0]))
                ):
                    current, errors = result[0], result[1]
                    keep(rest, balance, result[2])
                    count += len(left)
                    left = []
                    break
        for tensor, ratio in left:
            first = graph.producer_of(tensor)
            if first is None:
                continue
            self.declined(
                graph,
                ctx,
                first,
                f"not equalized: simulated int8 error {_ratios(ratio)} per output (kept only "
                f"when the mean over outputs falls by {MIN_MEASURED_GAIN:.0%} and no output's "
                f"bound exceeds {1 + NOT_WORSE:g}x, alone or with the other such groups)",
            )
        note.update(simulations=simulator.runs)
        return count

    def _predicted_instead(self, graph: Graph, ctx: Context, reason: str) -> int:
        ctx.memo["equalize"].update(decided_by="noise model", reason=reason)
        count = 0
        while self.predicted_pass(graph, ctx):
            count += 1
        return count


def _ratios(ratio: np.ndarray) -> str:
    return ", ".join(f"{r:.3f}x (<= {u:.3f}x)" for r, u in zip(ratio[0], ratio[1]))


def groups_in(graph: Graph) -> Iterator[tuple[Table, Group]]:
    """Each group once, in graph order, with the producer it was found from (lazily: a pass
    may rewrite the graph between two groups)."""
    decided: set[int] = set()
    for first in graph.live_ops(*LAYER_KINDS):
        if id(first) in decided or not _is_producer(graph, first):
            continue
        group = find_group(graph, first)
        if group is None:
            continue
        decided.update(id(p) for p in group.producers)
        yield first, group


def measuring(graph: Graph, ctx: Context) -> bool:
    """Groups are decided in finish(): --target int8, subgraph 0, --equalize auto or measure."""
    return ctx.target == "int8" and graph.index == 0 and ctx.equalize in ("auto", "measure")


def _is_identity(changes: dict[Table, tuple[np.ndarray, np.ndarray | None]], graph: Graph) -> bool:
    """Every r is 1: the plan would change nothing."""
    for layer, (weights, _) in changes.items():
        old = graph.constant(layer.inputs[LAYERS[layer.opcode.name].weight_input])
        if old.shape != weights.shape or not np.array_equal(old, weights):
            return False
    return True


def _plan_at(
    graph: Graph,
    ctx: Context,
    tensor: int,
    stats: dict[int, Stats],
    activation_range: dict[int, np.ndarray] | None = None,
):
    """The plan of the group whose first producer writes ``tensor`` (None if there is none)."""
    first = graph.producer_of(tensor)
    if first is None or first.opcode.name not in LAYER_KINDS or not _is_producer(graph, first):
        return None
    group = find_group(graph, first)
    if group is None:
        return None
    try:
        return plan_group(graph, ctx, group, 0.0, stats, activation_range)
    except Decline:
        return None


def plan_group(
    graph: Graph,
    ctx: Context,
    group: Group,
    min_gain: float,
    stats: dict[int, Stats],
    activation_range: dict[int, np.ndarray] | None = None,
):
    """({layer: (weights, bias or None)}, predicted gain); None below ``min_gain``; or Decline.

    ``activation_range``: calibrated max |x| per channel of the tensors the consumers read; with
    it, the producers' side of the balance is the geometric mean of their weight range and the
    calibrated activation range of the channel (r[c] = sqrt(sqrt(range1[c] * max|x[c]|) /
    range2[c])) instead of the weight range alone (Nagel). With one weight scale per channel the producers' weights do not care, and
    the tensor between is what one int8 scale must cover.
    """
    try:
        weights = {
            id(layer): layer_weights(graph, layer) for layer in group.producers + group.consumers
        }
        biases = {
            id(layer): layer_bias(
                graph, layer, weights[id(layer)].shape[_weight_axis(layer, "output")]
            )
            for layer in group.producers
        }
    except Decline:
        return None  # quantized or computed weights: nothing to equalize here
    reason = ctx.excluded(graph, *group.producers, *group.between, *group.consumers)
    if reason:
        raise Decline(reason)
    producers = []
    for layer in group.producers:
        axis = _weight_axis(layer, "output")
        w = np.moveaxis(weights[id(layer)].astype(np.float64), axis, 0)
        rows = w.reshape(len(w), -1)
        producers.append(
            Side(
                layer,
                layer.outputs[0],
                group.class_of(layer.outputs[0]),
                rows,
                input_energy=input_energy(graph, layer, stats, len(rows)),
            )
        )
    consumers = []
    for layer in group.consumers:
        tensor = layer.inputs[LAYERS[layer.opcode.name].data_input]
        matrix = consumer_matrix(layer.opcode.name, weights[id(layer)])
        classes = group.class_of(tensor)
        mean, variance = stats.get(tensor, (np.zeros(len(classes)), np.ones(len(classes))))
        if len(mean) != len(classes):
            mean, variance = np.zeros(len(classes)), np.ones(len(classes))
        consumers.append(Side(layer, tensor, classes, matrix, mean=mean, variance=variance))
    range1: dict[int, float] = {}
    range2: dict[int, float] = {}
    for side in producers:
        for k, value in zip(side.classes.tolist(), np.abs(side.weights).max(axis=1)):
            range1[k] = max(range1.get(k, 0.0), value)
    for side in consumers:
        for k, value in zip(side.classes.tolist(), np.abs(side.weights).max(axis=(0, 2))):
            range2[k] = max(range2.get(k, 0.0), value)
    if activation_range is not None:
        measured: dict[int, float] = {}
        for side in consumers:
            found = activation_range.get(side.tensor)
            if found is None or len(found) != len(side.classes):
                return None
            for k, value in zip(side.classes.tolist(), found.tolist()):
                measured[k] = max(measured.get(k, 0.0), value)
        # halfway (geometric mean) between the producers' weights and the activations
        range1 = {k: float(np.sqrt(range1.get(k, 0.0) * measured.get(k, 0.0))) for k in range1}
    r = {}
    for k in set(range1) | set(range2):
        a, b = range1.get(k, 0.0), range2.get(k, 0.0)
        # sqrt(a / b) rather than sqrt(a * b) / b: the product of two huge ranges overflows
        ratio = np.sqrt(a / b) if a > 0 and b > 0 else 1.0
        r[k] = float(np.clip(ratio, 1 / R_LIMIT, R_LIMIT)) if np.isfinite(ratio) else 1.0
    per_tensor = ctx.weight_granularity == "tensor"
    ones = dict.fromkeys(r, 1.0)
    before = predicted_noise(producers, consumers, ones, per_tensor)
    after = predicted_noise(producers, consumers, r, per_tensor)
    gain = before / after if after > 0 else 1.0
    if not gain >= min_gain:
        return None
    new: dict[int, np.ndarray] = {
        id(layer): weights[id(layer)].astype(np.float64)
        for layer in group.producers + group.consumers
    }
    changes: dict[Table, tuple[np.ndarray, np.ndarray | None]] = {}
    for side in consumers:
        scale = np.array([r[k] for k in side.classes])
        new[id(side.layer)] = scale_along_axis(
            new[id(side.layer)], scale, _weight_axis(side.layer, "input")
        )
    for side in producers:
        scale = np.array([r[k] for k in side.classes])
        new[id(side.layer)] = scale_along_axis(
            new[id(side.layer)], 1 / scale, _weight_axis(side.layer, "output")
        )
        bias = biases[id(side.layer)] / scale
        require_finite(new[id(side.layer)], bias)
        changes[side.layer] = (new[id(side.layer)].astype(np.float32), bias)
    for side in consumers:
        if side.layer not in changes:
            require_finite(new[id(side.layer)])
            changes[side.layer] = (new[id(side.layer)].astype(np.float32), None)
    return changes, gain


def apply_plan(graph: Graph, changes: dict[Table, tuple[np.ndarray, np.ndarray | None]]) -> None:
    for layer, (weights, bias) in changes.items():
        graph.set_constant(layer, LAYERS[layer.opcode.name].weight_input, weights)
        if bias is not None:
            set_layer_bias(graph, layer, bias)
