"""The int8 simulation behind --target int8's measured equalization (tfl_fuse/quantsim.py).

The simulation must predict what ai-edge-quantizer's static int8 model computes, so the
equalization it decides is the one that quantizes better; when it cannot run or would cost too
much, the rule falls back to the data-free noise model and says so.
"""

from __future__ import annotations

import json

import chef
import numpy as np
import pytest
import quantbench
from conftest import RECIPES

import tfl_fuse
from tfl_fuse import cli, fb, quantsim
from tfl_fuse.graph import Graph
from tfl_fuse.rules import equalize

OUTLIER = RECIPES / "Net_CLE_Measured_Outlier_000"


@pytest.fixture(scope="module")
def outlier_model() -> bytes:
    return chef.cook(OUTLIER)[0]


def test_weights_are_rounded_to_the_symmetric_int8_grid():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(4, 3, 3, 2)) * np.array([0.01, 1.0, 5.0, 100.0])[:, None, None, None]
    per_channel = quantsim.quantized_weights(w, 0, "channel")
    for o in range(4):
        step = np.max(np.abs(w[o])) / 127
        levels = per_channel[o] / step
        assert np.allclose(levels, np.round(levels), atol=1e-3)  # on the grid
        assert np.max(np.abs(levels)) == pytest.approx(127, abs=1e-3)  # max |w| is 127 steps
        assert np.max(np.abs(per_channel[o] - w[o])) <= step / 2 * (1 + 1e-5)
    per_tensor = quantsim.quantized_weights(w, 0, "tensor")
    step = np.max(np.abs(w)) / 127
    assert np.allclose(per_tensor / step, np.round(per_tensor / step), atol=1e-3)
    assert np.all(per_tensor[0] == 0)  # the small channel is lost with one scale per tensor


def test_simulated_model_quantizes_every_activation(outlier_model):
    ranges = quantsim.activation_ranges(
        outlier_model, quantsim.synthetic_inputs(_details(outlier_model), 4, 0, (-1.0, 1.0))
    )
    assert all(low <= 0.0 <= high for low, high in ranges.values())
    simulated = fb.decode(quantsim.simulated_model(outlier_model, "channel", ranges))
    kinds = [op.opcode.name for op in simulated.subgraphs[0].operators]
    # the graph input and the two op outputs each pass through FAKE_QUANT
    assert kinds == [
        "FAKE_QUANT",
        "DEPTHWISE_CONV_2D",
        "FAKE_QUANT",
        "CONV_2D",
        "FAKE_QUANT",
    ]


def _details(data: bytes):
    return quantsim._interpreter(data).get_input_details()


@pytest.mark.parametrize("granularity", ["channel", "tensor"])
def test_simulation_predicts_the_quantizer(outlier_model, granularity):
    """Same calibration images: the simulated int8 error is the quantizer's, before and after
    equalization, and so is the gain."""
    pytest.importorskip("ai_edge_quantizer")
    recipe = {"channel": "static_channel", "tensor": "static_tensor"}[granularity]
    equalized = tfl_fuse.optimize(outlier_model, target="int8", weight_granularity=granularity)[0]
    shape = tuple(int(d) for d in _details(outlier_model)[0]["shape"])
    calibration = quantsim.smooth_images(shape, 16, 5, (-1.0, 1.0))
    evaluation = [[x] for x in quantsim.smooth_images(shape, 16, 6, (-1.0, 1.0))]
    reference = quantsim.outputs(outlier_model, evaluation)
    simulated, real = {}, {}
    for name, model in (("original", outlier_model), ("equalized", equalized)):
        ranges = quantsim.activation_ranges(model, [[x] for x in calibration])
        simulated[name] = quantsim.relative_errors(
            reference,
            quantsim.outputs(quantsim.simulated_model(model, granularity, ranges), evaluation),
        )[0]
        quantized = quantbench.quantize(model, recipe, calibration)
        real[name] = quantsim.relative_errors(
            reference,
            quantbench.outputs_for(quantized, [x for (x,) in evaluation], delegate=False),
        )[0]
    for name in simulated:
        assert simulated[name] == pytest.approx(real[name], rel=0.25), (simulated, real)
    gain_simulated = simulated["equalized"] / simulated["original"]
    gain_real = real["equalized"] / real["original"]
    assert gain_real < 0.2 and gain_simulated == pytest.approx(gain_real, rel=0.5)


def test_measured_equalization_is_deterministic(outlier_model):
    first, report = tfl_fuse.optimize(outlier_model, target="int8")
    second, _ = tfl_fuse.optimize(outlier_model, target="int8")
    assert first == second
    assert report["equalize"]["decided_by"] == "simulation"
    assert report["equalize"]["simulations"] >= 2
    (rewrite,) = [r for r in report["rewrites"] if r["rule"] == "equalize_cross_layer"]
    assert "simulated int8 error" in rewrite["detail"]


