#!/usr/bin/env python3
"""The chef: build a .tflite or .circle model from a declarative recipe (``recipes/<Name>/recipe.toml``).

    python tools/chef.py recipes/Net_Conv_Add_Mul_000 -o out.tflite

A recipe names its operands (type, shape, optional quantization, a seeded filler for
constants), its operations (type, inputs, outputs, options), the graph inputs and outputs,
the format, and what must hold after optimization (``[expect]``). The model is written with
tfl_fuse's own encoder, deterministically. Errors name the recipe key that is wrong.
See ``recipes/README.md`` for the format.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

from tfl_fuse import fb
from tfl_fuse.graph import NUMPY_DTYPES
from tfl_fuse.model import Model, Table
from tfl_fuse.rules.predicates import ACTIVATIONS, PADDING_SAME, PADDING_VALID

OPTIONS_TABLE = {
    "CONV_2D": "Conv2DOptions",
    "DEPTHWISE_CONV_2D": "DepthwiseConv2DOptions",
    "TRANSPOSE_CONV": "TransposeConvOptions",
    "FULLY_CONNECTED": "FullyConnectedOptions",
    "CONV_3D": "Conv3DOptions",
    "ADD": "AddOptions",
    "SUB": "SubOptions",
    "MUL": "MulOptions",
    "DIV": "DivOptions",
    "MAX_POOL_2D": "Pool2DOptions",
    "AVERAGE_POOL_2D": "Pool2DOptions",
    "RESHAPE": "ReshapeOptions",
    "CONCATENATION": "ConcatenationOptions",
    "MEAN": "ReducerOptions",
    "PAD": "PadOptions",
    "SPACE_TO_BATCH_ND": "SpaceToBatchNDOptions",
    "BATCH_TO_SPACE_ND": "BatchToSpaceNDOptions",
    "SOFTMAX": "SoftmaxOptions",
    "SPLIT": "SplitOptions",
    "SQUEEZE": "SqueezeOptions",
    "TRANSPOSE": "TransposeOptions",
    "STRIDED_SLICE": "StridedSliceOptions",
    "SLICE": "SliceOptions",
    "GATHER": "GatherOptions",
    "EXPAND_DIMS": "ExpandDimsOptions",
    "MIRROR_PAD": "MirrorPadOptions",
    "MAXIMUM": "MaximumMinimumOptions",
    "MINIMUM": "MaximumMinimumOptions",
}
OPTION_DEFAULTS = {
    "Conv2DOptions": {"strideW": 1, "strideH": 1, "dilationWFactor": 1, "dilationHFactor": 1},
    "DepthwiseConv2DOptions": {
        "strideW": 1,
        "strideH": 1,
        "dilationWFactor": 1,
        "dilationHFactor": 1,
        "depthMultiplier": 1,
    },
    "TransposeConvOptions": {"strideW": 1, "strideH": 1},
    "Conv3DOptions": {
        "strideD": 1,
        "strideW": 1,
        "strideH": 1,
        "dilationDFactor": 1,
        "dilationWFactor": 1,
        "dilationHFactor": 1,
    },
    "Pool2DOptions": {"strideW": 1, "strideH": 1, "filterWidth": 1, "filterHeight": 1},
    "ReducerOptions": {"keepDims": True},
    "StridedSliceOptions": {
        "beginMask": 0,
        "endMask": 0,
        "ellipsisMask": 0,
        "newAxisMask": 0,
        "shrinkAxisMask": 0,
        "offset": False,
    },
    "GatherOptions": {"axis": 0, "batchDims": 0},
}
# Op versions that LiteRT accepts for what the chef writes.
OP_VERSIONS = {"TRANSPOSE_CONV": 3, "DEPTHWISE_CONV_2D": 2}
ENUM_VALUES = {**ACTIVATIONS, "SAME": PADDING_SAME, "VALID": PADDING_VALID}
KEY_ALIASES = {
    "activation": "fusedActivationFunction",
    "fused_activation": "fusedActivationFunction",
}


# Every key a recipe may hold, in one place: when the chef or tests/test_recipes.py learns a new
# key, add it here (recipes/README.md describes them). A key outside these lists is an error
# naming the recipe file, so a typo never turns an expectation off silently.
RECIPE_KEYS = {
    "top level": {
        "name", "format", "seed", "data_format", "signature",
        "inputs", "outputs", "operand", "operation", "expect",
    },
    "expect": {
        "rules", "exclude", "target", "weight_granularity", "equalize", "input_range", "quanta",
        "quanta_share", "atol_scale",
        "ops_after", "fired", "not_fired", "unchanged", "declined", "rtol",
    },
    "expect.declined": {"rule", "reason"},
    "operand": {"name", "type", "shape", "filler", "quant", "same_buffer_as"},
    "operand.filler": {
        "kind", "seed", "mean", "stddev", "low", "high", "value", "values", "axis_scale",
    },
    "operand.quant": {"scale", "zero_point", "quantized_dimension"},
    "operation": {"type", "inputs", "outputs", "options", "version", "custom_code"},
}  # fmt: skip


class RecipeError(Exception):
    """A recipe is malformed; the message names the key."""


def _unknown_keys(table: Any, kind: str, where: str) -> None:
    """RecipeError for a key ``kind`` tables do not take (a top-level key after [expect] too)."""
    if not isinstance(table, dict):
        raise RecipeError(f"{where}: expected a table, got {type(table).__name__}")
    for key in table:
        if key in RECIPE_KEYS[kind]:
            continue
        if kind == "expect" and key in RECIPE_KEYS["top level"]:
            raise RecipeError(
                f"{where}.{key}: a top-level key written after [expect] belongs to [expect] in "
                "TOML; move it above the [expect] header"
            )
        known = ", ".join(sorted(RECIPE_KEYS[kind]))
        raise RecipeError(f"{where}.{key}: unknown key (known in {kind}: {known})")


def check_keys(recipe: dict[str, Any]) -> None:
    """Every key of ``recipe`` is one the chef or the recipe test reads (RECIPE_KEYS)."""
    _unknown_keys({k: v for k, v in recipe.items() if k != "_file"}, "top level", "recipe")
    expect = recipe.get("expect", {})
    _unknown_keys(expect, "expect", "expect")
    for i, declined in enumerate(expect.get("declined", [])):
        _unknown_keys(declined, "expect.declined", f"expect.declined[{i}]")
    for i, operand in enumerate(recipe.get("operand", [])):
        _unknown_keys(operand, "operand", f"operand[{i}]")
        if "filler" in operand:
            _unknown_keys(operand["filler"], "operand.filler", f"operand[{i}].filler")
        if "quant" in operand:
            _unknown_keys(operand["quant"], "operand.quant", f"operand[{i}].quant")
    for i, operation in enumerate(recipe.get("operation", [])):
        _unknown_keys(operation, "operation", f"operation[{i}]")


def camel(key: str) -> str:
    if key in KEY_ALIASES:
        return KEY_ALIASES[key]
    head, *rest = key.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def load_recipe(path: str | Path) -> dict[str, Any]:
    """Read ``recipe.toml`` from a recipe folder (or the file itself)."""
    path = Path(path)
    file = path / "recipe.toml" if path.is_dir() else path
    try:
        recipe = tomllib.loads(file.read_text())
    except FileNotFoundError:
        raise RecipeError(f"{file}: no such recipe file") from None
    except tomllib.TOMLDecodeError as error:
        raise RecipeError(f"{file}: {error}") from None
    try:
        check_keys(recipe)
    except RecipeError as error:
        raise RecipeError(f"{file}: {error}") from None
    recipe.setdefault("name", file.parent.name)
    recipe["_file"] = str(file)
    return recipe


def fill(
    spec: dict[str, Any], shape: list[int], dtype: np.dtype, seed: int, where: str
) -> np.ndarray:
    kind = spec.get("kind", "gaussian")
    rng = np.random.default_rng(spec.get("seed", seed))
    count = int(np.prod(shape)) if shape else 1
    if kind == "gaussian":
        value = rng.normal(spec.get("mean", 0.0), spec.get("stddev", 1.0), count)
    elif kind == "uniform":
        value = rng.uniform(spec.get("low", -1.0), spec.get("high", 1.0), count)
    elif kind == "constant":
        value = np.full(count, spec.get("value", 0.0))
    elif kind == "explicit":
        values = list(spec.get("values", []))
        if len(values) != count:
            raise RecipeError(
                f"{where}.filler.values: {len(values)} values for shape {shape} ({count} needed)"
            )
        value = np.asarray(values)
    else:
        raise RecipeError(
            f"{where}.filler.kind: unknown filler {kind!r} (gaussian, uniform, constant, explicit)"
        )
    if "axis_scale" in spec:  # one factor per index of an axis, e.g. channels of very unequal range
        value = value.reshape(shape) * _axis_factors(spec["axis_scale"], shape, where)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        value = np.clip(np.round(value), info.min, info.max)
    return value.astype(dtype).reshape(shape)


def _axis_factors(spec: dict[str, Any], shape: list[int], where: str) -> np.ndarray:
    axis, values = spec.get("axis", 0), list(spec.get("values", []))
    if not -len(shape) <= axis < len(shape) or len(values) != shape[axis]:
        raise RecipeError(
            f"{where}.filler.axis_scale: {len(values)} values for axis {axis} of shape {shape}"
        )
    factors_shape = [1] * len(shape)
    factors_shape[axis] = -1
    return np.asarray(values, dtype=np.float64).reshape(factors_shape)


def build_model(recipe: dict[str, Any]) -> Model:
    """A neutral Model from a parsed recipe."""
    fmt = recipe.get("format", "tflite")
    if fmt not in ("tflite", "circle"):
        raise RecipeError(f"format: {fmt!r} is neither 'tflite' nor 'circle'")
    seed = int(recipe.get("seed", 0))
    model = Model(
        fmt,
        Table("Model", version=3, description=f"tfl_fuse chef: {recipe.get('name')}"),
        [],
        [],
        [],
    )
    model.add_buffer(None)
    tensors: list[Table] = []
    index: dict[str, int] = {}
    for i, operand in enumerate(recipe.get("operand", [])):
        where = f"operand[{i}]"
        name = operand.get("name")
        if not name:
            raise RecipeError(f"{where}.name: missing")
        if name in index:
            raise RecipeError(f"{where}.name: {name!r} is defined twice")
        type_name = str(operand.get("type", "float32")).upper()
        if type_name not in NUMPY_DTYPES:
            raise RecipeError(f"{where}.type: unknown type {operand.get('type')!r}")
        shape = [int(d) for d in operand.get("shape", [])]
        tensor = Table(
            "Tensor",
            shape=shape,
            type=type_name,
            buffer=0,
            name=name,
            isVariable=False,
            hasRank=True,
        )
        if "quant" in operand:
            q = operand["quant"]
            tensor.quantization = Table(
                "QuantizationParameters",
                scale=np.asarray(q.get("scale", []), dtype=np.float32),
                zeroPoint=np.asarray(
                    q.get("zero_point", [0] * len(q.get("scale", []))), dtype=np.int64
                ),
                quantizedDimension=int(q.get("quantized_dimension", 0)),
            )
        if (
            "same_buffer_as" in operand
        ):  # two tensors on one buffer, as converters emit for equal constants
            other = operand["same_buffer_as"]
            if other not in index:
                raise RecipeError(f"{where}.same_buffer_as: unknown (or later) operand {other!r}")
            tensor.buffer = tensors[index[other]].buffer
        elif "filler" in operand:
            value = fill(operand["filler"], shape, NUMPY_DTYPES[type_name], seed * 1000 + i, where)
            tensor.buffer = model.add_buffer(value)
        index[name] = len(tensors)
        tensors.append(tensor)

    def lookup(name: str, where: str) -> int:
        if name in ("", "-"):
            return -1
        if name not in index:
            raise RecipeError(f"{where}: unknown operand {name!r}")
        return index[name]

    operators = []
    for i, operation in enumerate(recipe.get("operation", [])):
        where = f"operation[{i}]"
        kind = str(operation.get("type", "")).upper()
        if not kind:
            raise RecipeError(f"{where}.type: missing")
        if kind not in _builtin_names(fmt):
            raise RecipeError(f"{where}.type: unknown operator {operation.get('type')!r}")
        version = int(operation.get("version", OP_VERSIONS.get(kind, 1)))
        custom_code = operation.get("custom_code")
        if (kind == "CUSTOM") != (custom_code is not None):
            raise RecipeError(f"{where}.custom_code: a CUSTOM operation, and only one, needs one")
        op = Table(
            "Operator",
            opcode=model.opcode(kind, version, custom_code),
            inputs=[lookup(n, f"{where}.inputs") for n in operation.get("inputs", [])],
            outputs=[lookup(n, f"{where}.outputs") for n in operation.get("outputs", [])],
        )
        options_name = OPTIONS_TABLE.get(kind)
        given = operation.get("options", {})
        if options_name:
            fields = dict(OPTION_DEFAULTS.get(options_name, {}))
            for key, value in given.items():
                if isinstance(value, str):
                    if value.upper() not in ENUM_VALUES:
                        raise RecipeError(f"{where}.options.{key}: unknown value {value!r}")
                    value = ENUM_VALUES[value.upper()]
                fields[camel(key)] = value
            op.builtinOptions = Table(options_name, **fields)
        elif given:
            raise RecipeError(f"{where}.options: {kind} takes no options in the chef")
        operators.append(op)

    subgraph = Table(
        "SubGraph",
        tensors=tensors,
        inputs=[lookup(n, "inputs") for n in recipe.get("inputs", [])],
        outputs=[lookup(n, "outputs") for n in recipe.get("outputs", [])],
        operators=operators,
        name="main",
    )
    if not subgraph.inputs or not subgraph.outputs:
        raise RecipeError(
            "inputs/outputs: a recipe needs graph inputs and outputs (top-level keys before any table)"
        )
    model.subgraphs.append(subgraph)
    if recipe.get("signature", True):
        model.root.signatureDefs = [
            Table(
                "SignatureDef",
                inputs=[Table("TensorMap", name=n, tensorIndex=index[n]) for n in recipe["inputs"]],
                outputs=[
                    Table("TensorMap", name=n, tensorIndex=index[n]) for n in recipe["outputs"]
                ],
                signatureKey="serving_default",
                subgraphIndex=0,
            )
        ]
    if "data_format" in recipe:
        subgraph.dataFormat = 1 if str(recipe["data_format"]).upper() == "CHANNELS_FIRST" else 0
    return model


def _builtin_names(fmt: str) -> dict[str, int]:
    from tfl_fuse import formats

    return formats.get(fmt).enum("BuiltinOperator")


def cook(path: str | Path) -> tuple[bytes, dict[str, Any]]:
    """Model bytes and the parsed recipe for a recipe folder."""
    recipe = load_recipe(path)
    try:
        model = build_model(recipe)
    except RecipeError as error:
        raise RecipeError(f"{recipe['_file']}: {error}") from None
    return bytes(fb.encode(model)), recipe


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", help="recipe folder or recipe.toml")
    parser.add_argument("-o", "--output", required=True, help="model file to write")
    args = parser.parse_args(argv)
    try:
        data, recipe = cook(args.recipe)
    except RecipeError as error:
        print(f"chef: error: {error}", file=sys.stderr)
        return 1
    suffix = ".circle" if recipe.get("format") == "circle" else ".tflite"
    if not re.search(r"\.(tflite|circle)$", args.output):
        args.output += suffix
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_bytes(data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
