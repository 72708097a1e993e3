"""CIFAR-10-shaped ResNet-20 training on a GPU: kdexp's loop against a hand-written one.

Usage: ``python bench/gpu.py [--epochs 2] [--train 50000] [--batch 128] [--smoke-cpu]``.

Without CUDA it prints ``no GPU`` and exits 0 (``--smoke-cpu`` runs every variant on a few CPU
batches instead, without torch.compile, to check the script itself; its times mean nothing).

The data are random CIFAR-10-shaped tensors (3x32x32, 10 classes), held in GPU memory for the
whole run: the in-memory data path, with no DataLoader and no host-to-device copy per batch.
For each variant it times the same epochs (SGD, nesterov, cosine schedule, a validation pass per
epoch) through a hand-written loop and through :func:`kdexp.train.fit` (baseline method, no
tracking, no checkpoints), synchronising the device before reading the clock:

* fp32;
* AMP bf16 (autocast);
* AMP bf16 + channels_last;
* AMP bf16 + channels_last + torch.compile (the first epoch, which compiles, is reported apart).

It prints images per second for each, and kdexp's throughput as a fraction of the hand loop's.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

from kdexp.dataset.base import Data, TensorLoader
from kdexp.method.baseline import Baseline
from kdexp.model.resnet_cifar import CifarResNet
from kdexp.schedule import cosine
from kdexp.tracking.base import Tracker
from kdexp.train import LoopOptions, fit

#: name: (amp, channels_last, compile)
VARIANTS = {
    "fp32": (None, False, False),
    "bf16": ("bf16", False, False),
    "bf16 + channels_last": ("bf16", True, False),
    "bf16 + channels_last + compile": ("bf16", True, True),
}


def _data(train: int, batch: int, device: torch.device) -> Data:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(train, 3, 32, 32, generator=generator).to(device)
    y = torch.randint(0, 10, (train,), generator=generator).to(device)
    vx, vy = x[: train // 10], y[: train // 10]
    return Data(
        train=TensorLoader(x, y, batch, shuffle=True, seed=0, drop_last=True),
        val=TensorLoader(vx, vy, 2 * batch),
        test=TensorLoader(vx, vy, 2 * batch),
        num_classes=10,
        input_shape=(3, 32, 32),
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _hand(
    model: nn.Module, data: Data, epochs: int, device: torch.device, amp: str | None, last: bool
) -> list[float]:
    """Seconds per epoch of a plain loop: zero_grad, forward, loss, backward, step."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    sched = cosine(opt, epochs, len(data.train))  # type: ignore[arg-type]
    loss_fn = nn.CrossEntropyLoss()
    fmt = torch.channels_last if last else torch.contiguous_format
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if amp else nullcontext
    times = []
    for _ in range(epochs):
        _sync(device)
        start = time.perf_counter()
        model.train()
        for x, y in data.train:
            opt.zero_grad(set_to_none=True)
            with autocast():
                loss = loss_fn(model(x.contiguous(memory_format=fmt)), y)
            loss.backward()
            opt.step()
            sched.step()
        model.eval()
        with torch.no_grad(), autocast():
            correct = sum(
                (model(x.contiguous(memory_format=fmt)).argmax(1) == y).sum() for x, y in data.val
            )
        float(correct)  # type: ignore[arg-type]
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def _kdexp(
    model: nn.Module, data: Data, epochs: int, device: torch.device, amp: str | None, last: bool
) -> list[float]:
    """Seconds per epoch of :func:`kdexp.train.fit` (read from its history's epoch times)."""
    loss_fn = nn.CrossEntropyLoss()
    method = Baseline(data=data, criterion=loss_fn)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    sched = cosine(opt, epochs, len(data.train))  # type: ignore[arg-type]
    marks: list[float] = []

    class _Clock(Tracker):
        """Records when each epoch's metrics arrive (after its validation pass)."""

        def log_metrics(self, metrics: dict[str, float], step: int) -> None:  # type: ignore[override]
            if "val/acc1" in metrics:
                _sync(device)
                marks.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as folder:
        options = LoopOptions(
            epochs=epochs, device=device, amp=amp, channels_last=last, checkpoint_dir=Path(folder)
        )
        _sync(device)
        start = time.perf_counter()
        fit(model, method, data, opt, sched, _Clock(), options)
    edges = [start, *marks]
    return [b - a for a, b in zip(edges, edges[1:], strict=False)]


def _model(device: torch.device, last: bool, compiled: bool) -> nn.Module:
    torch.manual_seed(0)
    model = CifarResNet(20, 10, 3).to(device)
    if last:
        model = model.to(memory_format=torch.channels_last)
    return torch.compile(model) if compiled else model  # type: ignore[return-value]


def main() -> None:
    """Time every variant both ways and print images per second and the ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train", type=int, default=50_000)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--smoke-cpu", action="store_true")
    options = parser.parse_args()
    if torch.cuda.is_available():
        device = torch.device("cuda")
        print(f"GPU: {torch.cuda.get_device_name()}; torch {torch.__version__}")
        variants = VARIANTS
    elif options.smoke_cpu:
        device = torch.device("cpu")
        options.train, options.epochs = 4 * options.batch, 2
        variants = {k: v for k, v in VARIANTS.items() if not v[2] and not v[0]}
        print("no GPU: CPU smoke run of the script (times mean nothing)")
    else:
        print("no GPU: nothing measured (bench/gpu.py needs CUDA)")
        return
    data = _data(options.train, options.batch, device)
    steps = len(data.train)  # type: ignore[arg-type]
    images = steps * options.batch
    print(f"ResNet-20, {images} images x {options.epochs} epochs, batch {options.batch}")
    loops: dict[str, Callable[..., list[float]]] = {"hand loop": _hand, "kdexp fit": _kdexp}
    for name, (amp, last, compiled) in variants.items():
        rates = {}
        for loop_name, loop in loops.items():
            epochs = loop(_model(device, last, compiled), data, options.epochs, device, amp, last)
            steady = epochs[1:] if len(epochs) > 1 else epochs  # the first warms up (or compiles)
            rates[loop_name] = images / (sum(steady) / len(steady))
            print(
                f"  {name:32s} {loop_name:9s} first epoch {epochs[0]:6.2f} s, then "
                f"{rates[loop_name]:9.0f} images/s",
                flush=True,
            )
        print(f"  {name:32s} kdexp / hand loop = {rates['kdexp fit'] / rates['hand loop']:.3f}")


if __name__ == "__main__":
    main()
