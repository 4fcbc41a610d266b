"""Models over 2 GB: weights after the flatbuffer (Buffer offset/size) are read and written.

The model (tools/large_model.py) is a sparse file, so it costs little disk until tfl_fuse
writes its output; skipped when the temp folder lacks room for two copies.
"""

from __future__ import annotations

import shutil

import large_model
import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter

from tfl_fuse import api, fb
from tfl_fuse.engine import op_counts

GIGABYTES = 2.2
NEEDED = 3 * int(GIGABYTES * 1e9)


def outputs(path) -> dict[str, np.ndarray]:
    interpreter = Interpreter(model_path=str(path))
    interpreter.allocate_tensors()
    detail = interpreter.get_input_details()[0]
    interpreter.set_tensor(detail["index"], np.asarray([[1, -2, 3, 0.5]], np.float32))
    interpreter.invoke()
    return {d["name"]: interpreter.get_tensor(d["index"]) for d in interpreter.get_output_details()}


def test_external_layout_round_trip_small(tmp_path):
    """The same layout on a small model (forced): LiteRT computes the same outputs."""
    src = tmp_path / "in.tflite"
    large_model.build(src, gigabytes=0.001)
    model = fb.decode(src.read_bytes())
    forced = tmp_path / "forced.tflite"
    forced.write_bytes(fb.encode_image(model, external=True).tobytes())
    got, expected = outputs(forced), outputs(src)
    assert got.keys() == expected.keys()
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name])


def test_model_over_2_gb(tmp_path):
    if shutil.disk_usage(tmp_path).free < NEEDED:
        pytest.skip(f"needs {NEEDED / 1e9:.1f} GB free in {tmp_path}")
    src, folded, plain = tmp_path / "in.tflite", tmp_path / "folded.tflite", tmp_path / "rt.tflite"
    size = large_model.build(src, gigabytes=GIGABYTES)
    assert size > fb.MAX_FLATBUFFER_SIZE
    expected = outputs(src)

    report = api.optimize_file(src, plain, rules_to_run=[])
    assert report["ops_after"] == report["ops_before"]
    report = api.optimize_file(src, folded)
    assert report["ops_after"] == {"FULLY_CONNECTED": 1, "GATHER": 1}

    for path in (plain, folded):
        assert path.stat().st_size > fb.MAX_FLATBUFFER_SIZE
        with api.open_model_file(path) as (data, _):
            model = fb.decode(data)  # the table lies after the flatbuffer, read zero-copy
            assert op_counts(model) == report["ops_after" if path == folded else "ops_before"]
        got = outputs(path)
        np.testing.assert_allclose(got["y"], expected["y"], rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(got["g"], expected["g"])


def test_fold_over_2_gb_of_weights_is_streamed(tmp_path):
    """A fold that changes every weight of a > 2 GB layer: the products are written as they
    are computed (model.ScaledProduct), and LiteRT computes what the input model did."""
    if shutil.disk_usage(tmp_path).free < NEEDED:
        pytest.skip(f"needs {NEEDED / 1e9:.1f} GB free in {tmp_path}")
    src, folded = tmp_path / "in.tflite", tmp_path / "folded.tflite"
    large_model.build(src, gigabytes=GIGABYTES, big="weights")
    with api.open_model_file(src) as (data, _):
        model = fb.decode(data)
        graph_tensors = {t.name: t for t in model.subgraphs[0].tensors}
        weights = graph_tensors["w"]
        offset = model.buffers[weights.buffer]._source_offset
        channels = weights.shape[0]
    # the weights are a zero hole; give the first and the last 64 rows values of their own
    rng = np.random.default_rng(0)
    rows = 64 * large_model.ROW
    with open(src, "r+b") as out:
        for first in (0, channels - 64):
            out.seek(offset + 4 * first * large_model.ROW)
            out.write(rng.normal(size=rows).astype(np.float32).tobytes())

    def run(path):
        interpreter = Interpreter(model_path=str(path))
        interpreter.allocate_tensors()
        detail = interpreter.get_input_details()[0]
        x = np.random.default_rng(1).normal(size=(1, large_model.ROW)).astype(np.float32)
        interpreter.set_tensor(detail["index"], x)
        interpreter.invoke()
        out = {d["name"]: d["index"] for d in interpreter.get_output_details()}
        return interpreter.get_tensor(out["y"]).copy()

    expected = run(src)
    assert np.count_nonzero(expected) >= 128
    report = api.optimize_file(src, folded)
    assert report["ops_after"] == {"FULLY_CONNECTED": 1, "GATHER": 1}
    assert folded.stat().st_size > fb.MAX_FLATBUFFER_SIZE
    got = run(folded)
    # float rounding only: each output sums 1,024 products, up to |y| ~ 100
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())
    np.testing.assert_array_equal(got[0, 64:-64], 0.0)  # the zero rows stay zero
