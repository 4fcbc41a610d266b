"""Unit tests of the shared predicates and of rule selection, on tiny graphs built by the chef."""

from __future__ import annotations

import chef
import numpy as np
import pytest

from tfl_fuse import engine, fb, rules
from tfl_fuse.graph import Graph
from tfl_fuse.rules.base import Decline
from tfl_fuse.rules.predicates import affine_of, per_channel_vector, spatial_padding_is_zero


def graph_of(operands, operations, inputs=("x",), outputs=("y",)) -> Graph:
    recipe = {
        "inputs": list(inputs),
        "outputs": list(outputs),
        "operand": operands,
        "operation": operations,
    }
    return Graph(fb.decode(fb.encode(chef.build_model(recipe))), 0)


def binary(kind, const_shape, const_first=False, values=None):
    filler = (
        {"kind": "explicit", "values": values}
        if values is not None
        else {"kind": "uniform", "low": 0.5, "high": 1.5}
    )
    operands = [
        {"name": "x", "shape": [1, 4, 4, 3]},
        {"name": "c", "shape": const_shape, "filler": filler},
        {"name": "y", "shape": [1, 4, 4, 3]},
    ]
    inputs = ["c", "x"] if const_first else ["x", "c"]
    return graph_of(operands, [{"type": kind, "inputs": inputs, "outputs": ["y"]}])


@pytest.mark.parametrize("shape", [[], [1], [3], [1, 3], [1, 1, 3], [1, 1, 1, 3]])
def test_per_channel_shapes_are_accepted(shape):
    graph = binary("MUL", shape)
    vector = per_channel_vector(graph, 1, 3, 4)
    assert vector.shape == (3,) and vector.dtype == np.float64


@pytest.mark.parametrize("shape", [[1, 4, 4, 1], [4, 3], [1, 4, 1, 3], [4, 4, 3]])
def test_other_shapes_are_not_per_channel(shape):
    graph = binary("MUL", shape)
    with pytest.raises(Decline, match="not per-channel"):
        per_channel_vector(graph, 1, 3, 4)


def test_affine_reading_of_each_op():
    values = [1.0, 2.0, 4.0]
    g = binary("SUB", [3], const_first=True, values=values)
    sub_first = affine_of(g, g.ops[0])
    assert np.allclose(sub_first.scale, -1) and np.allclose(sub_first.shift, values)
    g = binary("DIV", [3], values=values)
    div = affine_of(g, g.ops[0])
    assert np.allclose(div.scale, [1, 0.5, 0.25]) and not np.any(div.shift)
    g = binary("DIV", [3], const_first=True, values=values)
    with pytest.raises(Decline, match="not linear"):
        affine_of(g, g.ops[0])
    g = binary("DIV", [3], values=[1.0, 0.0, 2.0])
    with pytest.raises(Decline, match="zero"):
        affine_of(g, g.ops[0])


