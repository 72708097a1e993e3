"""FitNets: a student's intermediate feature regressed onto the teacher's hint layer."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdexp.errors import ConfigError
from kdexp.method.base import Step
from kdexp.method.distill.base import Distiller, pool_to_common_size, require_layers


def hint_loss(student_proj: Tensor, teacher_feat: Tensor) -> Tensor:
    """Mean squared error between the regressed student feature and the teacher's hint.

    Averaged over every element (batch, channels, positions), as ``nn.MSELoss`` does; the
    regressor that maps the student's guided layer to the teacher's shape is applied beforehand.
    """
    if student_proj.shape != teacher_feat.shape:
        raise ValueError(
            f"hint_loss: student projection {tuple(student_proj.shape)} does not match teacher "
            f"feature {tuple(teacher_feat.shape)}"
        )
    return F.mse_loss(student_proj, teacher_feat)


def _regressor(
    s_shape: torch.Size, t_shape: torch.Size, layers: tuple[str, str], key: str
) -> nn.Module:
    """A 1×1 conv + BN between feature maps, or a linear map between flat features."""
    if len(s_shape) == 4 and len(t_shape) == 4:
        return nn.Sequential(
            nn.Conv2d(s_shape[1], t_shape[1], kernel_size=1, bias=False),
            nn.BatchNorm2d(t_shape[1]),
        )
    if len(s_shape) == 2 and len(t_shape) == 2:
        return nn.Linear(s_shape[1], t_shape[1])
    raise ConfigError(
        key,
        layers[1],
        f"a layer of the same kind as student layer {layers[0]!r}: both b×c×h×w maps or both "
        f"flat, not {tuple(s_shape)} and {tuple(t_shape)}",
    )


class FitNet(Distiller):
    """Romero et al. 2015, "FitNets: Hints for Thin Deep Nets".

    loss = CE + β · Σ_layers MSE(r(f_s), f_t), r a trained regressor onto the teacher's hint.
    The regressor is a 1×1 conv + BN for feature maps (the larger map then pooled to the smaller
    one) or a linear map for flat features. Hint and task are trained jointly, as in the CRD
    benchmark, not in the paper's two stages.
    """

    def __init__(self, *, beta: float = 100.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if beta < 0:
            raise ConfigError(self.key_of("beta"), beta, "a non-negative weight")
        require_layers(self, "FitNet")
        self.beta = beta
        self.regressors = nn.ModuleList()

    def build_connectors(self, s_shapes: list[torch.Size], t_shapes: list[torch.Size]) -> None:
        """One regressor per layer pair, on the teacher's device."""
        device = next(self.teacher.parameters()).device
        layers = zip(self.student_layers, self.teacher_layers, strict=True)
        self.regressors = nn.ModuleList(
            _regressor(s, t, pair, self.key_of("teacher_layers"))
            for s, t, pair in zip(s_shapes, t_shapes, layers, strict=True)
        ).to(device)

    def distill_terms(
        self,
        s_logits: Tensor,
        t_logits: Tensor,
        s_feats: list[Tensor],
        t_feats: list[Tensor],
        targets: Tensor,
        ctx: Step,
    ) -> dict[str, Tensor]:
        """``feat``: β times the hint loss summed over the layer pairs."""
        total = s_logits.new_zeros((), dtype=torch.float32)
        for regressor, fs, ft in zip(self.regressors, s_feats, t_feats, strict=True):
            proj, ft = regressor(fs).float(), ft.float()
            if proj.dim() == 4:
                proj, ft = pool_to_common_size(proj, ft)
            total = total + hint_loss(proj, ft)
        return {"feat": self.beta * total}
