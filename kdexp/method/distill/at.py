"""Attention transfer: match the spatial attention maps of student and teacher features."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from kdexp.errors import ConfigError
from kdexp.method.distill.base import Distiller


def pool_to_common_size(fs: Tensor, ft: Tensor) -> tuple[Tensor, Tensor]:
    """Adaptive-average-pool two ``b×c×h×w`` maps to their common (smallest) spatial size.

    A map already at the smaller size is returned unchanged; channel counts may differ.
    """
    if fs.dim() != 4 or ft.dim() != 4:
        raise ValueError(
            f"expected b×c×h×w feature maps, got {tuple(fs.shape)} and {tuple(ft.shape)}"
        )
    if fs.shape[0] != ft.shape[0]:
        raise ValueError(f"batch sizes differ: {fs.shape[0]} and {ft.shape[0]}")
    size = (min(fs.shape[2], ft.shape[2]), min(fs.shape[3], ft.shape[3]))
    if tuple(fs.shape[2:]) != size:
        fs = F.adaptive_avg_pool2d(fs, size)
    if tuple(ft.shape[2:]) != size:
        ft = F.adaptive_avg_pool2d(ft, size)
    return fs, ft


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


def require_layers(method: Distiller, name: str) -> None:
    """Raise :class:`ConfigError` unless ``method`` taps at least one pair of layers."""
    if not method.student_layers:
        raise ConfigError(
            "method.student_layers",
            method.student_layers,
            f"at least one layer: {name} compares student and teacher features "
            "(with method.teacher_layers of the same length)",
        )


def require_feature_maps(
    method: Distiller, s_shapes: Sequence[torch.Size], t_shapes: Sequence[torch.Size], name: str
) -> None:
    """Raise :class:`ConfigError` unless every tapped feature is a ``b×c×h×w`` map."""
    for key, layers, shapes in (
        ("method.student_layers", method.student_layers, s_shapes),
        ("method.teacher_layers", method.teacher_layers, t_shapes),
    ):
        for layer, shape in zip(layers, shapes, strict=True):
            if len(shape) != 4:
                raise ConfigError(
                    key,
                    layer,
                    f"a convolutional layer with b×c×h×w outputs: {name} compares spatial maps, "
                    f"and {layer!r} gives shape {tuple(shape)}",
                )


class AT(Distiller):
    """Zagoruyko & Komodakis 2017, "Paying More Attention to Attention" (attention transfer).

    loss = CE + β · Σ_layers mean((a_s − a_t)²), a = normalise(mean_c |f|^p) per sample.
    """

    def __init__(self, *, beta: float = 1000.0, p: float = 2.0, **kwargs: Any) -> None:
        if beta < 0:
            raise ConfigError("method.beta", beta, "a non-negative weight")
        if not p > 0:
            raise ConfigError("method.p", p, "a positive exponent")
        super().__init__(**kwargs)
        require_layers(self, "AT")
        self.beta, self.p = beta, p

    def build_connectors(self, s_shapes: list[torch.Size], t_shapes: list[torch.Size]) -> None:
        """No connectors; checks that the tapped layers give feature maps."""
        require_feature_maps(self, s_shapes, t_shapes, "AT")

    def distill_terms(
        self,
        s_logits: Tensor,
        t_logits: Tensor,
        s_feats: list[Tensor],
        t_feats: list[Tensor],
        targets: Tensor,
    ) -> dict[str, Tensor]:
        """``at``: β times the attention loss summed over the layer pairs."""
        total = torch.stack(
            [
                at_loss(fs.float(), ft.float(), self.p)
                for fs, ft in zip(s_feats, t_feats, strict=True)
            ]
        ).sum()
        return {"at": self.beta * total}
