"""Epoch time of KD with a live teacher, with cached teacher outputs, and of the student alone.

Usage: ``python bench/distill.py``. In one process, on the same in-memory data (digits, and
MNIST-shaped synthetic tensors), the same student is trained through kdexp's loop for a few
epochs per variant, tracking off. The first epoch is left out of the mean (it pays for warm-up and,
with caching, for filling the cache once, which is printed separately). Target: cached KD at most
1.15x the student-alone epoch time.
"""

from __future__ import annotations

import statistics

import torch
from torch import nn

from kdexp.dataset.base import Data
from kdexp.dataset.digits import load as digits
from kdexp.dataset.synthetic import load as synthetic
from kdexp.method.baseline import Baseline
from kdexp.method.distill.kd import KD
from kdexp.model.mlp import MLP
from kdexp.schedule import constant
from kdexp.tracking.base import Tracker
from kdexp.train import LoopOptions, fit


def _epochs(data: Data, student: nn.Module, method, epochs: int) -> list[float]:  # type: ignore[no-untyped-def]
    method.prepare(student)
    opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9)
    options = LoopOptions(epochs=epochs, device=torch.device("cpu"), log_every=10)
    result = fit(
        student, method, data, opt, constant(opt, epochs, len(data.train)), Tracker(), options
    )
    return [h["epoch_time_s"] for h in result.history]


def compare(name: str, data: Data, image: tuple[int, int], epochs: int) -> None:
    """Print mean epoch times (epochs 2..n) and the ratios to the student alone."""
    channels, size = image
    torch.manual_seed(0)
    teacher = MLP(10, channels, size, [1200, 1200]).eval()
    loss = nn.CrossEntropyLoss()
    variants = {
        "student alone": lambda: Baseline(data=data, criterion=loss),
        "KD, live teacher": lambda: KD(
            data=data, criterion=loss, teacher=teacher, cache_teacher=False
        ),
        "KD, cached teacher": lambda: KD(
            data=data, criterion=loss, teacher=teacher, cache_teacher=True
        ),
    }
    times = {}
    for label, make in variants.items():
        torch.manual_seed(0)
        per_epoch = _epochs(data, MLP(10, channels, size, [256, 256]), make(), epochs)
        times[label] = statistics.mean(per_epoch[1:]), per_epoch[0]
    alone = times["student alone"][0]
    print(f"{name}: {len(data.train)} batches per epoch, mean of epochs 2..{epochs}")  # type: ignore[arg-type]
    for label, (mean, first) in times.items():
        print(
            f"  {label:20s} {1000 * mean:8.1f} ms/epoch  ({mean / alone:.2f}x the student "
            f"alone; first epoch {1000 * first:.1f} ms)"
        )


def main() -> None:
    """Digits (8x8) and MNIST-shaped synthetic data (28x28, 12,000 images)."""
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU; teacher MLP "
        "1200-1200, student MLP 256-256"
    )
    compare("digits", digits(batch_size=64, seed=0), (1, 8), epochs=8)
    mnist_like = synthetic(
        batch_size=128, seed=0, image_size=28, train_samples=12_000, test_samples=500, val_size=500
    )
    compare("MNIST-shaped", mnist_like, (1, 28), epochs=4)


if __name__ == "__main__":
    main()
