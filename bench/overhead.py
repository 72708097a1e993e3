"""Throughput of kdexp's training loop against a minimal hand-written PyTorch loop.

Usage: ``python bench/overhead.py [--quick]``. In one process, the same model is trained on the
same in-memory batches for the same number of steps, with the same optimizer, LR schedule and
per-epoch validation, twice over:

* through :func:`kdexp.train.fit` with the baseline method and MLflow tracking on (SQLite in a
  temporary folder, the default ``log_every=10``), checkpoints included, and
* through a hand-written loop: zero_grad, forward, cross-entropy, backward, step, schedule step,
  and an evaluation pass per epoch.

Each path runs ``repeats`` times, alternating, and the best time counts. It prints the throughput
ratio (kdexp / hand loop; target >= 0.97) for a CIFAR-shaped ResNet-20 workload and, for
transparency, for the tiny digits MLP whose steps take well under a millisecond, where fixed
per-step costs weigh most. It then runs bench/data_path.py (in-memory path vs DataLoader).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from kdexp.dataset.base import Data
from kdexp.dataset.digits import load as digits
from kdexp.dataset.synthetic import load as synthetic
from kdexp.method.baseline import Baseline
from kdexp.model.mlp import MLP
from kdexp.model.resnet_cifar import CifarResNet
from kdexp.schedule import cosine
from kdexp.tracking.mlflow import MlflowTracker
from kdexp.train import LoopOptions, fit


def _hand_loop(model: nn.Module, data: Data, epochs: int, lr: float) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True)
    sched = cosine(opt, epochs, len(data.train))  # type: ignore[arg-type]
    loss_fn = nn.CrossEntropyLoss()
    start = time.perf_counter()
    for _ in range(epochs):
        model.train()
        for x, y in data.train:
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            sched.step()
        model.eval()
        with torch.no_grad():
            correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in data.val)
    del correct
    return time.perf_counter() - start


def _kdexp_loop(model: nn.Module, data: Data, epochs: int, lr: float, folder: Path) -> float:
    loss_fn = nn.CrossEntropyLoss()
    method = Baseline(data=data, criterion=loss_fn)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True)
    sched = cosine(opt, epochs, len(data.train))  # type: ignore[arg-type]
    tracker = MlflowTracker(uri=f"sqlite:///{folder / 'mlflow.db'}", experiment="bench")
    options = LoopOptions(
        epochs=epochs,
        device=torch.device("cpu"),
        log_every=10,
        checkpoint_dir=folder / "checkpoints",
    )
    with tracker.run("bench", {}, {}):  # store set-up is outside the timed part
        start = time.perf_counter()
        fit(model, method, data, opt, sched, tracker, options)
        return time.perf_counter() - start


def compare(name: str, make_model, data: Data, epochs: int, lr: float, repeats: int) -> float:
    """Print and return the throughput ratio kdexp / hand loop for one workload."""
    steps = epochs * len(data.train)  # type: ignore[arg-type]
    hand, ours = [], []
    with tempfile.TemporaryDirectory() as tmp:
        _kdexp_loop(make_model(), data, 1, lr, Path(tmp))  # warm-up: imports, store schema
        for i in range(repeats):
            torch.manual_seed(i)
            hand.append(_hand_loop(make_model(), data, epochs, lr))
            torch.manual_seed(i)
            ours.append(_kdexp_loop(make_model(), data, epochs, lr, Path(tmp)))
    ratio = min(hand) / min(ours)
    print(
        f"{name}: {steps} steps; hand loop {min(hand):.3f}s, kdexp {min(ours):.3f}s "
        f"(best of {repeats}); kdexp throughput = {ratio:.3f}x the hand loop's"
    )
    return ratio


def main() -> None:
    """Run both workloads, then the data-path benchmark."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and repeats")
    args = parser.parse_args()
    repeats = 2 if args.quick else 3
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
    cifar = synthetic(
        batch_size=128,
        seed=0,
        channels=3,
        image_size=32,
        train_samples=1152 if args.quick else 4736,
        test_samples=128,
        val_size=128,
    )
    compare(
        "resnet20, 3x32x32, batch 128",
        lambda: CifarResNet(20, 10, 3),
        cifar,
        epochs=2,
        lr=0.05,
        repeats=repeats,
    )
    small = digits(batch_size=64, seed=0)
    compare(
        "mlp 256-256, digits 8x8, batch 64",
        lambda: MLP(10, 1, 8, [256, 256]),
        small,
        epochs=5 if args.quick else 20,
        lr=0.05,
        repeats=repeats,
    )
    sys.path.insert(0, str(Path(__file__).parent))
    import data_path

    data_path.main()


if __name__ == "__main__":
    main()
