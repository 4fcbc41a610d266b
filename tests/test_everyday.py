"""Everyday use (issue 13): rule sets, --check, --verify naming the rewrite, warnings, wording, API."""

from __future__ import annotations

import json
import os

import chef
import pytest
from conftest import RECIPES, conv_mul_recipe

import tfl_fuse
from tfl_fuse import cli, engine, fb, rules
from tfl_fuse.api import UnknownRuleError


@pytest.fixture(scope="module")
def demo_bytes() -> bytes:
    return chef.cook(RECIPES / "Demo_Residual_Preact_BN")[0]


@pytest.fixture
def demo(tmp_path, demo_bytes):
    path = tmp_path / "in.tflite"
    path.write_bytes(demo_bytes)
    return path


@pytest.fixture
def neg_gamma(tmp_path):
    path = tmp_path / "neg.tflite"
    path.write_bytes(chef.cook(RECIPES / "Net_Preactivation_NegGamma_000")[0])
    return path


def run(capsys, *args):
    code = cli.main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def usage_error(capsys, *args) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli.main([str(a) for a in args])
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def warnings(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("tfl-fuse: warning:")]


# rule sets ---------------------------------------------------------------------------------
def test_rules_all_and_enable_add_off_by_default_rules(demo, tmp_path, capsys):
    exact = [r.name for r in rules.ALL_RULES if not r.approximate]
    code, out, _ = run(capsys, demo, tmp_path / "o.tflite", "--rules", "all", "--report", "-")
    assert code == 0 and json.loads(out)["rules"] == exact
    assert "make_gamma_positive" not in exact  # approximate rules are named, never implied
    code, out, err = run(
        capsys,
        demo,
        tmp_path / "o.tflite",
        "--enable",
        "standalone_bn_to_depthwise",
        "--report",
        "-",
    )
    defaults = [r.name for r in rules.default_rules()]
    assert code == 0 and not warnings(err)
    assert sorted(json.loads(out)["rules"]) == sorted(defaults + ["standalone_bn_to_depthwise"])


def test_enable_contradictions_and_no_ops(demo, tmp_path, capsys):
    out = tmp_path / "o.tflite"
    assert "with --rules" in usage_error(
        capsys, demo, out, "--rules", "fold_constants", "--enable", "remove_identity"
    )
    assert "both in --enable and --disable" in usage_error(
        capsys, demo, out, "--enable", "standalone_bn_to_depthwise", "--disable",
        "standalone_bn_to_depthwise",
    )  # fmt: skip
    assert "unknown rule 'nope'" in usage_error(capsys, demo, out, "--enable", "nope")
    code, _, err = run(capsys, demo, out, "--enable", "fold_constants")
    assert code == 0 and warnings(err) == [
        "tfl-fuse: warning: --enable fold_constants: it is on by default already"
    ]


def test_empty_and_contradicting_rule_lists_are_usage_errors(demo, tmp_path, capsys):
    out = tmp_path / "o.tflite"
    assert "names no rule" in usage_error(capsys, demo, out, "--rules", " , ")
    assert "both in --rules and --disable" in usage_error(
        capsys, demo, out, "--rules", "fold_constants", "--disable", "fold_constants"
    )
    assert "contradict" in usage_error(capsys, demo, out, "-q", "-v")
    assert not out.exists()


def test_options_that_do_nothing_warn_once(demo, tmp_path, capsys):
    out = tmp_path / "x.circle"
    code, _, err = run(
        capsys,
        demo,
        out,
        "--exclude",
        "^no_such_tensor$",
        "--output-format",
        "tflite",
        "--disable",
        "standalone_bn_to_depthwise",
        "--tolerance",
        "1e-3",
        "--weight-granularity",
        "tensor",
        "-j",
        "2",
    )
    assert code == 0
    lines = warnings(err)
    assert len(lines) == 6, err
    for expected in (
        "--exclude '^no_such_tensor$' matches no op's output tensor name",
        "writing a tflite model to",
        "--disable standalone_bn_to_depthwise: it would not run anyway",
        "--tolerance does nothing without --verify",
        "--weight-granularity does nothing with --target float",
        "-j does nothing for a single model",
    ):
        assert sum(expected in line for line in lines) == 1, (expected, lines)
    assert out.read_bytes()[4:8] == b"TFL3"  # the explicit option wins
    code, _, err = run(capsys, demo, tmp_path / "o.tflite", "--exclude", "preact", "-q")
    assert code == 0 and err == ""  # a matching pattern and -q: silent


