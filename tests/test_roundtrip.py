"""Lossless round trips on real converter output, circle files, determinism and alignment."""

from __future__ import annotations

import os

import kerasmodels
import numpy as np
import pytest
from ai_edge_litert import schema_py_generated as tfl
from litert_compare import differences

import tfl_fuse
from tfl_fuse import fb, verify


def round_trip(data: bytes) -> bytes:
    out, _ = tfl_fuse.optimize(data, [])
    return bytes(out)


def assert_same_outputs(a: bytes, b: bytes, seed: int = 0) -> None:
    reference = verify.interpreter(a)
    inputs = verify.random_inputs(reference, seed)
    for x, y in zip(verify.run(a, inputs), verify.run(b, inputs), strict=True):
        assert np.array_equal(x, y)


def multi_subgraph_model() -> bytes:
    tf = kerasmodels.tf()

    @tf.function(input_signature=[tf.TensorSpec([1, 8], tf.float32)])
    def branchy(x):
        y = tf.cond(tf.reduce_sum(x) > 0, lambda: x * 2.0, lambda: x - 1.0)
        i = tf.constant(0)
        _, y = tf.while_loop(lambda i, v: i < 3, lambda i, v: (i + 1, v * 0.5 + 1.0), [i, y])
        return y

    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [branchy.get_concrete_function()], branchy
    )
    return converter.convert()


def keras_model(name: str) -> bytes:
    return kerasmodels.application(name, input_shape=(96, 96, 3)).read_bytes()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["MobileNetV2", "ResNet50V2"])
def test_keras_application_round_trip_is_lossless(name):
    data = keras_model(name)
    out = round_trip(data)
    assert differences(data, out) == []
    assert_same_outputs(data, out)


def test_multi_subgraph_round_trip_is_lossless():
    data = kerasmodels.cached("cond_while.tflite", multi_subgraph_model).read_bytes()
    model = fb.decode(data)
    assert len(model.subgraphs) >= 3
    out = round_trip(data)
    assert differences(data, out) == []
    for value in (1.0, -1.0):  # both branches of the cond
        interp_inputs = [np.full((1, 8), value, np.float32)]
        for x, y in zip(
            verify.run(data, interp_inputs), verify.run(out, interp_inputs), strict=True
        ):
            assert np.array_equal(x, y)


def test_signature_defs_and_metadata_survive():
    data = kerasmodels.application("MobileNetV2", input_shape=(32, 32, 3)).read_bytes()
    model = fb.decode(data)
    assert model.signature_defs and model.root.metadata
    out = round_trip(data)
    again = fb.decode(out)
    assert [s.signatureKey for s in again.signature_defs] == [
        s.signatureKey for s in model.signature_defs
    ]
    names = {m.name: bytes(model.buffers[m.buffer].data) for m in model.root.metadata}
    names_out = {m.name: bytes(again.buffers[m.buffer].data) for m in again.root.metadata}
    assert names == names_out
    assert differences(data, out) == []


def buffer_data_offsets(data: bytes) -> list[int]:
    model = tfl.Model.GetRootAs(data, 0)
    offsets = []
    for i in range(model.BuffersLength()):
        buffer = model.Buffers(i)
        o = buffer._tab.Offset(4)
        if o and buffer.DataLength():
            offsets.append(buffer._tab.Vector(o))
    return offsets


def test_output_is_deterministic_and_aligned():
    data = kerasmodels.application("MobileNetV2", input_shape=(32, 32, 3)).read_bytes()
    first, second = round_trip(data), round_trip(data)
    assert first == second
    optimized = [bytes(tfl_fuse.optimize(data)[0]) for _ in range(2)]
    assert optimized[0] == optimized[1]
    offsets = buffer_data_offsets(first) + buffer_data_offsets(optimized[0])
    assert offsets and all(offset % 16 == 0 for offset in offsets)


