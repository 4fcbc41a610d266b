"""Structural checks of a decoded model, so rules can trust every index they follow."""

from __future__ import annotations

from collections import deque

from .model import Model, ModelError, Table


def _check_index(value: int, limit: int, what: str, allow_absent: bool = False) -> None:
    if allow_absent and value == -1:
        return
    if not 0 <= value < limit:
        raise ModelError(f"{what} is {value}, out of range [0, {limit})")


def _subgraph_references(options: Table | None) -> list[tuple[str, int]]:
    if options is None:
        return []
    return [
        (name, value)
        for name, value in options.fields().items()
        if isinstance(value, int) and (name.endswith("SubgraphIndex") or name == "subgraph")
    ]


def validate(model: Model) -> None:
    """Raise ModelError naming the first out-of-range index, double producer or cycle."""
    if not model.subgraphs:
        raise ModelError("the model has no subgraphs")
    n_buffers = len(model.buffers)
    n_subgraphs = len(model.subgraphs)
    for s, subgraph in enumerate(model.subgraphs):
        n_tensors = len(subgraph.tensors)
        where = f"subgraph {s}"
        for t, tensor in enumerate(subgraph.tensors):
            _check_index(
                tensor.buffer, n_buffers, f"{where}: tensor {t} ({tensor.name!r}) buffer index"
            )
        for i in subgraph.inputs:
            _check_index(i, n_tensors, f"{where}: input tensor index")
        for o in subgraph.outputs:
            _check_index(o, n_tensors, f"{where}: output tensor index")
        for k, op in enumerate(subgraph.operators):
            op_where = f"{where}: operator {k} ({op.opcode.name})"
            for i in op.inputs:
                _check_index(i, n_tensors, f"{op_where} input tensor index", allow_absent=True)
            for o in op.outputs:
                _check_index(o, n_tensors, f"{op_where} output tensor index", allow_absent=True)
            for i in op.get("intermediates") or []:
                _check_index(
                    i, n_tensors, f"{op_where} intermediate tensor index", allow_absent=True
                )
            for options in (op.get("builtinOptions"), op.get("builtinOptions2")):
                for name, value in _subgraph_references(options):
                    _check_index(value, n_subgraphs, f"{op_where} {name}")
        _check_acyclic(subgraph, where)
    for signature in model.signature_defs:
        index = signature.get("subgraphIndex", 0)
        _check_index(
            index, n_subgraphs, f"signature {signature.get('signatureKey')!r} subgraph index"
        )
        n_tensors = len(model.subgraphs[index].tensors)
        for entry in (signature.get("inputs") or []) + (signature.get("outputs") or []):
            _check_index(
                entry.tensorIndex,
                n_tensors,
                f"signature {signature.get('signatureKey')!r} tensor {entry.name!r}",
            )
    for entry in model.root.get("metadata") or []:
        _check_index(entry.buffer, n_buffers, f"metadata {entry.name!r} buffer index")


def _check_acyclic(subgraph: Table, where: str) -> None:
    producer: dict[int, int] = {}
    for k, op in enumerate(subgraph.operators):
        for o in op.outputs:
            if o < 0:
                continue
            if o in producer:
                raise ModelError(
                    f"{where}: tensor {o} is produced by operators {producer[o]} and {k}"
                )
            producer[o] = k
    waiting = [0] * len(subgraph.operators)
    dependants: dict[int, list[int]] = {}
    for k, op in enumerate(subgraph.operators):
        for i in set(op.inputs):
            if i in producer:
                waiting[k] += 1
                dependants.setdefault(producer[i], []).append(k)
    ready = deque(k for k, n in enumerate(waiting) if n == 0)
    done = 0
    while ready:
        k = ready.popleft()
        done += 1
        for d in dependants.get(k, ()):
            waiting[d] -= 1
            if waiting[d] == 0:
                ready.append(d)
    if done != len(subgraph.operators):
        stuck = [k for k, n in enumerate(waiting) if n > 0][:3]
        raise ModelError(f"{where}: the graph has a cycle through operators {stuck}")