def test_float16_folds_warns_where_it_does_nothing(demo, tmp_path, capsys):
    code, _, err = run(
        capsys, demo, tmp_path / "o.tflite", "--target", "int8", "--float16-folds", "float32"
    )
    assert code == 0
    assert any("--float16-folds does nothing here" in line for line in warnings(err)), err
    code, _, err = run(capsys, demo, tmp_path / "o.tflite", "--float16-folds", "float32")
    assert code == 0 and "--float16-folds" not in err


def test_disabling_every_rule_warns(demo, tmp_path, capsys):
    every = ",".join(r.name for r in rules.default_rules())
    code, _, err = run(capsys, demo, tmp_path / "o.tflite", "--disable", every)
    assert code == 0 and any("no rule left to run" in line for line in warnings(err))


# --check -----------------------------------------------------------------------------------
def test_check_exits_4_when_rules_would_change_and_writes_nothing(demo, tmp_path, capsys):
    before = sorted(p.name for p in tmp_path.iterdir())
    code, _, err = run(capsys, demo, "--check")
    assert code == 4
    lines = err.strip().splitlines()
    assert lines[0] == f"tfl-fuse: check: {demo}: 4 rewrites would change the model:"
    assert len(lines) == 5 and "[push_shift_backward] ADD:preact" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    optimized = tmp_path / "opt.tflite"
    assert run(capsys, demo, optimized, "-q")[0] == 0
    code, _, err = run(capsys, optimized, "--check")
    assert code == 0 and "no rule would change the model" in err
    code, _, err = run(capsys, demo, "--check", "-q")
    assert code == 4 and err == ""
    code, _, err = run(capsys, demo, "--check", "--dry-run")
    assert code == 4 and warnings(err) == [
        "tfl-fuse: warning: --dry-run: --check writes nothing anyway"
    ]
    assert "give IN only" in usage_error(capsys, demo, tmp_path / "o.tflite", "--check")


def test_check_report(demo, tmp_path, capsys):
    code, out, _ = run(capsys, demo, "--check", "--report", "-", "-q")
    report = json.loads(out)
    assert code == 4 and report["output"] is None and len(report["rewrites"]) == 4


# --verify ----------------------------------------------------------------------------------
def test_verify_failure_names_the_rewrite_responsible(neg_gamma, tmp_path, capsys):
    out = tmp_path / "out.tflite"
    code, stdout, err = run(
        capsys,
        neg_gamma,
        out,
        "--rules",
        "make_gamma_positive,move_scale_forward",
        "--verify",
        "-v",
        "--report",
        "-",
    )
    assert code == 3 and not out.exists()
    lines = err.splitlines()
    errors = [line for line in lines if line.startswith("tfl-fuse: error:")]
    assert len(errors) == 1
    assert "first after rewrite 1 of 2: [make_gamma_positive] MUL:mul + ADD:relu" in errors[0]
    assert "beyond tolerance 1e-05" in errors[0]
    assert sum(line.startswith("  rewrote  ") for line in lines) == 2  # -v shows the rewrites
    report = json.loads(stdout)
    assert len(report["rewrites"]) == 2 and report["output"] is None
    culprit = report["verify"]["culprit"]
    assert culprit["rule"] == "make_gamma_positive" and culprit["index"] == 1
    assert report["verify"]["tolerance"] == 1e-5


