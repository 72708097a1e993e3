"""Neuron selectivity transfer: match the distributions of channel activation patterns (MMD)."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor

from kdexp.method.distill.base import PairedFeatureLoss, pool_to_common_size


def _mean_kernel(x: Tensor, y: Tensor) -> Tensor:
    """Per sample, the mean of ``(x_iᵀ y_j)²`` over all pairs of rows of ``b×n×d`` ``x``, ``y``."""
    return (x @ y.transpose(1, 2)).pow(2).mean((1, 2))


def nst_loss(fs: Tensor, ft: Tensor) -> Tensor:
    """Squared MMD with the kernel ``k(x, y) = (xᵀy)²`` between the channels of ``fs`` and ``ft``.

    Each channel's spatial map is flattened and L2-normalised; per sample the loss is
    ``mean k(t_i, t_j) + mean k(s_i, s_j) − 2 mean k(s_i, t_j)`` over channel pairs, then the
    mean over the batch. Spatial sizes are pooled to the smaller one as in attention transfer;
    channel counts may differ.
    """
    fs, ft = pool_to_common_size(fs, ft)
    s = F.normalize(fs.flatten(2), dim=2)
    t = F.normalize(ft.flatten(2), dim=2)
    return (_mean_kernel(t, t) + _mean_kernel(s, s) - 2 * _mean_kernel(s, t)).mean()


class NST(PairedFeatureLoss):
    """Huang & Wang 2017, "Like What You Like: Knowledge Distill via Neuron Selectivity Transfer".

    loss = CE + β · Σ_layers MMD²(channels_s, channels_t), polynomial kernel k(x, y) = (xᵀy)².
    """

    term, feature_maps = "nst", True

    def __init__(self, *, beta: float = 50.0, **kwargs: Any) -> None:
        super().__init__(beta=beta, **kwargs)

    def pair_loss(self, fs: Tensor, ft: Tensor) -> Tensor:
        """The NST loss of one layer pair."""
        return nst_loss(fs, ft)
