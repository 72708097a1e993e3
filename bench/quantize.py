"""CPU latency of int8 models (kdexp.method.quantize.backend) against their fp32 originals.

Usage: ``python bench/quantize.py [--repeats N]``. In one process, for the digits-shaped MLP
(``kdexp.model.mlp.MLP``, 256-256, dynamic and static int8) and a CIFAR ResNet-20
(``CifarResNet(20, 10, 3)``, static int8, calibrated on random inputs: latency does not depend on
the weights), it times the median forward call (``kdexp.stats.latency_ms``, inference mode) at
batch 1 and batch 64, fp32 and int8 alternately, and prints the fp32 / int8 ratio (> 1: int8 is
faster). Target: >= 2x at batch 64 for the ResNet. Also prints the state_dict sizes.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from kdexp.method.quantize import backend
from kdexp.model.mlp import MLP
from kdexp.model.resnet_cifar import CifarResNet
from kdexp.stats import latency_ms, size_bytes


def _time(model: nn.Module, shape: tuple[int, ...], batch: int, repeats: int) -> float:
    example = torch.randn(batch, *shape)
    return latency_ms(model, example, repeats=repeats, warmup=3, budget_s=float("inf"))


def _compare(name: str, fp32: nn.Module, int8: nn.Module, shape: tuple[int, ...], repeats: int):
    print(
        f"{name}: state_dict {size_bytes(fp32)} B fp32, {size_bytes(int8)} B int8 "
        f"({size_bytes(int8) / size_bytes(fp32):.2f}x)"
    )
    for batch in (1, 64):
        best_fp32 = best_int8 = float("inf")
        for _ in range(3):  # alternate, keep the best of each: less noise from other processes
            best_fp32 = min(best_fp32, _time(fp32, shape, batch, repeats))
            best_int8 = min(best_int8, _time(int8, shape, batch, repeats))
        print(
            f"  batch {batch:>2}: fp32 {best_fp32:8.3f} ms  int8 {best_int8:8.3f} ms  "
            f"speed-up {best_fp32 / best_int8:5.2f}x"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(
        f"torch {torch.__version__}, engine {backend.engine()}, {torch.get_num_threads()} threads"
    )

    mlp = MLP(10, 1, 8, hidden=[256, 256]).eval()
    mlp_shape = (1, 8, 8)
    calibration = [torch.randn(64, *mlp_shape) for _ in range(4)]
    _compare(
        "MLP 256-256, dynamic int8", mlp, backend.quantize_dynamic(mlp), mlp_shape, args.repeats
    )
    _compare(
        "MLP 256-256, static int8",
        mlp,
        backend.quantize_static(mlp, calibration),
        mlp_shape,
        args.repeats,
    )

    resnet = CifarResNet(20, 10, 3).eval()
    shape = (3, 32, 32)
    calibration = [torch.randn(64, *shape) for _ in range(4)]
    int8 = backend.quantize_static(resnet, calibration)
    _compare("CifarResNet-20, static int8", resnet, int8, shape, args.repeats)


if __name__ == "__main__":
    main()