def test_tolerance_is_settable(neg_gamma, tmp_path, capsys):
    # make_gamma_positive changes the output by 0.24 of its largest magnitude
    out = tmp_path / "out.tflite"
    args = [neg_gamma, out, "--rules", "make_gamma_positive,move_scale_forward", "--verify"]
    assert run(capsys, *args, "--tolerance", "0.1")[0] == 3
    code, _, err = run(capsys, *args, "--tolerance", "0.5")
    assert code == 0 and out.exists() and "APPROXIMATE" in err
    assert "must be in [0, 1)" in usage_error(capsys, *args, "--tolerance", "2")


def test_culprit_in_the_api(neg_gamma):
    with pytest.raises(tfl_fuse.VerificationError) as info:
        tfl_fuse.optimize(
            neg_gamma.read_bytes(),
            ["move_scale_forward", "make_gamma_positive", "fold_constants"],
            verify=True,
        )
    assert info.value.result["culprit"]["rule"] == "make_gamma_positive"
    assert info.value.report["rewrites"]
    _, report = tfl_fuse.optimize(
        neg_gamma.read_bytes(),
        ["make_gamma_positive", "move_scale_forward"],
        verify=True,
        tolerance=0.5,
    )
    assert report["verify"]["match"]


def test_stopped_runs_hold_the_first_rewrites(demo_bytes):
    full = engine.run(fb.decode(demo_bytes), rules.default_rules())["rewrites"]
    assert len(full) == 4
    for k in range(len(full) + 1):
        model = fb.decode(demo_bytes)
        report = engine.run(model, rules.default_rules(), stop_after=k)
        assert report["rewrites"] == full[:k]
        fb.encode(model)  # a consistent model at every stop


# report file -------------------------------------------------------------------------------
def test_unwritable_report_is_an_error_before_any_work(demo, tmp_path, capsys):
    out = tmp_path / "out.tflite"
    for report in (tmp_path / "missing" / "r.json", tmp_path):
        code, _, err = run(capsys, demo, out, "--report", report)
        assert code == 1 and not out.exists()
        assert err.startswith(f"tfl-fuse: error: cannot write report {report}")
        assert len(err.strip().splitlines()) == 1


# wording -----------------------------------------------------------------------------------
def test_missing_file_named_once_and_singular_rewrite(tmp_path, capsys):
    missing = tmp_path / "missing.tflite"
    code, _, err = run(capsys, missing, tmp_path / "o.tflite")
    assert code == 1 and err.count(str(missing)) == 1
    src = tmp_path / "in.tflite"
    src.write_bytes(chef.cook(RECIPES / "Net_TConv_Add_000")[0])
    code, _, err = run(capsys, src, tmp_path / "o.tflite")
    assert code == 0 and "; 1 rewrite," in err


# labels ------------------------------------------------------------------------------------
def test_labels_name_ops_by_their_original_output(demo_bytes, capsys, tmp_path):
    _, report = tfl_fuse.optimize(demo_bytes)
    ops = [label for entry in report["rewrites"] for label in entry["ops"]]
    assert ops.count("TRANSPOSE_CONV:up") == 2 and "TRANSPOSE_CONV:m2" not in ops
    src = tmp_path / "in.tflite"
    src.write_bytes(chef.cook(RECIPES / "Net_Conv_Relu_NegMul_000")[0])
    _, report = tfl_fuse.optimize(src.read_bytes())
    assert report["declined"]
    for entry in report["declined"]:
        assert set(entry) == {"rule", "subgraph", "ops", "reason", "outputs"}
        assert all(":" in label for label in entry["ops"])
    code, _, err = run(capsys, src, tmp_path / "o.tflite", "-v")
    declined = [line for line in err.splitlines() if line.startswith("  declined ")]
    entry = report["declined"][0]
    assert declined[0] == (
        f"  declined [{entry['rule']}] {' + '.join(entry['ops'])}: {entry['reason']}"
    )