@pytest.mark.parametrize(
    "kernel, stride, padding, size, expected",
    [
        (1, 1, "SAME", 8, True),
        (3, 1, "SAME", 8, False),
        (3, 1, "VALID", 8, True),
        (1, 2, "SAME", 8, True),
        (2, 2, "SAME", 8, True),
        (2, 2, "SAME", 7, False),
    ],
)
def test_spatial_padding_is_zero(kernel, stride, padding, size, expected):
    out = -(-size // stride) if padding == "SAME" else (size - kernel) // stride + 1
    operands = [
        {"name": "x", "shape": [1, size, size, 2]},
        {"name": "w", "shape": [3, kernel, kernel, 2], "filler": {"kind": "gaussian"}},
        {"name": "b", "shape": [3], "filler": {"kind": "gaussian"}},
        {"name": "y", "shape": [1, out, out, 3]},
    ]
    graph = graph_of(
        operands,
        [
            {
                "type": "CONV_2D",
                "inputs": ["x", "w", "b"],
                "outputs": ["y"],
                "options": {"padding": padding, "stride_w": stride, "stride_h": stride},
            }
        ],
    )
    assert spatial_padding_is_zero(graph, graph.ops[0]) is expected


def test_rule_selection():
    assert [r.name for r in rules.select(None)] == [r.name for r in rules.default_rules()]
    assert [r.name for r in rules.select(["fuse_activation"])] == ["fuse_activation"]
    assert "fuse_activation" not in [r.name for r in rules.select(None, ["fuse_activation"])]
    with pytest.raises(KeyError):
        rules.select(["no_such_rule"])


def test_engine_reaches_a_fixed_point_and_reports_passes():
    g = binary("MUL", [3])
    report = engine.run(g.model, rules.select(None))
    assert report["passes"] >= 1 and report["ops_after"] == {"MUL": 1}


def test_approximate_gamma_rule_is_off_by_default_and_says_what_it_changed(capsys):
    from conftest import RECIPES

    import tfl_fuse
    from tfl_fuse import cli

    assert "make_gamma_positive" not in [r.name for r in rules.default_rules()]
    assert cli.main(["--list-rules"]) == 0
    listed = [
        line
        for line in capsys.readouterr().out.splitlines()
        if line.startswith("make_gamma_positive")
    ]
    assert listed and "approximate; off by default" in listed[0]

    data, _ = chef.cook(RECIPES / "Net_Preactivation_NegGamma_000")
    _, exact = tfl_fuse.optimize(data)
    assert exact["ops_after"].get("MUL", 0) == 1
    chosen = [r.name for r in rules.ALL_RULES]
    with pytest.raises(tfl_fuse.VerificationError) as error:
        tfl_fuse.optimize(data, chosen, verify=True)
    assert error.value.result["max_abs_diff"]["ofm"] > 0
    out, report = tfl_fuse.optimize(data, chosen)
    assert report["ops_after"].get("MUL", 0) == 0
    assert any(
        r.get("approximate") and "1 scale(s) <= 0" in r["detail"] for r in report["rewrites"]
    )


# scaled_float32: products computed when written (model.ScaledProduct) --------------------------
def eager_product(weights: np.ndarray, factors: np.ndarray) -> np.ndarray:
    return np.multiply(weights, factors, dtype=np.float64).astype(np.float32)


@pytest.mark.parametrize(
    "shape, factor_shape",
    [
        ((64, 3, 3, 48), (64, 1, 1, 1)),  # output channels (a backward fold), several chunks
        ((64, 3, 3, 48), (1, 1, 1, 48)),  # input channels (a forward fold)
        ((1, 3, 3, 96), (1, 1, 1, 96)),  # depthwise
        ((32, 3, 3, 8), (32, 1, 1, 8)),  # grouped CONV_2D: an [O, C / groups] map
        ((3000, 70), (1, 70)),  # FULLY_CONNECTED, rows of 70 values
        ((2, 70000), (2, 1)),  # a row larger than the scratch
        ((5,), (5,)),
        ((), ()),
    ],
)
@pytest.mark.parametrize("float32_factors", [False, True])
def test_scaled_float32_writes_the_eager_products_bit_for_bit(
    shape, factor_shape, float32_factors, tmp_path
):
    from tfl_fuse.model import ScaledProduct
    from tfl_fuse.rules.predicates import scaled_float32

    rng = np.random.default_rng(len(shape) + int(np.prod(shape)))
    weights = rng.normal(size=shape).astype(np.float32)
    factors = rng.uniform(-3, 3, size=factor_shape)
    if float32_factors:  # a BN's MUL constant: the float32 multiply
        factors = factors.astype(np.float32).astype(np.float64)
    product = scaled_float32(weights, factors)
    expected = eager_product(weights, factors)
    if weights.nbytes < 4096:  # less than a page: computed at once
        assert isinstance(product, np.ndarray) and product.tobytes() == expected.tobytes()
        product = ScaledProduct(weights, factors)  # which computes small ones as well
    assert isinstance(product, ScaledProduct) and len(product) == weights.nbytes
    assert b"".join(bytes(piece) for piece in product.pieces()) == expected.tobytes()
    value = product.value()  # computed once, read-only, and then what is written
    assert value.dtype == np.float32 and value.shape == weights.shape
    assert value.tobytes() == expected.tobytes() and not value.flags.writeable
    assert product.value() is value
    assert b"".join(bytes(piece) for piece in product.pieces()) == expected.tobytes()


def _one_bad_product(where: str, value: float, weight: float = 1.0) -> tuple:
    """Weights of ones and factors of 0.5 where one product is ``value``: the weight ``value``
    times 2, or the weight ``weight`` times the factor ``value``."""
    weights = np.ones((8, 3, 3, 40), np.float32)
    factors = np.full((1, 1, 1, 40), 0.5)
    if where == "weight":
        weights[5, 1, 2, 7] = value
        factors[..., 7] = 2.0
    else:
        weights[5, 1, 2, 7] = weight
        factors[..., 7] = value
    return weights, factors


@pytest.mark.parametrize(
    "bad, message",
    [
        (("weight", np.nan), "not be finite"),
        (("factor", np.inf), "not be finite"),
        (("weight", 3e38), "overflow float32"),
        (("weight", -3e38), "overflow float32"),
    ],
)
def test_scaled_float32_declines_what_a_product_would_not_hold(bad, message):
    from tfl_fuse.rules.predicates import scaled_float32

    where, value = bad
    weights, factors = _one_bad_product(where, value)
    with pytest.raises(Decline, match=message):
        scaled_float32(weights, factors)
    factors[..., 7] = 0.25  # the same weights, a factor that keeps the product in range
    if where == "weight" and np.isfinite(value):
        assert np.isfinite(scaled_float32(weights, factors).value()).all()


@pytest.mark.parametrize(
    "bad",
    [
        ("weight", np.nan),
        ("factor", np.inf),
        ("weight", 3e38),
        ("weight", -3e38),
        ("factor", 1.0 + 2.0**-30),  # MAX * (1 + 2^-30) > MAX rounds to float32's MAX
    ],
)
def test_a_check_left_to_the_write_fails_where_the_check_at_the_fold_declines(bad):
    """Within overflow_checks_at_write, scaled_float32 reads nothing and declines nothing; the
    products fail (FoldedOverflow) as they are computed, piece by piece or as a value, wherever
    the check at the fold declines, and give its bytes where it does not."""
    from tfl_fuse.model import FoldedOverflow, ScaledProduct
    from tfl_fuse.rules.predicates import overflow_checks_at_write, scaled_float32

    where, value = bad
    weights, factors = _one_bad_product(where, value, weight=np.finfo(np.float32).max)
    with pytest.raises(Decline):
        scaled_float32(weights, factors)
    with overflow_checks_at_write():
        product = scaled_float32(weights, factors)
    assert isinstance(product, ScaledProduct) and not product.checked
    with pytest.raises(FoldedOverflow):
        for _ in product.pieces():
            pass
    with pytest.raises(FoldedOverflow):
        product.value()
    factors[..., 7] = 0.25  # in range: the bytes of the check at the fold
    with overflow_checks_at_write():
        product = scaled_float32(weights, factors)
    if where == "weight" and np.isnan(value):
        with pytest.raises(FoldedOverflow):
            product.value()
        return
    written = b"".join(bytes(piece) for piece in product.pieces())
    assert written == scaled_float32(weights, factors).value().tobytes()
    assert product.value().tobytes() == written and product.checked


def test_float32_factors_are_multiplied_in_float32_with_the_same_bits():
    """Factors that are float32 values (a BN's MUL constant) take the float32 multiply, which
    must give the float64 product rounded once, bit for bit: across every exponent, with
    subnormal weights, subnormal and overflowing products, and both signs of zero."""
    from tfl_fuse.model import ScaledProduct

    rng = np.random.default_rng(7)
    bits = rng.integers(0, 1 << 32, size=(300, 2, 2, 64), dtype=np.uint64).astype(np.uint32)
    weights = bits.view(np.float32)
    weights[~np.isfinite(weights)] = 0.0  # rules decline non-finite weights before this
    weights[0, 0, 0, :8] = [0.0, -0.0, 1e-45, -1e-45, 1.2e-38, 3.4e38, -3.4e38, 1.0]
    factor_bits = rng.integers(0, 1 << 32, size=64, dtype=np.uint64).astype(np.uint32)
    factors = factor_bits.view(np.float32).astype(np.float64)
    factors[~np.isfinite(factors)] = 1.0
    factors[:8] = [1e-30, 2.0, 0.5, 1e30, 3.0, 1.5, 0.75, -0.0]
    factors = factors.astype(np.float32).astype(np.float64)  # float32 values, read as float64
    for shape in [(1, 1, 1, 64), (300, 1, 1, 1)]:
        near = factors[: shape[0]] if shape[0] > 1 else factors
        near = np.resize(near, shape)
        product = ScaledProduct(weights, near)
        assert product._factors32 is not None  # the float32 multiply
        expected = eager_product(weights, near)
        with np.errstate(over="ignore", under="ignore"):
            written = b"".join(bytes(piece) for piece in product.pieces())
        assert written == expected.tobytes()
    wide = np.full((1, 1, 1, 64), 0.1)  # 0.1 is no float32 value: the float64 multiply
    assert ScaledProduct(weights, wide)._factors32 is None
    assert ScaledProduct(weights.astype(np.float64), near)._factors32 is None


def test_a_folded_constant_is_read_as_the_product():
    """Graph.constant computes a ScaledProduct a fold stored, and rules see plain arrays."""
    from tfl_fuse.model import ScaledProduct

    graph = binary("MUL", [1, 1, 1, 3])
    tensor = graph.ops[0].inputs[1]
    weights = graph.constant(tensor)
    factors = np.array([[[[2.0, -0.5, 3.0]]]])
    graph.set_constant(graph.ops[0], 1, ScaledProduct(weights, factors))
    assert isinstance(graph.model.buffers[graph.tensors[tensor].buffer].data, ScaledProduct)
    value = graph.constant(tensor)
    assert isinstance(value, np.ndarray) and value.shape == (1, 1, 1, 3)
    np.testing.assert_array_equal(value, eager_product(weights, factors))
    decoded = Graph(fb.decode(fb.encode(graph.model)), 0)
    np.testing.assert_array_equal(decoded.constant(tensor), value)


def dense_block(layers: int, width: int = 2) -> Graph:
    """A DenseNet block after move_scale_forward: layer j reads ADD(+t, RELU) of the
    concatenation of the block input and every earlier layer's output. A RELU also reads the
    block input (as the block's first BN does once its own shift went upstream), so no other
    layer's shift can be pushed up there: each walks down the chain of concatenations and
    fails at its bottom."""
    operands = [
        {"name": "x", "shape": [1, 4, 4, 3]},
        {"name": "k0", "shape": [width, 1, 1, 3], "filler": {"kind": "gaussian", "seed": 0}},
        {"name": "b0", "shape": [width], "filler": {"kind": "gaussian", "seed": 1}},
        {"name": "cat0", "shape": [1, 4, 4, width]},
        {"name": "side", "shape": [1, 4, 4, width]},
    ]
    operations = [
        {"type": "CONV_2D", "inputs": ["x", "k0", "b0"], "outputs": ["cat0"]},
        {"type": "RELU", "inputs": ["cat0"], "outputs": ["side"]},
    ]
    for j in range(1, layers + 1):
        channels = width * j
        operands += [
            {
                "name": f"t{j}",
                "shape": [channels],
                "filler": {"kind": "uniform", "low": 0.1, "high": 1.0, "seed": j},
            },
            {"name": f"a{j}", "shape": [1, 4, 4, channels]},
            {
                "name": f"k{j}",
                "shape": [width, 1, 1, channels],
                "filler": {"kind": "gaussian", "seed": 100 + j},
            },
            {"name": f"b{j}", "shape": [width], "filler": {"kind": "gaussian", "seed": 200 + j}},
            {"name": f"y{j}", "shape": [1, 4, 4, width]},
            {"name": f"cat{j}", "shape": [1, 4, 4, channels + width]},
        ]
        operations += [
            {
                "type": "ADD",
                "inputs": [f"cat{j - 1}", f"t{j}"],
                "outputs": [f"a{j}"],
                "options": {"activation": "RELU"},
            },
            {"type": "CONV_2D", "inputs": [f"a{j}", f"k{j}", f"b{j}"], "outputs": [f"y{j}"]},
            {
                "type": "CONCATENATION",
                "inputs": [f"cat{j - 1}", f"y{j}"],
                "outputs": [f"cat{j}"],
                "options": {"axis": 3},
            },
        ]
    return graph_of(operands, operations, outputs=("side", f"cat{layers}"))


def test_failed_shift_walks_are_remembered_with_the_same_decisions(monkeypatch):
    from tfl_fuse.rules import preactivation

    calls = []
    walk = preactivation._push_shift
    monkeypatch.setattr(
        preactivation, "_push_shift", lambda *args: calls.append(args[1]) or walk(*args)
    )

    def run() -> tuple[dict, int]:
        calls.clear()
        report = engine.run(dense_block(12).model, rules.select(["push_shift_backward"]))
        return report, len(calls)

    remembered, walked_remembering = run()
    assert remembered["ops_after"]["ADD"] == 12
    reasons = [entry["reason"] for entry in remembered["declined"]]
    assert len(reasons) == 12 and all("RELU 'side' also reads 'cat0'" in r for r in reasons)
    # each layer's walk stops one concatenation down, where the previous walk failed
    assert walked_remembering == 1 + 2 * 11

    class Forgetful(dict):
        def __setitem__(self, key, value):
            pass

    original = preactivation.Walks

    def forgetful() -> preactivation.Walks:
        walks = original()
        walks.failed = Forgetful()
        return walks

    monkeypatch.setattr(preactivation, "Walks", forgetful)
    forgotten, walked_forgetting = run()
    assert forgotten["declined"] == remembered["declined"]
    assert forgotten["rewrites"] == remembered["rewrites"]
    assert walked_forgetting == 12 * 13 // 2  # every walk to the bottom of the block


def residual_of_two_inputs() -> Graph:
    """A pre-activation BN after ADD(x, z) of two graph inputs: its shift meets a residual
    ADD whose branches both refuse it (neither has a layer to take it)."""
    operands = [
        {"name": "x", "shape": [1, 4, 4, 3]},
        {"name": "z", "shape": [1, 4, 4, 3]},
        {"name": "sum", "shape": [1, 4, 4, 3]},
        {"name": "t", "shape": [3], "filler": {"kind": "uniform", "low": 0.1, "high": 1.0}},
        {"name": "a", "shape": [1, 4, 4, 3]},
        {"name": "k", "shape": [2, 1, 1, 3], "filler": {"kind": "gaussian"}},
        {"name": "b", "shape": [2], "filler": {"kind": "gaussian"}},
        {"name": "y", "shape": [1, 4, 4, 2]},
    ]
    operations = [
        {"type": "ADD", "inputs": ["x", "z"], "outputs": ["sum"]},
        {
            "type": "ADD",
            "inputs": ["sum", "t"],
            "outputs": ["a"],
            "options": {"activation": "RELU"},
        },
        {"type": "CONV_2D", "inputs": ["a", "k", "b"], "outputs": ["y"]},
    ]
    return graph_of(operands, operations, inputs=("x", "z"))


def test_declined_shift_walks_leave_no_cyclic_garbage():
    """A refusal kept as an exception holds the frames it passed, which hold what kept it: a
    cycle that kept the whole model (and the views of the input's map) alive until the cycle
    collector ran; on DenseNet121 that was 7,500 objects a run and a 1.3 ms collection."""
    import gc

    cases = [
        (lambda: dense_block(12), "RELU 'side' also reads 'cat0'"),
        (residual_of_two_inputs, "no branch of the residual ADD 'sum' takes the shift"),
    ]
    for build, reason in cases:
        model = build().model
        gc.collect()
        gc.disable()
        try:
            report = engine.run(model, rules.select(["push_shift_backward"]))
            garbage = gc.collect()
        finally:
            gc.enable()
        assert any(reason in entry["reason"] for entry in report["declined"]), report["declined"]
        assert garbage == 0


def test_a_shift_pushed_into_folded_weights_leaves_them_uncomputed():
    """push_shift_backward checks the layer it shifts by its weights' shape: reading folded
    weights (a ScaledProduct) would compute them there, in fresh pages, and keep them
    (DenseNet121: 2.7 MB a run), though only the bias changes."""
    from tfl_fuse.model import ScaledProduct

    operands = [
        {"name": "x", "shape": [1, 4, 4, 32]},
        {"name": "w", "shape": [32, 1, 1, 32], "filler": {"kind": "gaussian", "seed": 3}},
        {"name": "b", "shape": [32], "filler": {"kind": "gaussian", "seed": 4}},
        {"name": "c", "shape": [1, 4, 4, 32]},
        {"name": "t", "shape": [32], "filler": {"kind": "uniform", "low": 0.1, "high": 1.0}},
        {"name": "y", "shape": [1, 4, 4, 32]},
    ]
    operations = [
        {"type": "CONV_2D", "inputs": ["x", "w", "b"], "outputs": ["c"]},
        {"type": "ADD", "inputs": ["c", "t"], "outputs": ["y"], "options": {"activation": "RELU"}},
    ]
    graph = graph_of(operands, operations)
    conv = graph.ops[0]
    weights, bias = (graph.constant(conv.inputs[i]) for i in (1, 2))
    shift = graph.constant(graph.ops[1].inputs[1])
    product = ScaledProduct(weights, np.linspace(0.5, 1.5, 32))  # as move_scale_forward leaves it
    graph.set_constant(conv, 1, product)
    report = engine.run(graph.model, rules.select(["push_shift_backward"]))
    assert [entry["rule"] for entry in report["rewrites"]] == ["push_shift_backward"]
    assert report["ops_after"] == {"CONV_2D": 1, "RELU": 1}
    assert product._value is None  # not computed by the rule: computed once, when written
    np.testing.assert_allclose(graph.constant(conv.inputs[2]), bias + shift, rtol=1e-6)
