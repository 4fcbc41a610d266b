"""Seeded random networks (convs, depthwise, BNs, chains, residuals, pools, concats, activations,
several consumers, extra graph outputs): whatever the rules do, LiteRT outputs must not change."""

from __future__ import annotations

import random

import chef
import pytest
from leftovers import unexplained_leftovers

import tfl_fuse
from tfl_fuse import fb, verify

ACTS = ["NONE", "NONE", "RELU", "RELU6"]


class Builder:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.operands: list[dict] = []
        self.operations: list[dict] = []
        self.shapes: dict[str, list[int]] = {}
        self.n = 0

    def tensor(self, shape, filler=None):
        self.n += 1
        name = f"t{self.n}"
        operand = {"name": name, "shape": list(shape)}
        if filler:
            operand["filler"] = {**filler, "seed": self.n}
        self.operands.append(operand)
        self.shapes[name] = list(shape)
        return name

    def op(self, kind, inputs, shape, **options):
        out = self.tensor(shape)
        entry = {"type": kind, "inputs": inputs, "outputs": [out]}
        if options:
            entry["options"] = options
        self.operations.append(entry)
        return out

    def int_constant(self, values):
        self.n += 1
        name = f"t{self.n}"
        self.operands.append(
            {
                "name": name,
                "shape": [len(values)],
                "type": "int32",
                "filler": {"kind": "explicit", "values": list(values)},
            }
        )
        return name

    def nchw_affine(self, x, h, w, c):
        """As PyTorch converters write a BN: TRANSPOSE to NCHW, MUL/ADD by [1, C, 1, 1] (or
        [C, 1, 1]) constants, maybe a crop over H or W, TRANSPOSE back to NHWC."""
        rng = self.rng
        y = self.op("TRANSPOSE", [x, self.int_constant([0, 3, 1, 2])], [1, c, h, w])
        for kind in rng.choice([["MUL"], ["ADD"], ["MUL", "ADD"], ["SUB", "MUL", "ADD"]]):
            shape = rng.choice([[1, c, 1, 1], [c, 1, 1]])
            filler = (
                {"kind": "uniform", "low": -1.5, "high": 1.5}
                if kind == "MUL"
                else {"kind": "gaussian", "stddev": 0.5}
            )
            act = rng.choice(["NONE", "NONE", "RELU"]) if kind == "ADD" else "NONE"
            y = self.op(kind, [y, self.tensor(shape, filler)], [1, c, h, w], activation=act)
        if rng.random() < 0.3 and h >= 3:  # a crop over the spatial axes, as after a deconv
            y = self.op(
                "STRIDED_SLICE",
                [
                    y,
                    self.int_constant([0, 0, 1, 1]),
                    self.int_constant([1, c, h, w]),
                    self.int_constant([1, 1, 1, 1]),
                ],
                [1, c, h - 1, w - 1],
            )
            h, w = h - 1, w - 1
        return self.op("TRANSPOSE", [y, self.int_constant([0, 2, 3, 1])], [1, h, w, c])

    def per_channel(self, channels, kind):
        shape = self.rng.choice([[channels], [1, 1, 1, channels], [1]])
        if kind == "scale":
            filler = self.rng.choice(
                [
                    {"kind": "uniform", "low": 0.5, "high": 1.5},
                    {"kind": "uniform", "low": 0.5, "high": 1.5},
                    {"kind": "gaussian"},
                ]
            )
        else:
            filler = {"kind": "gaussian", "stddev": 0.5}
        return self.tensor(shape, filler)

    def step(self, x):
        rng = self.rng
        _, h, w, c = self.shapes[x]
        kinds = [
            "conv",
            "conv",
            "dw",
            "bn",
            "bn",
            "bn",
            "affine",
            "relu",
            "pool",
            "residual",
            "concat",
        ]
        choice = rng.choice(kinds + ["strided", "nchw"])
        if choice == "nchw":
            return self.nchw_affine(x, h, w, c)
        if choice == "strided" and h >= 2:
            out_c = rng.randint(2, 6)
            outs = []
            for _ in range(rng.choice([1, 2])):  # one or two 1x1 stride-2 consumers of x
                weights = self.tensor([out_c, 1, 1, c], {"kind": "gaussian", "stddev": 0.4})
                bias = self.tensor([out_c], {"kind": "gaussian"})
                shape = [1, -(-h // 2), -(-w // 2), out_c]
                padding = rng.choice(["SAME", "VALID"])
                outs.append(
                    self.op(
                        "CONV_2D",
                        [x, weights, bias],
                        shape,
                        padding=padding,
                        stride_w=2,
                        stride_h=2,
                    )
                )
            return outs[-1]
        if choice == "conv":
            k = rng.choice([1, 3])
            padding = (
                "SAME"
                if k == 3 and (h < 4 or rng.random() < 0.6)
                else rng.choice(["SAME", "VALID"])
            )
            out_c = rng.randint(2, 6)
            oh = h if padding == "SAME" else h - k + 1
            weights = self.tensor([out_c, k, k, c], {"kind": "gaussian", "stddev": 0.4})
            bias = self.tensor([out_c], {"kind": "gaussian"})
            return self.op(
                "CONV_2D",
                [x, weights, bias],
                [1, oh, oh, out_c],
                padding=padding,
                activation=rng.choice(ACTS),
            )
        if choice == "dw":
            mult = rng.choice([1, 2])
            weights = self.tensor([1, 3, 3, c * mult], {"kind": "gaussian", "stddev": 0.4})
            bias = self.tensor([c * mult], {"kind": "gaussian"})
            return self.op(
                "DEPTHWISE_CONV_2D",
                [x, weights, bias],
                [1, h, w, c * mult],
                padding="SAME",
                depth_multiplier=mult,
                activation=rng.choice(ACTS),
            )
        if choice == "bn":
            m = self.op("MUL", [x, self.per_channel(c, "scale")], [1, h, w, c])
            return self.op(
                "ADD",
                [m, self.per_channel(c, "shift")],
                [1, h, w, c],
                activation=rng.choice(["NONE", "RELU"]),
            )
        if choice == "affine":
            kind = rng.choice(["MUL", "ADD", "SUB", "DIV"])
            const = self.per_channel(c, "scale" if kind in ("MUL", "DIV") else "shift")
            inputs = [const, x] if kind in ("MUL", "ADD") and rng.random() < 0.3 else [x, const]
            return self.op(kind, inputs, [1, h, w, c])
        if choice == "relu":
            return self.op(rng.choice(["RELU", "RELU6"]), [x], [1, h, w, c])
        if choice == "pool":
            kind = rng.choice(["MAX_POOL_2D", "AVERAGE_POOL_2D"])
            size = rng.choice([1, 3])
            return self.op(
                kind, [x], [1, h, w, c], padding="SAME", filter_width=size, filter_height=size
            )
        same = [
            t
            for t, s in self.shapes.items()
            if s == [1, h, w, c] and t != x and not self._is_constant(t)
        ]
        if choice == "residual" and same:
            if rng.random() < 0.4:  # a product of two tensors, as in hard-swish or squeeze-excite
                act = rng.choice(["NONE", "RELU"])
                return self.op("MUL", [x, rng.choice(same)], [1, h, w, c], activation=act)
            return self.op("ADD", [x, rng.choice(same)], [1, h, w, c])
        spatial = [
            t
            for t, s in self.shapes.items()
            if s[:3] == [1, h, w] and t != x and not self._is_constant(t)
        ]
        if choice == "concat" and spatial:
            other = rng.choice(spatial)
            return self.op(
                "CONCATENATION", [x, other], [1, h, w, c + self.shapes[other][3]], axis=3
            )
        return self.op("RELU", [x], [1, h, w, c])

    def _is_constant(self, name):
        return any(o["name"] == name and "filler" in o for o in self.operands)

    def build(self, steps):
        x = self.tensor([1, 6, 6, self.rng.randint(2, 4)])
        inputs = [x]
        activations = [x]
        for _ in range(steps):
            source = activations[-1] if self.rng.random() < 0.75 else self.rng.choice(activations)
            activations.append(self.step(source))
        outputs = [activations[-1]]
        consumed = {i for op in self.operations for i in op["inputs"]}
        for t in activations[1:-1]:
            if t not in consumed or self.rng.random() < 0.1:
                outputs.append(t)
        return {
            "inputs": inputs,
            "outputs": outputs,
            "operand": self.operands,
            "operation": self.operations,
        }


@pytest.mark.parametrize("seed", range(60))
def test_random_network_keeps_its_outputs(seed):
    recipe = Builder(seed).build(steps=random.Random(seed).randint(4, 10))
    data = fb.encode(chef.build_model(recipe))
    out, report = tfl_fuse.optimize(data)
    # large inputs cancel in float32 sums: a looser rtol there
    for kinds, rtol in ((("normal", "zeros"), 1e-4), (("large",), 1e-3)):
        result = verify.compare_models(data, out, seed=seed, rtol=rtol, kinds=kinds)
        assert result["match"], (result["summary"], report["rewrites"])
    assert sum(report["ops_after"].values()) <= sum(report["ops_before"].values())
    assert unexplained_leftovers(out, report) == [], report["declined"]
    again, second = tfl_fuse.optimize(out)
    assert second["rewrites"] == []


def test_random_networks_exercise_the_rules():
    fired = set()
    for seed in range(300):
        recipe = Builder(seed).build(steps=random.Random(seed).randint(4, 10))
        _, report = tfl_fuse.optimize(fb.encode(chef.build_model(recipe)))
        fired |= {r["rule"] for r in report["rewrites"]}
    wanted = {
        "move_stride_up",
        "fold_into_preceding_layer",
        "fold_into_following_layers",
        "merge_linear_chain",
        "fuse_activation",
        "move_scale_forward",
        "push_shift_backward",
        "remove_identity",
    }
    assert wanted <= fired


@pytest.mark.parametrize("target", ["int8", "dynamic"])
@pytest.mark.parametrize("seed", range(30))
def test_random_network_for_a_quantizer_keeps_its_outputs(seed, target):
    """--target int8/dynamic: the same function, and no scale left in input channels."""
    recipe = Builder(seed).build(steps=random.Random(seed).randint(4, 10))
    data = fb.encode(chef.build_model(recipe))
    out, report = tfl_fuse.optimize(data, target=target)
    for kinds, rtol in ((("normal", "zeros"), 1e-4), (("large",), 1e-3)):
        result = verify.compare_models(data, out, seed=seed, rtol=rtol, kinds=kinds)
        assert result["match"], (result["summary"], report["rewrites"])
    assert not [r for r in report["rewrites"] if r.get("scaled_input_channels")]
    assert sum(report["ops_after"].values()) <= sum(report["ops_before"].values())
    assert unexplained_leftovers(out, report) == [], report["declined"]
    again, second = tfl_fuse.optimize(out, target=target)
    assert second["rewrites"] == []
