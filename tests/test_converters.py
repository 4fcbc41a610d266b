"""Small PyTorch networks converted by litert-torch (``make test-converters``; not in ``make test``).

For each net: tfl_fuse's output computes what the converted model computes (LiteRT, seeded
inputs), no MUL/ADD/SUB/DIV by a constant is left where an exact fold exists (the expected
leftovers are listed with why they stay), and every leftover is explained in the report.
Needs ``torch`` (CPU wheel) and ``litert-torch``: ``pip install -e '.[converters]'``.
"""

from __future__ import annotations

import os
from collections import Counter

import pytest

if os.environ.get("TFL_FUSE_CONVERTERS") != "1":
    pytest.skip("converter suite: run it with make test-converters", allow_module_level=True)
pytest.importorskip("torch")
pytest.importorskip("litert_torch")

import torchmodels  # noqa: E402
from conftest import BUILD  # noqa: E402
from leftovers import leftovers, unexplained_leftovers  # noqa: E402

import tfl_fuse  # noqa: E402
from tfl_fuse import verify  # noqa: E402

pytestmark = pytest.mark.converters

# Leftovers that no exact rewrite can remove (op type: count), and why.
EXPECTED_LEFTOVERS = {
    "conv_bn_relu_stack": {},  # the converter folds conv -> BN itself
    "preact_residual": {},  # pre-activation BNs: scales forward, shifts back into the convs
    "convtranspose_bn": {},  # the converter folds ConvTranspose2d -> BN itself
    "linear_bn1d": {},  # the converter folds Linear -> BatchNorm1d itself
    # BN on the NCHW graph input before a padded 3x3 conv: the scale folds, the shift has no
    # producer to go into and cannot cross the padded border
    "bn_conv2d": {"ADD": 1},
    "bn_conv2d_1x1": {},  # 1x1 conv: no padding, so the shift folds forward too
    # BN after conv -> ReLU, before a padded depthwise 3x3: the scale folds forward, the shift
    # can neither cross the ReLU back nor the padded border forward
    "depthwise_bn": {"ADD": 1},
    # the same before a padded grouped 3x3 conv (the BN before the grouped 1x1 folds entirely)
    "grouped_bn": {"ADD": 1},
    # post-activation BN: the scale (> 0) into the conv with ReLU, the shift below the max pool
    # into the 1x1 conv
    "conv_relu_bn_maxpool": {},
    "bn1d_linear": {},  # BN on the input of a Linear: both into FULLY_CONNECTED
    "conv1d_bn": {},  # through the RESHAPE / TRANSPOSE around each 1-D conv, into the conv
}


SUMMARY = BUILD / "converters" / "summary.md"
LINEAR = ("MUL", "ADD", "SUB", "DIV")


@pytest.fixture(scope="module")
def summary():
    """Rows of build/converters/summary.md: ops before/after, leftovers and why, per net."""
    rows: list[str] = []
    yield rows
    SUMMARY.parent.mkdir(parents=True, exist_ok=True)
    header = "| net | ops before -> after | MUL/ADD/SUB/DIV before -> after | max abs diff | leftovers and why |\n|---|---|---|---|---|\n"
    SUMMARY.write_text(header + "\n".join(rows) + "\n")


def _counts(ops: dict[str, int]) -> str:
    return "/".join(str(ops.get(k, 0)) for k in LINEAR)


@pytest.mark.parametrize("name", torchmodels.NAMES)
def test_pytorch_net_folds_exactly(name, summary):
    data = torchmodels.converted(name).read_bytes()
    out, report = tfl_fuse.optimize(data)
    result = verify.compare_models(data, out)
    found = leftovers(out)
    names = {entry.split(" -> ", 1)[1] for _, entry in found}
    reasons = [
        d["reason"]
        for d in report["declined"]
        if any(name in names for name in d.get("outputs", []))
    ]
    summary.append(
        f"| {name} | {sum(report['ops_before'].values())} -> {sum(report['ops_after'].values())} "
        f"| {_counts(report['ops_before'])} -> {_counts(report['ops_after'])} "
        f"| {max(result['max_abs_diff'].values()):.2g} | {'; '.join(reasons) or '-'} |"
    )
    assert result["match"], result["summary"]
    left = Counter(entry.split(" -> ")[0] for _, entry in found)
    assert dict(left) == EXPECTED_LEFTOVERS[name], (left, report["declined"])
    assert unexplained_leftovers(out, report) == [], report["declined"]
    assert sum(report["ops_after"].values()) <= sum(report["ops_before"].values())
    again, second = tfl_fuse.optimize(out)
    assert second["rewrites"] == []
