"""Probabilistic knowledge transfer: match the conditional similarity distributions of a batch."""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from kdexp.errors import ConfigError
from kdexp.method.distill.base import PairedFeatureLoss

Reduction = Literal["reference", "distinct"]
REDUCTIONS = ("reference", "distinct")


def conditional_probabilities(
    e: Tensor, reduction: Reduction = "reference", eps: float = 1e-7
) -> Tensor:
    """``b×b`` matrix ``P[i, j] = K_ij / Σ_k K_ik`` with the cosine kernel ``K = (cos + 1)/2``.

    ``reference`` (RepDistiller's ``PKT``): rows are scaled by ``1/(‖e_i‖ + eps)`` and the
    self-pairs are kept (``K_ii ≈ 1`` in every row sum). ``distinct``: rows are L2-normalised and
    the diagonal is zero, so each row is a distribution over the *other* samples (all zero in the
    degenerate case where every other sample is antipodal to sample ``i``).
    """
    e = e.flatten(1)
    if reduction == "reference":
        z = e / (e.norm(dim=1, keepdim=True) + eps)
        k = (z @ z.t() + 1) / 2
        return k / k.sum(1, keepdim=True)
    z = F.normalize(e, dim=1)
    k = (z @ z.t() + 1) / 2
    k = k * ~torch.eye(len(e), dtype=torch.bool, device=e.device)
    return k / k.sum(1, keepdim=True).clamp_min(1e-12)


def pkt_loss(
    es: Tensor, et: Tensor, reduction: Reduction = "reference", eps: float = 1e-7
) -> Tensor:
    """``Σ_i Σ_j P_t[i,j] · log((P_t[i,j] + ε)/(P_s[i,j] + ε)) / b²``.

    The mean of the teacher-to-student KL divergence of each row, divided again by ``b``: the
    mean over the ``b×b`` matrix, for which the CRD benchmark's ``β = 30000`` was tuned. With
    ``reference`` (the default, RepDistiller's form) the sum includes the self-pairs ``j = i``;
    with ``distinct`` it runs over ``j ≠ i`` (and is identically 0 at ``b = 2``).
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    b = es.shape[0]
    if et.shape[0] != b or b < 2:
        raise ValueError(f"need equal batch sizes ≥ 2, got {b} and {et.shape[0]}")
    ps = conditional_probabilities(es, reduction, eps)
    pt = conditional_probabilities(et, reduction, eps)
    return (pt * torch.log((pt + eps) / (ps + eps))).sum() / b**2


class PKT(PairedFeatureLoss):
    """Passalis & Tefas 2018, "Learning Deep Representations with Probabilistic Knowledge Transfer".

    loss = CE + β · Σ_ij P_t log(P_t/P_s) / b², P = row-normalised cosine kernel (cos + 1)/2.
    ``reduction`` ``reference`` (default) keeps the self-pairs in the rows and the sum, as
    RepDistiller does; ``distinct`` leaves them out.
    """

    term, feature_maps = "pkt", False

    def __init__(
        self, *, beta: float = 30000.0, reduction: str = "reference", **kwargs: Any
    ) -> None:
        super().__init__(beta=beta, **kwargs)
        if reduction not in REDUCTIONS:
            raise ConfigError(
                self.key_of("reduction"),
                reduction,
                "reference (RepDistiller: self-pairs kept) or distinct (self-pairs left out)",
            )
        self.reduction: Reduction = reduction  # type: ignore[assignment]

    def pair_loss(self, fs: Tensor, ft: Tensor) -> Tensor:
        """The PKT loss of one layer pair."""
        return pkt_loss(fs, ft, self.reduction)
