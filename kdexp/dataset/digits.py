"""scikit-learn's bundled 8x8 handwritten digits: 1,797 images, 10 classes, no download."""

from __future__ import annotations

import torch
from sklearn.datasets import load_digits

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
    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1)
    labels = torch.tensor(bunch.target, dtype=torch.long)
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
