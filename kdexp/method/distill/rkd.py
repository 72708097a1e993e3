"""Relational knowledge distillation: match distances and angles among a batch's embeddings."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from kdexp.errors import ConfigError
from kdexp.method.base import Step
from kdexp.method.distill.base import Distiller, require_layers


def _normalised_distances(e: Tensor, eps: float = 1e-12) -> Tensor:
    """The ``b(b−1)`` off-diagonal Euclidean distances between rows, divided by their mean.

    The mean is taken over the non-zero distances only (coincident rows are left out of it).
    Squared distances are clamped at ``eps`` before the square root so that coincident rows
    still give a finite gradient.
    """
    e = e.flatten(1)
    sq = e.pow(2).sum(1)
    d2 = sq[:, None] + sq[None, :] - 2 * e @ e.t()
    off = ~torch.eye(len(e), dtype=torch.bool, device=e.device)
    d = d2[off].clamp_min(eps).sqrt()
    nonzero = d > eps**0.5
    mu = d[nonzero].mean() if nonzero.any() else d.new_ones(())
    return d / mu


def rkd_distance_loss(es: Tensor, et: Tensor) -> Tensor:
    """Smooth-L1 (δ = 1) between normalised pairwise distances, averaged over ordered pairs i ≠ j.

    Each distance is divided by the mean of its own embedding's non-zero off-diagonal distances,
    so student and teacher embeddings may have different widths and scales.
    """
    if es.shape[0] != et.shape[0] or es.shape[0] < 2:
        raise ValueError(f"need equal batch sizes ≥ 2, got {es.shape[0]} and {et.shape[0]}")
    return F.smooth_l1_loss(_normalised_distances(es), _normalised_distances(et))


def _angles(e: Tensor) -> Tensor:
    """Cosines ``cos ∠(e_i, e_j, e_k)`` at vertex ``j`` for all triplets of distinct indices.

    Returned as a flat tensor of the ``b(b−1)(b−2)`` values, ordered by ``(j, i, k)``.
    """
    e = e.flatten(1)
    b = len(e)
    diff = F.normalize(e[None, :, :] - e[:, None, :], dim=2)  # diff[j, i] = (e_i − e_j)/‖·‖
    cos = torch.bmm(diff, diff.transpose(1, 2))  # cos[j, i, k]
    idx = torch.arange(b, device=e.device)
    distinct = (
        (idx[:, None, None] != idx[None, :, None])
        & (idx[:, None, None] != idx[None, None, :])
        & (idx[None, :, None] != idx[None, None, :])
    )
    return cos[distinct]


def rkd_angle_loss(es: Tensor, et: Tensor) -> Tensor:
    """Smooth-L1 (δ = 1) between angle cosines, averaged over triplets of distinct indices."""
    if es.shape[0] != et.shape[0] or es.shape[0] < 3:
        raise ValueError(f"need equal batch sizes ≥ 3, got {es.shape[0]} and {et.shape[0]}")
    return F.smooth_l1_loss(_angles(es), _angles(et))


class RKD(Distiller):
    """Park, Kim, Lu & Cho 2019, "Relational Knowledge Distillation".

    loss = CE + w_d · smoothL1(ψ_D) + w_a · smoothL1(ψ_A): normalised pairwise distances and
    triplet angle cosines of the embeddings, summed over the layer pairs.
    """

    def __init__(
        self, *, distance_weight: float = 25.0, angle_weight: float = 50.0, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        for name, value in (("distance_weight", distance_weight), ("angle_weight", angle_weight)):
            if value < 0:
                raise ConfigError(self.key_of(name), value, "a non-negative weight")
        require_layers(self, "RKD")
        self.distance_weight, self.angle_weight = distance_weight, angle_weight

    def distill_terms(
        self,
        s_logits: Tensor,
        t_logits: Tensor,
        s_feats: list[Tensor],
        t_feats: list[Tensor],
        targets: Tensor,
        ctx: Step,
    ) -> dict[str, Tensor]:
        """``rkd_dist`` and ``rkd_angle`` (those with a non-zero weight), summed over layers."""
        pairs = [(fs.float(), ft.float()) for fs, ft in zip(s_feats, t_feats, strict=True)]
        terms = {}
        if self.distance_weight:
            dist = torch.stack([rkd_distance_loss(es, et) for es, et in pairs]).sum()
            terms["rkd_dist"] = self.distance_weight * dist
        if self.angle_weight:
            angle = torch.stack([rkd_angle_loss(es, et) for es, et in pairs]).sum()
            terms["rkd_angle"] = self.angle_weight * angle
        return terms
