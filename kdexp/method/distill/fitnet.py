"""FitNets: a student's intermediate feature regressed onto the teacher's hint layer."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdexp.errors import ConfigError
from kdexp.method.base import Step
from kdexp.method.distill.base import Distiller, pool_to_common_size, require_layers

REGRESSORS = ("reference", "pool")


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


def _reference_conv(s_shape: torch.Size, t_shape: torch.Size) -> nn.Module | None:
    """RepDistiller's ``ConvReg`` convolution for these map sizes, or None when it has none.

    Twice the teacher's height: a 3×3 conv of stride 2 (padding 1); half of it: a 4×4 transposed
    conv of stride 2 (padding 1); otherwise, when at least as large, a valid conv whose kernel
    ``(1 + Δh, 1 + Δw)`` shrinks the map to the teacher's size (1×1 for equal sizes).
    """
    (s_c, s_h, s_w), (t_c, t_h, t_w) = s_shape[1:], t_shape[1:]
    if s_h == 2 * t_h:
        conv: nn.Module = nn.Conv2d(s_c, t_c, kernel_size=3, stride=2, padding=1)
    elif 2 * s_h == t_h:
        conv = nn.ConvTranspose2d(s_c, t_c, kernel_size=4, stride=2, padding=1)
    elif s_h >= t_h and s_w >= t_w:
        conv = nn.Conv2d(s_c, t_c, kernel_size=(1 + s_h - t_h, 1 + s_w - t_w))
    else:
        return None
    with torch.no_grad():
        out = conv(torch.zeros(1, s_c, s_h, s_w))
    return conv if tuple(out.shape[2:]) == (t_h, t_w) else None


def _regressor(
    s_shape: torch.Size,
    t_shape: torch.Size,
    layers: tuple[str, str],
    form: str,
    key: str = "method",
) -> nn.Module:
    """The regressor from a student feature's shape to the teacher's (``key``: where the
    method's config sits, for error messages).

    Feature maps: ``reference``, RepDistiller's ``ConvReg`` (conv + BN + ReLU, the conv chosen by
    :func:`_reference_conv`); ``pool``, a 1×1 conv + BN, the larger map pooled afterwards. Flat
    features: a linear map in either form (the reference regresses feature maps only).
    """
    if len(s_shape) == 4 and len(t_shape) == 4:
        if form == "pool":
            return nn.Sequential(
                nn.Conv2d(s_shape[1], t_shape[1], kernel_size=1, bias=False),
                nn.BatchNorm2d(t_shape[1]),
            )
        conv = _reference_conv(s_shape, t_shape)
        if conv is None:
            raise ConfigError(
                f"{key}.regressor",
                form,
                f"pool: the reference regressor maps a student map to a teacher map of half, "
                f"twice or at most its size, not {tuple(s_shape[2:])} ({layers[0]}) to "
                f"{tuple(t_shape[2:])} ({layers[1]})",
            )
        return nn.Sequential(conv, nn.BatchNorm2d(t_shape[1]), nn.ReLU())
    if len(s_shape) == 2 and len(t_shape) == 2:
        return nn.Linear(s_shape[1], t_shape[1])
    raise ConfigError(
        f"{key}.teacher_layers",
        layers[1],
        f"a layer of the same kind as student layer {layers[0]!r}: both b×c×h×w maps or both "
        f"flat, not {tuple(s_shape)} and {tuple(t_shape)}",
    )


class FitNet(Distiller):
    """Romero et al. 2015, "FitNets: Hints for Thin Deep Nets".

    loss = CE + β · Σ_layers MSE(r(f_s), f_t), r a trained regressor onto the teacher's hint.
    For feature maps, ``regressor`` ``reference`` (default) is the CRD benchmark's (RepDistiller
    ``ConvReg``): conv + BN + ReLU, the conv strided (or transposed) when the sizes differ by 2×;
    ``pool`` is a 1×1 conv + BN with the larger map average-pooled to the smaller. Flat features
    get a linear map. Hint and task are trained jointly, as in the CRD benchmark, not in the
    paper's two stages.
    """

    def __init__(self, *, beta: float = 100.0, regressor: str = "reference", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if beta < 0:
            raise ConfigError(self.key_of("beta"), beta, "a non-negative weight")
        if regressor not in REGRESSORS:
            raise ConfigError(
                self.key_of("regressor"),
                regressor,
                "reference (RepDistiller's conv + BN + ReLU) or pool (1×1 conv + BN, then pooling)",
            )
        require_layers(self, "FitNet")
        self.beta, self.regressor = beta, regressor
        self.regressors = nn.ModuleList()

    def build_connectors(self, s_shapes: list[torch.Size], t_shapes: list[torch.Size]) -> None:
        """One regressor per layer pair, on the teacher's device."""
        device = next(self.teacher.parameters()).device
        layers = zip(self.student_layers, self.teacher_layers, strict=True)
        self.regressors = nn.ModuleList(
            _regressor(s, t, pair, self.regressor, self.key)
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
            if proj.dim() == 4 and self.regressor == "pool":
                proj, ft = pool_to_common_size(proj, ft)
            total = total + hint_loss(proj, ft)
        return {"feat": self.beta * total}
