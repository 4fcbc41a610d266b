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
