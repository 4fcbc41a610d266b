"""Bad input: one clear line on stderr, exit 1, no traceback, OUT neither created nor touched."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import chef
import numpy as np
import pytest
from ai_edge_litert.tools import flatbuffer_utils
from conftest import RECIPES

from tfl_fuse import cli

GOOD_RECIPE = RECIPES / "Net_Conv_Add_Mul_000"


@pytest.fixture(scope="module")
def good_model() -> bytes:
    return chef.cook(GOOD_RECIPE)[0]


def corrupt(data: bytes, change) -> bytes:
    model = flatbuffer_utils.read_model_from_bytearray(bytearray(data))
    change(model)
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def run_cli(capsys, args):
    code = cli.main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.err


def assert_refused(
    capsys, tmp_path, data: bytes | None, expect: str, existing: bytes | None = None
):
    src = tmp_path / "in.tflite"
    if data is not None:
        src.write_bytes(data)
    dst = tmp_path / "out.tflite"
    if existing is not None:
        dst.write_bytes(existing)
    code, err = run_cli(capsys, [src, dst])
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("tfl-fuse: error:") and expect in lines[0], lines[0]
    if existing is None:
        assert not dst.exists()
    else:
        assert dst.read_bytes() == existing
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left


def test_empty_file(capsys, tmp_path):
    assert_refused(capsys, tmp_path, b"", "too short")


@pytest.mark.parametrize("fraction", [0.02, 0.1, 0.3, 0.5, 0.8, 0.95])
def test_truncated_file(capsys, tmp_path, good_model, fraction):
    cut = max(8, int(len(good_model) * fraction))
    assert_refused(
        capsys,
        tmp_path,
        good_model[:cut],
        "truncated or not a tflite flatbuffer",
        existing=b"keep me",
    )


@pytest.mark.parametrize("seed", range(5))
def test_random_bytes(capsys, tmp_path, seed):
    data = np.random.default_rng(seed).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    assert_refused(capsys, tmp_path, data, "not a TFLite or circle model")


@pytest.mark.parametrize("seed", range(5))
def test_random_bytes_with_a_valid_identifier(capsys, tmp_path, seed):
    data = bytearray(np.random.default_rng(seed).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    data[4:8] = b"TFL3"
    data[0:4] = (64).to_bytes(4, "little")
    assert_refused(capsys, tmp_path, bytes(data), "tfl-fuse: error")


def test_wrong_identifier(capsys, tmp_path, good_model):
    assert_refused(
        capsys, tmp_path, good_model[:4] + b"ABCD" + good_model[8:], "file identifier b'ABCD'"
    )


def _set_tensor_buffer(m):
    m.subgraphs[0].tensors[1].buffer = 999


def _set_op_input(m):
    m.subgraphs[0].operators[0].inputs[0] = 999


def _set_opcode(m):
    m.subgraphs[0].operators[0].opcodeIndex = 57


def _set_graph_output(m):
    m.subgraphs[0].outputs = [77]


def _make_cycle(m):
    ops = m.subgraphs[0].operators
    ops[0].inputs[0] = ops[-1].outputs[0]


@pytest.mark.parametrize(
    "change, expect",
    [
        (_set_tensor_buffer, "buffer index is 999"),
        (_set_op_input, "input tensor index is 999"),
        (_set_opcode, "opcode index 57"),
        (_set_graph_output, "output tensor index is 77"),
        (_make_cycle, "cycle"),
    ],
    ids=["buffer", "tensor", "opcode", "graph-output", "cycle"],
)
def test_out_of_range_indices_and_cycles(capsys, tmp_path, good_model, change, expect):
    assert_refused(capsys, tmp_path, corrupt(good_model, change), expect)


def test_out_of_range_subgraph_index(capsys, tmp_path):
    import kerasmodels
    from test_roundtrip import multi_subgraph_model

    data = kerasmodels.cached("cond_while.tflite", multi_subgraph_model).read_bytes()

    def change(m):
        for op in m.subgraphs[0].operators:
            options = op.builtinOptions
            if options is not None and hasattr(options, "bodySubgraphIndex"):
                options.bodySubgraphIndex = 42
                return
            if options is not None and hasattr(options, "thenSubgraphIndex"):
                options.thenSubgraphIndex = 42
                return
        raise AssertionError("no control-flow op")

    assert_refused(capsys, tmp_path, corrupt(data, change), "SubgraphIndex is 42")


def test_missing_input_path(capsys, tmp_path):
    assert_refused(capsys, tmp_path, None, "cannot read")


def test_input_is_a_directory_needs_a_folder_output(capsys, tmp_path):
    folder = tmp_path / "models"
    folder.mkdir()
    out = tmp_path / "out.tflite"
    out.write_bytes(b"a file")
    code, err = run_cli(capsys, [folder, out])
    assert code == 1 and "must be a folder" in err and len(err.strip().splitlines()) == 1


def test_unwritable_output_folder(capsys, tmp_path, good_model):
    src = tmp_path / "in.tflite"
    src.write_bytes(good_model)
    blocker = tmp_path / "file"
    blocker.write_bytes(b"x")
    for dst in (tmp_path / "missing" / "out.tflite", blocker / "out.tflite"):
        code, err = run_cli(capsys, [src, dst])
        assert code == 1 and "cannot write" in err and len(err.strip().splitlines()) == 1
        assert not dst.exists()


def test_usage_errors_exit_2(capsys, tmp_path, good_model):
    src = tmp_path / "in.tflite"
    src.write_bytes(good_model)
    for args in (
        [src, tmp_path / "o.tflite", "--rules", "no_such_rule"],
        [src],
        ["--exclude", "(", src, src],
    ):
        with pytest.raises(SystemExit) as exit_info:
            cli.main([str(a) for a in args])
        assert exit_info.value.code == 2
    capsys.readouterr()


def test_real_process_prints_no_traceback(tmp_path):
    src = tmp_path / "in.tflite"
    src.write_bytes(b"TFL3" * 3)
    result = subprocess.run(
        [sys.executable, "-m", "tfl_fuse", str(src), str(tmp_path / "out.tflite")],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out.tflite").exists()


def test_in_and_out_may_be_the_same_path(capsys, tmp_path, good_model):
    path = tmp_path / "model.tflite"
    path.write_bytes(good_model)
    code, _ = run_cli(capsys, [path, path])
    assert code == 0 and path.read_bytes() != good_model
    assert Path(path).stat().st_size > 0


@pytest.mark.parametrize(
    "recipe",
    [
        "Net_Preactivation_Residual_MaxPool_000",
        "Net_Decomposed_BN_000",
        "Net_Concat_BN_Relu_Conv_000",
    ],
)
def test_corrupted_bytes_never_crash(capsys, tmp_path, recipe):
    """Seeded byte flips in valid models: each run ends in 0 or a one-line error, never a crash."""
    import random

    data, _ = chef.cook(RECIPES / recipe)
    rng = random.Random(recipe)
    src, dst = tmp_path / "in.tflite", tmp_path / "out.tflite"
    outcomes = {0: 0, 1: 0}
    for _ in range(150):
        corrupted = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            corrupted[rng.randrange(8, len(corrupted))] = rng.randrange(256)
        src.write_bytes(corrupted)
        code, err = run_cli(capsys, [src, dst, "-q"])
        outcomes[code] += 1
        if code:
            assert len(err.strip().splitlines()) == 1 and "internal error" not in err, err
    assert outcomes[1] > 0