# API ---------------------------------------------------------------------------------------
def test_api_arguments_are_validated(demo_bytes, demo, tmp_path):
    with pytest.raises(TypeError, match=r"rules_to_run .*not a string.*\['fold_constants'\]"):
        tfl_fuse.optimize(demo_bytes, rules_to_run="fold_constants")
    with pytest.raises(TypeError, match="disable"):
        tfl_fuse.optimize(demo_bytes, disable="fold_constants")
    with pytest.raises(ValueError, match="output_format .* not 'onnx'"):
        tfl_fuse.optimize(demo_bytes, output_format="onnx")
    with pytest.raises(ValueError, match="rules_to_run: unknown rule 'nope'"):
        tfl_fuse.optimize(demo_bytes, ["nope"])
    with pytest.raises(KeyError):  # as before: an unknown rule is also a KeyError
        tfl_fuse.optimize(demo_bytes, ["nope"])
    with pytest.raises(UnknownRuleError, match="disable: unknown rule"):
        tfl_fuse.optimize(demo_bytes, disable=["nope"])
    with pytest.raises(ValueError, match="exclude: invalid regular expression"):
        tfl_fuse.optimize(demo_bytes, exclude=["("])
    with pytest.raises(ValueError, match="tolerance"):
        tfl_fuse.optimize(demo_bytes, tolerance=-1)
    with pytest.raises(TypeError, match=r"optimize_file\(\) got an unexpected keyword"):
        tfl_fuse.optimize_file(demo, tmp_path / "o.tflite", rule=["fold_constants"])
    dst = tmp_path / "o.circle"
    report = tfl_fuse.optimize_file(demo, dst)
    assert report["output"] == str(dst) and dst.read_bytes()[4:8] == b"CIR0"


def test_culprit_found_after_an_exact_prefix(tmp_path):
    """Zero scales become 1e-10: outputs still match until the shift t/1e-10 is pushed into
    biases (rewrite 3); bisection names that rewrite and the approximate one behind it."""
    data = chef.cook(RECIPES / "Net_Preactivation_ZeroGamma_000")[0]
    names = [r.name for r in rules.default_rules()] + ["make_gamma_positive"]
    with pytest.raises(tfl_fuse.VerificationError) as info:
        tfl_fuse.optimize(data, names, verify=True)
    culprit = info.value.result["culprit"]
    assert culprit["index"] == 3 and culprit["rule"] == "push_shift_backward"
    assert "after approximate rewrite 1: [make_gamma_positive]" in str(info.value)
    # the first two rewrites alone still match: the bisection's claim, checked directly
    model = fb.decode(data)
    engine.run(model, rules.select(names), stop_after=2)
    from tfl_fuse.verify import compare_models

    assert compare_models(data, bytes(fb.encode(model)))["match"]


def test_model_explorer_overlay_marks_the_input_models_ops(demo, tmp_path, capsys):
    import explorer_overlay

    src = tmp_path / "neg.tflite"
    src.write_bytes(chef.cook(RECIPES / "Net_Conv_Relu_NegMul_000")[0])
    _, report = tfl_fuse.optimize(demo.read_bytes())
    _, declining = tfl_fuse.optimize(src.read_bytes())
    report["declined"] = declining["declined"]
    data = explorer_overlay.overlay(report)
    results = {name: r["value"] for name, r in data["results"].items()}
    # folded MULs/ADDs are green (1), the layers that took them blue only if not also folded
    assert results["m2"] == 1 and results["mul"] == 1 and results["preact"] == 1
    assert results["up"] == 1  # TRANSPOSE_CONV:up is named in the fold's ops
    assert results["c"] == 3 and results["a"] == 3 and results["d"] == 3
    assert results["ofm"] == 1  # demo's ADD:ofm folded; the other model's declined MUL:ofm loses
    assert [t["value"] for t in data["thresholds"]] == [1, 2, 3]
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"declined": declining["declined"], "rewrites": []}))
    assert explorer_overlay.main([str(path), "-o", str(tmp_path / "o.json")]) == 0
    assert json.loads((tmp_path / "o.json").read_text())["results"] == {"ofm": {"value": 2}}


