"""Similarity-preserving distillation: match the batch's pairwise similarity matrices."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor

from kdexp.method.distill.base import PairedFeatureLoss


def similarity_matrix(f: Tensor) -> Tensor:
    """Row-L2-normalised ``b×b`` Gram matrix ``F Fᵀ`` of the features ``F = f.flatten(1)``."""
    flat = f.flatten(1)
    return F.normalize(flat @ flat.t(), dim=1)


def sp_loss(fs: Tensor, ft: Tensor) -> Tensor:
    """``‖G_s − G_t‖_F² / b²`` between the student's and teacher's similarity matrices.

    Only the batch sizes need agree; feature shapes may differ freely.
    """
    b = fs.shape[0]
    if ft.shape[0] != b:
        raise ValueError(f"batch sizes differ: {b} and {ft.shape[0]}")
    return (similarity_matrix(fs) - similarity_matrix(ft)).pow(2).sum() / b**2


class SP(PairedFeatureLoss):
    """Tung & Mori 2019, "Similarity-Preserving Knowledge Distillation".

    loss = CE + β · Σ_layers ‖G_s − G_t‖_F² / b², G = row-normalised F Fᵀ of the batch's features.
    """

    term, feature_maps = "sp", False

    def __init__(self, *, beta: float = 3000.0, **kwargs: Any) -> None:
        super().__init__(beta=beta, **kwargs)

    def pair_loss(self, fs: Tensor, ft: Tensor) -> Tensor:
        """The SP loss of one layer pair."""
        return sp_loss(fs, ft)
