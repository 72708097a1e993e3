"""Decoupled knowledge distillation: target-class and non-target-class KD weighted apart."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from kdexp.errors import ConfigError
from kdexp.method.base import Step
from kdexp.method.distill.base import Distiller


def _binary_log_probs(z: Tensor, onehot: Tensor) -> Tensor:
    """``b×2`` log-probabilities ``[log p_target, log(1 − p_target)]`` of ``softmax(z)``.

    ``onehot`` is the boolean ``b×c`` mask of the targets; ``log(1 − p)`` is computed as a
    log-sum-exp over the other logits, which stays finite when ``p`` rounds to 1.
    """
    lse = z.logsumexp(1)
    log_pt = z.masked_select(onehot) - lse
    others = z.masked_fill(onehot, float("-inf"))
    log_rest = others.logsumexp(1) - lse
    return torch.stack([log_pt, log_rest], dim=1)


def dkd_loss(
    s_logits: Tensor,
    t_logits: Tensor,
    targets: Tensor,
    alpha: float = 1.0,
    beta: float = 8.0,
    T: float = 4.0,
) -> tuple[Tensor, Tensor]:
    """``(α·T²·TCKD, β·T²·NCKD)``, both averaged over the batch; their sum is the DKD loss.

    TCKD is ``KL([p_t, 1 − p_t]_teacher ‖ [p_t, 1 − p_t]_student)`` with ``p = softmax(z/T)`` and
    ``t`` the label; NCKD is the KL divergence between the teacher's and student's softmax of
    ``z/T`` over the non-target classes only (the target logit removed).
    """
    b, c = s_logits.shape
    if t_logits.shape != (b, c) or targets.shape != (b,) or c < 2:
        raise ValueError(
            f"dkd_loss: logits {tuple(s_logits.shape)}, {tuple(t_logits.shape)} and targets "
            f"{tuple(targets.shape)} do not match"
        )
    onehot = F.one_hot(targets, c).bool()
    zs, zt = s_logits / T, t_logits / T

    bs, bt = _binary_log_probs(zs, onehot), _binary_log_probs(zt, onehot)
    tckd = (bt.exp() * (bt - bs)).sum(1).mean()

    ns = F.log_softmax(zs[~onehot].view(b, c - 1), dim=1)
    nt = F.log_softmax(zt[~onehot].view(b, c - 1), dim=1)
    nckd = (nt.exp() * (nt - ns)).sum(1).mean()
    return alpha * T**2 * tckd, beta * T**2 * nckd


class DKD(Distiller):
    """Zhao, Cui, Song, Qiu & Liang 2022, "Decoupled Knowledge Distillation".

    loss = CE + w(e) · T² · (α · TCKD + β · NCKD), w(e) = min((e + 1)/warmup, 1) in epoch e ≥ 0.
    """

    def __init__(
        self,
        *,
        alpha: float = 1.0,
        beta: float = 8.0,
        warmup: int = 20,
        T: float = 4.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(T=T, **kwargs)
        for name, value in (("alpha", alpha), ("beta", beta)):
            if value < 0:
                raise ConfigError(self.key_of(name), value, "a non-negative weight")
        if warmup < 0:
            raise ConfigError(
                self.key_of("warmup"), warmup, "a number of epochs ≥ 0 (0: no warm-up)"
            )
        self.alpha, self.beta, self.warmup = alpha, beta, warmup

    def warmup_factor(self, epoch: int) -> float:
        """The weight of the DKD terms in ``epoch`` (from 0): linear up to 1 over ``warmup``.

        The epoch comes from the loop's step context, so a resumed run warms up where it was.
        """
        return 1.0 if self.warmup == 0 else min((epoch + 1) / self.warmup, 1.0)

    def distill_terms(
        self,
        s_logits: Tensor,
        t_logits: Tensor,
        s_feats: list[Tensor],
        t_feats: list[Tensor],
        targets: Tensor,
        ctx: Step,
    ) -> dict[str, Tensor]:
        """``dkd_tckd`` and ``dkd_nckd``, each weighted and warmed up."""
        tckd, nckd = dkd_loss(
            s_logits.float(), t_logits.float(), targets, self.alpha, self.beta, self.T
        )
        w = self.warmup_factor(ctx.epoch)
        return {"dkd_tckd": w * tckd, "dkd_nckd": w * nckd}
