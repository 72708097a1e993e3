"""scikit-learn's bundled 8x8 handwritten digits: 1,797 images, 10 classes, no download."""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np
import torch

from kdexp.dataset.base import Data, split_indices, tensor_data
from kdexp.errors import ConfigError


def load(
    *,
    batch_size: int,
    seed: int,
    num_classes: int = 10,
    channels: int = 1,
    image_size: int = 8,
    val_size: float | int = 0.1,
    test_size: float | int = 0.2,
    split_seed: int = 0,
    classes: list[int] | None = None,
    train_limit: int | None = None,
) -> Data:
    """The digits as in-memory tensors; the test set is a fixed, seeded 20% of the 1,797 images.

    Pixel values 0..16 are scaled to [0, 1] and normalised with the training set's mean and std.
    """
    if (channels, image_size) != (1, 8):
        raise ConfigError(
            "dataset.channels/dataset.image_size", (channels, image_size), "(1, 8) for digits"
        )
    pixels, targets = _read_digits()
    images = torch.from_numpy(pixels).reshape(-1, 1, 8, 8)
    labels = torch.from_numpy(targets)
    train_idx, test_idx = split_indices(len(labels), test_size, split_seed, "dataset.test_size")
    return tensor_data(
        images[train_idx],
        labels[train_idx],
        images[test_idx],
        labels[test_idx],
        num_classes=num_classes,
        batch_size=batch_size,
        seed=seed,
        val_size=val_size,
        split_seed=split_seed,
        mean=[0.3053],
        std=[0.3750],
        scale=16.0,
        classes=classes,
        train_limit=train_limit,
    )


def _read_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 images (float32, N x 64, values 0..16) and labels (int64) of scikit-learn's
    ``digits.csv.gz``, read directly: what ``sklearn.datasets.load_digits`` returns, without
    importing scikit-learn (about 1 s of SciPy and pandas imports for a 500 kB file)."""
    spec = importlib.util.find_spec("sklearn")  # locates the package without running it
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("dataset", "digits", "scikit-learn installed (it ships the digits file)")
    path = Path(next(iter(spec.submodule_search_locations)), "datasets", "data", "digits.csv.gz")
    with gzip.open(path, "rt") as handle:
        table = np.loadtxt(handle, delimiter=",", dtype=np.float32)
    return np.ascontiguousarray(table[:, :-1]), table[:, -1].astype(np.int64)
