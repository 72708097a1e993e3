"""Neuron selectivity transfer: match the distributions of channel activation patterns (MMD)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from kdexp.errors import ConfigError
from kdexp.method.distill.at import pool_to_common_size, require_feature_maps, require_layers
from kdexp.method.distill.base import Distiller


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


class NST(Distiller):
    """Huang & Wang 2017, "Like What You Like: Knowledge Distill via Neuron Selectivity Transfer".

    loss = CE + β · Σ_layers MMD²(channels_s, channels_t), polynomial kernel k(x, y) = (xᵀy)².
    """

    def __init__(self, *, beta: float = 50.0, **kwargs: Any) -> None:
        if beta < 0:
            raise ConfigError("method.beta", beta, "a non-negative weight")
        super().__init__(**kwargs)
        require_layers(self, "NST")
        self.beta = beta

    def build_connectors(self, s_shapes: list[torch.Size], t_shapes: list[torch.Size]) -> None:
        """No connectors; checks that the tapped layers give feature maps."""
        require_feature_maps(self, s_shapes, t_shapes, "NST")

    def distill_terms(
        self,
        s_logits: Tensor,
        t_logits: Tensor,
        s_feats: list[Tensor],
        t_feats: list[Tensor],
        targets: Tensor,
    ) -> dict[str, Tensor]:
        """``nst``: β times the MMD loss summed over the layer pairs."""
        total = torch.stack(
            [nst_loss(fs.float(), ft.float()) for fs, ft in zip(s_feats, t_feats, strict=True)]
        ).sum()
        return {"nst": self.beta * total}
