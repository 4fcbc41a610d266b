"""The two flatbuffer formats tfl_fuse reads and writes, and how their schemas differ.

Both schemas come from packages, never from copied files: LiteRT's generated object API
(``ai_edge_litert.schema_py_generated``) for TFLite and ``circle_schema`` for circle. This
module is the only place that knows the module layout of each and the layout of their
tables: the decoder and encoder ask it for a table's :class:`Layout` (each field's name,
vtable slot, kind, scalar type and default, read off the generated accessors), for enum
values by name, and for the file identifier. See ``schemas/README.md`` for the differences
in words.
"""

from __future__ import annotations

import importlib
import linecache
import pkgutil
import re
from dataclasses import dataclass, field
from functools import cache, cached_property
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

# Field kinds of a table layout.
SCALAR = 0  # a number or bool stored in the table
STRING = 1
VECTOR = 2  # a vector of numbers or bools
TABLE = 3
TABLES = 4  # a vector of tables
UNION = 5  # a table whose type a "<name>Type" field names (the union's enum)

# struct codes of the flatbuffers scalar types, as the generated accessors name them.
SCALAR_CODES = {
    "Bool": "<?",
    "Int8": "<b",
    "Uint8": "<B",
    "Int16": "<h",
    "Uint16": "<H",
    "Int32": "<i",
    "Uint32": "<I",
    "Int64": "<q",
    "Uint64": "<Q",
    "Float32": "<f",
    "Float64": "<d",
}


@dataclass(frozen=True)
class Field:
    """One field of a table: where it lies (vtable slot) and how it is stored."""

    name: str  # the object-API attribute name, which is also the neutral Table's field name
    slot: int
    kind: int  # SCALAR, STRING, VECTOR, TABLE, TABLES or UNION
    code: str = ""  # struct code of a SCALAR, or of a VECTOR's elements
    default: Any = None
    type_name: str = ""  # the table type of a TABLE or TABLES; the enum of a UNION
    type_slot: int = -1  # UNION: the slot of its "<name>Type" field


@dataclass(frozen=True)
class Layout:
    """A table's fields in declaration order (the order the object API packs them)."""

    type_name: str
    fields: tuple[Field, ...]

    @cached_property
    def names(self) -> frozenset[str]:
        return frozenset(f.name for f in self.fields)

    def field(self, name: str) -> Field | None:
        return next((f for f in self.fields if f.name == name), None)


# A field the current bindings no longer read but older files carry: circle SubGraph slot 5
# held `data_format` before circle 0.7 (CHANNELS_LAST 0, CHANNELS_FIRST 1).
LEGACY_FIELDS = {("circle", "SubGraph"): Field("dataFormat", 5, SCALAR, "<b", 0)}


class LayoutError(RuntimeError):
    """The generated code of a schema package is not what :meth:`Format.layout` can read
    (a new binding, or one installed without its sources): a setup problem, not a bad model."""


_OFFSET = re.compile(r"self\._tab\.Offset\((\d+)\)")
_GET = re.compile(r"self\._tab\.Get\(flatbuffers\.number_types\.(\w+)Flags, (\w) \+")
_OBJECT = re.compile(r"obj = (\w+)\(\)")


def _method_source(function: Any) -> str:
    """The source of a generated accessor method (a few lines; no full-module parse)."""
    code = function.__code__
    lines = linecache.getlines(code.co_filename)
    start = code.co_firstlineno - 1
    if start >= len(lines):
        raise LayoutError(
            f"{code.co_filename}: no source for {function.__qualname__} (a package installed "
            "without its .py files?); tfl_fuse reads the tables' layouts from that source"
        )
    indent = len(lines[start]) - len(lines[start].lstrip())
    body = [lines[start]]
    for line in lines[start + 1 :]:
        if line.strip() and len(line) - len(line.lstrip()) <= indent:
            break
        body.append(line)
    return "".join(body)


