"""One subgraph of a Model with a producer/consumer index, and the helpers that mutate it.

Rules read and change the graph only through :class:`Graph`, which keeps the index current:
matching walks ``ops_of_type`` and follows ``producer``/``consumers`` instead of scanning
the operator list, so a pass is linear in the model size. Constants are copy-on-write:
a buffer or tensor shared with another user is never changed in place.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Iterator

import numpy as np

from .model import Model, ModelError, ScaledProduct, Table

NUMPY_DTYPES: dict[str, np.dtype] = {
    name: np.dtype(dtype)
    for name, dtype in {
        "FLOAT32": "<f4",
        "FLOAT16": "<f2",
        "FLOAT64": "<f8",
        "INT32": "<i4",
        "UINT8": "u1",
        "INT64": "<i8",
        "BOOL": "?",
        "INT16": "<i2",
        "INT8": "i1",
        "UINT64": "<u8",
        "UINT32": "<u4",
        "UINT16": "<u2",
        "COMPLEX64": "<c8",
        "COMPLEX128": "<c16",
    }.items()
}
FLOAT_TYPES = {"FLOAT32", "FLOAT64"}
OFFLINE_MEMORY_METADATA = "OfflineMemoryAllocation"


def op_type(op: Table) -> str:
    return op.opcode.name


class Graph:
    """A subgraph plus its producer/consumer index."""

    def __init__(self, model: Model, index: int) -> None:
        self.model = model
        self.index = index
        self.subgraph = model.subgraphs[index]
        self.tensors: list[Table] = self.subgraph.tensors
        self.producer: dict[int, Table] = {}
        self.consumers: dict[int, list[Table]] = defaultdict(list)
        self.by_type: dict[str, list[Table]] = defaultdict(list)
        self._dead: set[int] = set()
        self._order: dict[int, int] | None = None  # _positions(); None when stale
        self._orphans: set[int] = set()
        self._names = {t.name for t in self.tensors}
        for op in self.subgraph.operators:
            self._index_op(op)
        # Graph inputs: the caller may overwrite them, even when the model gives them data.
        self.inputs = set(self.subgraph.inputs)
        self.pinned = self.inputs | set(self.subgraph.outputs)
        for signature in model.signature_defs:
            if signature.get("subgraphIndex", 0) == index:
                for entry in signature.get("inputs") or []:
                    self.inputs.add(entry.tensorIndex)
                for entry in (signature.get("inputs") or []) + (signature.get("outputs") or []):
                    self.pinned.add(entry.tensorIndex)

    # index ---------------------------------------------------------------------------------
    def _index_op(self, op: Table) -> None:
        for t in op.outputs:
            if t >= 0:
                self.producer[t] = op
        for t in op.inputs:
            if t >= 0:
                self.consumers[t].append(op)
        self.by_type[op.opcode.name].append(op)

    @property
    def ops(self) -> list[Table]:
        return [op for op in self.subgraph.operators if id(op) not in self._dead]

    def ops_of_type(self, *types: str) -> list[Table]:
        """Live operators of the given types, in graph order (a snapshot)."""
        found = []
        for name in types:
            found.extend(op for op in self.by_type.get(name, ()) if id(op) not in self._dead)
        if len(types) > 1:
            order = self._positions()
            found.sort(key=lambda op: order[id(op)])
        return found

    def _positions(self) -> dict[int, int]:
        """id(op) -> its index in the operator list, kept until the list changes."""
        if self._order is None:
            self._order = {id(op): i for i, op in enumerate(self.subgraph.operators)}
        return self._order

    def live_ops(self, *types: str) -> Iterator[Table]:
        """Operators of the given types in graph order, skipping any a rewrite removed meanwhile."""
        for op in self.ops_of_type(*types):
            if id(op) not in self._dead:
                yield op

    def is_alive(self, op: Table) -> bool:
        return id(op) not in self._dead

    def consumers_of(self, tensor: int) -> list[Table]:
        ops = self.consumers.get(tensor)
        if not ops:
            return []
        dead = self._dead
        return [op for op in ops if id(op) not in dead]

    def producer_of(self, tensor: int) -> Table | None:
        op = self.producer.get(tensor)
        return op if op is not None and id(op) not in self._dead else None

    def is_graph_output(self, tensor: int) -> bool:
        return tensor in self.pinned

    def name(self, tensor: int) -> str:
        return str(self.tensors[tensor].name) if tensor >= 0 else "<absent>"

    def shape(self, tensor: int) -> list[int]:
        return list(self.tensors[tensor].shape or [])

    def dtype(self, tensor: int) -> str:
        return self.tensors[tensor].type

    # constants -----------------------------------------------------------------------------
    def is_constant(self, tensor: int) -> bool:
        """The tensor holds data no one can change: not computed, not variable, no graph input.

        LiteRT lets the caller overwrite a graph input that has data, and a variable tensor is
        state that ops write, so neither is a constant to fold, however much data it carries.
        Neither is data of a type without a numpy equivalent (STRING, INT4, ...) or sparse data.
        """
        if tensor < 0 or tensor in self.inputs:
            return False
        fields = self.tensors[tensor].__dict__  # (the most frequent question rules ask)
        if fields["type"] not in NUMPY_DTYPES or fields.get("sparsity") is not None:
            return False  # strings, packed int4, sparse data: bytes rules never read
        producer = self.producer.get(tensor)
        if fields.get("isVariable") or (producer is not None and id(producer) not in self._dead):
            return False
        data = self.model.buffers[fields["buffer"]].data
        return data is not None and len(data) > 0

    def constant(self, tensor: int) -> np.ndarray:
        """The value of a constant tensor as a read-only numpy array of its shape."""
        t = self.tensors[tensor]
        dtype = NUMPY_DTYPES.get(t.type)
        if dtype is None:
            raise ModelError(f"tensor {t.name!r}: constants of type {t.type} are not supported")
        data = self.model.buffers[t.buffer].data
        if isinstance(data, ScaledProduct):
            return data.value().reshape([int(d) for d in (t.shape or [])])
        shape = [int(d) for d in (t.shape or [])]
        count = math.prod(shape)
        if data is None or len(data) != count * dtype.itemsize:
            raise ModelError(
                f"tensor {t.name!r}: buffer holds {0 if data is None else len(data)} bytes, "
                f"shape {shape} of {t.type} needs {count * dtype.itemsize}"
            )
        return np.frombuffer(data, dtype=dtype).reshape(shape)

    def set_constant(self, op: Table, position: int, value: np.ndarray) -> int:
        """Give input ``position`` of ``op`` the constant ``value``, copy-on-write.

        The tensor is changed in place when ``op`` is its only user and it is not pinned;
        otherwise a new tensor is made for ``op``. The old buffer is never written to.
        Returns the tensor index now used by ``op``.
        """
        tensor = op.inputs[position]
        value = value if isinstance(value, ScaledProduct) else np.asarray(value)
        users = self.consumers_of(tensor)
        if len(users) == 1 and users[0] is op and not self.is_graph_output(tensor):
            t = self.tensors[tensor]
            t.buffer = self.model.add_buffer(value.astype(NUMPY_DTYPES[t.type], copy=False))
            self._set_shape(t, value.shape)
            return tensor
        new = self.add_constant(self.tensors[tensor].name, value, like=tensor)
        self.replace_input(op, position, new)
        return new

    def add_constant(
        self, name: str, value: np.ndarray, like: int | None = None, type_name: str = "FLOAT32"
    ) -> int:
        """Append a constant tensor (unique name) and return its index."""
        if like is not None:
            t = self.tensors[like].copy()
            t.sparsity = None  # the new data is dense
            type_name = t.type
        else:
            t = Table(
                "Tensor",
                shape=[],
                type=type_name,
                buffer=0,
                name=name,
                isVariable=False,
                hasRank=True,
            )
        t.name = self._unique(name)
        value = value if isinstance(value, ScaledProduct) else np.asarray(value)
        t.buffer = self.model.add_buffer(value.astype(NUMPY_DTYPES[type_name], copy=False))
        t.shapeSignature = None
        self._set_shape(t, value.shape)
        self.tensors.append(t)
        return len(self.tensors) - 1

    def add_tensor_like(self, like: int, name: str, shape: Iterable[int] | None = None) -> int:
        """Append an activation tensor shaped like ``like`` (same type and quantization)."""
        t = self.tensors[like].copy()
        t.name = self._unique(name)
        t.buffer = 0
        if shape is not None:
            self._set_shape(t, tuple(shape))
        self.tensors.append(t)
        return len(self.tensors) - 1

    def _unique(self, name: str) -> str:
        candidate, n = name, 1
        while candidate in self._names:
            candidate = f"{name}_{n}"
            n += 1
        self._names.add(candidate)
        return candidate

    @staticmethod
    def _set_shape(t: Table, shape: tuple[int, ...]) -> None:
        if list(t.shape or []) != list(shape):
            t.shape = [int(d) for d in shape]
            if t.get("shapeSignature") is not None:
                t.shapeSignature = [int(d) for d in shape]

    # mutation ------------------------------------------------------------------------------
    def replace_input(self, op: Table, position: int, tensor: int) -> None:
        old = op.inputs[position]
        op.inputs[position] = tensor
        if old >= 0:
            users = self.consumers[old]
            users.remove(op)
            self._maybe_orphan(old)
        if tensor >= 0:
            self.consumers[tensor].append(op)

    def append_input(self, op: Table, tensor: int) -> None:
        op.inputs.append(tensor)
        if tensor >= 0:
            self.consumers[tensor].append(op)

    def replace_uses(self, old: int, new: int) -> None:
        """Every live consumer of ``old`` reads ``new`` instead."""
        for op in self.consumers_of(old):
            for position, t in enumerate(op.inputs):
                if t == old:
                    self.replace_input(op, position, new)

    def set_output(self, op: Table, position: int, tensor: int) -> None:
        old = op.outputs[position]
        op.outputs[position] = tensor
        if self.producer.get(old) is op:
            del self.producer[old]
            self._maybe_orphan(old)
        self.producer[tensor] = op

    def remove_op(self, op: Table) -> None:
        """Remove an operator; its outputs lose their producer."""
        self._dead.add(id(op))
        for t in op.inputs:
            if t >= 0 and op in self.consumers[t]:
                self.consumers[t].remove(op)
                self._maybe_orphan(t)
        for t in op.outputs:
            if self.producer.get(t) is op:
                del self.producer[t]
                self._maybe_orphan(t)

    def revive_op(self, op: Table) -> None:
        """Undo :meth:`remove_op` for an op that is still in the operator list."""
        if id(op) not in self._dead:
            return
        self._dead.discard(id(op))
        for t in op.inputs:
            if t >= 0:
                self.consumers[t].append(op)
                self._orphans.discard(t)
        for t in op.outputs:
            if t >= 0:
                self.producer[t] = op
                self._orphans.discard(t)

    def set_shape(self, tensor: int, shape: list[int]) -> None:
        self._set_shape(self.tensors[tensor], tuple(shape))

    def insert_op(
        self, kind: str, inputs: list[int], outputs: list[int], options: Table | None, before: Table
    ) -> Table:
        """A new operator placed just before ``before`` in execution order."""
        op = Table(
            "Operator",
            opcode=self.model.opcode(kind, 1),
            inputs=list(inputs),
            outputs=list(outputs),
        )
        if options is not None:
            op.builtinOptions = options
        operators = self.subgraph.operators
        operators.insert(next(i for i, o in enumerate(operators) if o is before), op)
        self._order = None
        self._index_op(op)
        return op

    def move_before(self, op: Table, anchor: Table) -> None:
        """Place ``op`` just before ``anchor`` in execution order (it now feeds ``anchor``)."""
        operators = self.subgraph.operators
        operators.remove(op)
        operators.insert(next(i for i, o in enumerate(operators) if o is anchor), op)
        self._order = None

    def set_op_type(self, op: Table, name: str, version: int | None = None) -> None:
        old = op.opcode
        new_version = old.version if version is None else version
        op.opcode = self.model.opcode(
            name, new_version, old.custom_code if name == old.name else None
        )
        if name != old.name:
            self.by_type[old.name].remove(op)
            self.by_type[name].append(op)

    def _maybe_orphan(self, tensor: int) -> None:
        if tensor >= 0 and not self.consumers_of(tensor) and tensor not in self.producer:
            self._orphans.add(tensor)

    # sweep ---------------------------------------------------------------------------------
    def sweep(self) -> None:
        """Drop removed operators and tensors that rewrites left unreferenced."""
        if self._dead:
            self.subgraph.operators = [
                op for op in self.subgraph.operators if id(op) not in self._dead
            ]
            self._dead.clear()
            self._order = None
        metadata = self.model.root.get("metadata") or []
        if any(entry.name == OFFLINE_MEMORY_METADATA for entry in metadata):
            return  # offline memory plans index tensors: keep the numbering
        referenced: set[int] = set(self.pinned)
        for op in self.subgraph.operators:
            referenced.update(op.inputs)
            referenced.update(op.outputs)
            referenced.update(op.get("intermediates") or [])
        dropped = sorted(t for t in self._orphans if t not in referenced)
        self._orphans.clear()
        if not dropped:
            return
        dropped_set = set(dropped)
        mapping: dict[int, int] = {-1: -1}
        kept: list[Table] = []
        for i, t in enumerate(self.tensors):
            if i not in dropped_set:
                mapping[i] = len(kept)
                kept.append(t)
        self.subgraph.tensors[:] = kept
        for op in self.subgraph.operators:
            op.inputs = [mapping[t] for t in op.inputs]
            op.outputs = [mapping[t] for t in op.outputs]
            if op.get("intermediates"):
                op.intermediates = [mapping[t] for t in op.intermediates]
        self.subgraph.inputs = [mapping[t] for t in self.subgraph.inputs]
        self.subgraph.outputs = [mapping[t] for t in self.subgraph.outputs]
        for signature in self.model.signature_defs:
            if signature.get("subgraphIndex", 0) == self.index:
                for entry in (signature.get("inputs") or []) + (signature.get("outputs") or []):
                    entry.tensorIndex = mapping[entry.tensorIndex]
        self.__init__(self.model, self.index)  # rebuild the index over the new numbering
