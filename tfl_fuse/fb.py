"""Decode TFL3/CIR0 flatbuffers into the neutral :class:`~tfl_fuse.model.Model` and back.

Decoding goes through the schema package's object API (``ModelT.InitFromObj``), whose
buffer data are zero-copy numpy views of the input bytes; the object tree is then turned
into neutral :class:`Table` records field by field, so every field of the schema travels
through untouched. Encoding maps each Table back to the target format's class by type
name (which is also how circle <-> tflite conversion works), packs buffer data itself,
16-byte aligned, into a builder pre-sized to the model, and drops unused buffers.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
from collections.abc import Iterator
from typing import Any

import flatbuffers
import numpy as np

from . import formats
from .formats import UNION_ENUMS, Format
from .model import Model, ModelError, OpCode, Table

# Index vectors that rules edit: decoded as Python lists instead of read-only numpy views.
_INDEX_FIELDS = {"inputs", "outputs", "intermediates", "shape", "shapeSignature"}
# circle SubGraph slot 5 held `data_format` before circle 0.7; circle_schema 0.10 no longer
# reads it, so it is read and written here by hand.
_CIRCLE_DATA_FORMAT_SLOT = 5
_CIRCLE_DATA_FORMAT_VTABLE_OFFSET = 4 + 2 * _CIRCLE_DATA_FORMAT_SLOT
BUFFER_ALIGNMENT = 16
MAX_FLATBUFFER_SIZE = 2**31 - 1


# --------------------------------------------------------------------------------------------
# decode


def _neutral(value: Any, field_name: str = "") -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return value
    if isinstance(value, np.ndarray):
        if field_name in _INDEX_FIELDS:
            return value.tolist()
        return value
    if isinstance(value, list):
        return [_neutral(v, field_name) for v in value]
    type_name = type(value).__name__
    table = Table(type_name[:-1] if type_name.endswith("T") else type_name)
    for name, field_value in vars(value).items():
        if name.endswith("Type") and name[:-4] in UNION_ENUMS:
            continue  # the union's member is named by the Table's own type name
        table.__dict__[name] = _neutral(field_value, name)
    return table


def detect_format(data: bytes | bytearray | memoryview) -> Format:
    if len(data) < 8:
        raise ModelError(f"not a model: {len(data)} bytes is too short for a flatbuffer")
    identifier = bytes(data[4:8])
    fmt = formats.BY_IDENTIFIER.get(identifier)
    if fmt is None:
        raise ModelError(
            f"not a TFLite or circle model: file identifier {identifier!r}, expected b'TFL3' or b'CIR0'"
        )
    return fmt


def _parse_failure(format_name: str, size: int, error: BaseException) -> str:
    """Why the flatbuffer parser failed, in words (not the struct module's)."""
    if isinstance(error, struct.error):
        why = f"a table or vector points past the end of the file ({size} bytes)"
    elif isinstance(error, RecursionError):
        why = "its tables nest without end"
    elif isinstance(error, MemoryError):
        why = "a vector claims more elements than memory holds"
    elif isinstance(error, UnicodeDecodeError):
        why = "a string is not UTF-8"
    else:
        why = f"the {format_name} schema cannot read it ({type(error).__name__})"
    return f"truncated or not a {format_name} flatbuffer: {why}"


def decode(data: bytes | bytearray | memoryview) -> Model:
    """Decode model bytes (TFL3 or CIR0) into a neutral Model; ModelError on bad input."""
    fmt = detect_format(data)
    root_offset = struct.unpack_from("<I", data, 0)[0]
    if root_offset + 4 > len(data):
        raise ModelError(
            f"truncated or not a {fmt.name} flatbuffer: "
            f"its root offset {root_offset} is past the end of the file ({len(data)} bytes)"
        )
    try:
        accessor = fmt.accessor_class("Model").GetRootAs(data, 0)
        obj = fmt.table_class("Model").InitFromObj(accessor)
        data_formats = _read_circle_data_formats(accessor) if fmt is formats.CIRCLE else []
    except (RecursionError, MemoryError, Exception) as error:  # noqa: BLE001 - any parse failure
        raise ModelError(_parse_failure(fmt.name, len(data), error)) from None
    model = _model_from_objects(obj, fmt, data)
    _record_source_offsets(accessor, model)
    for subgraph, data_format in zip(model.subgraphs, data_formats):
        if data_format:
            subgraph.dataFormat = data_format
    from .validate import validate  # late import: validate uses the graph helpers

    validate(model)
    return model


def _record_source_offsets(accessor: Any, model: Model) -> None:
    """Remember where each buffer's data lies in the input, so the writer can copy it file to file."""
    for i, buffer in enumerate(model.buffers):
        if buffer.data is None:
            continue
        table = accessor.Buffers(i)._tab
        offset = table.Offset(4)
        if offset:
            buffer._source_offset = table.Vector(offset)
            buffer._source_data = buffer.data


def _read_circle_data_formats(accessor: Any) -> list[int]:
    values = []
    for i in range(accessor.SubgraphsLength()):
        table = accessor.Subgraphs(i)._tab
        offset = table.Offset(_CIRCLE_DATA_FORMAT_VTABLE_OFFSET)
        values.append(
            table.Get(flatbuffers.number_types.Int8Flags, offset + table.Pos) if offset else 0
        )
    return values


def _model_from_objects(obj: Any, fmt: Format, data: bytes | bytearray | memoryview) -> Model:
    try:
        opcodes = [
            OpCode(
                fmt.op_name(code.deprecatedBuiltinCode, code.builtinCode),
                code.version,
                _neutral(code.customCode),
                source=_neutral(code),
                source_format=fmt.name,
            )
            for code in obj.operatorCodes or []
        ]
    except KeyError as error:
        raise ModelError(str(error.args[0])) from None

    buffers = []
    for buffer in obj.buffers or []:
        payload = buffer.data
        if buffer.offset > 1:  # data stored after the flatbuffer (models over 2 GB)
            if buffer.offset + buffer.size > len(data):
                raise ModelError(
                    f"buffer data at offset {buffer.offset} is past the end of the file"
                )
            payload = np.frombuffer(data, dtype=np.uint8, count=buffer.size, offset=buffer.offset)
        buffers.append(Table("Buffer", data=payload, offset=0, size=0))

    tensor_types = fmt.enum_names("TensorType")
    subgraphs = []
    for subgraph_object in obj.subgraphs or []:
        subgraph = _neutral(subgraph_object)
        subgraph.tensors = subgraph.tensors or []
        subgraph.operators = subgraph.operators or []
        subgraph.inputs = subgraph.inputs or []
        subgraph.outputs = subgraph.outputs or []
        for tensor in subgraph.tensors:
            name = tensor_types.get(tensor.type)
            if name is None:
                raise ModelError(f"tensor {tensor.name!r} has unknown type code {tensor.type}")
            tensor.type = name
        for op in subgraph.operators:
            index = op.__dict__.pop("opcodeIndex")
            if not 0 <= index < len(opcodes):
                raise ModelError(
                    f"operator in subgraph {len(subgraphs)} uses opcode index {index}, "
                    f"but the model has {len(opcodes)} operator codes"
                )
            op.opcode = opcodes[index]
            op.inputs = op.inputs or []
            op.outputs = op.outputs or []
            if op.get("largeCustomOptionsOffset", 0) > 1:
                start, size = op.largeCustomOptionsOffset, op.largeCustomOptionsSize
                op.customOptions = np.frombuffer(data, dtype=np.uint8, count=size, offset=start)
                op.largeCustomOptionsOffset = op.largeCustomOptionsSize = 0
        subgraphs.append(subgraph)

    obj.operatorCodes = obj.subgraphs = obj.buffers = None
    root = _neutral(obj)
    for name in ("operatorCodes", "subgraphs", "buffers"):
        root.__dict__.pop(name, None)
    return Model(fmt.name, root, opcodes, subgraphs, buffers)


# --------------------------------------------------------------------------------------------
# encode


class _Defaults:
    """Default field values of a format's tables, to tell 'unset' from 'set' when converting."""

    def __init__(self, fmt: Format) -> None:
        self.fmt = fmt
        self.cache: dict[str, dict[str, Any]] = {}

    def of(self, type_name: str) -> dict[str, Any]:
        if type_name not in self.cache:
            cls = self.fmt.table_class(type_name)
            self.cache[type_name] = vars(cls()) if cls is not None else {}
        return self.cache[type_name]


def _is_unset(value: Any, default: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, (list, np.ndarray)):
        return len(value) == 0 and default is None
    return value == default


class _Encoder:
    def __init__(self, model: Model, fmt: Format) -> None:
        self.model = model
        self.fmt = fmt
        self.source_defaults = _Defaults(formats.get(model.format))

    def obj(self, value: Any, where: str) -> Any:
        if isinstance(value, Table):
            return self.table(value, where)
        if isinstance(value, list):
            return [self.obj(v, where) for v in value]
        return value

    def table(self, table: Table, where: str) -> Any:
        cls = self.fmt.table_class(table._type)
        if cls is None:
            raise ModelError(f"{where}: the {self.fmt.name} schema has no table {table._type}")
        obj = cls()
        known = vars(obj)
        source_defaults = self.source_defaults.of(table._type)
        for name, value in table.fields().items():
            if name not in known:
                if _is_unset(value, source_defaults.get(name)):
                    continue
                raise ModelError(
                    f"{where}: the {self.fmt.name} schema has no field {table._type}.{name}"
                )
            if name in UNION_ENUMS and isinstance(value, Table):
                members = self.fmt.enum(UNION_ENUMS[name])
                if value._type not in members:
                    raise ModelError(f"{where}: the {self.fmt.name} schema has no {value._type}")
                setattr(obj, name + "Type", members[value._type])
            setattr(obj, name, self.obj(value, where))
        return obj


HOLE_MIN_BYTES = 4096  # buffer data at least this large is referenced, not copied, until written


class Encoded:
    """An encoded model: the builder's image, whose large buffer data are "holes" filled on output.

    Writing fills each hole from its numpy array, or straight from the input file
    (``os.sendfile``) when the data is unchanged input, so the output never needs a second
    in-memory copy of the weights.
    """

    def __init__(self, image: memoryview, holes: list[tuple[int, np.ndarray, int | None]]) -> None:
        self.image = image
        self.holes = sorted(holes, key=lambda hole: hole[0])

    def __len__(self) -> int:
        return len(self.image)

    def tobytes(self) -> bytes:
        out = bytearray(self.image)
        for position, data, _ in self.holes:
            out[position : position + len(data)] = memoryview(data).cast("B")
        return bytes(out)

    def write(self, fd: int, source_fd: int | None = None) -> None:
        position = 0
        for start, data, source_offset in self.holes:
            _write_all(fd, self.image[position:start])
            if source_offset is not None and source_fd is not None:
                _send_all(fd, source_fd, source_offset, len(data))
            else:
                _write_all(fd, memoryview(data).cast("B"))
            position = start + len(data)
        _write_all(fd, self.image[position:])


def _write_all(fd: int, view: memoryview) -> None:
    while len(view):
        view = view[os.write(fd, view) :]


def _send_all(fd: int, source_fd: int, offset: int, count: int) -> None:
    while count:
        sent = os.sendfile(fd, source_fd, offset, count)
        if sent <= 0:
            raise OSError("sendfile wrote nothing")
        offset += sent
        count -= sent


class _PackedBuffer:
    """A Buffer table whose data is 16-byte aligned; large data is reserved, filled on output."""

    def __init__(
        self, fmt: Format, data: np.ndarray | None, source_offset: int | None, holes: list
    ) -> None:
        self.fmt = fmt
        self.data = data
        self.source_offset = source_offset
        self.holes = holes

    def Pack(self, builder: flatbuffers.Builder) -> int:  # noqa: N802 - object-API protocol
        data_offset = None
        if self.data is not None:
            size = len(self.data)
            builder.StartVector(1, size, BUFFER_ALIGNMENT)
            builder.head -= size
            if size >= HOLE_MIN_BYTES:
                self.holes.append(
                    (len(builder.Bytes) - builder.head, self.data, self.source_offset)
                )
            else:
                builder.Bytes[builder.head : builder.head + size] = memoryview(self.data).cast("B")
            builder.vectorNumElems = size
            data_offset = builder.EndVector()
        self.fmt.function("Buffer", "BufferStart")(builder)
        if data_offset is not None:
            self.fmt.function("Buffer", "BufferAddData")(builder, data_offset)
        return self.fmt.function("Buffer", "BufferEnd")(builder)


def used_buffer_map(model: Model) -> tuple[list[int], dict[int, int]]:
    """Buffers to keep (old indices, in order) and old -> new index for every old index.

    Buffer 0 stays the empty sentinel; a buffer no tensor or metadata uses is dropped; a used
    buffer without data becomes buffer 0 (as LiteRT's own reader does).
    """
    used: set[int] = set()
    for subgraph in model.subgraphs:
        used.update(tensor.buffer for tensor in subgraph.tensors)
    metadata = model.root.get("metadata") or []
    used.update(entry.buffer for entry in metadata)
    metadata_buffers = {entry.buffer for entry in metadata}
    keep = [0]
    mapping = {0: 0}
    for index in sorted(used):
        if index == 0:
            continue
        buffer = model.buffers[index]
        if buffer.data is None and index not in metadata_buffers:
            mapping[index] = 0
        else:
            mapping[index] = len(keep)
            keep.append(index)
    return keep, mapping


@contextlib.contextmanager
def _circle_data_format_writer(fmt: Format, values: list[int]) -> Iterator[None]:
    """Write circle's legacy SubGraph.data_format slot, which circle_schema 0.10 cannot."""
    if fmt is not formats.CIRCLE or not any(values):
        yield
        return
    import importlib

    module = importlib.import_module(f"{fmt._module}.SubGraph")
    original = module.SubGraphStart
    pending = list(values)

    def start(builder: flatbuffers.Builder) -> None:
        original(builder)
        value = pending.pop(0)
        if value:
            builder.PrependInt8Slot(_CIRCLE_DATA_FORMAT_SLOT, value, 0)

    module.SubGraphStart = start
    try:
        yield
    finally:
        module.SubGraphStart = original


def encode(model: Model, fmt_name: str | None = None) -> bytes:
    """Encode a Model as TFL3 or CIR0 bytes."""
    return encode_image(model, fmt_name).tobytes()


def encode_image(model: Model, fmt_name: str | None = None) -> Encoded:
    """Encode a Model; the result references large buffer data instead of copying it."""
    fmt = formats.get(fmt_name or model.format)
    encoder = _Encoder(model, fmt)
    keep, buffer_map = used_buffer_map(model)

    opcodes = list(model.opcodes)
    known = {id(code) for code in opcodes}
    for subgraph in model.subgraphs:
        for op in subgraph.operators:
            if id(op.opcode) not in known:
                known.add(id(op.opcode))
                opcodes.append(op.opcode)
    opcode_index = {id(code): i for i, code in enumerate(opcodes)}
    opcode_objects = [_opcode_object(encoder, code) for code in opcodes]

    tensor_types = fmt.enum("TensorType")
    subgraph_objects = []
    for s, subgraph in enumerate(model.subgraphs):
        shell = subgraph.copy()
        shell.tensors, shell.operators = [], []
        shell.__dict__.pop("dataFormat", None)
        sg = encoder.table(shell, f"subgraph {s}")
        for tensor in subgraph.tensors:
            if tensor.type not in tensor_types:
                raise ModelError(
                    f"tensor {tensor.name!r}: the {fmt.name} schema has no type {tensor.type}"
                )
            shell_tensor = tensor.copy()
            shell_tensor.type = tensor_types[tensor.type]
            shell_tensor.buffer = buffer_map[tensor.buffer]
            sg.tensors.append(encoder.table(shell_tensor, f"tensor {tensor.name!r}"))
        for i, op in enumerate(subgraph.operators):
            shell_op = op.copy()
            del shell_op.opcode
            obj = encoder.table(shell_op, f"operator {i} ({op.opcode.name}) of subgraph {s}")
            obj.opcodeIndex = opcode_index[id(op.opcode)]
            sg.operators.append(obj)
        subgraph_objects.append(sg)

    root = model.root.copy()
    if fmt.name != model.format:  # each format numbers its schema versions its own way
        root.version = fmt.schema_version
    metadata = root.get("metadata")
    if metadata:
        root.metadata = [entry.copy() for entry in metadata]
        for entry in root.metadata:
            entry.buffer = buffer_map[entry.buffer]
    model_object = encoder.table(root, "model")
    model_object.operatorCodes = opcode_objects
    model_object.subgraphs = subgraph_objects
    holes: list[tuple[int, np.ndarray, int | None]] = []
    model_object.buffers = [_packed(fmt, model.buffers[i], holes) for i in keep]

    data_bytes = sum(len(model.buffers[i].data) for i in keep if model.buffers[i].data is not None)
    if data_bytes > MAX_FLATBUFFER_SIZE:
        raise ModelError("the model is larger than 2 GB, which a single flatbuffer cannot hold")
    # Generous: the builder's memory is an anonymous map, and untouched pages (the holes
    # and the slack) cost nothing.
    estimate = (
        data_bytes
        + 64 * len(keep)
        + (1 << 20)
        + 4096 * sum(len(sg.tensors) + len(sg.operators) for sg in model.subgraphs)
    )
    builder = _builder(min(estimate, MAX_FLATBUFFER_SIZE))
    try:
        with _circle_data_format_writer(fmt, [sg.get("dataFormat", 0) for sg in model.subgraphs]):
            offset = model_object.Pack(builder)
        builder.Finish(offset, file_identifier=fmt.identifier)
    except flatbuffers.builder.BuilderSizeError:
        raise ModelError(
            "the model is larger than 2 GB, which a single flatbuffer cannot hold"
        ) from None
    total, head = len(builder.Bytes), builder.Head()
    image = memoryview(builder.Bytes)[head:]
    return Encoded(
        image, [(total - from_end - head, data, source) for from_end, data, source in holes]
    )


def _builder(size: int) -> flatbuffers.Builder:
    builder = flatbuffers.Builder(0)
    builder.Bytes = mmap.mmap(-1, size) if size >= 1 << 20 else bytearray(size)
    builder.head = size
    return builder


def _packed(fmt: Format, buffer: Table, holes: list) -> _PackedBuffer:
    unchanged = buffer.get("_source_data") is not None and buffer.data is buffer._source_data
    return _PackedBuffer(fmt, buffer.data, buffer._source_offset if unchanged else None, holes)


def inconsistent_opcodes(model: Model) -> list[str]:
    """What the writer will correct in the input's operator-code fields, one line per code.

    Current writers set ``deprecated_builtin_code = min(code, 127)`` (127 is
    PLACEHOLDER_FOR_GREATER_OP_CODES; circle's negative codes stay as they are) and
    ``builtin_code = code``; readers take the larger of the two, as TFLite's GetBuiltinCode
    does. A code stored otherwise (older writers left ``builtin_code`` at 0) is written back
    in the current form: same operator, both fields set.
    """
    fmt = formats.get(model.format)
    found = []
    for code in model.opcodes:
        source = code.source
        if source is None:
            continue
        stored = (source.get("deprecatedBuiltinCode", 0), source.get("builtinCode", 0))
        wanted = fmt.op_codes(code.name)
        if stored != wanted:
            found.append(
                f"operator code {code.name}: deprecated_builtin_code/builtin_code "
                f"{stored[0]}/{stored[1]} written as {wanted[0]}/{wanted[1]}"
            )
    return found


def _opcode_object(encoder: _Encoder, code: OpCode) -> Any:
    fmt = encoder.fmt
    if (
        code.source is not None
        and code.source_format == fmt.name
        and code.source.version == code.version
    ):
        obj = encoder.table(code.source, f"operator code {code.name}")
        # Both code fields as current writers set them, whatever the input had (some older
        # writers left builtin_code at 0, which readers of builtin_code alone take for ADD).
        obj.deprecatedBuiltinCode, obj.builtinCode = fmt.op_codes(code.name)
        return obj
    try:
        deprecated, builtin = fmt.op_codes(code.name)
    except KeyError:
        raise ModelError(
            f"operator {code.name} has no equivalent in the {fmt.name} schema"
        ) from None
    obj = fmt.table_class("OperatorCode")()
    obj.deprecatedBuiltinCode, obj.builtinCode = deprecated, builtin
    obj.version = code.version
    obj.customCode = code.custom_code
    return obj
