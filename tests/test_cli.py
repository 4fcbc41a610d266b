"""The command-line contract: options, report file, dry run, exit codes."""

from __future__ import annotations

import json

import chef
import pytest
from conftest import RECIPES

from tfl_fuse import cli, fb


@pytest.fixture
def model(tmp_path):
    path = tmp_path / "in.tflite"
    path.write_bytes(chef.cook(RECIPES / "Net_Preactivation_Residual_MaxPool_000")[0])
    return path


def test_report_file_has_the_contract_keys(model, tmp_path, capsys):
    report_path = tmp_path / "report.json"
    assert (
        cli.main([str(model), str(tmp_path / "out.tflite"), "--report", str(report_path), "-q"])
        == 0
    )
    assert capsys.readouterr().err == ""  # -q
    report = json.loads(report_path.read_text())
    assert {"ops_before", "ops_after", "rewrites", "declined"} <= set(report)
    assert report["ops_before"]["MUL"] == 1 and report["ops_after"].get("MUL", 0) == 0
    assert all({"rule", "subgraph", "ops", "reason"} <= set(d) for d in report["declined"])


def test_report_to_stdout_and_verbose_lines(model, tmp_path, capsys):
    assert cli.main([str(model), str(tmp_path / "out.tflite"), "--report", "-", "-v"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["output"].endswith("out.tflite")
    assert "rewrote  [move_scale_forward]" in captured.err and "tfl-fuse:" in captured.err


def test_dry_run_writes_nothing(model, tmp_path, capsys):
    out = tmp_path / "out.tflite"
    assert cli.main([str(model), str(out), "--dry-run"]) == 0
    assert not out.exists()
    assert cli.main([str(model), "--dry-run"]) == 0  # OUT may be omitted
    capsys.readouterr()


def ops(path):
    return sorted(op.opcode.name for op in fb.decode(path.read_bytes()).subgraphs[0].operators)


def test_rules_none_and_disable(model, tmp_path, capsys):
    out = tmp_path / "out.tflite"
    assert cli.main([str(model), str(out), "--rules", "none", "-q"]) == 0
    assert ops(out) == ops(model)
    assert (
        cli.main(
            [
                str(model),
                str(out),
                "--disable",
                "push_shift_backward,move_scale_forward",
                "--report",
                "-",
                "-q",
            ]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert "push_shift_backward" not in report["rules"] and report["ops_after"]["MUL"] == 1


def test_output_format_by_option_and_by_suffix(model, tmp_path, capsys):
    assert cli.main([str(model), str(tmp_path / "a.bin"), "--output-format", "circle", "-q"]) == 0
    assert (tmp_path / "a.bin").read_bytes()[4:8] == b"CIR0"
    assert cli.main([str(model), str(tmp_path / "b.circle"), "-q"]) == 0
    assert (tmp_path / "b.circle").read_bytes()[4:8] == b"CIR0"
    assert cli.main([str(tmp_path / "b.circle"), str(tmp_path / "c.tflite"), "-q", "--verify"]) == 0
    assert (tmp_path / "c.tflite").read_bytes()[4:8] == b"TFL3"
    capsys.readouterr()


def test_verify_mismatch_exits_3_and_writes_nothing(tmp_path, capsys):
    src = tmp_path / "in.tflite"
    src.write_bytes(chef.cook(RECIPES / "Net_Preactivation_NegGamma_000")[0])
    out = tmp_path / "out.tflite"
    out.write_bytes(b"previous")
    code = cli.main(
        [str(src), str(out), "--verify", "--rules", "make_gamma_positive,move_scale_forward"]
    )
    assert code == 3
    assert out.read_bytes() == b"previous"
    err = capsys.readouterr().err
    assert "--verify: outputs differ" in err and len(err.strip().splitlines()) == 1


def test_list_rules_and_version(capsys):
    assert cli.main(["--list-rules"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) >= 10 and all(len(line.split()) > 1 for line in lines)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert "tfl-fuse" in capsys.readouterr().out