def _field_from_accessor(type_name: str, name: str, default: Any, accessor: type) -> Field:
    """Slot and kind of one field, read off its generated accessor method."""
    method = getattr(accessor, name[:1].upper() + name[1:], None)
    if method is None:
        raise LayoutError(f"{type_name}.{name}: no accessor method")
    source = _method_source(method)
    offset = _OFFSET.search(source)
    if offset is None:
        raise LayoutError(f"{type_name}.{name}: no vtable offset in its accessor")
    slot = (int(offset.group(1)) - 4) // 2
    code = method.__code__
    is_vector = "j" in code.co_varnames[: code.co_argcount]  # Shape(self, j): one element
    get, obj = _GET.search(source), _OBJECT.search(source)
    if get is not None and get.group(1) not in SCALAR_CODES:
        raise LayoutError(f"{type_name}.{name}: a scalar type tfl_fuse does not know")
    if is_vector and get is not None and get.group(2) == "a":
        return Field(name, slot, VECTOR, SCALAR_CODES[get.group(1)])
    if is_vector and obj is not None and "Indirect" in source:
        return Field(name, slot, TABLES, type_name=obj.group(1))
    if not is_vector and get is not None and get.group(2) == "o":
        return Field(name, slot, SCALAR, SCALAR_CODES[get.group(1)], default)
    if not is_vector and "self._tab.String(o + self._tab.Pos)" in source:
        return Field(name, slot, STRING)
    if not is_vector and "self._tab.Union(obj, o)" in source:
        if name not in UNION_ENUMS:
            raise LayoutError(f"{type_name}.{name}: a union UNION_ENUMS does not name")
        return Field(name, slot, UNION, type_name=UNION_ENUMS[name])
    if not is_vector and obj is not None and "Indirect" in source:
        return Field(name, slot, TABLE, type_name=obj.group(1))
    # Vectors of strings and structs: neither schema has one today.
    raise LayoutError(f"{type_name}.{name}: a field kind tfl_fuse does not read")


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

    def layout(self, type_name: str) -> Layout | None:
        """The fields of a table (None if the schema lacks it), from the generated code.

        A fresh object-API instance gives the field names, their order and defaults; each field's
        accessor method gives its vtable slot and kind. Anything the accessors do that this
        does not recognize raises LayoutError, so a new binding fails loudly, not silently.
        """
        key = ("L", type_name)
        if key not in self._cache:
            self._cache[key] = self._make_layout(type_name)
        return self._cache[key]

    def _make_layout(self, type_name: str) -> Layout | None:
        cls, accessor = self.table_class(type_name), self.accessor_class(type_name)
        if cls is None or accessor is None:
            return None
        union_types = {name + "Type" for name in UNION_ENUMS}
        fields = []
        slots = {}
        for name, default in vars(cls()).items():  # declaration order, object-API defaults
            if name in union_types:
                slots[name] = _field_from_accessor(type_name, name, default, accessor).slot
                continue
            fields.append(_field_from_accessor(type_name, name, default, accessor))
        for i, f in enumerate(fields):
            if f.kind == UNION:
                fields[i] = Field(
                    f.name, f.slot, UNION, "<B", None, f.type_name, slots[f.name + "Type"]
                )
        legacy = LEGACY_FIELDS.get((self.name, type_name))
        if legacy is not None:  # written before the others, where tfl_fuse always wrote it
            fields.insert(0, legacy)
        return Layout(type_name, tuple(fields))

    def table_names(self) -> list[str]:
        """Every table type of the schema (those with an object-API class), sorted."""
        if self._per_table_modules:
            package = importlib.import_module(self._module)
            names = [m.name for m in pkgutil.iter_modules(package.__path__)]
        else:
            names = [n[:-1] for n in vars(importlib.import_module(self._module)) if n.endswith("T")]
        return sorted(n for n in names if self.table_class(n) is not None)

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
