"""The rewrite rules, one module per family; ``ALL_RULES`` is the order the engine runs them."""

from __future__ import annotations

from .activation import FuseActivation
from .backward import FoldIntoPrecedingLayer
from .base import Context, Decline, Rule
from .chain import MergeLinearChain
from .constants import FoldConstants
from .equalize import EqualizeCrossLayer
from .forward import FoldIntoFollowingLayers
from .identity import RemoveIdentity
from .normalize import AddSignatureDef, DequantizeFloat16Weights
from .preactivation import (
    MakeGammaPositive,
    MoveBareScaleForward,
    MoveScaleForward,
    PushShiftBackward,
)
from .quantized import (
    DynamicRangeBnToDepthwise,
    FoldIntoQuantizedLayer,
    QuantizedBnToDepthwise,
)
from .reorder import MoveBeforeRearrangement
from .standalone import StandaloneBnToDepthwise
from .stride import MoveStrideUp

ALL_RULES: list[Rule] = [
    # storage normalizations first, so what they expose (float32 weights) folds like the rest
    DequantizeFloat16Weights(),
    AddSignatureDef(),
    FoldConstants(),
    RemoveIdentity(),
    MergeLinearChain(),
    MoveBeforeRearrangement(),
    FoldIntoPrecedingLayer(),
    FoldIntoQuantizedLayer(),
    QuantizedBnToDepthwise(),
    FoldIntoFollowingLayers(),
    MakeGammaPositive(),
    MoveScaleForward(),
    MoveBareScaleForward(),
    PushShiftBackward(),
    FuseActivation(),
    MoveStrideUp(),
    StandaloneBnToDepthwise(),
    DynamicRangeBnToDepthwise(),
    EqualizeCrossLayer(),
]
RULES_BY_NAME: dict[str, Rule] = {rule.name: rule for rule in ALL_RULES}


TARGETS = ("float", "int8", "dynamic")
WEIGHT_GRANULARITIES = ("channel", "tensor")


def default_rules(target: str = "float") -> list[Rule]:
    return [rule for rule in ALL_RULES if rule.is_default(target)]


def select(
    names: list[str] | None, disabled: list[str] | None = None, target: str = "float"
) -> list[Rule]:
    """Rules by name (None: the target's defaults), minus ``disabled``, in engine order.

    KeyError names an unknown one.
    """
    for name in list(names or []) + list(disabled or []):
        if name not in RULES_BY_NAME:
            raise KeyError(name)
    chosen = (
        default_rules(target) if names is None else [r for r in ALL_RULES if r.name in set(names)]
    )
    return [r for r in chosen if r.name not in set(disabled or [])]


__all__ = [
    "ALL_RULES",
    "RULES_BY_NAME",
    "TARGETS",
    "WEIGHT_GRANULARITIES",
    "Context",
    "Decline",
    "Rule",
    "default_rules",
    "select",
]