def test_over_budget_falls_back_to_the_noise_model(outlier_model, monkeypatch):
    monkeypatch.setattr(equalize, "SIMULATION_BUDGET", 0.0)
    _, report = tfl_fuse.optimize(outlier_model, target="int8")
    assert report["equalize"]["decided_by"] == "noise model"
    assert "budget" in report["equalize"]["reason"]
    (rewrite,) = [r for r in report["rewrites"] if r["rule"] == "equalize_cross_layer"]
    assert "predicted quantization noise" in rewrite["detail"]
    # --equalize measure runs the simulation whatever it costs
    _, report = tfl_fuse.optimize(outlier_model, target="int8", equalize="measure")
    assert report["equalize"]["decided_by"] == "simulation"


def test_failed_simulation_falls_back_to_the_noise_model(outlier_model, monkeypatch):
    def refuse(*args, **kwargs):
        raise quantsim.SimulationError("LiteRT cannot run the model: test")

    monkeypatch.setattr(quantsim, "Simulator", refuse)
    out, report = tfl_fuse.optimize(outlier_model, target="int8")
    assert report["equalize"]["decided_by"] == "noise model"
    assert "simulation failed" in report["equalize"]["reason"]
    assert tfl_fuse.verify.compare_models(outlier_model, out)["match"]


@pytest.mark.parametrize(
    "child, timeout, expected",
    [
        ("import os, signal; os.kill(os.getpid(), signal.SIGSEGV)", 60, "crashed (SIGSEGV)"),
        ("import time; time.sleep(30)", 1, "did not finish running the model within 1 s"),
    ],
)
def test_a_native_crash_or_hang_in_the_probe_falls_back(
    outlier_model, monkeypatch, child, timeout, expected
):
    """LiteRT runs in a child process first (quantsim.probe): a segfault or a hang there, which
    in this process would kill or block tfl_fuse, means no in-process simulation."""

    def refuse(*args, **kwargs):
        raise AssertionError("the simulation ran in this process after the probe failed")

    monkeypatch.setattr(quantsim, "PROBE_CODE", child)
    monkeypatch.setattr(quantsim, "PROBE_TIMEOUT", timeout)
    monkeypatch.setattr(quantsim, "Simulator", refuse)
    out, report = tfl_fuse.optimize(outlier_model, target="int8", equalize="measure")
    assert report["equalize"]["decided_by"] == "noise model"
    assert expected in report["equalize"]["reason"], report["equalize"]
    assert tfl_fuse.verify.compare_models(outlier_model, out)["match"]


def test_the_probe_passes_a_model_litert_runs(outlier_model):
    quantsim.probe(outlier_model, "channel", (-1.0, 1.0))  # no SimulationError


def test_predict_mode_runs_no_simulation(outlier_model, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("no simulation in predict mode")

    monkeypatch.setattr(quantsim, "Simulator", refuse)
    _, report = tfl_fuse.optimize(outlier_model, target="int8", equalize="predict")
    assert report["equalize"]["mode"] == "predict" and "decided_by" not in report["equalize"]


def test_non_float_inputs_cannot_be_simulated():
    details = [{"name": "ids", "shape": np.array([1, 4]), "dtype": np.int32}]
    with pytest.raises(quantsim.SimulationError, match="not float32"):
        quantsim.synthetic_inputs(details, 2, 0, (-1.0, 1.0))


def test_multiply_adds_of_a_depthwise_and_a_pointwise_conv(outlier_model):
    graph = Graph(fb.decode(outlier_model), 0)
    # depthwise 3x3 over 12x12x8, then 1x1 8 -> 6 over 12x12
    assert quantsim.multiply_adds(graph) == 12 * 12 * 8 * 9 + 12 * 12 * 6 * 8


def test_cli_equalize_options(outlier_model, tmp_path, capsys):
    source = tmp_path / "in.tflite"
    source.write_bytes(outlier_model)
    report_path = tmp_path / "r.json"
    argv = [str(source), str(tmp_path / "out.tflite"), "--target", "int8"]
    assert (
        cli.main(
            [
                *argv,
                "--equalize",
                "predict",
                "--input-range",
                "0,1",
                "--report",
                str(report_path),
                "-q",
            ]
        )
        == 0
    )
    report = json.loads(report_path.read_text())
    assert report["equalize"]["mode"] == "predict"
    assert report["equalize"]["input_range"] == [0.0, 1.0]
    # options that do nothing are said to do nothing
    assert cli.main([str(source), str(tmp_path / "f.tflite"), "--input-range", "0,1"]) == 0
    assert "--input-range does nothing" in capsys.readouterr().err
    # a bad range is a usage error, nothing written
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*argv[:2], "--target", "int8", "--input-range", "1,0"])
    assert exit_info.value.code == 2
    assert "LOW < HIGH" in capsys.readouterr().err


def test_verify_allows_the_rounding_of_equalized_weights(outlier_model):
    _, report = tfl_fuse.optimize(outlier_model, target="int8", verify=True)
    assert any(r["rule"] == "equalize_cross_layer" for r in report["rewrites"])
    assert report["verify"]["match"] and report["verify"]["tolerance"] == 1e-4
    _, report = tfl_fuse.optimize(outlier_model, verify=True)  # no equalization: 1e-5
    assert report["verify"]["tolerance"] == 1e-5
