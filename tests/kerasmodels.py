"""Keras models converted with tensorflow-cpu, cached under build/cache (never committed).

BatchNormalization layers get random statistics (DESIGN.md 6) so that folding is not an
identity: gamma in [0.5, 1.5] (a fraction may be made negative), beta and moving mean
normal(0, 0.2), moving variance in [0.5, 1.5].
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
CACHE = Path(
    os.environ.get("TFL_FUSE_CACHE", Path(__file__).resolve().parent.parent / "build" / "cache")
)


def tf():
    import tensorflow

    return tensorflow


def randomize_batchnorm(model, seed: int = 0, negative_fraction: float = 0.0) -> None:
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, tf().keras.layers.BatchNormalization):
            weights = layer.get_weights()
            shapes = [w.shape for w in weights]
            values = []
            names = [w.name for w in layer.weights]
            for name, shape in zip(names, shapes, strict=True):
                if "gamma" in name:
                    gamma = rng.uniform(0.5, 1.5, shape)
                    if negative_fraction:
                        gamma[rng.random(shape) < negative_fraction] *= -1
                    values.append(gamma)
                elif "beta" in name or "mean" in name:
                    values.append(rng.normal(0.0, 0.2, shape))
                else:
                    values.append(rng.uniform(0.5, 1.5, shape))
            layer.set_weights(values)


def convert(model) -> bytes:
    converter = tf().lite.TFLiteConverter.from_keras_model(model)
    return converter.convert()


def cached(name: str, build: Callable[[], bytes]) -> Path:
    """The path of a cached model file, built once by ``build()`` and renamed into place."""
    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / name
    if not path.exists():
        data = build()
        fd, temp = tempfile.mkstemp(dir=CACHE, suffix=".tmp")
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(temp, path)
    return path


def application(
    name: str,
    input_shape=(224, 224, 3),
    negative_fraction: float = 0.0,
    seed: int = 0,
    classifier_activation="softmax",
) -> Path:
    """A keras.applications model (weights=None) with random BN statistics, as .tflite."""
    tag = f"{name}-{'x'.join(map(str, input_shape))}-neg{negative_fraction}-s{seed}-{classifier_activation}.tflite"

    def build() -> bytes:
        constructor = getattr(tf().keras.applications, name)
        model = constructor(
            weights=None, input_shape=input_shape, classifier_activation=classifier_activation
        )
        randomize_batchnorm(model, seed, negative_fraction)
        return convert(model)

    return cached(tag, build)


def small(
    name: str, make_model: Callable[[], object], seed: int = 0, negative_fraction: float = 0.0
) -> Path:
    """A small Keras model from ``make_model()`` with random BN statistics, cached by ``name``."""

    def build() -> bytes:
        tf().keras.utils.set_random_seed(seed)
        model = make_model()
        randomize_batchnorm(model, seed, negative_fraction)
        return convert(model)

    return cached(f"{name}-neg{negative_fraction}-s{seed}.tflite", build)
