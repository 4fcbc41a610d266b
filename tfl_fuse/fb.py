"""Decode TFL3/CIR0 flatbuffers into the neutral :class:`~tfl_fuse.model.Model` and back.

Both directions walk the tables with the layouts :mod:`tfl_fuse.formats` reads off the schema
packages' generated code (each field's name, vtable slot, kind and default), instead of going
through the object API's per-field method calls, which cost most of a run on many-op models.

Decoding reads each table's vtable once and turns it into a neutral :class:`Table` holding
every field of the schema (absent fields at their defaults), so every field travels through
untouched. Index vectors rules edit (``inputs``, ``shape``, ...) become lists; other vectors
are read-only numpy views of the input, so weights are never copied.

Encoding writes each Table with the target format's layout of the same type name (which is
also how circle <-> tflite conversion works) into a pre-sized buffer, back to front, byte for
byte as the flatbuffers ``Builder`` and the object API's ``Pack`` would (the same field order,
alignment and vtable sharing), so the output is deterministic. Buffer data is 16-byte
aligned; large data is not copied but left as a hole the writer fills from the input file.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import gc
import mmap
import os
import queue
import struct
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from . import formats
from .formats import SCALAR, STRING, TABLE, TABLES, UNION, VECTOR, Format
from .model import (
    MADV_POPULATE_READ,
    SCALE_CHUNK_VALUES,
    Model,
    ModelError,
    OpCode,
    ScaledProduct,
    Table,
    mapped_range,
    populate_mapped_pages,
    release_mapped_pages,
)

# Index vectors that rules edit: decoded as Python lists instead of read-only numpy views.
_INDEX_FIELDS = {"inputs", "outputs", "intermediates", "shape", "shapeSignature"}
BUFFER_ALIGNMENT = 16
MAX_FLATBUFFER_SIZE = 2**31 - 1
# Buffer data beyond this is kept after the flatbuffer (the tables need room inside 2 GB too).
EXTERNAL_DATA_BYTES = MAX_FLATBUFFER_SIZE - (256 << 20)

_U8 = struct.Struct("<B").unpack_from
_U16 = struct.Struct("<H").unpack_from
_U32 = struct.Struct("<I").unpack_from
_I32 = struct.Struct("<i").unpack_from


# --------------------------------------------------------------------------------------------
# decode


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


# Reading kinds beyond the layout's: index vectors read as lists, legacy fields that appear
# in the neutral table only when set, and a union's type (read, as the object API reads it,
# even without a member; the member's table is named by it, so no field holds it).
_INDEX = 10
_LEGACY = 11
_UNION_TYPE = 12


class _ReadPlan:
    """How to read one table type: its defaults, and per vtable slot what lies there."""

    __slots__ = ("defaults", "slots", "count")

    def __init__(self, layout: formats.Layout, legacy: set[str]) -> None:
        self.defaults: dict[str, Any] = {"_type": layout.type_name}
        last = max((max(f.slot, f.type_slot) for f in layout.fields), default=-1)
        slots: list[tuple | None] = [None] * (last + 1)
        for f in layout.fields:
            kind, argument = f.kind, None
            if f.name in legacy:
                kind, argument = _LEGACY, struct.Struct(f.code).unpack_from
            else:
                self.defaults[f.name] = f.default
            if kind == SCALAR:
                argument = struct.Struct(f.code).unpack_from
            elif kind == VECTOR:
                if f.name in _INDEX_FIELDS:
                    kind, argument = _INDEX, f.code[1]
                else:
                    argument = np.dtype(f.code)
            elif kind in (TABLE, TABLES):
                argument = f.type_name
            elif kind == UNION:
                argument = (f.type_name, f.type_slot)
                slots[f.type_slot] = (f.name + "Type", _UNION_TYPE, _U8)
            slots[f.slot] = (f.name, kind, argument)
        self.slots = tuple(slots)
        self.count = len(slots)


# format -> type name -> plan: made once per process
_READ_PLANS: dict[str, dict[str | tuple[str, int], _ReadPlan | None]] = {}


class _Reader:
    """Reads tables out of the model bytes with the format's layouts."""

    def __init__(self, fmt: Format, data: bytes | bytearray | memoryview) -> None:
        self.fmt = fmt
        self.data = data
        self.plans = _READ_PLANS.setdefault(fmt.name, {})
        self.vector_structs: dict[tuple[str, int], Any] = {}

    def plan(self, type_name: str) -> _ReadPlan:
        plan = self.plans.get(type_name)
        if plan is None:
            layout = self.fmt.layout(type_name)
            if layout is None:
                raise ModelError(f"the {self.fmt.name} schema has no table {type_name}")
            legacy = formats.LEGACY_FIELDS.get((self.fmt.name, type_name))
            plan = _ReadPlan(layout, {legacy.name} if legacy else set())
            self.plans[type_name] = plan
        return plan

    def root(self) -> Table:
        return self.table(_U32(self.data, 0)[0], self.plan("Model"))

    def table(self, pos: int, plan: _ReadPlan) -> Table:
        fields = plan.defaults.copy()
        table = Table.__new__(Table)
        table.__dict__ = fields
        if not plan.count:
            return table  # nothing to read (the object API does not look at it either)
        data = self.data
        vtable = pos - _I32(data, pos)[0]
        if vtable < 0:
            raise struct.error("a vtable before the start of the file")
        count = min((_U16(data, vtable)[0] - 3) // 2, plan.count)
        if count > 0:
            offsets = struct.unpack_from(f"<{count}H", data, vtable + 4)
            for offset, entry in zip(offsets, plan.slots):
                if not offset or entry is None:
                    continue
                name, kind, argument = entry
                at = pos + offset
                if kind == SCALAR:
                    fields[name] = argument(data, at)[0]
                    continue
                if kind == _LEGACY:
                    value = argument(data, at)[0]
                    if value:
                        fields[name] = value
                    continue
                if kind == UNION:
                    fields[name] = self.union(pos, offsets, at, *argument)
                    continue
                if kind == _UNION_TYPE:
                    argument(data, at)
                    continue
                at += _U32(data, at)[0]
                if kind == _INDEX:
                    n = _U32(data, at)[0]
                    fields[name] = list(self.vector_struct(argument, n)(data, at + 4))
                elif kind == VECTOR:
                    fields[name] = np.frombuffer(
                        data, dtype=argument, count=_U32(data, at)[0], offset=at + 4
                    )
                elif kind == STRING:
                    n = _U32(data, at)[0]
                    raw = bytes(data[at + 4 : at + 4 + n])
                    try:
                        fields[name] = raw.decode("utf-8")
                    except UnicodeDecodeError:
                        fields[name] = raw
                elif kind == TABLE:
                    fields[name] = self.table(at, self.plan(argument))
                else:  # TABLES
                    n = _U32(data, at)[0]
                    child = self.plan(argument)
                    read = self.table
                    starts = self.vector_struct("I", n)(data, at + 4)
                    fields[name] = [
                        read(element + start, child)
                        for element, start in zip(range(at + 4, at + 4 + 4 * n, 4), starts)
                    ]
        return table

    def union(self, pos: int, offsets: tuple, at: int, enum: str, type_slot: int) -> Table | None:
        type_offset = offsets[type_slot] if type_slot < len(offsets) else 0
        member = _U8(self.data, pos + type_offset)[0] if type_offset else 0
        if not member:
            return None
        key = (enum, member)
        if key not in self.plans:
            name = self.fmt.enum_names(enum).get(member)
            known = name is not None and self.fmt.layout(name) is not None
            self.plans[key] = self.plan(name) if known else None
        plan = self.plans[key]
        if plan is None:
            return None  # a member this schema does not know: as the object API
        return self.table(at + _U32(self.data, at)[0], plan)

    def vector_struct(self, code: str, n: int) -> Any:
        key = (code, n)
        unpack = self.vector_structs.get(key)
        if unpack is None:
            unpack = struct.Struct(f"<{n}{code}").unpack_from
            if n <= 64:  # small vectors repeat; one-off large ones are not kept
                self.vector_structs[key] = unpack
        return unpack

    def vector_start(self, pos: int, slot: int) -> int | None:
        """Where the elements of the vector in ``slot`` of the table at ``pos`` start."""
        data = self.data
        vtable = pos - _I32(data, pos)[0]
        if 4 + 2 * slot >= _U16(data, vtable)[0]:
            return None
        offset = _U16(data, vtable + 4 + 2 * slot)[0]
        if not offset:
            return None
        at = pos + offset
        return at + _U32(data, at)[0] + 4


def decode(data: bytes | bytearray | memoryview) -> Model:
    """Decode model bytes (TFL3 or CIR0) into a neutral Model; ModelError on bad input."""
    fmt = detect_format(data)
    root_offset = struct.unpack_from("<I", data, 0)[0]
    if root_offset + 4 > len(data):
        raise ModelError(
            f"truncated or not a {fmt.name} flatbuffer: "
            f"its root offset {root_offset} is past the end of the file ({len(data)} bytes)"
        )
    reader = _Reader(fmt, data)
    with collector_paused():
        try:
            root = reader.root()
            buffer_positions = _buffer_positions(reader, root_offset)
        except (ModelError, formats.LayoutError):
            raise
        except (RecursionError, MemoryError, Exception) as error:  # noqa: BLE001 - any parse failure
            raise ModelError(_parse_failure(fmt.name, len(data), error)) from None
        model = _model_from_tables(root, fmt, data, buffer_positions)
    from .validate import validate  # late import: validate uses the graph helpers

    validate(model)
    return model


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Pause Python's cycle collector while the model's tables are made (or rewritten).

    Decoding makes tens of thousands of dicts and lists and frees none of them; each
    collection the allocations trigger would walk all of them again (a third of the decoding
    time on a 6,000-op model) to find no garbage. A whole run makes no cyclic garbage either
    (test_recipes checks every recipe's run), so reference counting still frees everything. The
    collector is re-enabled afterwards, and left alone if the caller had turned it off.
    """
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _buffer_positions(reader: _Reader, root_offset: int) -> list[int | None]:
    """Where each buffer's inline data starts in the input (for file-to-file copies)."""
    slot = reader.fmt.layout("Model").field("buffers").slot
    data_slot = reader.fmt.layout("Buffer").field("data").slot
    start = reader.vector_start(root_offset, slot)
    if start is None:
        return []
    n = _U32(reader.data, start - 4)[0]
    positions = []
    for i in range(n):
        at = start + 4 * i
        positions.append(reader.vector_start(at + _U32(reader.data, at)[0], data_slot))
    return positions


def _model_from_tables(
    root: Table, fmt: Format, data: bytes | bytearray | memoryview, buffer_positions: list
) -> Model:
    try:
        opcodes = [
            OpCode(
                fmt.op_name(code.deprecatedBuiltinCode, code.builtinCode),
                code.version,
                code.customCode,
                source=code,
                source_format=fmt.name,
            )
            for code in root.operatorCodes or []
        ]
    except KeyError as error:
        raise ModelError(str(error.args[0])) from None

    buffers = []
    for b, buffer in enumerate(root.buffers or []):
        payload = buffer.data
        if buffer.offset > 1:  # data stored after the flatbuffer (models over 2 GB)
            if payload is not None and len(payload):
                # LiteRT reads the inline data, other readers the offset: refuse the ambiguity.
                raise ModelError(
                    f"buffer {b} has both inline data and an offset ({buffer.offset}); "
                    "a buffer holds one or the other"
                )
            payload = _external(data, buffer.offset, buffer.size, f"buffer {b} data")
            buffers.append(Table("Buffer", data=payload, offset=0, size=0))
            buffers[-1]._source_offset, buffers[-1]._source_data = buffer.offset, payload
            continue
        buffers.append(Table("Buffer", data=payload, offset=0, size=0))
        if payload is not None:
            buffers[-1]._source_offset, buffers[-1]._source_data = buffer_positions[b], payload

    tensor_types = fmt.enum_names("TensorType")
    subgraphs = []
    for subgraph in root.subgraphs or []:
        subgraph.tensors = subgraph.tensors or []
        subgraph.operators = subgraph.operators or []
        subgraph.inputs = subgraph.inputs or []
        subgraph.outputs = subgraph.outputs or []
        for tensor in subgraph.tensors:
            name = tensor_types.get(tensor.type)
            if name is None:
                raise ModelError(f"tensor {tensor.name!r} has unknown type code {tensor.type}")
            tensor.type = name
        for k, op in enumerate(subgraph.operators):
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
                what = f"operator {k} of subgraph {len(subgraphs)}"
                if op.get("customOptions") is not None and len(op.customOptions):
                    raise ModelError(
                        f"{what} has both inline custom options and large custom options"
                    )
                op.customOptions = _external(
                    data,
                    op.largeCustomOptionsOffset,
                    op.largeCustomOptionsSize,
                    f"{what} large custom options",
                )
                op.largeCustomOptionsOffset = op.largeCustomOptionsSize = 0
        subgraphs.append(subgraph)

    for name in ("operatorCodes", "subgraphs", "buffers"):
        root.__dict__.pop(name, None)
    return Model(fmt.name, root, opcodes, subgraphs, buffers)


def _external(
    data: bytes | bytearray | memoryview, offset: int, size: int, what: str
) -> np.ndarray:
    """Bytes stored after the flatbuffer at (offset, size), checked to lie inside the file."""
    if not 0 <= offset <= len(data) or not 0 <= size <= len(data) - offset:
        raise ModelError(
            f"{what} at offset {offset}, size {size} lie past the end of the file ({len(data)} bytes)"
        )
    return np.frombuffer(data, dtype=np.uint8, count=size, offset=offset)


# --------------------------------------------------------------------------------------------
# encode


HOLE_MIN_BYTES = 4096  # buffer data at least this large is referenced, not copied, until written


def aligned_as_written(model: Model) -> bool:
    """Whether every buffer's data lies in the input file where this writer would align it
    (BUFFER_ALIGNMENT): only then is the input file itself an acceptable output."""
    for buffer in model.buffers:
        data = buffer.get("data")
        if data is None or not len(data):
            continue
        position = buffer.__dict__.get("_source_offset")
        if position is None or position % BUFFER_ALIGNMENT:
            return False
    return True


class Encoded:
    """An encoded model: the builder's image, whose large buffer data are "holes" filled on output.

    Writing fills each hole from its numpy array; unchanged input data is written from the
    input's map a few MiB at a time, or copied file to file in the kernel (copy_file_range)
    when it is larger than 64 MiB, so the output never needs a second in-memory copy of the
    weights. In a model over 2 GB the holes lie after the image (buffers
    with offset/size); the gaps between them are zero padding.
    """

    def __init__(
        self,
        image: memoryview,
        holes: list[tuple[int, np.ndarray, int | None]],
        size: int | None = None,
    ) -> None:
        self.image = image
        self.holes = sorted(holes, key=lambda hole: hole[0])
        self.size = len(image) if size is None else size

    @classmethod
    def copy_of(cls, data: bytes | bytearray | memoryview | mmap.mmap) -> Encoded:
        """The input model itself, to be written byte for byte (from the input file when it
        is one, else from memory)."""
        whole = np.frombuffer(data, np.uint8)
        return cls(memoryview(b""), [(0, whole, 0)], len(whole))

    def __len__(self) -> int:
        return self.size

    def tobytes(self) -> bytes:
        out = bytearray(self.size)
        out[: len(self.image)] = self.image
        for position, data, _ in self.holes:
            out[position : position + len(data)] = _bytes_of(data)
        return bytes(out)

    def write(self, fd: int, source_fd: int | None = None, writeback: bool = False) -> None:
        """Write the image to ``fd``, unchanged weights copied from ``source_fd`` in the kernel.

        ``writeback``: start writing to disk each MiB written so far while the rest is still
        being written (sync_file_range), so that an fsync after this waits less: a whole
        optimize_file of DenseNet121 103 -> 97 ms, MobileNetV2 25 -> 22 ms, ResNet50V2
        152 -> 130 ms (12 interleaved runs each).

        Data up to MAPPED_WRITE_STEP and the image between goes out in batches of that size,
        one writev each (:class:`_Batch`). Where folds changed PIPELINE_MIN_BYTES or more,
        the writing is done by a thread of its own (:class:`_Pipeline`), in order, while this
        one computes the next piece of folded weights.
        """
        folded = sum(
            len(data)
            for _, data, _ in self.holes
            if isinstance(data, ScaledProduct) and data._value is None
        )
        pipeline = _Pipeline() if folded >= PIPELINE_MIN_BYTES else None
        done = False
        try:
            self._write(fd, source_fd, writeback, pipeline)
            done = True
        finally:
            if pipeline is not None:
                pipeline.close(done)

    def _write(
        self, fd: int, source_fd: int | None, writeback: bool, pipeline: _Pipeline | None
    ) -> None:
        run = _run_now if pipeline is None else pipeline.submit
        position = flushed = 0
        start_writeback = _writeback_starter() if writeback else None
        batch = _Batch(fd)
        small = min(MAPPED_WRITE_STEP, MAPPED_WRITE_BYTES)

        def flush() -> None:
            nonlocal batch
            if batch.views:
                run(batch.flush)
                batch = _Batch(fd)

        for start, data, source_offset in self.holes:
            if pipeline is not None:
                pipeline.check()
            self._gap(batch, position, start)
            if isinstance(data, ScaledProduct):
                flush()
                if pipeline is None:
                    for piece in data.pieces():  # computed as written, through a reused scratch
                        _write_all(fd, piece)
                else:
                    for piece, owner in data.pieces_into(pipeline.take):
                        pipeline.submit(functools.partial(_write_all, fd, piece), owner)
            elif len(data) <= small or (source_offset is None and len(data) <= MAPPED_WRITE_STEP):
                batch.add(data)  # unchanged input data from the map, or a rule's new array
            else:
                flush()
                run(functools.partial(_write_large, fd, data, source_fd, source_offset))
            position = start + len(data)
            if batch.size >= MAPPED_WRITE_STEP or len(batch.views) >= WRITEV_MAX_VIEWS:
                flush()
            if (
                start_writeback is not None
                and not batch.views
                and position - flushed >= WRITEBACK_STEP
            ):
                run(functools.partial(start_writeback, fd, flushed, position - flushed))
                flushed = position
        self._gap(batch, position, self.size)
        flush()
        if start_writeback is not None and self.size - flushed >= WRITEBACK_STEP:
            run(functools.partial(start_writeback, fd, flushed, self.size - flushed))

    def _gap(self, batch: _Batch, start: int, end: int) -> None:
        if end > start:
            image = self.image[start:end]
            if len(image):
                batch.add_view(image)
            padding = end - max(start, len(self.image))
            if padding > 0:
                batch.add_view(memoryview(bytes(padding)))


def _run_now(call: Callable[[], Any], owner: Any = None) -> None:
    call()


def _write_large(
    fd: int, data: np.ndarray, source_fd: int | None, source_offset: int | None
) -> None:
    """Buffer data larger than a batch: unchanged input under 64 MiB from the input's map,
    larger from the input file in the kernel, a rule's new array from memory."""
    if source_offset is not None and len(data) <= MAPPED_WRITE_BYTES and _write_mapped(fd, data):
        return
    if source_offset is not None and source_fd is not None:
        _send_all(fd, source_fd, source_offset, len(data))
    else:
        _write_all(fd, memoryview(data).cast("B"))


PIPELINE_MIN_BYTES = 1 << 20
PIPELINE_BUFFERS = 4


class _Pipeline:
    """A writing thread fed in order, so that computing folded weights (numpy, which lets go of
    the interpreter lock) and writing them (the kernel's copy) overlap on two cores:
    DenseNet121's write of 23 MB of folded weights 17.5 -> 14.4 ms (24 interleaved runs).

    The pieces are computed into a few buffers of its own, each handed back once written; a
    piece too large for them (a row of over SCALE_CHUNK_VALUES values) waits while as many are
    queued, so memory stays bounded whatever the layer. The first failure of a write is kept,
    later writes are skipped, and :meth:`close` raises it.
    """

    def __init__(self) -> None:
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.free: queue.SimpleQueue = queue.SimpleQueue()
        self.buffers: set[int] = set()
        for _ in range(PIPELINE_BUFFERS):
            buffer = np.empty(SCALE_CHUNK_VALUES, np.float32)
            self.buffers.add(id(buffer))
            self.free.put(buffer)
        self.own = threading.Semaphore(PIPELINE_BUFFERS)  # queued pieces of their own
        self.error: BaseException | None = None
        self.abandoned = False
        self.thread = threading.Thread(target=self._run, name="tfl_fuse-write", daemon=True)
        self.thread.start()

    def take(self) -> np.ndarray:
        """A free buffer (waits until a piece written hands one back)."""
        return self.free.get()

    def submit(self, call: Callable[[], Any], owner: Any = None) -> None:
        """Run ``call`` after everything submitted before; ``owner``: the memory of a piece it
        writes, given back to the free buffers afterwards when it is one of them."""
        if owner is None:
            pooled = None
        elif id(owner) in self.buffers:
            pooled = True
        else:
            self.own.acquire()
            pooled = False
        self.queue.put((call, owner, pooled))

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            call, owner, pooled = item
            try:
                if self.error is None and not self.abandoned:
                    call()
            except BaseException as error:  # noqa: BLE001 - raised again by close()
                self.error = error
            finally:
                del call, item
                if pooled:
                    self.free.put(owner)
                elif pooled is not None:
                    self.own.release()
                del owner

    def close(self, done: bool) -> None:
        """Wait for the writes; raise the first failure. Not ``done``: the caller failed,
        so what is still queued is skipped."""
        if not done:
            self.abandoned = True
        self.queue.put(None)
        self.thread.join()
        if done:
            self.check()


WRITEV_MAX_VIEWS = 512  # below every IOV_MAX (Linux: 1024)
NEAR_BYTES = 64  # input data this close (a length prefix, alignment) is mapped in one span


class _Batch:
    """Views written together in one writev, so that a model's many small buffers cost a few
    system calls instead of one or three each (a write, and mapping and letting go of the
    input's pages). Input data that lies back to back in the input's map is mapped in one
    call before the write and let go after it, as :func:`_write_mapped` does step by step:
    MobileNetV2's write 11.2 -> 9.7 ms (fsync included). Only the pages of the batch's own
    data are let go, not those of data between (a fold's weights, read again when written).
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.views: list[memoryview] = []
        self.size = 0
        self.spans: list[list[Any]] = []  # [map, start, end] of input bytes the views read

    def add_view(self, view: memoryview) -> None:
        self.views.append(view)
        self.size += len(view)

    def add(self, data: np.ndarray) -> None:
        mapped, low, high = mapped_range(data)
        if mapped is not None:
            last = self.spans[-1] if self.spans else None
            if last is not None and last[0] is mapped and last[2] <= low <= last[2] + NEAR_BYTES:
                last[2] = high
            else:
                self.spans.append([mapped, low, high])
        self.add_view(memoryview(np.ascontiguousarray(data).reshape(-1).view(np.uint8)))

    def flush(self) -> None:
        if not self.views:
            return
        page = mmap.PAGESIZE
        for mapped, low, high in self.spans:  # every page the views touch, mapped at once
            first, end = low // page * page, min(-(-high // page) * page, len(mapped))
            with contextlib.suppress(OSError, ValueError):
                mapped.madvise(MADV_POPULATE_READ, first, end - first)
        views = self.views
        while views:
            written = os.writev(self.fd, views)
            while views and written >= len(views[0]):
                written -= len(views[0])
                views.pop(0)
            if written:
                views[0] = views[0][written:]
        for mapped, low, high in self.spans:  # the pages wholly their own, let go
            first, end = -(-low // page) * page, high // page * page
            if end > first:
                with contextlib.suppress(OSError, ValueError):
                    mapped.madvise(mmap.MADV_DONTNEED, first, end - first)
        self.views, self.size, self.spans = [], 0, []


WRITEBACK_STEP = 1 << 20
MAPPED_WRITE_BYTES = 64 << 20
MAPPED_WRITE_STEP = 4 << 20


def _write_mapped(fd: int, data: np.ndarray) -> bool:
    """Write unchanged input data from the input's map, a few MiB at a time: each step's
    pages mapped in one call before it is written and let go after (so memory grows by one
    step, not by the data). False, having written nothing, where ``data`` is no view of a
    mapped file or the kernel cannot map a range at once (the caller copies it otherwise).

    On this project's VMs this is faster than copy_file_range for models under 64 MiB
    (MobileNetV2's 14 MB of weights: 5.0 against 5.9 ms): neither can share pages, since
    the input's buffers and the output's do not lie at the same offsets within a page, and
    writing from mapped memory copies in larger steps than the kernel's file-to-file copy.
    """
    flat = data.reshape(-1).view(np.uint8)
    for start in range(0, len(flat), MAPPED_WRITE_STEP):
        step = flat[start : start + MAPPED_WRITE_STEP]
        if not populate_mapped_pages(step) and start == 0:
            return False
        _write_all(fd, memoryview(step))
        release_mapped_pages(step)
    return True


SYNC_FILE_RANGE_WRITE = 2  # linux/fs.h: start writeback of dirty pages, do not wait


@functools.cache
def _libc_call(name: str, *argtypes: str) -> Any:
    """The C library's function ``name`` (ctypes argument type names), or None without it."""
    try:
        import ctypes

        call = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    call.argtypes = [getattr(ctypes, t) for t in argtypes]
    call.restype = ctypes.c_int
    return call


RESERVE_UNSUPPORTED = {errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.ENODEV, errno.EINTR}


def reserve(fd: int, size: int) -> None:
    """Allocate the disk space of a new file of ``size`` bytes in one call (Linux fallocate).

    ext4 otherwise allocates blocks a few at a time as the written pages go to disk; with the
    space allocated first, DenseNet121's write is about 1 ms faster and ResNet50V2's 5 ms.
    A disk too full for the model fails here (OSError ENOSPC), before anything is written.
    Where the file system or the C library cannot (tmpfs before Linux 3.5, some network
    file systems, not Linux), nothing is reserved and the writes allocate as before
    (glibc's posix_fallocate is not used: there it writes a byte into every block first).
    """
    call = _libc_call("fallocate", "c_int", "c_int", "c_longlong", "c_longlong")
    if call is None or size <= 0:
        return
    if call(fd, 0, 0, size) != 0:
        import ctypes

        code = ctypes.get_errno()
        if code not in RESERVE_UNSUPPORTED:
            raise OSError(code, os.strerror(code))


@functools.cache
def _writeback_starter() -> Any:
    """Linux's sync_file_range(fd, offset, count, SYNC_FILE_RANGE_WRITE) as a function, or None
    where the C library has none (the fsync then does all the waiting, as without it)."""
    call = _libc_call("sync_file_range", "c_int", "c_longlong", "c_longlong", "c_uint")
    if call is None:
        return None

    def start(fd: int, offset: int, count: int) -> None:
        call(fd, offset, count, SYNC_FILE_RANGE_WRITE)  # a failure only means no head start

    return start


def _bytes_of(data: np.ndarray | ScaledProduct) -> memoryview:
    """Buffer data as bytes (a ScaledProduct computed)."""
    if isinstance(data, ScaledProduct):
        data = data.value()
    return memoryview(data).cast("B")


def _write_all(fd: int, view: memoryview) -> None:
    while len(view):
        view = view[os.write(fd, view) :]


def _send_all(fd: int, source_fd: int, offset: int, count: int) -> None:
    """Copy ``count`` bytes at ``offset`` of the input file to ``fd``, inside the kernel.

    copy_file_range is about 3x faster than sendfile on ext4 (2.4 GB: 1.6 s against 5 s);
    sendfile is the fallback where the kernel or file system cannot do it.
    """
    use_copy = hasattr(os, "copy_file_range")
    while count:
        if use_copy:
            try:
                sent = os.copy_file_range(source_fd, fd, count, offset)
            except OSError:
                use_copy = False
                continue
        else:
            sent = os.sendfile(fd, source_fd, offset, count)
        if sent <= 0:
            raise OSError("the input file ended before the data the model names")
        offset += sent
        count -= sent


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


class _Builder:
    """A flatbuffer written back to front into a pre-sized buffer.

    It lays bytes out exactly as ``flatbuffers.Builder`` does (the same alignment padding,
    vtables trimmed of trailing empty slots and shared when equal), without its per-value
    method calls. Positions are offsets from the end of the buffer, as the flatbuffers
    builder counts them, so growing the buffer moves nothing.
    """

    def __init__(self, size: int) -> None:
        self.bytes: bytearray | mmap.mmap = _zeroed(size)
        self.size = size
        self.head = size
        self.minalign = 1
        self.vtables: dict[tuple, int] = {}
        self.object_end = 0
        self.slots: list[tuple[int, int]] = []

    def offset(self) -> int:
        return self.size - self.head

    def prep(self, size: int, additional: int) -> None:
        """Pad so that ``size`` bytes are aligned after ``additional`` more bytes are written."""
        if size > self.minalign:
            self.minalign = size
        padding = -(self.size - self.head + additional) & (size - 1)
        if self.head < padding + size + additional:
            self.grow(padding + size + additional)
        self.head -= padding  # the buffer starts zeroed: padding needs no writing

    def grow(self, needed: int) -> None:
        size = self.size
        while size - self.size + self.head < needed:
            size *= 2
        if size > MAX_FLATBUFFER_SIZE + 1:
            raise ModelError(
                "the model's tables are larger than 2 GB, which a single flatbuffer cannot hold"
            )
        grown = _zeroed(size)
        used = self.size - self.head
        grown[size - used :] = self.bytes[self.head :]
        self.head += size - self.size
        self.bytes, self.size = grown, size

    def uoffset(self, target: int) -> None:
        self.prep(4, 0)
        value = self.size - self.head + 4 - target
        self.head -= 4
        _PACK_U32(self.bytes, self.head, value)

    def string(self, value: str | bytes) -> int:
        raw = value.encode("utf-8") if isinstance(value, str) else bytes(value)
        n = len(raw)
        self.prep(4, n + 1)
        head = self.head - n - 1  # the zero terminator is already there
        self.bytes[head : head + n] = raw
        head -= 4
        _PACK_U32(self.bytes, head, n)
        self.head = head
        return self.size - head

    def vector(self, payload: bytes | memoryview, count: int, alignment: int) -> int:
        n = len(payload)
        self.prep(4, n)
        if alignment > 4:  # 4-byte alignment after n bytes is every smaller alignment too
            self.prep(alignment, n)
        head = self.head - n
        self.bytes[head : head + n] = payload
        head -= 4
        _PACK_U32(self.bytes, head, count)
        self.head = head
        return self.size - head

    def offsets(self, targets: list[int]) -> int:
        """A vector of offsets to tables written before."""
        n = len(targets)
        self.prep(4, 4 * n)
        end = self.size - self.head + 4 * n  # offsets are relative to where each is stored
        self.head -= 4 * n
        struct.pack_into(
            f"<{n}I", self.bytes, self.head, *[end - 4 * i - t for i, t in enumerate(targets)]
        )
        self.head -= 4
        _PACK_U32(self.bytes, self.head, n)
        return self.size - self.head

    def start(self) -> None:
        self.object_end = self.size - self.head
        self.slots = []

    def scalar(self, slot: int, pack: Any, width: int, value: Any) -> None:
        """A field of the table being written (prep and write in one, as it is the most
        frequent call)."""
        if width > self.minalign:
            self.minalign = width
        head = self.head
        padding = (head - self.size) & (width - 1)
        if head < padding + width:
            self.grow(padding + width)
            head = self.head
        head -= padding + width
        pack(self.bytes, head, value)
        self.head = head
        self.slots.append((slot, self.size - head))

    def reference(self, slot: int, target: int) -> None:
        """A field of the table being written that points to ``target``."""
        if self.minalign < 4:
            self.minalign = 4
        head = self.head
        padding = (head - self.size) & 3
        if head < padding + 4:
            self.grow(padding + 4)
            head = self.head
        head -= padding + 4
        position = self.size - head
        _PACK_U32(self.bytes, head, position - target)
        self.head = head
        self.slots.append((slot, position))

    def end(self) -> int:
        """Finish the table: its vtable, shared with an equal one written before."""
        self.prep(4, 0)
        self.head -= 4
        table = self.size - self.head
        slots = self.slots
        entries = [0] * (max(slots)[0] + 1 if slots else 0)
        for slot, position in slots:
            entries[slot] = table - position
        key = (table - self.object_end, *entries)
        vtable = self.vtables.get(key)
        if vtable is None:
            n = len(entries) + 2
            if self.head < 2 * n:
                self.grow(2 * n)
            self.head -= 2 * n
            _vtable_struct(n)(self.bytes, self.head, 2 * n, *key)
            vtable = self.vtables[key] = self.size - self.head
        _PACK_I32(self.bytes, self.size - table, vtable - table)
        return table

    def finish(self, root: int, identifier: bytes) -> memoryview:
        self.prep(self.minalign, 8)
        self.prep(4, 4)
        self.head -= 4
        self.bytes[self.head : self.head + 4] = identifier
        self.uoffset(root)
        return memoryview(self.bytes)[self.head :]


_PACK_U32 = struct.Struct("<I").pack_into
_PACK_I32 = struct.Struct("<i").pack_into


@functools.cache
def _vtable_struct(n: int) -> Any:
    return struct.Struct(f"<{n}H").pack_into


@functools.cache
def _list_struct(code: str, n: int) -> Any:
    return struct.Struct(f"<{n}{code}").pack


def _zeroed(size: int) -> bytearray | mmap.mmap:
    # An anonymous map for large sizes: untouched pages (holes, slack) cost no memory.
    return mmap.mmap(-1, size) if size >= 1 << 20 else bytearray(size)


class _WritePlan:
    """How to write one table type of the target format."""

    __slots__ = ("type_name", "fields", "children", "names", "known", "source_defaults")

    def __init__(self, layout: formats.Layout, source: formats.Layout | None) -> None:
        self.type_name = layout.type_name
        self.names = layout.names
        # what a table may hold without a look at each field: its fields, its type, the
        # label rules give operators
        self.known = layout.names | {"_type", "_origin"}
        # Fields the target lacks may be present in a table only at the source's defaults.
        self.source_defaults = {f.name: f.default for f in source.fields} if source else {}
        fields = []
        for f in layout.fields:
            pack = width = None
            if f.kind in (SCALAR, UNION):
                packer = struct.Struct(f.code)
                pack, width = packer.pack_into, packer.size
            elif f.kind == VECTOR:
                pack, width = np.dtype(f.code), struct.calcsize(f.code)
            fields.append(
                (f.name, f.kind, f.slot, f.default, pack, width, f.type_name, f.type_slot)
            )
        self.fields = tuple(fields)
        # the fields written before the table itself: strings, vectors, tables
        self.children = tuple(
            (name, kind, pack, width, type_name)
            for name, kind, _, _, pack, width, type_name, _ in fields
            if kind != SCALAR
        )


# (target format, source format) -> type name -> plan: made once per process
_WRITE_PLANS: dict[tuple[str, str], dict[str, _WritePlan]] = {}


class _Writer:
    """Writes neutral Tables with the target format's layouts."""

    def __init__(self, fmt: Format, source: Format, size: int) -> None:
        self.fmt = fmt
        self.source = source
        self.builder = _Builder(size)
        self.plans = _WRITE_PLANS.setdefault((fmt.name, source.name), {})
        self.holes: list[tuple[int, np.ndarray, int | None]] = []
        self.buffer_data_slot = fmt.layout("Buffer").field("data").slot

    def plan(self, type_name: str, where: str) -> _WritePlan:
        plan = self.plans.get(type_name)
        if plan is None:
            layout = self.fmt.layout(type_name)
            if layout is None:
                raise ModelError(f"{where}: the {self.fmt.name} schema has no table {type_name}")
            plan = _WritePlan(layout, self.source.layout(type_name))
            self.plans[type_name] = plan
        return plan

    def table(self, table: Table, where: str) -> int:
        plan = self.plans.get(table._type) or self.plan(table._type, where)
        values = table.__dict__
        if not plan.known.issuperset(values):
            self.check_unknown(plan, values, values.keys() - plan.names, where)
        builder = self.builder
        children = []
        for name, kind, pack, width, type_name in plan.children:
            value = values.get(name)
            if value is None:
                continue
            if kind == VECTOR:
                children.append(self.vector(value, pack, width, name, where))
            elif kind == STRING:
                children.append(builder.string(value))
            elif kind == TABLES:
                if value and type(value[0]) is _BufferEntry:  # the model's buffers
                    targets = [self.buffer(entry) for entry in value]
                else:
                    targets = [self.table(entry, where) for entry in value]
                children.append(builder.offsets(targets))
            elif kind == UNION:
                members = self.fmt.enum(type_name)
                if not isinstance(value, Table) or value._type not in members:
                    member = getattr(value, "_type", type(value).__name__)
                    raise ModelError(f"{where}: the {self.fmt.name} schema has no {member}")
                children.append(self.table(value, where))
            else:  # TABLE
                children.append(self.table(value, where))
        builder.start()
        child = 0
        for name, kind, slot, default, pack, width, type_name, type_slot in plan.fields:
            if kind == SCALAR:
                value = values.get(name, default)
                if value != default:
                    builder.scalar(slot, pack, width, value)
                continue
            value = values.get(name)
            if value is None:
                continue
            if kind == UNION:
                builder.scalar(type_slot, pack, width, self.fmt.enum(type_name)[value._type])
            builder.reference(slot, children[child])
            child += 1
        return builder.end()

    def check_unknown(self, plan: _WritePlan, values: dict, extra: set, where: str) -> None:
        for name in [name for name in values if name in extra]:  # in the table's order
            if name.startswith("_") or _is_unset(values[name], plan.source_defaults.get(name)):
                continue
            raise ModelError(
                f"{where}: the {self.fmt.name} schema has no field {plan.type_name}.{name}"
            )

    def vector(self, value: Any, dtype: np.dtype, width: int, name: str, where: str) -> int:
        if type(value) is list and len(value) <= 64 and dtype.kind in "iu":
            try:
                payload = _list_struct(dtype.char, len(value))(*value)
            except struct.error:
                raise ModelError(f"{where}: a value of {name} does not fit {dtype.name}") from None
            return self.builder.vector(payload, len(value), width)
        array = np.asarray(value)
        if array.ndim != 1:
            raise ModelError(f"{where}: {name} is not a vector")
        if array.dtype != dtype:
            array = _converted(array, dtype, f"{where}: a value of {name}")
        return self.builder.vector(
            memoryview(np.ascontiguousarray(array)).cast("B"), len(array), width
        )

    def buffer(self, entry: _BufferEntry) -> int:
        """A Buffer table; its data 16-byte aligned, or after the flatbuffer (offset/size)."""
        builder = self.builder
        data = entry.data
        if entry.file_offset is not None:
            layout = self.fmt.layout("Buffer")
            builder.start()
            builder.scalar(layout.field("offset").slot, _PACK_U64, 8, entry.file_offset)
            builder.scalar(layout.field("size").slot, _PACK_U64, 8, len(data))
            return builder.end()
        position = None
        if data is not None:
            size = len(data)
            builder.prep(4, size)
            builder.prep(BUFFER_ALIGNMENT, size)
            builder.head -= size
            if size >= HOLE_MIN_BYTES:
                self.holes.append((builder.offset(), data, entry.source_offset))
            else:
                builder.bytes[builder.head : builder.head + size] = _bytes_of(data)
            builder.head -= 4
            _PACK_U32(builder.bytes, builder.head, size)
            position = builder.offset()
        builder.start()
        if position is not None:
            builder.reference(self.buffer_data_slot, position)
        return builder.end()


_PACK_U64 = struct.Struct("<Q").pack_into


def _converted(array: np.ndarray, dtype: np.dtype, what: str) -> np.ndarray:
    """``array`` as the schema's element type; ModelError where a value does not fit it."""
    with np.errstate(over="ignore", invalid="ignore"):  # checked below
        converted = array.astype(dtype)
    if dtype.kind in "iu" and array.size:
        limits = np.iinfo(dtype)
        if array.dtype.kind not in "iub" or array.min() < limits.min or array.max() > limits.max:
            if not np.array_equal(converted, array):
                raise ModelError(f"{what} does not fit {dtype.name}")
    elif dtype.kind == "f" and np.any(np.isinf(converted) & ~np.isinf(array)):
        raise ModelError(f"{what} does not fit {dtype.name}")
    return converted


def _is_unset(value: Any, default: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, (list, np.ndarray)):
        return len(value) == 0 and default is None
    return value == default


class _BufferEntry:
    """A buffer to write: its data, where unchanged data lies in the input, and (over 2 GB)
    where the data goes after the flatbuffer."""

    __slots__ = ("data", "source_offset", "file_offset")

    def __init__(self, buffer: Table) -> None:
        self.data = buffer.data
        unchanged = buffer.get("_source_data") is not None and buffer.data is buffer._source_data
        self.source_offset = buffer._source_offset if unchanged else None
        self.file_offset: int | None = None


def encode(model: Model, fmt_name: str | None = None) -> bytes:
    """Encode a Model as TFL3 or CIR0 bytes."""
    return encode_image(model, fmt_name).tobytes()


def encode_image(
    model: Model, fmt_name: str | None = None, external: bool | None = None
) -> Encoded:
    """Encode a Model; the result references large buffer data instead of copying it.

    ``external``: keep buffer data after the flatbuffer (Buffer offset/size); None decides
    by size (over EXTERNAL_DATA_BYTES, which a single flatbuffer cannot hold).
    """
    fmt = formats.get(fmt_name or model.format)
    keep, buffer_map = used_buffer_map(model)
    root = _root_table(model, fmt, buffer_map)
    buffers = [_BufferEntry(model.buffers[i]) for i in keep]
    root.buffers = buffers
    data_bytes = sum(len(b.data) for b in buffers if b.data is not None)
    tables = 64 * len(keep) + (1 << 20)
    tables += 4096 * sum(len(sg.tensors) + len(sg.operators) for sg in model.subgraphs)
    if external is None:
        external = data_bytes + BUFFER_ALIGNMENT * len(keep) > EXTERNAL_DATA_BYTES
    source = formats.get(model.format)
    if not external:
        # Generous: the builder's memory is an anonymous map, and untouched pages (the holes
        # and the slack) cost nothing.
        writer = _Writer(fmt, source, min(data_bytes + tables, MAX_FLATBUFFER_SIZE))
        image = writer.builder.finish(writer.table(root, "model"), fmt.identifier)
        total = len(image) + writer.builder.head
        head = writer.builder.head
        return Encoded(
            image,
            [(total - from_end - head, data, source) for from_end, data, source in writer.holes],
        )
    # Over 2 GB: every buffer with data keeps it after the flatbuffer, at a 16-byte aligned
    # file offset (Buffer.offset/size, which LiteRT reads). The tables are written once with
    # placeholder offsets to learn their size, which real offsets (all > 1) do not change.
    _require_external_buffers(fmt)
    outside = [b for b in buffers if b.data is not None and len(b.data)]
    for buffer in outside:
        buffer.file_offset = 2
    writer = _Writer(fmt, source, tables)
    size = len(writer.builder.finish(writer.table(root, "model"), fmt.identifier))
    position = size
    placed = []
    for buffer in outside:
        position = -(-position // BUFFER_ALIGNMENT) * BUFFER_ALIGNMENT
        buffer.file_offset = position
        placed.append((position, buffer.data, buffer.source_offset))
        position += len(buffer.data)
    writer = _Writer(fmt, source, tables)
    image = writer.builder.finish(writer.table(root, "model"), fmt.identifier)
    if len(image) != size:  # pragma: no cover - would be a writer change
        raise ModelError("internal: the model's tables changed size between packings")
    return Encoded(image, placed, position)


def _root_table(model: Model, fmt: Format, buffer_map: dict[int, int]) -> Table:
    """The Model table to write: the neutral model's fields in the target format's terms
    (operator-code indices, tensor type numbers, remapped buffer indices)."""
    opcodes = list(model.opcodes)
    known = {id(code) for code in opcodes}
    for subgraph in model.subgraphs:
        for op in subgraph.operators:
            if id(op.opcode) not in known:
                known.add(id(op.opcode))
                opcodes.append(op.opcode)
    opcode_index = {id(code): i for i, code in enumerate(opcodes)}

    tensor_types = fmt.enum("TensorType")
    keeps_data_format = "dataFormat" in fmt.layout("SubGraph").names
    subgraphs = []
    for subgraph in model.subgraphs:
        shell = subgraph.copy()
        if not keeps_data_format:
            shell.__dict__.pop("dataFormat", None)
        shell.tensors = []
        for tensor in subgraph.tensors:
            number = tensor_types.get(tensor.type)
            if number is None:
                raise ModelError(
                    f"tensor {tensor.name!r}: the {fmt.name} schema has no type {tensor.type}"
                )
            shell_tensor = tensor.copy()
            shell_tensor.type = number
            shell_tensor.buffer = buffer_map[tensor.buffer]
            shell.tensors.append(shell_tensor)
        shell.operators = []
        for op in subgraph.operators:
            shell_op = op.copy()
            del shell_op.opcode
            shell_op.opcodeIndex = opcode_index[id(op.opcode)]
            shell.operators.append(shell_op)
        subgraphs.append(shell)

    root = model.root.copy()
    if fmt.name != model.format:  # each format numbers its schema versions its own way
        root.version = fmt.schema_version
    metadata = root.get("metadata")
    if metadata:
        root.metadata = [entry.copy() for entry in metadata]
        for entry in root.metadata:
            entry.buffer = buffer_map[entry.buffer]
    root.operatorCodes = [_opcode_table(fmt, code) for code in opcodes]
    root.subgraphs = subgraphs
    return root


def _require_external_buffers(fmt: Format) -> None:
    if "offset" not in fmt.layout("Buffer").names:
        raise ModelError(
            f"the model is larger than 2 GB, and the {fmt.name} schema has no Buffer.offset "
            "to keep weights after the flatbuffer"
        )


def check_size(model: Model, fmt_name: str | None = None) -> None:
    """Refuse, before any rule runs, a model the output format cannot hold."""
    data_bytes = sum(len(b.data) for b in model.buffers if b.data is not None)
    if data_bytes > EXTERNAL_DATA_BYTES:
        _require_external_buffers(formats.get(fmt_name or model.format))


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


def _opcode_table(fmt: Format, code: OpCode) -> Table:
    if (
        code.source is not None
        and code.source_format == fmt.name
        and code.source.version == code.version
    ):
        table = code.source.copy()
        # Both code fields as current writers set them, whatever the input had (some older
        # writers left builtin_code at 0, which readers of builtin_code alone take for ADD).
        table.deprecatedBuiltinCode, table.builtinCode = fmt.op_codes(code.name)
        return table
    try:
        deprecated, builtin = fmt.op_codes(code.name)
    except KeyError:
        raise ModelError(
            f"operator {code.name} has no equivalent in the {fmt.name} schema"
        ) from None
    return Table(
        "OperatorCode",
        deprecatedBuiltinCode=deprecated,
        builtinCode=builtin,
        version=code.version,
        customCode=code.custom_code,
    )
