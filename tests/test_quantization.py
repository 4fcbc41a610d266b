"""--target int8 output quantized by ai-edge-quantizer: no worse than the untouched model.

A small ResNet-V2-like network built by the chef (a stem conv, three pre-activation residual
blocks: MUL s -> ADD t (RELU) -> CONV (RELU) -> CONV -> residual ADD, a final BN + RELU and a 1x1
head) is quantized with ai-edge-quantizer's static_wi8_ai8 recipe twice: directly (a) and after
``tfl_fuse.optimize(target="int8")`` (c). Both are compared with the float model on seeded smooth
images (the figures of tools/quantbench.py); error(c) must not exceed error(a), and the quantized
(c) model must load and run in LiteRT.
"""

from __future__ import annotations

import chef
import numpy as np
import pytest
import quantbench

import tfl_fuse
from tfl_fuse import fb, verify

pytest.importorskip("ai_edge_quantizer")

SIZE, CHANNELS, BLOCKS = 16, 16, 3


def preactivation_recipe() -> dict:
    def tensor(name, shape, filler=None):
        operand = {"name": name, "shape": shape}
        if filler:
            operand["filler"] = filler
        return operand

    act = [1, SIZE, SIZE, CHANNELS]
    operands = [
        tensor("ifm", [1, SIZE, SIZE, 3]),
        tensor("k_stem", [CHANNELS, 3, 3, 3], {"kind": "gaussian", "stddev": 0.3, "seed": 1}),
        tensor("b_stem", [CHANNELS], {"kind": "gaussian", "stddev": 0.1, "seed": 2}),
        tensor("x0", act),
    ]
    operations = [
        {
            "type": "CONV_2D",
            "inputs": ["ifm", "k_stem", "b_stem"],
            "outputs": ["x0"],
            "options": {"padding": "SAME"},
        }
    ]

    def batchnorm(x, out, seed, activation="RELU"):
        # A pre-activation BN as the converter leaves it: per-channel scales of unequal size.
        operands.extend(
            [
                tensor(
                    f"s_{out}",
                    [CHANNELS],
                    {"kind": "uniform", "low": 0.2, "high": 4.0, "seed": seed},
                ),
                tensor(f"m_{out}", act),
                tensor(
                    f"t_{out}", [CHANNELS], {"kind": "gaussian", "stddev": 0.5, "seed": seed + 1}
                ),
                tensor(out, act),
            ]
        )
        operations.extend(
            [
                {"type": "MUL", "inputs": [x, f"s_{out}"], "outputs": [f"m_{out}"]},
                {
                    "type": "ADD",
                    "inputs": [f"m_{out}", f"t_{out}"],
                    "outputs": [out],
                    "options": {"activation": activation},
                },
            ]
        )

    def conv(x, out, seed, activation="NONE", size=3, channels=CHANNELS):
        stddev = float(np.sqrt(2.0 / (size * size * CHANNELS)))
        operands.extend(
            [
                tensor(
                    f"k_{out}",
                    [channels, size, size, CHANNELS],
                    {"kind": "gaussian", "stddev": stddev, "seed": seed},
                ),
                tensor(
                    f"b_{out}", [channels], {"kind": "gaussian", "stddev": 0.1, "seed": seed + 1}
                ),
                tensor(out, [1, SIZE, SIZE, channels]),
            ]
        )
        operations.append(
            {
                "type": "CONV_2D",
                "inputs": [x, f"k_{out}", f"b_{out}"],
                "outputs": [out],
                "options": {"padding": "SAME", "activation": activation},
            }
        )

    x = "x0"
    for block in range(BLOCKS):
        seed = 10 * (block + 1)
        batchnorm(x, f"p{block}", seed)
        conv(f"p{block}", f"h{block}", seed + 2, activation="RELU")
        conv(f"h{block}", f"r{block}", seed + 4)
        operands.append(tensor(f"x{block + 1}", act))
        operations.append({"type": "ADD", "inputs": [x, f"r{block}"], "outputs": [f"x{block + 1}"]})
        x = f"x{block + 1}"
    batchnorm(x, "post", 100)
    conv("post", "ofm", 102, size=1, channels=10)
    return {
        "name": "preact_quant",
        "inputs": ["ifm"],
        "outputs": ["ofm"],
        "operand": operands,
        "operation": operations,
    }


@pytest.fixture(scope="module")
def models() -> dict:
    original = bytes(fb.encode(chef.build_model(preactivation_recipe())))
    int8, report = tfl_fuse.optimize(original, target="int8")
    return {"original": original, "int8": int8, "report": report}


def test_int8_target_quantizes_no_worse_than_the_untouched_model(models):
    shape = (1, SIZE, SIZE, 3)
    calibration = quantbench.smooth_images(shape, 32, quantbench.CALIBRATION_SEED, (-1.0, 1.0))
    evaluation = quantbench.smooth_images(shape, 16, quantbench.EVALUATION_SEED, (-1.0, 1.0))
    reference = quantbench.outputs_for(models["original"], evaluation, delegate=False)

    quantized = {
        name: quantbench.quantize(models[key], "static_channel", calibration)
        for name, key in (("a", "original"), ("c", "int8"))
    }
    errors = {
        name: quantbench.relative_errors(
            reference, quantbench.outputs_for(model, evaluation, delegate=True)
        )[0]
        for name, model in quantized.items()
    }
    print(f"static int8 error: (a) {errors['a']:.5f}, (c) {errors['c']:.5f}")
    # The quantizer did quantize: int8 tensors, and an error well above float rounding.
    for model in quantized.values():
        interp = verify.interpreter(model)
        assert any(d["dtype"] == np.int8 for d in interp.get_tensor_details())
    assert errors["a"] > 1e-4
    # (c) is another model: its pre-activation BNs became depthwise convs.
    assert models["report"]["ops_after"].get("MUL", 0) == 0
    assert models["report"]["ops_after"].get("DEPTHWISE_CONV_2D", 0) == BLOCKS + 1
    assert errors["c"] <= errors["a"]


def test_quantized_int8_target_runs_in_litert(models):
    calibration = quantbench.smooth_images((1, SIZE, SIZE, 3), 8, 0, (-1.0, 1.0))
    quantized = quantbench.quantize(models["int8"], "static_channel", calibration)
    for delegate in (False, True):
        (outputs,) = quantbench.outputs_for(quantized, calibration[:1], delegate=delegate)
        assert outputs[0].shape == (1, SIZE, SIZE, 10)
        assert np.all(np.isfinite(outputs[0])) and np.any(outputs[0] != 0)
