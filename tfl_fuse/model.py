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

Buffer data is a read-only numpy ``uint8`` view of the input bytes until a rule replaces it,
with an array or with a :class:`ScaledProduct` (a fold's new weights, computed when written).
"""

from __future__ import annotations

import contextlib
import math
import mmap
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

ADOPT_MIN_BYTES = 1 << 20  # add_buffer keeps arrays at least this large without a copy
SCALE_CHUNK_VALUES = 1 << 16  # float64 values per step: the temporary stays in the CPU cache
# weights at least this large give back the input pages they were read from as they go (their
# pages would otherwise all count in the process's memory); smaller ones keep them, as the
# madvise calls cost more than the pages (DenseNet121: 3 ms a run)
RELEASE_MAPPED_BYTES = 64 << 20


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

    def add_buffer(self, data: np.ndarray | bytes | ScaledProduct | None) -> int:
        """Append a buffer holding ``data`` (copied as little-endian bytes); return its index.

        A :class:`ScaledProduct` is kept as it is, to be computed when written."""
        if data is None or isinstance(data, ScaledProduct):
            payload = data
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


def release_mapped_pages(array: np.ndarray) -> None:
    """Let the kernel drop the pages of the input file that ``array`` (read) maps.

    The input is mapped read-only; pages read once stay counted in the process's memory
    until released, so a layer of N GB would otherwise cost N GB more than its result.
    Reading them again later is correct (the kernel maps the file again), only slower.
    """
    mapped, first, end = _mapped_pages(array, touched=False)
    if mapped is not None and end > first:
        with contextlib.suppress(OSError, ValueError):
            mapped.madvise(mmap.MADV_DONTNEED, first, end - first)


MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)  # Linux 5.14


def populate_mapped_pages(array: np.ndarray) -> bool:
    """Map every page of the input file that ``array`` views in one call, before it is read.

    Reading a mapped file page by page costs a fault every few pages; asking the kernel to map
    the range at once costs a fraction of that. False where ``array`` is no view of a mapped
    file or the kernel cannot (older than 5.14): reading it then faults as usual.
    """
    mapped, first, end = _mapped_pages(array, touched=True)
    if mapped is None or end <= first:
        return False
    try:
        mapped.madvise(MADV_POPULATE_READ, first, end - first)
    except (OSError, ValueError):
        return False
    return True


def _mapped_pages(array: np.ndarray, touched: bool) -> tuple[mmap.mmap | None, int, int]:
    """The file map ``array`` views (None if none) and the range of its pages: every page it
    touches (``touched``), or only the pages wholly its own."""
    if array.nbytes < mmap.PAGESIZE:
        return None, 0, 0  # not a whole page
    mapped, start, end = mapped_range(array)
    if mapped is None:
        return None, 0, 0
    page = mmap.PAGESIZE
    if touched:
        return mapped, start // page * page, min(-(-end // page) * page, len(mapped))
    return mapped, -(-start // page) * page, end // page * page


def mapped_range(array: np.ndarray) -> tuple[mmap.mmap | None, int, int]:
    """The file map a C-contiguous ``array`` views and the bytes of it (start, end), or
    (None, 0, 0) where it views none."""
    source = array
    while isinstance(source, np.ndarray) and source.base is not None:
        source = source.base
    mapped = source.obj if isinstance(source, memoryview) else source
    if not isinstance(mapped, mmap.mmap) or not array.flags.c_contiguous or not array.nbytes:
        return None, 0, 0
    base = np.frombuffer(mapped, np.uint8, count=1).__array_interface__["data"][0]
    start = array.__array_interface__["data"][0] - base
    return mapped, start, start + array.nbytes


_scratch = threading.local()


def _scratch_array(shape: tuple[int, ...]) -> np.ndarray:
    """A reused float32 array of ``shape`` (at most SCALE_CHUNK_VALUES values), this thread's own."""
    flat = getattr(_scratch, "values", None)
    if flat is None:
        flat = _scratch.values = np.empty(SCALE_CHUNK_VALUES, np.float32)
    return flat[: math.prod(shape)].reshape(shape)


FLOAT32_MAX = float(np.finfo(np.float32).max)


class FoldedOverflow(BaseException):
    """Folded weights whose overflow check was left to the write (``ScaledProduct`` made with
    ``checked=False``) hold a product that is not finite or reaches float32's largest value.

    The run that made them is abandoned and made again with the checks done as the rules fold
    (:func:`tfl_fuse.api.optimize_and_write`). A BaseException, as a rule that reads the value
    must not take it for a reason of its own to decline (``except Exception``).
    """


def _multiply(block: np.ndarray, near: np.ndarray, out: np.ndarray, exact32: bool) -> None:
    if exact32:
        np.multiply(block, near, out=out)  # the same bits (see ScaledProduct.__init__)
    else:
        # one pass: each product in float64, rounded to float32 as it is stored
        np.multiply(block, near, out=out, dtype=np.float64, casting="unsafe")


def _check_products(products: np.ndarray, shape: tuple[int, ...]) -> None:
    """FoldedOverflow unless every float32 product is finite and below FLOAT32_MAX in
    magnitude. NaN fails both comparisons. A product of magnitude FLOAT32_MAX fails too: it may
    have been rounded down to it from above, which the check at the fold refuses."""
    if not (-FLOAT32_MAX < float(products.min()) and float(products.max()) < FLOAT32_MAX):
        raise FoldedOverflow(shape)


class ScaledProduct:
    """Buffer data computed when it is written: float32(source * factors), each product in
    float64 and rounded once (``factors`` broadcasts to the shape of ``source``).

    A fold's new weights are written straight from this, a few rows at a time through one
    reused scratch, instead of filling a fresh array first and writing that: on the virtual
    machines builds run on, the fresh pages cost more than the arithmetic (about 2.5 us per
    4 KiB page here; DenseNet121's 23 MB of folded weights, 14 ms). Memory stays the
    scratch's, however large the layer. Whoever reads the value (``value()``, which
    ``Graph.constant`` calls) gets it computed once and kept.
    """

    dtype = np.dtype(np.float32)

    def __init__(self, source: np.ndarray, factors: np.ndarray, checked: bool = True) -> None:
        self.source = source
        self.factors = np.asarray(factors, np.float64)
        # False: no one has looked whether every product is finite and below float32's
        # largest value; each piece is then checked as it is computed (FoldedOverflow)
        self.checked = checked
        self.shape = tuple(source.shape)
        self._value: np.ndarray | None = None
        # Where every factor is a float32 value (a BN's MUL constant, read as float64), a
        # float32 multiply gives the same bits as the float64 product rounded once: the exact
        # product of two float32 values has at most 48 significant bits, so float64 holds it
        # exactly and both round it once, to nearest even. float32 runs about 3x faster (no
        # conversion on the way in and out).
        narrow = self.factors.astype(np.float32)
        self._factors32 = (
            narrow if source.dtype == np.float32 and np.array_equal(narrow, self.factors) else None
        )

    @property
    def size(self) -> int:
        return int(self.source.size)

    @property
    def nbytes(self) -> int:
        return 4 * self.size

    def __len__(self) -> int:  # as buffer data: its length in bytes
        return self.nbytes

    def astype(self, dtype: Any, copy: bool = True) -> Any:
        if np.dtype(dtype) == self.dtype and not copy:
            return self
        return self.value().astype(dtype, copy=copy)

    def value(self) -> np.ndarray:
        """The float32 array (read-only), computed on first use."""
        if self._value is None:
            value = np.empty(self.shape, np.float32)
            flat = value.reshape(-1)
            position = 0
            for piece in self._pieces():
                flat[position : position + piece.size] = piece.reshape(-1)
                position += piece.size
            value.flags.writeable = False
            self._value = value
            self.checked = True
        return self._value

    def pieces(self) -> Iterator[memoryview]:
        """The float32 bytes in order, a few rows at a time; each piece is valid until the next."""
        for piece, _ in self.pieces_into(None):
            yield piece

    def pieces_into(
        self, take: Callable[[], np.ndarray] | None
    ) -> Iterator[tuple[memoryview, Any]]:
        """:meth:`pieces`, each computed into a buffer ``take()`` gives (a float32 array of
        SCALE_CHUNK_VALUES values), so that a piece stays valid while the next is computed
        (None: one reused scratch). Yields (piece, the array that owns its memory)."""
        if self._value is not None:
            yield memoryview(self._value.reshape(-1).view(np.uint8)), self._value
            return
        for piece in self._pieces(take):
            owner = piece if piece.base is None else piece.base
            yield memoryview(piece.reshape(-1).view(np.uint8)), owner

    def _pieces(self, take: Callable[[], np.ndarray] | None = None) -> Iterator[np.ndarray]:
        source, factors = self.source, self.factors
        if source.ndim == 0:
            with np.errstate(over="ignore", invalid="ignore"):
                product = np.multiply(source, factors, dtype=np.float64).astype(np.float32)
            if not self.checked:
                _check_products(product, self.shape)
            yield product.reshape(1)
            return
        exact32 = self._factors32 is not None
        if exact32:
            factors = self._factors32
        row = max(1, source[0].size)
        rows = max(1, SCALE_CHUNK_VALUES // row)
        per_row = factors.ndim == source.ndim and factors.shape[0] != 1
        small = rows * row <= SCALE_CHUNK_VALUES
        release = source.nbytes >= RELEASE_MAPPED_BYTES
        for start in range(0, len(source), rows):
            part = slice(start, start + rows)
            block = source[part]
            if not small:
                out = np.empty(block.shape, np.float32)
            elif take is None:
                out = _scratch_array(block.shape)
            else:
                out = take()[: block.size].reshape(block.shape)
            near = factors[part] if per_row else factors
            if self.checked:
                _multiply(block, near, out, exact32)
            else:
                with np.errstate(over="ignore", invalid="ignore"):  # found below, not printed
                    _multiply(block, near, out, exact32)
                _check_products(out, self.shape)
            if release:
                release_mapped_pages(block)
            yield out