def test_unused_buffers_are_dropped_and_buffer_zero_stays_empty():
    data = kerasmodels.application("MobileNetV2", input_shape=(32, 32, 3)).read_bytes()
    model = fb.decode(data)
    model.buffers.append(model.buffers[1])  # an unreferenced buffer
    model.add_buffer(np.arange(10, dtype=np.float32))
    out = fb.decode(fb.encode(model))
    referenced = {t.buffer for sg in out.subgraphs for t in sg.tensors} | {
        m.buffer for m in out.root.metadata
    }
    assert set(range(len(out.buffers))) == referenced | {0}
    assert out.buffers[0].data is None


def test_shared_buffers_stay_shared():
    data = kerasmodels.application("ResNet50V2", input_shape=(32, 32, 3), seed=3).read_bytes()
    model = fb.decode(fb.encode(fb.decode(data)))
    original = fb.decode(data)

    def sharing(m):
        users = {}
        for t in m.subgraphs[0].tensors:
            if m.buffers[t.buffer].data is not None:
                users.setdefault(t.buffer, []).append(t.name)
        return sorted(sorted(v) for v in users.values() if len(v) > 1)

    assert sharing(model) == sharing(original)


def test_file_writer_streams_the_same_bytes(tmp_path):
    """The CLI path (mapped input, buffer data sent file to file) writes what optimize() returns."""
    path = kerasmodels.application("MobileNetV2", input_shape=(32, 32, 3))
    expected = bytes(tfl_fuse.optimize(path.read_bytes())[0])
    out = tmp_path / "out.tflite"
    tfl_fuse.optimize_file(path, out)
    assert out.read_bytes() == expected
    same = tmp_path / "same.tflite"
    same.write_bytes(path.read_bytes())
    tfl_fuse.optimize_file(same, same)  # IN == OUT
    assert same.read_bytes() == expected


@pytest.mark.parametrize("copy", ["from the map", "in the kernel"])
def test_unchanged_weights_are_written_the_same_by_either_copy(tmp_path, monkeypatch, copy):
    """Unchanged input data under 64 MiB is written from the input's map, a step at a time;
    larger data (here: all of it) is copied file to file. Both give optimize()'s bytes."""
    path = kerasmodels.application("MobileNetV2", input_shape=(32, 32, 3))
    expected = bytes(tfl_fuse.optimize(path.read_bytes())[0])
    used = {"mapped": 0, "kernel": 0}
    write_mapped, send_all = fb._write_mapped, fb._send_all

    def spy_mapped(fd, data):
        written = write_mapped(fd, data)
        used["mapped"] += written
        return written

    def spy_kernel(*args):
        used["kernel"] += 1
        return send_all(*args)

    monkeypatch.setattr(fb, "_write_mapped", spy_mapped)
    monkeypatch.setattr(fb, "_send_all", spy_kernel)
    monkeypatch.setattr(fb, "MAPPED_WRITE_STEP", 4096 * 3)  # several steps per buffer
    if copy == "in the kernel":
        monkeypatch.setattr(fb, "MAPPED_WRITE_BYTES", -1)
    out = tmp_path / "out.tflite"
    tfl_fuse.optimize_file(path, out)
    assert out.read_bytes() == expected
    assert (used["mapped"] > 0, used["kernel"] > 0) == (
        copy == "from the map",
        copy == "in the kernel",
    )


def test_data_not_mapped_from_a_file_is_not_written_from_a_map(tmp_path):
    out = tmp_path / "out.bin"
    with out.open("wb") as f:
        assert not fb._write_mapped(f.fileno(), np.zeros(1 << 16, np.uint8))
    assert out.stat().st_size == 0


