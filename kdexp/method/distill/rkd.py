"""Relational knowledge distillation: match distances and angles among a batch's embeddings."""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from kdexp.errors import ConfigError
from kdexp.method.base import Step
from kdexp.method.distill.base import Distiller, require_layers

Reduction = Literal["reference", "distinct"]
REDUCTIONS = ("reference", "distinct")


def _distance_matrix(e: Tensor, eps: float = 1e-12) -> Tensor:
    """``b×b`` Euclidean distances between the rows of ``e``, with an exact zero diagonal.

    Squared distances are clamped at ``eps`` before the square root so that coincident rows
    give a finite gradient (their distance reads ``√eps``).
    """
    e = e.flatten(1)
    sq = e.pow(2).sum(1)
    d = (sq[:, None] + sq[None, :] - 2 * e @ e.t()).clamp_min(eps).sqrt()
    eye = torch.eye(len(e), dtype=torch.bool, device=e.device)
    return d.masked_fill(eye, 0.0)


def _normalised_distances(e: Tensor, reduction: Reduction, eps: float = 1e-12) -> Tensor:
    """Distances divided by their mean, in the layout the reduction averages over.

    ``reference``: the whole ``b×b`` matrix (zero diagonal), divided by the mean of its positive
    entries, as RepDistiller's ``RKDLoss`` does. ``distinct``: the ``b(b−1)`` off-diagonal
    entries, divided by the mean of those that exceed ``√eps`` (coincident rows left out).
    """
    d = _distance_matrix(e, eps)
    if reduction == "reference":
        return d / d[d > 0].mean()
    off = ~torch.eye(len(d), dtype=torch.bool, device=d.device)
    d = d[off]
    nonzero = d > eps**0.5
    mu = d[nonzero].mean() if nonzero.any() else d.new_ones(())
    return d / mu


def _check(reduction: str, es: Tensor, et: Tensor, least: int) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if es.shape[0] != et.shape[0] or es.shape[0] < least:
        raise ValueError(f"need equal batch sizes ≥ {least}, got {es.shape[0]} and {et.shape[0]}")


def rkd_distance_loss(es: Tensor, et: Tensor, reduction: Reduction = "reference") -> Tensor:
    """Smooth-L1 (δ = 1) between the student's and teacher's normalised pairwise distances.

    Each distance matrix is divided by its own mean distance, so the two embeddings may differ in
    width and scale. ``reference`` (RepDistiller) averages over all ``b²`` ordered pairs, the
    zero diagonal included; ``distinct`` over the ``b(b−1)`` pairs ``i ≠ j``, which is
    ``b/(b−1)`` times larger.
    """
    _check(reduction, es, et, 2)
    return F.smooth_l1_loss(
        _normalised_distances(es, reduction), _normalised_distances(et, reduction)
    )


def _angles(e: Tensor, reduction: Reduction) -> Tensor:
    """Cosines ``cos ∠(e_i, e_j, e_k)`` at vertex ``j``, indexed ``[j, i, k]``.

    ``reference``: all ``b³`` values, where a zero edge (``i = j`` or ``k = j``) gives 0, as
    RepDistiller's ``RKDLoss`` has them. ``distinct``: the ``b(b−1)(b−2)`` triplets of distinct
    indices, flattened.
    """
    e = e.flatten(1)
    diff = F.normalize(e[None, :, :] - e[:, None, :], dim=2)  # diff[j, i] = (e_i − e_j)/‖·‖
    cos = torch.bmm(diff, diff.transpose(1, 2))  # cos[j, i, k]
    if reduction == "reference":
        return cos
    idx = torch.arange(len(e), device=e.device)
    distinct = (
        (idx[:, None, None] != idx[None, :, None])
        & (idx[:, None, None] != idx[None, None, :])
        & (idx[None, :, None] != idx[None, None, :])
    )
    return cos[distinct]


def rkd_angle_loss(es: Tensor, et: Tensor, reduction: Reduction = "reference") -> Tensor:
    """Smooth-L1 (δ = 1) between the student's and teacher's triplet angle cosines.

    ``reference`` (RepDistiller) averages over all ``b³`` index triplets, the degenerate ones
    included; ``distinct`` over the ``b(b−1)(b−2)`` triplets of distinct indices, which is
    ``b²/((b−1)(b−2))`` times larger.
    """
    _check(reduction, es, et, 3)
    return F.smooth_l1_loss(_angles(es, reduction), _angles(et, reduction))


class RKD(Distiller):
    """Park, Kim, Lu & Cho 2019, "Relational Knowledge Distillation".

    loss = CE + w_d · smoothL1(ψ_D) + w_a · smoothL1(ψ_A): normalised pairwise distances and
    triplet angle cosines of the embeddings, summed over the layer pairs. ``reduction``
    ``reference`` (default) averages as RepDistiller does, over the whole ``b×b`` matrix and all
    ``b³`` triplets, the reduction for which w_d = 25 and w_a = 50 were tuned; ``distinct``
    averages over distinct pairs and triplets only.
    """

    def __init__(
        self,
        *,
        distance_weight: float = 25.0,
        angle_weight: float = 50.0,
        reduction: str = "reference",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        for name, value in (("distance_weight", distance_weight), ("angle_weight", angle_weight)):
            if value < 0:
                raise ConfigError(self.key_of(name), value, "a non-negative weight")
        if reduction not in REDUCTIONS:
            raise ConfigError(
                self.key_of("reduction"),
                reduction,
                "reference (RepDistiller: mean over the b×b matrix and all b³ triplets) or "
                "distinct (mean over distinct pairs and triplets)",
            )
        require_layers(self, "RKD")
        self.distance_weight, self.angle_weight = distance_weight, angle_weight
        self.reduction: Reduction = reduction  # type: ignore[assignment]

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
            dist = torch.stack([rkd_distance_loss(es, et, self.reduction) for es, et in pairs])
            terms["rkd_dist"] = self.distance_weight * dist.sum()
        if self.angle_weight:
            angle = torch.stack([rkd_angle_loss(es, et, self.reduction) for es, et in pairs])
            terms["rkd_angle"] = self.angle_weight * angle.sum()
        return terms