def test_every_library_entry_point_takes_every_option():
    """optimize, optimize_image and optimize_file take the same options (one was missing
    float16_folds once), and the CLI's Options hand over the same ones."""
    import inspect

    from tfl_fuse import api, cli

    expected = list(inspect.signature(api.optimize).parameters)[1:]
    for function in (api.optimize_image, api.optimize_file):
        names = list(inspect.signature(function).parameters)
        own = ("src", "dst", "data", "durable")  # durable: how optimize_file writes
        assert [n for n in names if n not in own] == expected, function
    fields = inspect.signature(cli.Options).parameters
    options = cli.Options(**{name: None for name in fields if name != "warnings"})
    assert set(options.library_arguments(None)) == set(expected) - {"seed"}


def test_no_fsync_writes_the_same_model_without_fsync(demo, tmp_path, capsys, monkeypatch):
    """--no-fsync: the same bytes, renamed into place as always, but never fsync'ed (the
    default fsyncs once: the model; the folder run likewise, per model)."""
    import os

    calls = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: calls.append(fd) or real(fd))
    durable, fast = tmp_path / "durable.tflite", tmp_path / "fast.tflite"
    assert run(capsys, demo, durable, "-q")[0] == 0
    assert len(calls) == 1
    assert run(capsys, demo, fast, "-q", "--no-fsync")[0] == 0
    assert len(calls) == 1
    assert fast.read_bytes() == durable.read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    folder_in, folder_out = tmp_path / "in", tmp_path / "out"
    folder_in.mkdir()
    (folder_in / "a.tflite").write_bytes(demo.read_bytes())
    assert run(capsys, folder_in, folder_out, "-q", "--no-fsync")[0] == 0
    assert len(calls) == 1 and (folder_out / "a.tflite").read_bytes() == durable.read_bytes()
    code, _, err = run(capsys, demo, "--check", "--no-fsync")
    assert "--no-fsync does nothing here" in err


def test_durable_writes_start_writeback_early_and_write_the_same_bytes(tmp_path, monkeypatch):
    """A durable write hands each MiB to the disk as it goes (sync_file_range), so the final
    fsync waits less; the bytes are those of a write without it."""
    from tfl_fuse import api, fb

    path = tmp_path / "m.tflite"
    path.write_bytes(chef.cook(RECIPES / "Net_Conv_Add_Mul_000")[0])
    started = []
    real = fb._writeback_starter()
    assert real is not None  # Linux: the C library has sync_file_range
    monkeypatch.setattr(fb, "WRITEBACK_STEP", 1)
    monkeypatch.setattr(fb, "HOLE_MIN_BYTES", 64)  # the recipe's weights become holes too
    monkeypatch.setattr(
        fb, "_writeback_starter", lambda: lambda *args: started.append(args) or real(*args)
    )
    api.optimize_file(path, tmp_path / "durable.tflite")
    assert started and all(count > 0 for _, _, count in started)
    calls = len(started)
    api.optimize_file(path, tmp_path / "fast.tflite", durable=False)
    assert len(started) == calls  # no fsync coming: no early writeback either
    assert (tmp_path / "durable.tflite").read_bytes() == (tmp_path / "fast.tflite").read_bytes()


def test_the_replaced_output_is_freed_in_the_background_and_nothing_leaks(tmp_path, monkeypatch):
    """A file over 1 MiB that OUT replaces is held open across the rename and closed by a
    thread (freeing it costs the rename ~0.25 ms per MiB otherwise); OUT gets the new bytes,
    the old file's readers keep theirs, and once released no descriptor is left open."""
    from tfl_fuse import api

    path = tmp_path / "m.tflite"
    path.write_bytes(chef.cook(RECIPES / "Net_Conv_Add_Mul_000")[0])
    out = tmp_path / "out.tflite"
    old = b"x" * (api.RELEASE_IN_BACKGROUND_BYTES + 1)
    out.write_bytes(old)
    closed = []
    real_release = api._release
    monkeypatch.setattr(api, "_release", lambda fd: closed.append(fd) or real_release(fd))
    fds = set(os.listdir("/proc/self/fd"))
    with out.open("rb") as reader:  # a reader of the old file keeps reading the old bytes
        api.optimize_file(path, out)
        api.wait_for_releases()
        assert reader.read() == old
    assert len(closed) == 1
    assert out.read_bytes() == tfl_fuse.optimize(path.read_bytes())[0]
    assert set(os.listdir("/proc/self/fd")) <= fds  # the held descriptor was closed
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    out.write_bytes(b"small")  # under 1 MiB: replaced as before, no thread
    api.optimize_file(path, out)
    assert len(closed) == 1 and out.read_bytes()[4:8] == b"TFL3"