def test_rarely_used_fields_survive_a_round_trip():
    """Sparsity, per-axis quantization, shape signatures, variant tensors, custom ops and options,
    descriptions, metadata, signature defs and op versions: every field goes through."""
    import chef
    from ai_edge_litert.tools import flatbuffer_utils as fu
    from conftest import RECIPES

    data, _ = chef.cook(RECIPES / "Net_Conv_Add_Mul_000")
    model = fu.read_model_from_bytearray(bytearray(data))
    sg = model.subgraphs[0]
    weights = sg.tensors[1]
    weights.shapeSignature = [8, 1, 1, -1]
    q = tfl.QuantizationParametersT()
    q.scale, q.zeroPoint, q.quantizedDimension = [0.5] * 8, [0] * 8, 0
    q.min, q.max = [-1.0], [1.0]
    weights.quantization = q
    sparsity = tfl.SparsityParametersT()
    sparsity.traversalOrder, sparsity.blockMap = [0, 1, 2, 3], []
    dim = tfl.DimensionMetadataT()
    dim.format, dim.denseSize = 0, 8
    segments = tfl.Int32VectorT()
    segments.values = [0, 2, 4]
    dim.arraySegmentsType, dim.arraySegments = tfl.SparseIndexVector.Int32Vector, segments
    sparsity.dimMetadata = [dim]
    sg.tensors[0].sparsity = sparsity
    variant = tfl.VariantSubTypeT()
    variant.shape, variant.type, variant.hasRank = [2, 3], tfl.TensorType.FLOAT32, True
    sg.tensors[3].variantTensors = [variant]
    sg.tensors[3].hasRank = True
    custom = tfl.OperatorCodeT()
    custom.builtinCode = custom.deprecatedBuiltinCode = tfl.BuiltinOperator.CUSTOM
    custom.customCode, custom.version = "MyCustomOp", 7
    model.operatorCodes.append(custom)
    op = tfl.OperatorT()
    op.opcodeIndex, op.inputs, op.outputs = (
        len(model.operatorCodes) - 1,
        [sg.outputs[0]],
        [len(sg.tensors)],
    )
    op.customOptions, op.customOptionsFormat = list(b"flexbuffer-bytes"), 0
    op.intermediates = [2]
    extra = tfl.TensorT()
    extra.name, extra.shape, extra.type, extra.buffer = "custom_out", [1, 8, 8, 8], 0, 0
    sg.tensors.append(extra)
    sg.operators.append(op)
    sg.outputs = [len(sg.tensors) - 1]
    model.description = "rare fields"
    buffer = tfl.BufferT()
    buffer.data = list(b"some metadata")
    model.buffers.append(buffer)
    metadata = tfl.MetadataT()
    metadata.name, metadata.buffer = "my_metadata", len(model.buffers) - 1
    model.metadata = [metadata]
    model.signatureDefs[0].outputs[0].tensorIndex = len(sg.tensors) - 1
    original = bytes(fu.convert_object_to_bytearray(model))

    out = round_trip(original)
    assert differences(original, out) == []
    # and through circle and back
    through_circle = bytes(
        tfl_fuse.optimize(
            bytes(tfl_fuse.optimize(original, [], output_format="circle")[0]),
            [],
            output_format="tflite",
        )[0]
    )
    assert differences(original, through_circle) == []


def test_a_second_run_gives_back_the_first_runs_output_byte_for_byte(tmp_path):
    """Nothing left to fold and the input laid out as tfl_fuse writes: the output is the
    input itself (copied in the kernel), identical bytes, and the report says so."""
    data = kerasmodels.application("ResNet50V2", input_shape=(32, 32, 3), seed=3).read_bytes()
    first, report = tfl_fuse.optimize(data)
    assert report["rewrites"] and "identical_to_input" not in report
    second, report = tfl_fuse.optimize(first, verify=True)
    assert not report["rewrites"] and report["identical_to_input"] is True
    assert second == first and report["verify"]["match"]
    (tmp_path / "first.tflite").write_bytes(first)
    report = tfl_fuse.optimize_file(tmp_path / "first.tflite", tmp_path / "second.tflite")
    assert (tmp_path / "second.tflite").read_bytes() == first
    # converted to circle, or from a converter that aligns buffer data less: re-encoded
    _, report = tfl_fuse.optimize(first, output_format="circle")
    assert "identical_to_input" not in report
    _, report = tfl_fuse.optimize(
        kerasmodels.application("MobileNetV2", input_shape=(32, 32, 3)).read_bytes()
    )
    assert not report["rewrites"] and "identical_to_input" not in report


