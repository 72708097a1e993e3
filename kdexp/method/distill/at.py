"""Attention transfer: match the spatial attention maps of student and teacher features."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor

from kdexp.errors import ConfigError
from kdexp.method.distill.base import PairedFeatureLoss, pool_to_common_size


def attention_map(f: Tensor, p: float = 2) -> Tensor:
    """Spatial attention of a ``b×c×h×w`` map: channel mean of ``|f|^p``, flattened, L2-normalised.

    Returns a ``b×(h·w)`` tensor whose rows have unit norm.
    """
    return F.normalize(f.abs().pow(p).mean(1).flatten(1), dim=1)


def at_loss(fs: Tensor, ft: Tensor, p: float = 2) -> Tensor:
    """Mean over batch and positions of ``(a_s − a_t)²`` between the two attention maps.

    When spatial sizes differ the features are adaptive-average-pooled to the smaller size first
    (:func:`pool_to_common_size`); channel counts need not match.
    """
    fs, ft = pool_to_common_size(fs, ft)
    return (attention_map(fs, p) - attention_map(ft, p)).pow(2).mean()


class AT(PairedFeatureLoss):
    """Zagoruyko & Komodakis 2017, "Paying More Attention to Attention" (attention transfer).

    loss = CE + β · Σ_layers mean((a_s − a_t)²), a = normalise(mean_c |f|^p) per sample.
    """

    term, feature_maps = "at", True

    def __init__(self, *, beta: float = 1000.0, p: float = 2.0, **kwargs: Any) -> None:
        super().__init__(beta=beta, **kwargs)
        if not p > 0:
            raise ConfigError(self.key_of("p"), p, "a positive exponent")
        self.p = p

    def pair_loss(self, fs: Tensor, ft: Tensor) -> Tensor:
        """The attention loss of one layer pair."""
        return at_loss(fs, ft, self.p)