def test_the_input_is_unmapped_in_the_background_once_nothing_views_it(tmp_path, monkeypatch):
    """optimize_file hands the input's map to the background thread once the output is
    written (unmapping a 32 MB model costs 1.6 ms); a map something still views is left
    alone (closing it would fail), not closed under the viewer."""
    import mmap

    import numpy as np

    from tfl_fuse import api

    recipe = conv_mul_recipe(128, 64)
    path = tmp_path / "m.tflite"
    path.write_bytes(fb.encode(chef.build_model(recipe)))
    assert path.stat().st_size >= 1 << 16  # large enough to be mapped, not read
    monkeypatch.setattr(api, "RELEASE_IN_BACKGROUND_BYTES", 1 << 16)
    handed = []
    real_unmap = api._unmap
    monkeypatch.setattr(api, "_unmap", lambda data: handed.append(data) or real_unmap(data))
    report = api.optimize_file(path, tmp_path / "out.tflite")
    api.wait_for_releases()
    assert report["ops_after"] == {"CONV_2D": 1}
    assert len(handed) == 1 and isinstance(handed[0], mmap.mmap) and handed[0].closed
    assert (tmp_path / "out.tflite").read_bytes() == tfl_fuse.optimize(path.read_bytes())[0]

    with api.open_model_file(path) as (data, _):
        view = np.frombuffer(data, np.uint8)
        real_unmap(data)
        api.wait_for_releases()
        assert not data.closed and view[:8].tobytes() == path.read_bytes()[:8]
        del view
    data.close()


def test_background_releases_work_at_exit_and_in_a_forked_child(tmp_path):
    """The closing thread is a daemon drained at exit, and a forked child (verify forks) gets
    its own: replacing large outputs in both and waiting there neither hangs nor fails."""
    import subprocess
    import sys

    path = tmp_path / "m.tflite"
    path.write_bytes(chef.cook(RECIPES / "Net_Conv_Add_Mul_000")[0])
    script = f"""
import os, sys
from tfl_fuse import api
src, a, b = {str(path)!r}, {str(tmp_path / "a.tflite")!r}, {str(tmp_path / "b.tflite")!r}
for out in (a, b):
    open(out, "wb").write(b"x" * (api.RELEASE_IN_BACKGROUND_BYTES + 1))
api.optimize_file(src, a)
pid = os.fork()
if pid == 0:
    api.optimize_file(src, b)
    api.wait_for_releases()
    os._exit(0)
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status))
"""
    result = subprocess.run([sys.executable, "-c", script], timeout=60, capture_output=True)
    assert result.returncode == 0, result.stderr
    for name in ("a.tflite", "b.tflite"):
        assert (tmp_path / name).read_bytes() == tfl_fuse.optimize(path.read_bytes())[0]


def test_a_tflite_run_does_not_load_the_circle_schema(tmp_path):
    """The circle schema is imported only for circle models: loading it costs a TFLite run
    3.7 MB of memory (MobileNetV2's peak RSS 44.7 -> 48.4 MB when validation once asked it)."""
    import subprocess
    import sys

    path = tmp_path / "m.tflite"
    path.write_bytes(chef.cook(RECIPES / "Net_Preactivation_BN_000")[0])
    script = (
        "import sys, tfl_fuse\n"
        f"tfl_fuse.optimize_file({str(path)!r}, {str(tmp_path / 'out.tflite')!r})\n"
        "sys.exit(any(name.startswith('circle_schema') for name in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr
