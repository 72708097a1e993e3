"""Pruning benchmark (one process, CPU): prints ratios against the dense model.

1. Structured: 50% channel pruning (l1, layerwise) of CIFAR ResNet-20, CPU latency at batch 64
   of the shrunk model / the dense one (target <= 0.6).
2. Unstructured: the time a fine-tuning step takes with 80% magnitude masks re-applied after every
   optimizer step (``after_step``), against the same step without (target <= 1.10).

    python bench/prune.py [--repeats 30] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from kdexp.dataset.synthetic import load as synthetic
from kdexp.method.prune import Channel, Magnitude
from kdexp.model.resnet_cifar import CifarResNet
from kdexp.stats import latency_ms


def _step_times(plain: nn.Module, masked: nn.Module, method, x, y, repeats: int):  # type: ignore[no-untyped-def]
    """Median step time (ms) of each model, the two measured in alternation so that drift in
    the machine's speed hits both alike."""
    criterion = nn.CrossEntropyLoss()
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for m in (plain, masked)]
    times: tuple[list[float], list[float]] = ([], [])
    for i in range(repeats + 3):
        for j, (model, optimizer) in enumerate(zip((plain, masked), optimizers, strict=True)):
            start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            criterion(model(x), y).backward()
            optimizer.step()
            if j == 1:
                method.after_step(1)  # not an update step: masks are re-applied only
            if i >= 3:
                times[j].append(time.perf_counter() - start)
    return tuple(1000.0 * statistics.median(t) for t in times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    data = synthetic(batch_size=64, seed=0, channels=3, image_size=32, train_samples=256)
    x = torch.randn(64, 3, 32, 32)
    y = torch.randint(0, 10, (64,))

    dense = CifarResNet(20, 10, 3).eval()
    pruned = CifarResNet(20, 10, 3)
    pruned.load_state_dict(dense.state_dict())
    method = Channel(data=data, criterion=nn.CrossEntropyLoss(), sparsity=0.5, epochs=1)
    method.prepare(pruned)
    method.after_step(0)
    small = method.finalize(pruned).eval()
    dense_ms = latency_ms(dense, x, args.repeats, budget_s=float("inf"))
    small_ms = latency_ms(small, x, args.repeats, budget_s=float("inf"))
    dense_params = sum(p.numel() for p in dense.parameters())
    small_params = sum(p.numel() for p in small.parameters())
    print(f"threads {torch.get_num_threads()}, torch {torch.__version__}")
    print(
        f"channel 50% resnet20: latency@64 dense {dense_ms:.2f} ms, pruned {small_ms:.2f} ms, "
        f"ratio {small_ms / dense_ms:.3f} (target <= 0.6); params {dense_params} -> "
        f"{small_params} ({small_params / dense_params:.3f})"
    )

    base = CifarResNet(20, 10, 3).train()
    masked = CifarResNet(20, 10, 3).train()
    masked.load_state_dict(base.state_dict())
    magnitude = Magnitude(data=data, criterion=nn.CrossEntropyLoss(), sparsity=0.8, epochs=1)
    magnitude.prepare(masked)
    magnitude.after_step(0)
    plain_ms, masked_ms = _step_times(base, masked, magnitude, x, y, args.repeats)
    print(
        f"unstructured 80% masks: train step dense {plain_ms:.2f} ms, with masks "
        f"{masked_ms:.2f} ms, ratio {masked_ms / plain_ms:.3f} (target <= 1.10)"
    )


if __name__ == "__main__":
    main()
