"""The two flatbuffer formats tfl_fuse reads and writes, and how their schemas differ.

Both schemas come from packages, never from copied files: LiteRT's generated object API
(``ai_edge_litert.schema_py_generated``) for TFLite and ``circle_schema`` for circle. This
module is the only place that knows the module layout of each; the decoder and encoder ask
it for a table class by name, for enum values by name, and for the file identifier.
See ``schemas/README.md`` for the differences in words.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from functools import cache
from typing import Any

# Union fields of the object API ("<name>Type" + "<name>") and the enum that numbers them.
UNION_ENUMS = {
    "builtinOptions": "BuiltinOptions",
    "builtinOptions2": "BuiltinOptions2",
    "details": "QuantizationDetails",
    "arraySegments": "SparseIndexVector",
    "arrayIndices": "SparseIndexVector",
}

# TFLite keeps builtin codes >= 127 only in `builtin_code`; `deprecated_builtin_code` says 127.
PLACEHOLDER_FOR_GREATER_OP_CODES = 127


@dataclass(frozen=True)
class Format:
    """One flatbuffer format: its name, file identifier, suffix and schema bindings."""

    name: str
    identifier: bytes
    suffix: str
    _module: str
    _per_table_modules: bool
    schema_version: int = 0  # Model.version this format's readers expect
    _cache: dict = field(default_factory=dict, compare=False, repr=False)

    def _lookup(self, table: str, attribute: str) -> Any:
        if self._per_table_modules:  # circle_schema: one module per table or enum
            try:
                module = importlib.import_module(f"{self._module}.{table}")
            except ImportError:
                return None
            return getattr(module, attribute, None)
        return getattr(importlib.import_module(self._module), attribute, None)

    def table_class(self, type_name: str) -> type | None:
        """The object-API class (``<type_name>T``) of a table, or None if the schema lacks it."""
        key = ("T", type_name)
        if key not in self._cache:
            self._cache[key] = self._lookup(type_name, type_name + "T")
        return self._cache[key]

    def accessor_class(self, type_name: str) -> type:
        key = ("A", type_name)
        if key not in self._cache:
            self._cache[key] = self._lookup(type_name, type_name)
        return self._cache[key]

    def function(self, table: str, name: str) -> Any:
        """A module-level builder function of the generated code (``BufferStart``, ...)."""
        key = ("F", table, name)
        if key not in self._cache:
            self._cache[key] = self._lookup(table, name)
        return self._cache[key]

    def enum(self, enum_name: str) -> dict[str, int]:
        """Name -> value of a schema enum."""
        key = ("E", enum_name)
        if key not in self._cache:
            cls = self._lookup(enum_name, enum_name)
            values = (
                {}
                if cls is None
                else {
                    k: v
                    for k, v in vars(cls).items()
                    if not k.startswith("_") and isinstance(v, int)
                }
            )
            self._cache[key] = values
        return self._cache[key]

    def enum_names(self, enum_name: str) -> dict[int, str]:
        key = ("N", enum_name)
        if key not in self._cache:
            names: dict[int, str] = {}
            for k, v in self.enum(enum_name).items():
                names.setdefault(v, k)
            self._cache[key] = names
        return self._cache[key]

    # Operator codes ------------------------------------------------------------------------
    def op_name(self, deprecated_code: int, builtin_code: int) -> str:
        """Name of a builtin operator from the two code fields of an OperatorCode."""
        if deprecated_code == PLACEHOLDER_FOR_GREATER_OP_CODES:
            code = builtin_code
        elif deprecated_code < 0:  # circle's own operators (negative codes)
            code = deprecated_code
        else:
            code = max(builtin_code, deprecated_code)
        name = self.enum_names("BuiltinOperator").get(code)
        if name is None:
            raise KeyError(f"unknown builtin operator code {code} in a {self.name} model")
        return name

    def op_codes(self, name: str) -> tuple[int, int]:
        """(deprecated_builtin_code, builtin_code) for an operator name; KeyError if absent."""
        code = self.enum("BuiltinOperator")[name]
        deprecated = (
            code if code < PLACEHOLDER_FOR_GREATER_OP_CODES else PLACEHOLDER_FOR_GREATER_OP_CODES
        )
        return deprecated, code


TFLITE = Format(
    "tflite", b"TFL3", ".tflite", "ai_edge_litert.schema_py_generated", False, schema_version=3
)
CIRCLE = Format("circle", b"CIR0", ".circle", "circle_schema.v0_10.circle", True, schema_version=0)
FORMATS = {f.name: f for f in (TFLITE, CIRCLE)}
BY_IDENTIFIER = {f.identifier: f for f in (TFLITE, CIRCLE)}


@cache
def get(name: str) -> Format:
    return FORMATS[name]


def for_path(path: str, default: Format | None = None) -> Format | None:
    """The format a file name suggests by its suffix."""
    for fmt in FORMATS.values():
        if str(path).endswith(fmt.suffix):
            return fmt
    return default
