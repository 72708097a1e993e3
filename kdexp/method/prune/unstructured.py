"""Unstructured pruning: individual weights of Conv/Linear layers are zeroed by a criterion.

The k = round(s·N) lowest-scored weights are pruned, over all prunable layers together
(``scope: global``, one threshold, as ``torch.nn.utils.prune.global_unstructured``) or in each
layer separately (``scope: layerwise``, the same ratio everywhere). Weights pruned at one update
stay pruned at the next (their score counts as −∞). The masks are plain tensors held by the method
and multiplied into the weights after every optimizer step, so the saved model is an ordinary
state_dict of the same architecture with exact zeros.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, cast

import torch
from omegaconf import DictConfig
from torch import Tensor, nn
from torch.nn.utils import prune as torch_prune

from kdexp.errors import ConfigError
from kdexp.method.base import Needs, Step
from kdexp.method.prune.base import Pruner, select_layers


def _weight(module: nn.Module) -> Tensor:
    return cast(Tensor, module.weight)


class Unstructured(Pruner):
    """Base of the unstructured criteria; subclasses define :meth:`scores`."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.targets: dict[str, nn.Module] = {}
        self.masks: dict[str, Tensor] = {}

    def setup(self, model: nn.Module) -> None:
        self.targets = select_layers(model, self.layers, self.keep_first, self.keep_last)
        self.masks = {
            name: torch.ones_like(_weight(m), dtype=torch.bool) for name, m in self.targets.items()
        }

    def scores(self) -> dict[str, Tensor]:
        """Importance of every weight of every prunable layer (higher is kept)."""
        raise NotImplementedError

    def mask_state(self) -> dict[str, Any]:
        return {name: mask.clone() for name, mask in self.masks.items()}

    def load_mask_state(self, state: dict[str, Any]) -> None:
        for name, mask in state.items():
            self.masks[name] = mask.to(self.masks[name].device)

    @torch.no_grad()
    def update(self, target: float) -> dict[str, float]:
        scores = {
            name: s.detach().float().masked_fill(~self.masks[name], float("-inf"))
            for name, s in self.scores().items()
        }
        if self.scope == "global":
            flat = torch.cat([s.reshape(-1) for s in scores.values()])
            k = round(target * flat.numel())
            keep = torch.ones_like(flat, dtype=torch.bool)
            if k:
                keep[torch.topk(flat, k, largest=False).indices] = False
            sizes = [s.numel() for s in scores.values()]
            for name, chunk in zip(scores, keep.split(sizes), strict=True):
                self.masks[name] = chunk.view_as(scores[name])
        else:
            for name, s in scores.items():
                k = round(target * s.numel())
                keep = torch.ones(s.numel(), dtype=torch.bool, device=s.device)
                if k:
                    keep[torch.topk(s.reshape(-1), k, largest=False).indices] = False
                self.masks[name] = keep.view_as(s)
        return self.sparsities()

    def sparsities(self) -> dict[str, float]:
        """Fraction of each layer's weights pruned, and of all of them (key ``""``)."""
        pruned = {n: int((~m).sum()) for n, m in self.masks.items()}
        total = sum(m.numel() for m in self.masks.values())
        out = {n: pruned[n] / self.masks[n].numel() for n in self.masks}
        out[""] = sum(pruned.values()) / max(total, 1)
        return out

    def apply_masks(self) -> None:
        for name, module in self.targets.items():
            _weight(module).data.mul_(self.masks[name])

    def finalize(self, model: nn.Module) -> nn.Module:
        """Masks folded into the weights: the same architecture with exact zeros."""
        model = super().finalize(model)
        for module in model.modules():  # folds torch.nn.utils.prune reparametrisations, if any
            buffers = dict(module.named_buffers(recurse=False))
            for param, _ in list(module.named_parameters(recurse=False)):
                name = param.removesuffix("_orig")
                if param.endswith("_orig") and f"{name}_mask" in buffers:
                    torch_prune.remove(module, name)
        return model

    def csv_columns(self) -> list[str]:
        return ["params", "nonzero", "sparsity"]

    def csv_row(self, name: str) -> list[Any]:
        mask = self.masks[name]
        return [mask.numel(), int(mask.sum()), f"{self.layer_sparsity[name]:.6f}"]


class Magnitude(Unstructured):
    """Han, Pool, Tran & Dally 2015, "Learning both Weights and Connections for Efficient Neural
    Networks": prune the weights of smallest |w|."""

    def scores(self) -> dict[str, Tensor]:
        return {n: _weight(m).abs() for n, m in self.targets.items()}


class Random(Magnitude):
    """Control: prune weights chosen uniformly at random (from the run's seeded RNG)."""

    def scores(self) -> dict[str, Tensor]:
        return {n: torch.rand_like(_weight(m)) for n, m in self.targets.items()}


class Sensitivity(Unstructured):
    """First-order sensitivity: prune the weights of smallest Σ_b |∂L_b/∂w| over
    ``calibration_batches`` training batches (LeCun et al. 1990 / Mozer & Smolensky 1989, the
    first-order term)."""

    @classmethod
    def needs(cls, cfg: DictConfig) -> Needs:
        """Single-process only: under torchrun each rank would score its own slice of batches."""
        return replace(super().needs(cfg), distributed=False)

    def _accumulated(self, taylor: bool) -> dict[str, Tensor]:
        weights = {n: _weight(m) for n, m in self.targets.items()}
        acc = {n: torch.zeros_like(w) for n, w in weights.items()}

        def add() -> None:
            for n, w in weights.items():
                if w.grad is not None:
                    acc[n] += (w.grad * w).abs() if taylor else w.grad.abs()

        self.calibration_gradients(add)
        return acc

    def scores(self) -> dict[str, Tensor]:
        return self._accumulated(taylor=False)


class Taylor(Sensitivity):
    """Molchanov, Tyree, Karras, Aila & Kautz 2017, "Pruning Convolutional Neural Networks for
    Resource Efficient Inference": the first-order Taylor estimate of the loss change when a weight
    is removed, Σ_b |w · ∂L_b/∂w| over ``calibration_batches`` training batches."""

    def scores(self) -> dict[str, Tensor]:
        return self._accumulated(taylor=True)


class L1Regularization(Magnitude):
    """λ·Σ|w| over the prunable weights is added to the loss (term ``reg``) so that training
    drives unimportant weights towards zero; the small ones are then pruned by magnitude on the
    schedule (Han et al. 2015 compare L1 and L2 regularisation before pruning)."""

    def __init__(self, *, l1: float = 1e-5, **kwargs: Any) -> None:
        if not l1 >= 0:
            raise ConfigError("method.l1", l1, "a non-negative weight")
        super().__init__(**kwargs)
        self.l1 = l1

    def loss(self, inputs: Tensor, targets: Tensor, logits: Tensor, ctx: Step) -> dict[str, Tensor]:
        """CE (or the distill component's terms) plus ``reg``: λ·Σ|w|."""
        total = torch.stack([_weight(m).abs().sum() for m in self.targets.values()]).sum()
        return {**super().loss(inputs, targets, logits, ctx), "reg": self.l1 * total}
