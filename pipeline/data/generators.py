"""In-process image generators: deterministic, offline data for the quickstart and the tests.

A generator yields uint8 images (N, H, W) or (N, H, W, 3) and integer labels for a row range of
a split; the same (split, params, range) always gives the same rows, on any worker.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from typing import Any, Protocol

import numpy as np

from pipeline.errors import ConfigError


class Generator(Protocol):
    def classes(self, params: dict[str, Any]) -> list[str]: ...
    def num_rows(self, split: str, params: dict[str, Any]) -> int: ...
    def rows(self, split: str, params: dict[str, Any], start: int, stop: int) -> tuple[np.ndarray, np.ndarray]: ...


_GENERATORS: dict[str, Generator] = {}


def register_generator(name: str) -> Callable[[type], type]:
    def deco(cls: type) -> type:
        _GENERATORS[name] = cls()
        return cls

    return deco


def get(name: str) -> Generator:
    if name not in _GENERATORS:
        raise ConfigError(f"generator {name!r} is not registered (known: {', '.join(sorted(_GENERATORS))})")
    return _GENERATORS[name]


@cache
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    return images, bunch.target.astype(np.int64)


@register_generator("digits")
class Digits:
    """scikit-learn's 1,797 real 8x8 handwritten digits (ships with the package, no download).

    Every fifth image is the test split (360 images), the rest train (1,437).
    """

    def _split(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        images, labels = _digits()
        is_test = np.arange(len(labels)) % 5 == 0
        keep = is_test if split == "test" else ~is_test
        return images[keep], labels[keep]

    def classes(self, params: dict[str, Any]) -> list[str]:
        return [str(d) for d in range(10)]

    def num_rows(self, split: str, params: dict[str, Any]) -> int:
        return len(self._split(split)[1])

    def rows(self, split: str, params: dict[str, Any], start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        images, labels = self._split(split)
        return images[start:stop], labels[start:stop]


@register_generator("blobs")
class Blobs:
    """Synthetic RGB images: a fixed random pattern per class plus per-sample noise.

    params: num_classes (4), rows (64 per split), size (16), noise (0.3), seed (0).
    Row r of a split always has label r % num_classes and the same noise.
    """

    def classes(self, params: dict[str, Any]) -> list[str]:
        return [f"class{c}" for c in range(int(params.get("num_classes", 4)))]

    def num_rows(self, split: str, params: dict[str, Any]) -> int:
        return int(params.get("rows", 64))

    def rows(self, split: str, params: dict[str, Any], start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        num_classes = int(params.get("num_classes", 4))
        size = int(params.get("size", 16))
        seed = int(params.get("seed", 0))
        noise = float(params.get("noise", 0.3))
        prototypes = np.random.default_rng(seed).uniform(0, 1, (num_classes, size, size, 3))
        ids = np.arange(start, stop)
        labels = ids % num_classes
        split_key = 1 if split == "train" else 2
        images = np.empty((len(ids), size, size, 3), dtype=np.uint8)
        for k, (row, label) in enumerate(zip(ids, labels, strict=True)):
            rng = np.random.default_rng([seed, split_key, int(row)])
            pixels = prototypes[label] + noise * rng.standard_normal((size, size, 3))
            images[k] = np.clip(pixels * 255, 0, 255).astype(np.uint8)
        return images, labels.astype(np.int64)
