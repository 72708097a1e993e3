"""Seeded random tensors of any shape and class count, for fast tests and benchmarks."""

from __future__ import annotations

import torch

from kdexp.dataset.base import Data, tensor_data


def load(
    *,
    batch_size: int,
    seed: int,
    num_classes: int = 10,
    channels: int = 1,
    image_size: int = 8,
    train_samples: int = 512,
    test_samples: int = 128,
    val_size: float | int = 0.125,
    noise: float = 1.0,
    split_seed: int = 0,
    data_seed: int = 0,
    classes: list[int] | None = None,
    train_limit: int | None = None,
) -> Data:
    """Gaussian blobs: each class has a random mean image; samples add ``noise``-scaled noise.

    The data depend only on ``data_seed``, so runs with different ``seed`` see the same images.
    """
    g = torch.Generator().manual_seed(data_seed)
    shape = (channels, image_size, image_size)
    centers = torch.randn(num_classes, *shape, generator=g)

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(n) % num_classes
        y = y[torch.randperm(n, generator=g)]
        return centers[y] + noise * torch.randn(n, *shape, generator=g), y

    train_x, train_y = draw(train_samples)
    test_x, test_y = draw(test_samples)
    return tensor_data(
        train_x,
        train_y,
        test_x,
        test_y,
        num_classes=num_classes,
        batch_size=batch_size,
        seed=seed,
        val_size=val_size,
        split_seed=split_seed,
        mean=[0.0] * channels,
        std=[1.0] * channels,
        scale=1.0,
        classes=classes,
        train_limit=train_limit,
    )