@pytest.mark.parametrize("most", [1, 4097, 100_003, None])
def test_batched_writes_survive_partial_writes(tmp_path, monkeypatch, most):
    """Small buffers and the tables between go out in batches (one writev each); a writev that
    writes less than asked (here: every other call at most ``most`` bytes, ending inside a
    view or at a view's end) is resumed where it stopped."""
    path = kerasmodels.application("MobileNetV2", input_shape=(32, 32, 3))
    expected = bytes(tfl_fuse.optimize(path.read_bytes())[0])
    calls = []
    real = os.writev

    def short_writev(fd, views):
        calls.append(len(views))
        if most is None or len(calls) % 2:
            return real(fd, views)
        prefix, left = [], most
        for view in views:
            if left <= 0:
                break
            prefix.append(view[:left])
            left -= len(prefix[-1])
        return real(fd, prefix)

    monkeypatch.setattr(os, "writev", short_writev)
    out = tmp_path / "out.tflite"
    tfl_fuse.optimize_file(path, out)
    assert out.read_bytes() == expected
    if most is None:  # MobileNetV2's 100-odd buffers and gaps: a few batches
        assert 0 < len(calls) < 20 and max(calls) > 10


@pytest.fixture(scope="module")
def preactivation_resnet(tmp_path_factory) -> tuple:
    """ResNet50V2 (32x32): its folds change MBs of weights, written by the pipeline."""
    path = tmp_path_factory.mktemp("pipeline") / "in.tflite"
    path.write_bytes(
        kerasmodels.application("ResNet50V2", input_shape=(32, 32, 3), seed=3).read_bytes()
    )
    return path, bytes(tfl_fuse.optimize(path.read_bytes())[0])


@pytest.mark.parametrize("most", [None, 1, 100_003])
def test_folded_weights_are_written_by_a_thread_of_their_own(
    tmp_path, monkeypatch, preactivation_resnet, most
):
    """Where folds changed 1 MiB or more, a writing thread writes while the caller computes the
    next piece of folded weights: the bytes are those of the in-memory encoding, also when
    writes are cut short (every other call at most ``most`` bytes), and the thread is gone
    afterwards. Under the threshold everything is written by the caller."""
    import threading

    path, expected = preactivation_resnet
    writers = []
    real = os.write

    def write(fd, view):
        writers.append(threading.current_thread().name)
        if most is not None and len(writers) % 2 == 0:
            view = memoryview(view)[:most]
        return real(fd, view)

    monkeypatch.setattr(os, "write", write)
    tfl_fuse.optimize_file(path, tmp_path / "piped.tflite")
    assert (tmp_path / "piped.tflite").read_bytes() == expected
    assert writers and set(writers) == {"tfl_fuse-write"}  # pieces of folded weights
    assert not [t for t in threading.enumerate() if t.name == "tfl_fuse-write"]

    writers.clear()
    monkeypatch.setattr(fb, "PIPELINE_MIN_BYTES", 1 << 40)
    tfl_fuse.optimize_file(path, tmp_path / "inline.tflite")
    assert (tmp_path / "inline.tflite").read_bytes() == expected
    assert writers and set(writers) == {threading.current_thread().name}


def test_a_failed_write_on_the_writing_thread_fails_the_run(
    tmp_path, monkeypatch, preactivation_resnet
):
    """A write that fails on the writing thread (a full disk) is raised by the caller, later
    writes are skipped, OUT keeps what it had and no temp file or thread is left; so is a
    failure of the caller's while the thread writes."""
    import errno
    import threading

    from tfl_fuse import model

    path, expected = preactivation_resnet
    out = tmp_path / "out.tflite"
    out.write_bytes(b"previous")
    calls = []
    real = os.write

    def full_disk(fd, view):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, view)

    monkeypatch.setattr(os, "write", full_disk)
    with pytest.raises(OSError, match="No space left"):
        tfl_fuse.optimize_file(path, out)
    assert len(calls) == 3  # nothing written after the failure
    monkeypatch.setattr(os, "write", real)

    starts = []
    monkeypatch.setattr(fb, "_writeback_starter", lambda: lambda *args: starts.append(args[1:]))
    tfl_fuse.optimize_file(path, tmp_path / "spied.tflite")
    (tmp_path / "spied.tflite").unlink()

    def failing_last_writeback(fd, offset, count):  # queued after the caller's last look
        if (offset, count) == starts[-1]:
            raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(fb, "_writeback_starter", lambda: failing_last_writeback)
    with pytest.raises(OSError, match="Input/output error"):
        tfl_fuse.optimize_file(path, out)
    monkeypatch.undo()

    real_pieces = model.ScaledProduct._pieces

    def failing_pieces(self, take=None):
        for count, piece in enumerate(real_pieces(self, take)):
            if count == 2:
                raise MemoryError
            yield piece

    monkeypatch.setattr(model.ScaledProduct, "_pieces", failing_pieces)
    with pytest.raises(MemoryError):
        tfl_fuse.optimize_file(path, out)
    assert out.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.tflite"]
    assert not [t for t in threading.enumerate() if t.name == "tfl_fuse-write"]


