"""The table layouts read off the generated code, checked against the object API itself.

For every table type of both schemas, a table with random field values is packed by the
object API; the decoder must read it as the object API does, and the encoder must write the
same table byte for byte as the object API's ``Pack``.
"""

from __future__ import annotations

import random

import flatbuffers
import numpy as np
import pytest

from tfl_fuse import fb, formats
from tfl_fuse.model import ModelError, Table

FORMATS = [formats.TFLITE, formats.CIRCLE]
RANGES = {
    "<?": (0, 1),
    "<b": (-128, 127),
    "<B": (0, 255),
    "<h": (-(2**15), 2**15 - 1),
    "<H": (0, 2**16 - 1),
    "<i": (-(2**31), 2**31 - 1),
    "<I": (0, 2**32 - 1),
    "<q": (-(2**63), 2**63 - 1),
    "<Q": (0, 2**64 - 1),
}


def random_scalar(code: str, default, rng: random.Random):
    if rng.random() < 0.3:
        return default  # at the default: not written
    if code in ("<f", "<d"):
        return float(np.float32(rng.choice([0.0, -1.5, 3.25, 1e-30, rng.uniform(-1e6, 1e6)])))
    low, high = RANGES[code]
    value = rng.choice([low, high, 0, 1, rng.randint(low, high)])
    return bool(value) if code == "<?" else value


def random_object(fmt: formats.Format, type_name: str, rng: random.Random, depth: int = 0):
    """An object-API instance of ``type_name`` with random values in its fields."""
    obj = fmt.table_class(type_name)()
    for field in fmt.layout(type_name).fields:
        if field in formats.LEGACY_FIELDS.values():
            continue  # the bindings cannot write it
        if field.kind == formats.SCALAR:
            setattr(obj, field.name, random_scalar(field.code, field.default, rng))
        elif rng.random() < 0.25 or (depth > 2 and field.kind != formats.VECTOR):
            continue  # absent
        elif field.kind == formats.VECTOR:
            n = rng.choice([0, 1, 3, 17])
            values = [random_scalar(field.code, 0, rng) for _ in range(n)]
            array = np.array(values, dtype=np.dtype(field.code))
            setattr(obj, field.name, array if rng.random() < 0.5 else array.tolist())
        elif field.kind == formats.STRING:
            setattr(obj, field.name, rng.choice(["", "x", "name/with:ü", b"\xff\xfe"]))
        elif field.kind == formats.TABLE:
            setattr(obj, field.name, random_object(fmt, field.type_name, rng, depth + 1))
        elif field.kind == formats.TABLES:
            value = [
                random_object(fmt, field.type_name, rng, depth + 1)
                for _ in range(rng.choice([0, 1, 2]))
            ]
            setattr(obj, field.name, value)
        elif field.kind == formats.UNION:
            members = [
                (name, number)
                for name, number in fmt.enum(field.type_name).items()
                if number and fmt.table_class(name) is not None
            ]
            name, number = rng.choice(members)
            setattr(obj, field.name, random_object(fmt, name, rng, depth + 1))
            setattr(obj, field.name + "Type", number)
    return obj


def object_api_neutral(value):
    """What the decoder should give for an object-API value (the pre-layout decoder's rule)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return value
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, list):
        return [object_api_neutral(v) for v in value]
    table = Table(type(value).__name__[:-1])
    for name, field_value in vars(value).items():
        if name.endswith("Type") and name[:-4] in formats.UNION_ENUMS:
            continue
        table.__dict__[name] = object_api_neutral(field_value)
    return table


def assert_same(decoded, expected, path: str) -> None:
    if isinstance(expected, Table):
        assert isinstance(decoded, Table) and decoded._type == expected._type, path
        assert decoded.fields().keys() == expected.fields().keys(), path
        for name, value in expected.fields().items():
            assert_same(decoded.__dict__[name], value, f"{path}.{name}")
    elif isinstance(expected, list):
        assert isinstance(decoded, list) and len(decoded) == len(expected), path
        for i, (a, b) in enumerate(zip(decoded, expected)):
            assert_same(a, b, f"{path}[{i}]")
    elif isinstance(expected, np.ndarray):
        if isinstance(decoded, list):  # index vectors are decoded as lists
            assert decoded == expected.tolist(), path
        else:
            assert decoded.dtype == expected.dtype, path
            assert decoded.tobytes() == expected.tobytes(), path
    else:
        assert type(decoded) is type(expected) and decoded == expected, path


def object_api_bytes(fmt: formats.Format, obj) -> bytes:
    builder = flatbuffers.Builder(0)
    builder.Finish(obj.Pack(builder), file_identifier=fmt.identifier)
    return bytes(builder.Output())


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_every_table_has_a_layout_with_every_object_api_field(fmt):
    unions = {name + "Type" for name in formats.UNION_ENUMS}
    for type_name in fmt.table_names():
        layout = fmt.layout(type_name)
        names = [f.name for f in layout.fields if f not in formats.LEGACY_FIELDS.values()]
        expected = [n for n in vars(fmt.table_class(type_name)()) if n not in unions]
        assert names == expected, type_name
        slots = [f.slot for f in layout.fields] + [
            f.type_slot for f in layout.fields if f.kind == formats.UNION
        ]
        assert len(slots) == len(set(slots)), f"{type_name}: two fields share a slot"


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_every_table_reads_and_writes_as_the_object_api_does(fmt):
    rng = random.Random(0)
    for type_name in fmt.table_names():
        for _ in range(3):
            packed = object_api_bytes(fmt, random_object(fmt, type_name, rng))
            # the object API's own reading of it, packed again: the bytes the writer must give
            unpacked = fmt.table_class(type_name).InitFromBuf(
                packed, flatbuffers.encode.Get(flatbuffers.packer.uoffset, packed, 0)
            )
            expected_bytes = object_api_bytes(fmt, unpacked)

            reader = fb._Reader(fmt, packed)
            decoded = reader.table(fb._U32(packed, 0)[0], reader.plan(type_name))
            assert_same(decoded, object_api_neutral(unpacked), type_name)

            for size in (1 << 12, 8):  # 8 bytes: the builder grows on the way
                writer = fb._Writer(fmt, fmt, size)
                written = writer.builder.finish(writer.table(decoded, type_name), fmt.identifier)
                assert bytes(written) == expected_bytes, type_name


def test_vectors_are_written_as_the_schema_types_them():
    """A vector given with another numpy dtype is converted (not written as raw bytes of its
    own type); a value the schema's type cannot hold is an error, not a silent wrap."""
    fmt = formats.TFLITE
    quantization = Table(
        "QuantizationParameters",
        scale=np.array([0.5, 0.25]),  # float64: the schema stores float32
        zeroPoint=[0, 1],
    )
    writer = fb._Writer(fmt, fmt, 1 << 12)
    written = bytes(writer.builder.finish(writer.table(quantization, "here"), fmt.identifier))
    reader = fb._Reader(fmt, written)
    decoded = reader.table(fb._U32(written, 0)[0], reader.plan("QuantizationParameters"))
    assert decoded.scale.dtype == np.float32 and decoded.scale.tolist() == [0.5, 0.25]
    assert decoded.zeroPoint.dtype == np.int64 and decoded.zeroPoint.tolist() == [0, 1]
    for bad in (
        Table("Tensor", shape=[2**31]),
        Table("Tensor", shape=np.array([2**40])),
        Table("QuantizationParameters", scale=np.array([1e39])),
    ):
        with pytest.raises(ModelError, match="does not fit"):
            fb._Writer(fmt, fmt, 1 << 12).table(bad, "here")
