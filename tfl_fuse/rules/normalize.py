"""Normalizations that make a float model quantizer-ready (on with ``--target int8``/``dynamic``).

They change how the model is stored, never what it computes.

``dequantize_float16_weights``: weights stored as float16 behind a DEQUANTIZE::

    W16 (FLOAT16 constant) -> DEQUANTIZE -> W (FLOAT32) -> CONV_2D ...
    ==>                                     W (FLOAT32 constant) -> CONV_2D ...

Math: DEQUANTIZE of a FLOAT16 tensor is the float16 -> float32 conversion, which is exact
(every float16 value, subnormals included, is a float32 value), so storing ``float32(W16)``
in ``W`` and removing the op computes the same function. ``W`` keeps its index and name, so
consumers and graph outputs still point at it; the float16 buffer is never written (it may
be shared) and is dropped when nothing else uses it. The folding rules then see ``W`` as an
ordinary float32 constant, which is why this rule runs first. Conditions: the input is a dense
FLOAT16 constant of the output's shape, the output is FLOAT32 without quantization
parameters, and it is not a graph output (the model's outputs stay computed). A DEQUANTIZE
of INT8/UINT8/INT16 belongs to a quantized model and is left alone.

``add_signature_def``: a model without a SignatureDef gets one for subgraph 0, as TF's
TFLiteConverter writes it: key ``serving_default``, one entry per graph input and output.
The quantizer's calibration runs the model through its signature. Names come from the
tensor names with what converters add (``serving_default_`` prefix, ``:0`` suffix) removed,
made Python identifiers (signature runners take them as keyword arguments) and unique;
names converters give internal tensors (``StatefulPartitionedCall:0``) or nothing usable
fall back to the converter's own ``input_<i>`` / ``output_<i>``.
"""

from __future__ import annotations

import re

import numpy as np

from ..graph import Graph
from ..model import Table
from .base import Context, Decline, Rule

SIGNATURE_KEY = "serving_default"
_CONVERTER_PREFIX = re.compile(r"^serving_default_")
_OUTPUT_INDEX_SUFFIX = re.compile(r":\d+$")
_INTERNAL_NAME = re.compile(r"^(StatefulPartitionedCall|PartitionedCall|Identity)(_\d+)?$")


def is_float16_constant(graph: Graph, tensor: int) -> bool:
    return graph.is_constant(tensor) and graph.dtype(tensor) == "FLOAT16"


def is_float_dequantize_output(graph: Graph, tensor: int) -> bool:
    quantization = graph.tensors[tensor].get("quantization")
    scale = quantization.get("scale") if quantization is not None else None
    quantized = scale is not None and len(scale) > 0
    return graph.dtype(tensor) == "FLOAT32" and not quantized


def check_float16_dequantize(graph: Graph, op: Table) -> None:
    """Raise Decline unless ``op`` may become a float32 constant."""
    source, out = op.inputs[0], op.outputs[0]
    if graph.tensors[source].get("sparsity") is not None:
        raise Decline(f"the float16 constant {graph.name(source)!r} is sparse")
    if graph.shape(source) != graph.shape(out):
        raise Decline(
            f"shapes differ: {graph.name(source)!r} {graph.shape(source)}, "
            f"{graph.name(out)!r} {graph.shape(out)}"
        )
    if graph.is_graph_output(out):
        raise Decline(f"{graph.name(out)!r} is a graph output")


class DequantizeFloat16Weights(Rule):
    name = "dequantize_float16_weights"
    summary = "float16 weights behind a DEQUANTIZE are stored as float32 constants (exact)"
    default = False
    int8_default = True

    def apply(self, graph: Graph, ctx: Context) -> int:
        converted: list[str] = []
        stored: dict[tuple[int, tuple[int, ...]], int] = {}  # float16 buffer -> float32 buffer
        for op in graph.live_ops("DEQUANTIZE"):
            if len(op.inputs) != 1 or len(op.outputs) != 1:
                continue
            source, out = op.inputs[0], op.outputs[0]
            if not (is_float16_constant(graph, source) and is_float_dequantize_output(graph, out)):
                continue  # an int8 DEQUANTIZE, or one of a computed tensor: not this rule's case
            try:
                check_float16_dequantize(graph, op)
                reason = ctx.excluded(graph, op)
                if reason:
                    raise Decline(reason)
                key = (graph.tensors[source].buffer, tuple(graph.shape(source)))
                if key not in stored:
                    value = graph.constant(source).astype(np.float32)
                    if not np.all(np.isfinite(value)):
                        raise Decline(f"{graph.name(source)!r} holds inf or NaN")
                    stored[key] = graph.model.add_buffer(value)
            except Decline as decline:
                self.declined(graph, ctx, op, f"float16 weights kept: {decline}")
                continue
            # A float16 buffer shared by several constants becomes one shared float32 buffer;
            # rules that later change a constant copy it first.
            graph.tensors[out].buffer = stored[key]
            graph.remove_op(op)
            converted.append(graph.name(out))
        if converted:
            self.rewrote(
                graph,
                ctx,
                [f"{len(converted)} x DEQUANTIZE"],
                f"float16 constants now float32 constants with the same values: "
                f"{_short_list(converted)}",
                tensors=converted,
            )
        return len(converted)


def _short_list(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def signature_name(tensor_name: str) -> str:
    """A signature entry name from a tensor name; "" when the tensor name is not usable."""
    base = _OUTPUT_INDEX_SUFFIX.sub("", _CONVERTER_PREFIX.sub("", tensor_name))
    if _INTERNAL_NAME.match(base):
        return ""
    name = re.sub(r"\W+", "_", base, flags=re.ASCII).strip("_")
    return name if name[:1].isalpha() else ""


def signature_entries(graph: Graph, tensors: list[int], fallback: str, taken: set[str]) -> list:
    entries = []
    for i, tensor in enumerate(tensors):
        name = signature_name(graph.name(tensor)) or f"{fallback}_{i}"
        unique, n = name, 1
        while unique in taken:
            unique = f"{name}_{n}"
            n += 1
        taken.add(unique)
        entries.append(Table("TensorMap", name=unique, tensorIndex=tensor))
    return entries


class AddSignatureDef(Rule):
    name = "add_signature_def"
    summary = "a model without a SignatureDef gets 'serving_default' for subgraph 0"
    default = False
    int8_default = True

    def apply(self, graph: Graph, ctx: Context) -> int:
        # The engine runs rules per subgraph; a signature belongs to the model, and converters
        # give one to the entry subgraph only, so this acts on subgraph 0 once.
        if graph.index != 0 or graph.model.signature_defs:
            return 0
        taken: set[str] = set()  # distinct across inputs and outputs: one dict may hold both
        inputs = signature_entries(graph, list(graph.subgraph.inputs), "input", taken)
        outputs = signature_entries(graph, list(graph.subgraph.outputs), "output", taken)
        graph.model.root.signatureDefs = [
            Table(
                "SignatureDef",
                inputs=inputs,
                outputs=outputs,
                signatureKey=SIGNATURE_KEY,
                subgraphIndex=0,
            )
        ]
        self.rewrote(
            graph,
            ctx,
            [f"SignatureDef:{SIGNATURE_KEY}"],
            "added for subgraph 0: inputs "
            + ", ".join(f"{e.name}={graph.name(e.tensorIndex)!r}" for e in inputs)
            + "; outputs "
            + ", ".join(f"{e.name}={graph.name(e.tensorIndex)!r}" for e in outputs),
        )
        return 1