def test_the_writing_thread_holds_few_pieces_however_large_the_layer(tmp_path, monkeypatch):
    """Rows too large for the writing thread's buffers get memory of their own; the caller
    waits while four of them are queued, so a huge layer is not computed ahead into memory."""
    import threading
    import time

    from tfl_fuse import model

    monkeypatch.setattr(model, "SCALE_CHUNK_VALUES", 16)  # every 32-value row is too large
    monkeypatch.setattr(fb, "PIPELINE_MIN_BYTES", 0)
    source = np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32)
    product = model.ScaledProduct(source, np.linspace(0.5, 2.0, 32))
    expected = model.ScaledProduct(source, np.linspace(0.5, 2.0, 32)).value().tobytes()
    live, most = [0], [0]
    real_pieces = model.ScaledProduct._pieces

    def counted(self, take=None):
        for piece in real_pieces(self, take):
            live[0] += 1
            most[0] = max(most[0], live[0])
            yield piece

    real_write = fb._write_all

    def slow_write(fd, view):
        time.sleep(0.002)
        real_write(fd, view)
        live[0] -= 1

    monkeypatch.setattr(model.ScaledProduct, "_pieces", counted)
    monkeypatch.setattr(fb, "_write_all", slow_write)
    path = tmp_path / "product.bin"
    with path.open("wb") as out:
        fb.Encoded(memoryview(b""), [(0, product, None)], product.nbytes).write(out.fileno())
    assert path.read_bytes() == expected
    assert 1 < most[0] <= fb.PIPELINE_BUFFERS + 1
    assert not [t for t in threading.enumerate() if t.name == "tfl_fuse-write"]


def test_the_output_is_reserved_whole_before_it_is_written(
    tmp_path, monkeypatch, preactivation_resnet
):
    """optimize_file allocates the output's space in one fallocate before its first write
    (where the file system cannot, it writes as before, to the same bytes)."""
    import ctypes
    import errno

    path, expected = preactivation_resnet
    events = []
    real_call = fb._libc_call

    def spy(name, *argtypes):
        call = real_call(name, *argtypes)
        if name != "fallocate":
            return call

        def fallocate(fd, mode, offset, length):
            events.append(("reserve", os.fstat(fd).st_size, length))
            return call(fd, mode, offset, length)

        return fallocate

    for name in ("write", "writev"):
        real = getattr(os, name)
        monkeypatch.setattr(os, name, lambda *a, _real=real: events.append(("write",)) or _real(*a))
    monkeypatch.setattr(fb, "_libc_call", spy)
    out = tmp_path / "out.tflite"
    tfl_fuse.optimize_file(path, out)
    assert out.read_bytes() == expected
    assert events[0] == ("reserve", 0, len(expected))  # a new file, reserved whole, first
    assert [e for e in events if e[0] == "reserve"] == [events[0]]
    assert ("write",) in events

    with out.open("r+b") as held:  # on this machine's file system the space is really taken
        fb.reserve(held.fileno(), 3 * len(expected))
        if os.fstat(held.fileno()).st_size != len(expected):
            assert os.fstat(held.fileno()).st_blocks * 512 >= 3 * len(expected)

    def unsupported(fd, mode, offset, length):
        ctypes.set_errno(errno.EOPNOTSUPP)
        return -1

    monkeypatch.setattr(
        fb,
        "_libc_call",
        lambda name, *a: unsupported if name == "fallocate" else real_call(name, *a),
    )
    tfl_fuse.optimize_file(path, tmp_path / "unreserved.tflite")
    assert (tmp_path / "unreserved.tflite").read_bytes() == expected


