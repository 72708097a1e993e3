"""Probabilistic knowledge transfer: match the conditional similarity distributions of a batch."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from kdexp.method.distill.base import PairedFeatureLoss


def conditional_probabilities(e: Tensor) -> Tensor:
    """``b×b`` matrix ``P[i, j] = K_ij / Σ_{k≠i} K_ik`` with ``K = (cos + 1)/2``, zero diagonal.

    ``cos`` is the cosine similarity between flattened rows of ``e``; each row of ``P`` is the
    distribution over the other samples of the batch (all zero in the degenerate case where
    every other sample is antipodal to sample ``i``).
    """
    z = F.normalize(e.flatten(1), dim=1)
    k = (z @ z.t() + 1) / 2
    k = k * ~torch.eye(len(e), dtype=torch.bool, device=e.device)
    return k / k.sum(1, keepdim=True).clamp_min(1e-12)


def pkt_loss(es: Tensor, et: Tensor, eps: float = 1e-7) -> Tensor:
    """``Σ_i Σ_{j≠i} P_t[i,j] · log((P_t[i,j] + ε)/(P_s[i,j] + ε)) / b²``.

    That is the mean of the teacher-to-student KL divergence of each row, divided again by
    ``b``: the mean over the ``b×b`` matrix, the reduction for which the CRD benchmark's weight
    ``β = 30000`` was tuned.
    """
    b = es.shape[0]
    if et.shape[0] != b or b < 2:
        raise ValueError(f"need equal batch sizes ≥ 2, got {b} and {et.shape[0]}")
    ps, pt = conditional_probabilities(es), conditional_probabilities(et)
    return (pt * torch.log((pt + eps) / (ps + eps))).sum() / b**2


class PKT(PairedFeatureLoss):
    """Passalis & Tefas 2018, "Learning Deep Representations with Probabilistic Knowledge Transfer".

    loss = CE + β · Σ_ij P_t log(P_t/P_s) / b², P = row-normalised cosine kernel (cos + 1)/2.
    """

    term, feature_maps = "pkt", False

    def __init__(self, *, beta: float = 30000.0, **kwargs: Any) -> None:
        super().__init__(beta=beta, **kwargs)

    def pair_loss(self, fs: Tensor, ft: Tensor) -> Tensor:
        """The PKT loss of one layer pair."""
        return pkt_loss(fs, ft)
