"""One training epoch of MNIST-shaped data: in-memory tensors vs per-sample PIL + DataLoader.

Usage: ``python bench/data_path.py``. Generates 60,000 random uint8 28x28 images (10 classes) in
memory, so nothing is read from disk or downloaded. It times one shuffled pass over every batch
(batch size 128) through

* :class:`kdexp.dataset.base.TensorLoader` on the normalised tensors (the default path of
  ``kdexp.dataset.torchvision``), and
* a dataset that builds a PIL image per sample and applies ``ToTensor`` and ``Normalize``, as
  ``torchvision.datasets.MNIST.__getitem__`` does, behind ``DataLoader(num_workers=0)``,

best of three each, and prints both times and the speed-up.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from kdexp.dataset.base import TensorLoader, normalize

N, SIZE, CLASSES, BATCH = 60_000, 28, 10, 128
MEAN, STD = (0.1307,), (0.3081,)


class _PILDataset(Dataset[tuple[Any, int]]):
    """Per-sample path of torchvision's MNIST: uint8 array -> PIL image -> transform."""

    def __init__(self, images: Tensor, targets: Tensor, transform: Callable[[Any], Any]) -> None:
        self.images, self.targets, self.transform = images, targets, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        img = Image.fromarray(self.images[index].numpy(), mode="L")
        return self.transform(img), int(self.targets[index])


def _epoch(loader: Iterable[Any]) -> float:
    start = time.perf_counter()
    seen = 0
    for x, _ in loader:
        seen += len(x)
    elapsed = time.perf_counter() - start
    assert seen == N, seen
    return elapsed


def _best(loader: Iterable[Any], repeats: int = 3) -> float:
    return min(_epoch(loader) for _ in range(repeats))


def main() -> None:
    """Time both paths and print the in-memory speed-up."""
    torch.manual_seed(0)
    images = torch.randint(0, 256, (N, SIZE, SIZE), dtype=torch.uint8)
    targets = torch.randint(0, CLASSES, (N,))

    start = time.perf_counter()
    inputs = normalize(images.unsqueeze(1), MEAN, STD, 255.0)
    setup = time.perf_counter() - start
    memory = _best(TensorLoader(inputs, targets, BATCH, shuffle=True, seed=0))

    transform = T.Compose([T.ToTensor(), T.Normalize(MEAN, STD)])
    pil = DataLoader(
        _PILDataset(images, targets, transform),
        batch_size=BATCH,
        shuffle=True,
        num_workers=0,
        generator=torch.Generator().manual_seed(0),
    )
    per_sample = _best(pil)

    print(f"threads: {torch.get_num_threads()}, {N} images {SIZE}x{SIZE}, batch {BATCH}")
    print(f"in-memory TensorLoader epoch:      {memory:.3f} s (one-off normalise {setup:.3f} s)")
    print(f"PIL + ToTensor + DataLoader epoch: {per_sample:.3f} s")
    print(f"in-memory speed-up: {per_sample / memory:.2f}x")


if __name__ == "__main__":
    main()
