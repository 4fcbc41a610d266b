import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

RECIPES = ROOT / "recipes"
BUILD = Path(os.environ.get("TFL_FUSE_BUILD", ROOT / "build"))


def recipe_dirs() -> list[Path]:
    return sorted(p for p in RECIPES.iterdir() if (p / "recipe.toml").is_file())


@pytest.fixture(scope="session")
def build_dir() -> Path:
    BUILD.mkdir(parents=True, exist_ok=True)
    return BUILD


def conv_mul_recipe(channels_in: int, channels_out: int) -> dict:
    """A chef recipe: a 3x3 CONV_2D (SAME) on an 8x8 input and a MUL by a positive per-channel
    constant after it, with ``channels_in`` -> ``channels_out`` channels."""
    return {
        "inputs": ["x"],
        "outputs": ["y"],
        "operand": [
            {"name": "x", "shape": [1, 8, 8, channels_in]},
            {
                "name": "w",
                "shape": [channels_out, 3, 3, channels_in],
                "filler": {"kind": "gaussian"},
            },
            {"name": "b", "shape": [channels_out], "filler": {"kind": "gaussian"}},
            {"name": "c", "shape": [1, 8, 8, channels_out]},
            {"name": "s", "shape": [channels_out], "filler": {"kind": "uniform", "low": 0.5}},
            {"name": "y", "shape": [1, 8, 8, channels_out]},
        ],
        "operation": [
            {
                "type": "CONV_2D",
                "inputs": ["x", "w", "b"],
                "outputs": ["c"],
                "options": {"padding": "SAME"},
            },
            {"type": "MUL", "inputs": ["c", "s"], "outputs": ["y"]},
        ],
    }
