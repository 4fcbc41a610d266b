"""Every folder in recipes/ is a test: build it, optimize it, check the expectations, value-test it."""

from __future__ import annotations

import gc

import chef
import pytest
import valuetest
from conftest import recipe_dirs
from leftovers import unexplained_leftovers

import tfl_fuse


def optimize_recipe(recipe_dir):
    """Cook and optimize; also how many objects the run left to the cycle collector."""
    data, recipe = chef.cook(recipe_dir)
    expect = recipe.get("expect", {})
    rules = expect.get("rules")
    gc.collect()
    gc.disable()
    try:
        out, report = tfl_fuse.optimize(
            data,
            None if rules in (None, "all") else list(rules),
            exclude=expect.get("exclude"),
            target=expect.get("target", "float"),
            weight_granularity=expect.get("weight_granularity", "channel"),
            equalize=expect.get("equalize", "auto"),
            input_range=expect.get("input_range"),
        )
        garbage = gc.collect()
    finally:
        gc.enable()
    return data, bytes(out), report, expect, garbage


@pytest.mark.parametrize("recipe_dir", recipe_dirs(), ids=lambda p: p.name)
def test_recipe(recipe_dir, build_dir):
    data, out, report, expect, garbage = optimize_recipe(recipe_dir)
    # everything a run makes is freed as it goes: cycles would keep the model (and views of
    # the input's map) alive until the collector ran, and cost a collection of their own
    assert garbage == 0
    after = report["ops_after"]
    for op, count in expect.get("ops_after", {}).items():
        assert after.get(op, 0) == count, (
            f"{op}: expected {count} after, got {after.get(op, 0)}; report {report}"
        )
    fired = {entry["rule"] for entry in report["rewrites"]}
    for rule in expect.get("fired", []):
        assert rule in fired, f"rule {rule} did not fire; declined: {report['declined']}"
    for rule in expect.get("not_fired", []):
        assert rule not in fired, f"rule {rule} fired: {report['rewrites']}"
    for wanted in expect.get("declined", []):
        assert any(
            entry["rule"] == wanted["rule"] and wanted["reason"] in entry["reason"]
            for entry in report["declined"]
        ), f"no decline {wanted} in {report['declined']}"
    if expect.get("unchanged"):
        assert not report["rewrites"]
    if report["rules"]:
        assert unexplained_leftovers(out, report) == [], report["declined"]

    # round trip with no rules computes the same, and the optimized model too
    round_trip, _ = tfl_fuse.optimize(data, [])
    ok, lines = valuetest.run_value_test(
        f"{recipe_dir.name}.roundtrip", data, bytes(round_trip), build_dir / "recipes"
    )
    assert ok, "\n".join(lines)
    ok, lines = valuetest.run_value_test(
        recipe_dir.name,
        data,
        out,
        build_dir / "recipes",
        rtol=expect.get("rtol", 1e-5),
        quanta=expect.get("quanta", 0),
        quanta_share=expect.get("quanta_share", 0.0),
        atol_scale=expect.get("atol_scale", 1e-5),
    )
    assert ok, "\n".join(lines)


@pytest.mark.parametrize("recipe_dir", recipe_dirs(), ids=lambda p: p.name)
def test_no_rewrite_means_no_change(recipe_dir):
    """The engine's "unchanged" (no rewrite entry, nothing lifted) is what lets tfl_fuse write
    an input back byte for byte: it must mean the model re-encodes exactly as it was decoded,
    whatever a rule looked at, planned or declined."""
    from tfl_fuse import engine, fb
    from tfl_fuse import rules as rule_set

    data, recipe = chef.cook(recipe_dir)
    expect = recipe.get("expect", {})
    names = expect.get("rules")
    target = expect.get("target", "float")
    model = fb.decode(data)
    report = engine.run(
        model,
        rule_set.select(None if names in (None, "all") else list(names), None, target),
        expect.get("exclude"),
        target,
        expect.get("weight_granularity", "channel"),
        equalize="predict",  # the measured mode decides the same way, only slower
    )
    if report["unchanged"]:
        assert not report["rewrites"]
        assert fb.encode(model) == fb.encode(fb.decode(data))
