"""Soft-label knowledge distillation."""

from __future__ import annotations

from typing import Any

from kdexp.errors import ConfigError
from kdexp.method.distill.base import Distiller


class KD(Distiller):
    """Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network".

    loss = α·T²·KL(softmax(t/T) ‖ softmax(s/T)) + (1−α)·CE(s, y), the KL averaged over the batch.
    """

    def __init__(self, *, alpha: float = 0.9, T: float = 4.0, **kwargs: Any) -> None:
        if not 0 <= alpha <= 1:  # checked first: the base class would name 1 - alpha
            key = kwargs.get("key", "method")
            raise ConfigError(f"{key}.alpha", alpha, "a weight in [0, 1]")
        super().__init__(T=T, ce_weight=1 - alpha, kd_weight=alpha, **kwargs)
