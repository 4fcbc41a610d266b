"""Folder mode: tfl-fuse IN_DIR OUT_DIR [-j N] on nested models with bad files among them."""

from __future__ import annotations

import json

import chef
import pytest
from conftest import RECIPES

from tfl_fuse import cli, fb
from tfl_fuse.batch import find_models, table


def op_count(path) -> int:
    return len(fb.decode(path.read_bytes()).subgraphs[0].operators)


@pytest.fixture(scope="module")
def models() -> dict[str, bytes]:
    return {
        "demo": chef.cook(RECIPES / "Demo_Residual_Preact_BN")[0],
        "conv": chef.cook(RECIPES / "Net_Conv_Add_Mul_000")[0],
        "circle": chef.cook(RECIPES / "Net_Circle_Conv_BN_000")[0],
        "negative": chef.cook(RECIPES / "Net_Preactivation_NegGamma_000")[0],
    }


@pytest.fixture
def tree(tmp_path, models):
    root = tmp_path / "in"
    (root / "a" / "b").mkdir(parents=True)
    (root / "demo.tflite").write_bytes(models["demo"])
    (root / "a" / "conv.tflite").write_bytes(models["conv"])
    (root / "a" / "b" / "net.circle").write_bytes(models["circle"])
    (root / "a" / "b" / "cut.tflite").write_bytes(models["conv"][:700])  # truncated
    (root / "a" / "empty.tflite").write_bytes(b"")
    (root / "a" / "notes.txt").write_text("not a model")
    (root / ".hidden.tflite").write_bytes(b"")  # a temp file: skipped
    return root


def run(capsys, *args):
    code = cli.main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_find_models_is_recursive_sorted_and_skips_hidden(tree):
    assert [str(p.relative_to(tree)) for p in find_models(tree)] == [
        "demo.tflite",
        "a/conv.tflite",
        "a/empty.tflite",
        "a/b/cut.tflite",
        "a/b/net.circle",
    ]


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_bad_models_fail_alone(tree, tmp_path, capsys, jobs):
    out = tmp_path / "out"
    report_path = tmp_path / "batch.json"
    code, stdout, err = run(capsys, tree, out, "-j", jobs, "--report", report_path)
    assert code == 1 and stdout == ""
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert written == ["a/b/net.circle", "a/conv.tflite", "demo.tflite"]
    assert op_count(out / "demo.tflite") == 9 and op_count(out / "a" / "conv.tflite") == 1
    assert (out / "a" / "b" / "net.circle").read_bytes()[4:8] == b"CIR0"
    lines = err.splitlines()
    assert lines[0].split() == ["model", "ops", "rewrites", "declined", "status"]
    assert lines[1].split() == ["demo.tflite", "12", "->", "9", "4", "0", "ok"]
    assert lines[3].split() == ["a/empty.tflite", "-", "-", "-", "failed"]
    assert "tfl-fuse: 5 models: 3 changed, 2 failed" in lines
    errors = [line for line in lines if line.startswith("tfl-fuse: error:")]
    assert len(errors) == 2
    assert errors[0].startswith("tfl-fuse: error: a/empty.tflite: not a model")
    assert errors[1].startswith("tfl-fuse: error: a/b/cut.tflite: truncated or not a tflite")
    document = json.loads(report_path.read_text())
    assert document["summary"] == {"models": 5, "failed": 2, "mismatch": 0, "changed": 3}
    rows = {row["model"]: row for row in document["models"]}
    assert rows["demo.tflite"]["report"]["ops_after"]["ADD"] == 2
    assert rows["demo.tflite"]["output"] == str(out / "demo.tflite")
    assert "truncated" in rows["a/b/cut.tflite"]["error"]


def test_all_good_exits_0_and_output_format_changes_the_suffix(tmp_path, capsys, models):
    root = tmp_path / "in"
    (root / "x").mkdir(parents=True)
    (root / "x" / "m.tflite").write_bytes(models["conv"])
    out = tmp_path / "out"
    code, _, err = run(capsys, root, out, "--output-format", "circle", "-q")
    assert code == 0 and err == ""
    code, _, err = run(capsys, root, tmp_path / "o2", "--exclude", "^nothing$")
    assert code == 0 and "warning: --exclude '^nothing$' matches no op's output tensor name" in err
    assert "(in 1 of 1 model)" in err
    assert (out / "x" / "m.circle").read_bytes()[4:8] == b"CIR0"
    assert not (out / "x" / "m.tflite").exists()


def test_check_and_verify_in_a_folder(tmp_path, capsys, models):
    root = tmp_path / "in"
    root.mkdir()
    (root / "m.tflite").write_bytes(models["conv"])
    code, _, err = run(capsys, root, "--check")
    assert code == 4 and "would change" in err and not list(tmp_path.glob("out*"))
    out = tmp_path / "out"
    assert run(capsys, root, out, "-q")[0] == 0
    code, _, err = run(capsys, out, "--check")
    assert code == 0 and "unchanged" in err
    (root / "n.tflite").write_bytes(models["negative"])
    code, _, err = run(
        capsys,
        root,
        tmp_path / "v",
        "--verify",
        "--rules",
        "make_gamma_positive,move_scale_forward",
    )
    assert code == 3
    assert "n.tflite: --verify: outputs differ" in err and "[make_gamma_positive]" in err
    assert not (tmp_path / "v" / "n.tflite").exists()


def test_folder_usage_errors(tree, tmp_path, capsys):
    code, _, err = run(capsys, tree, tree / "sub")
    assert code == 2 and "inside IN_DIR" in err
    blocker = tmp_path / "file"
    blocker.write_bytes(b"x")
    code, _, err = run(capsys, tree, blocker)
    assert code == 1 and "must be a folder" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run(capsys, empty, tmp_path / "o")
    assert code == 0 and "warning: no .tflite or .circle file" in err


def test_table_aligns_columns():
    rows = [
        {"model": "a.tflite", "status": "ok", "report": _report(10, 7, 3, 1)},
        {"model": "long/name.tflite", "status": "failed", "error": "x"},
    ]
    lines = table(rows, check=False).splitlines()
    assert len({line.index("ok") for line in lines if "ok" in line}) == 1
    assert lines[1].split() == ["a.tflite", "10", "->", "7", "3", "1", "ok"]


def _report(before, after, rewrites, declined):
    return {
        "ops_before": {"CONV_2D": before},
        "ops_after": {"CONV_2D": after},
        "rewrites": [{}] * rewrites,
        "declined": [{}] * declined,
    }


def test_progress_bar_only_on_a_terminal(tmp_path, capsys, monkeypatch, models):
    pytest.importorskip("tqdm")
    root = tmp_path / "in"
    root.mkdir()
    for k in range(3):
        (root / f"m{k}.tflite").write_bytes(models["conv"])
    code, _, err = run(capsys, root, tmp_path / "plain")
    assert code == 0 and "\r" not in err
    monkeypatch.setattr("sys.stderr.isatty", lambda: True)
    code = cli.main([str(root), str(tmp_path / "tty")])
    err = capsys.readouterr().err
    assert code == 0 and "/3 [" in err and "model/s" in err
    code = cli.main([str(root), str(tmp_path / "quiet"), "-q"])
    assert code == 0 and capsys.readouterr().err == ""
