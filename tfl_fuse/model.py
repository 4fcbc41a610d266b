"""The schema-neutral in-memory model.

A decoded model is a tree of :class:`Table` records: each knows its schema type name
(``"Tensor"``, ``"Conv2DOptions"``, ...) and holds the fields of that table under the
object-API field names (``fusedActivationFunction``, ``strideW``, ...). The tree holds
every field the schema has, so a round trip loses nothing, and it does not depend on
which format it came from. Three things are interpreted, because rules need them:

* an operator's ``opcode`` is an :class:`OpCode` (name, version, custom code) instead of an
  index into the operator-code table;
* a tensor's ``type`` is the TensorType name (``"FLOAT32"``), not a number;
* a union field holds a Table whose type name says which member it is (no ``*Type`` field).

Buffer data is a read-only numpy ``uint8`` view of the input bytes until a rule replaces it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

ADOPT_MIN_BYTES = 1 << 20  # add_buffer keeps arrays at least this large without a copy


class Table:
    """One flatbuffer table: its schema type name and its fields as attributes."""

    def __init__(self, type_name: str, **fields: Any) -> None:
        self._type = type_name
        self.__dict__.update(fields)

    def fields(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}

    def get(self, name: str, default: Any = None) -> Any:
        return self.__dict__.get(name, default)

    def copy(self) -> Table:
        clone = Table(self._type)
        clone.__dict__.update(self.__dict__)
        return clone

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in self.fields().items() if v is not None)
        return f"{self._type}({inner})"


@dataclass(eq=False)
class OpCode:
    """An operator code. ``source`` is the decoded table, re-emitted unchanged when possible."""

    name: str
    version: int = 1
    custom_code: str | None = None
    source: Table | None = None
    source_format: str | None = None


class ModelError(Exception):
    """The input is not a model tfl_fuse can read, or a model cannot be written as asked."""


@dataclass(eq=False)
class Model:
    """A whole model: the root table plus the three lists rules work on."""

    format: str
    root: Table  # the Model table without operatorCodes, subgraphs and buffers
    opcodes: list[OpCode]
    subgraphs: list[Table]
    buffers: list[Table]

    def opcode(self, name: str, version: int = 1, custom_code: str | None = None) -> OpCode:
        """The operator code for (name, version, custom_code), added if the model lacks it."""
        for code in self.opcodes:
            if code.name == name and code.version == version and code.custom_code == custom_code:
                return code
        code = OpCode(name, version, custom_code)
        self.opcodes.append(code)
        return code

    def add_buffer(self, data: np.ndarray | bytes | None) -> int:
        """Append a buffer holding ``data`` (copied as little-endian bytes); return its index."""
        if data is None:
            payload = None
        else:
            array = np.ascontiguousarray(data)
            if array.dtype.byteorder == ">":
                array = array.byteswap().view(array.dtype.newbyteorder("<"))
            if array.nbytes >= ADOPT_MIN_BYTES and array.base is None and array.flags.writeable:
                # A large array of its own (a rule's fresh result) is adopted, not copied, and
                # made read-only so nothing changes it behind the model's back.
                array.flags.writeable = False
                payload = array.reshape(-1).view(np.uint8)
            else:
                payload = np.frombuffer(array.tobytes(), dtype=np.uint8)
        self.buffers.append(Table("Buffer", data=payload, offset=0, size=0))
        return len(self.buffers) - 1

    @property
    def signature_defs(self) -> list[Table]:
        return self.root.get("signatureDefs") or []