def _overflowing_fold_model() -> bytes:
    """CONV_2D -> MUL whose fold would overflow float32 in one product (3e38 * 2), in weights
    of 9 KB: large enough to be folded as a ScaledProduct, whose check can wait for the write."""
    import chef
    from conftest import conv_mul_recipe

    recipe = conv_mul_recipe(16, 16)
    weights = np.full((16, 3, 3, 16), 0.1, np.float32)
    weights[5, 1, 2, 7] = 3e38
    scale = np.ones(16, np.float32)
    scale[5] = 2.0
    for operand in recipe["operand"]:
        if operand["name"] == "w":
            operand["filler"] = {"kind": "explicit", "values": weights.ravel().tolist()}
        if operand["name"] == "s":
            operand["filler"] = {"kind": "explicit", "values": scale.tolist()}
    return bytes(fb.encode(chef.build_model(recipe)))


def test_a_fold_found_to_overflow_as_it_is_written_is_made_again_and_declined(
    tmp_path, monkeypatch, capsys
):
    """optimize_file, the CLI and batch runs check folded weights as they write them. Where a
    product overflows there, the temp file goes and the run is made again checking at the fold,
    which declines it: the same bytes and report as optimize() (which checks at the fold)."""
    import json

    from tfl_fuse import api, cli, model

    data = _overflowing_fold_model()
    expected, expected_report = tfl_fuse.optimize(data)
    assert expected_report["ops_after"].get("MUL") == 1
    assert any("overflow float32" in d["reason"] for d in expected_report["declined"])
    src = tmp_path / "in.tflite"
    src.write_bytes(data)

    attempts, overflows = [], []
    real_attempt, real_check = api._optimize_and_write, model._check_products

    def attempt(*args):
        attempts.append(1)
        return real_attempt(*args)

    def check(products, shape):
        try:
            real_check(products, shape)
        except model.FoldedOverflow:
            overflows.append(shape)
            raise

    monkeypatch.setattr(api, "_optimize_and_write", attempt)
    monkeypatch.setattr(model, "_check_products", check)
    report = tfl_fuse.optimize_file(src, tmp_path / "out.tflite")
    assert (tmp_path / "out.tflite").read_bytes() == bytes(expected)
    assert (len(attempts), overflows) == (2, [(16, 3, 3, 16)])
    for r in (report, expected_report):
        r.pop("timing", None), r.pop("output", None)
    assert report == expected_report
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.tflite", "out.tflite"]

    attempts.clear(), overflows.clear()
    code = cli.main([str(src), str(tmp_path / "cli.tflite"), "--report", "-", "-q"])
    assert code == 0 and (tmp_path / "cli.tflite").read_bytes() == bytes(expected)
    assert len(attempts) == 2 and len(overflows) == 1
    assert json.loads(capsys.readouterr().out)["declined"] == expected_report["declined"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cli.tflite", "in.tflite", "out.tflite"]

    attempts.clear(), overflows.clear()
    code = cli.main([str(src), "--dry-run", "--report", "-", "-q"])  # checked at the fold
    assert code == 0 and not attempts and not overflows
    assert json.loads(capsys.readouterr().out)["declined"] == expected_report["declined"]


def test_folded_weights_written_by_optimize_file_are_not_read_by_the_rules(
    tmp_path, monkeypatch, preactivation_resnet
):
    """optimize_file leaves every large fold's overflow check to the write (no read of the
    weights during the rules) and writes the bytes optimize() makes checking at the fold."""
    from tfl_fuse import model

    path, expected = preactivation_resnet
    made = []
    real = model.ScaledProduct.__init__

    def init(self, source, factors, checked=True):
        made.append(checked)
        real(self, source, factors, checked)

    monkeypatch.setattr(model.ScaledProduct, "__init__", init)
    tfl_fuse.optimize_file(path, tmp_path / "out.tflite")
    assert (tmp_path / "out.tflite").read_bytes() == expected
    assert made and not any(made)  # every one unchecked: left to the write
    made.clear()
    assert bytes(tfl_fuse.optimize(path.read_bytes())[0]) == expected
    assert made and all(made)
