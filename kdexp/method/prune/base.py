"""What every pruning method shares: the schedule of mask updates, the choice of prunable layers,
re-applying masks after each optimizer step, the dense model's statistics, and the sparsity metrics
and artifacts. Pruning while distilling is the base class's distill component
(:class:`kdexp.method.base.Method`): nothing here forwards to it.

A method subclasses :class:`Pruner` and implements

- ``setup(model)``: find its prunable units (weights, channel groups) once, before training;
- ``update(target)``: recompute its masks for the target sparsity and return the per-layer
  sparsities (fractions of weights or channels removed), ``""`` keyed to the global one;
- ``apply_masks()``: zero what is pruned (called after every optimizer step);
- and, if it shrinks the model, ``finalize``.
"""

from __future__ import annotations

import copy
import csv
import logging
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from kdexp.dataset.base import Data
from kdexp.errors import ConfigError
from kdexp.features import describe_modules
from kdexp.method.base import Method, Needs, Step
from kdexp.method.prune.schedule import LEGACY_KNOBS, Schedule, build_schedule
from kdexp.stats import count_params, flops, latency_ms
from kdexp.surgery import PRUNABLE

log = logging.getLogger(__name__)

SCOPES = ("global", "layerwise")


def select_layers(
    model: nn.Module,
    layers: Sequence[str] | None,
    keep_first: bool,
    keep_last: bool,
) -> dict[str, nn.Module]:
    """The prunable Conv/Linear modules by path: ``layers`` if given, else all of them minus the
    first (``keep_first``) and the last, the classifier (``keep_last``)."""
    modules = dict(model.named_modules())
    if layers is not None:
        chosen = {}
        for path in layers:
            if not path or path not in modules:
                raise ConfigError(
                    "method.layers",
                    path,
                    f"a module path of {type(model).__name__}: "
                    + describe_modules(model, penultimate=False),
                )
            if not isinstance(modules[path], PRUNABLE):
                prunable = [n for n, m in modules.items() if isinstance(m, PRUNABLE)]
                raise ConfigError(
                    "method.layers",
                    path,
                    f"a Conv or Linear module ({path} is {type(modules[path]).__name__}): "
                    + ", ".join(prunable),
                )
            chosen[path] = modules[path]
        return chosen
    found = [(n, m) for n, m in modules.items() if n and isinstance(m, PRUNABLE)]
    if keep_first:
        found = found[1:]
    if keep_last:
        found = found[:-1]
    if not found:
        raise ConfigError("method.layers", layers, "a model with a Conv or Linear layer to prune")
    return dict(found)


class Pruner(Method):
    """Base of the pruning methods: loss = CE (or the distill component's terms) + the method's
    terms.

    Masks are updated at the steps of the schedule and re-applied after every optimizer step, so
    pruned weights stay exactly zero while the rest is fine-tuned.
    """

    def __init__(
        self,
        *,
        data: Data,
        criterion: nn.Module,
        sparsity: float,
        epochs: int,
        schedule: str | Schedule = "oneshot",  # a name in conf/method/prune/schedule/ or a Schedule
        scope: str = "global",
        keep_first: bool = False,
        keep_last: bool = False,
        layers: Sequence[str] | None = None,
        calibration_batches: int = 8,
        key: str = "method",
        distill: Callable[..., Method] | None = None,
        teacher: nn.Module | None = None,
        # Deprecated flat knobs: set on the schedule (method.schedule.frequency=...) with a warning.
        initial_sparsity: float | None = None,
        start_epoch: int | None = None,
        frequency: int | None = None,
        updates: int | None = None,
        rounds: int | None = None,
        epochs_per_round: int | None = None,
    ) -> None:
        super().__init__(data=data, criterion=criterion, key=key, distill=distill, teacher=teacher)
        if isinstance(sparsity, bool) or not isinstance(sparsity, int | float):
            raise ConfigError("method.sparsity", sparsity, "a fraction in [0, 1)")
        if not 0 <= sparsity < 1:
            raise ConfigError("method.sparsity", sparsity, "a fraction in [0, 1)")
        if scope not in SCOPES:
            raise ConfigError("method.scope", scope, "one of " + ", ".join(SCOPES))
        if not isinstance(calibration_batches, int) or calibration_batches < 1:
            raise ConfigError("method.calibration_batches", calibration_batches, "a positive int")
        if not isinstance(epochs, int) or epochs < 1:
            raise ConfigError("method.epochs", epochs, "a positive integer (${schedule.epochs})")
        steps_per_epoch = len(data.train)  # type: ignore[arg-type]
        legacy = dict(
            initial_sparsity=initial_sparsity,
            start_epoch=start_epoch,
            frequency=frequency,
            updates=updates,
            rounds=rounds,
            epochs_per_round=epochs_per_round,
        )
        assert set(legacy) == set(LEGACY_KNOBS)
        self.schedule = build_schedule(schedule, legacy)
        self.sparsity, self.scope = float(sparsity), scope
        self.keep_first, self.keep_last = keep_first, keep_last
        self.layers = list(layers) if layers is not None else None
        self.calibration_batches = calibration_batches
        self.plan = self.schedule.plan(
            float(sparsity),
            total_steps=epochs * steps_per_epoch,
            steps_per_epoch=steps_per_epoch,
            epochs=epochs,
        )
        self._updates = dict(self.plan)
        self.curve: list[tuple[int, float, float]] = []  # (step, target, reached)
        self.layer_sparsity: dict[str, float] = {}
        self.rounds_done = 0
        self._dense: nn.Module | None = None

    @classmethod
    def needs(cls, cfg: DictConfig) -> Needs:
        """A trained model to start from (and a teacher with a distill component)."""
        return replace(super().needs(cfg), trained_start=True)

    # -- for subclasses -----------------------------------------------------------------------
    def setup(self, model: nn.Module) -> None:
        """Find the prunable units of ``model``; raise ConfigError for bad layer choices."""
        raise NotImplementedError

    def update(self, target: float) -> dict[str, float]:
        """New masks for ``target``; the sparsity reached per layer and globally (key ``""``)."""
        raise NotImplementedError

    def apply_masks(self) -> None:
        """Zero what is pruned."""
        raise NotImplementedError

    @property
    def model(self) -> nn.Module:
        model = self.__dict__.get("_model")
        if model is None:
            raise RuntimeError("prepare(model) has not been called")
        return model

    # -- the Method protocol ------------------------------------------------------------------
    def prepare(self, model: nn.Module) -> nn.Module:
        """Keep a CPU copy of the dense model and choose the prunable layers."""
        # A plain attribute, not a submodule: not trained, not moved, not in method.parameters().
        self.__dict__["_dense"] = copy.deepcopy(model).cpu().eval().requires_grad_(False)
        # Kept out of the method's submodules: its parameters belong to the model.
        self.__dict__["_model"] = model
        self.setup(model)
        return model

    def after_step(self, ctx: Step) -> dict[str, float]:
        """Update the masks at the schedule's steps (returning the sparsities); re-apply them."""
        target = self._updates.get(ctx.step)
        if target is None:
            with torch.no_grad():
                self.apply_masks()
            return {}
        reached = self.update(target)
        with torch.no_grad():
            self.apply_masks()
        self.layer_sparsity = {k: v for k, v in reached.items() if k}
        self.curve.append((ctx.step, target, reached[""]))
        self.rounds_done += 1
        metrics = {
            "sparsity/global": reached[""],
            "sparsity/target": target,
            **{f"sparsity/{k}": v for k, v in self.layer_sparsity.items()},
        }
        if self.schedule.counts_rounds:
            metrics["prune/round"] = self.rounds_done
            log.info("pruning round %d: sparsity %.4f", self.rounds_done, reached[""])
        return metrics

    def get_extra_state(self) -> dict[str, Any]:
        """The schedule's position and the masks, saved in ``method.state_dict()`` (resume)."""
        return {
            "rounds_done": self.rounds_done,
            "curve": [list(point) for point in self.curve],
            "layer_sparsity": dict(self.layer_sparsity),
            "masks": self.mask_state(),
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`get_extra_state` saved; call after :meth:`prepare`."""
        self.rounds_done = int(state["rounds_done"])
        self.curve = [(int(s), float(t), float(r)) for s, t, r in state["curve"]]
        self.layer_sparsity = dict(state["layer_sparsity"])
        self.load_mask_state(state["masks"])

    def mask_state(self) -> dict[str, Any]:
        """What is pruned, as tensors, numbers and lists; subclasses override."""
        return {}

    def load_mask_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`mask_state` returned."""

    def selects_best(self) -> bool:
        """Only epochs after the last mask update compete for ``best.pt``: an earlier, denser
        epoch's weights were never fine-tuned under the final masks."""
        return self.rounds_done >= len(self.plan)

    def finalize(self, model: nn.Module) -> nn.Module:
        """Apply the final masks (also to best-epoch weights reloaded by ``test_on=best``)."""
        with torch.no_grad():
            self.apply_masks()
        return model

    def final_metrics(self) -> dict[str, float]:
        """``model/dense_{params,flops,latency_ms}`` of the starting model, the final sparsity."""
        metrics: dict[str, float] = {}
        if self._dense is not None:
            self._dense.eval()
            one = torch.randn(1, *self.data.input_shape)
            metrics.update(
                {
                    "model/dense_params": count_params(self._dense)[0],
                    "model/dense_flops": flops(self._dense, one),
                    "model/dense_latency_ms": latency_ms(self._dense, one),
                }
            )
        if self.curve:
            metrics["prune/final_sparsity"] = self.curve[-1][2]
        return metrics

    def write_artifacts(self, folder: Path) -> list[Path]:
        """``sparsity_curve.png``, ``layer_sparsity.png`` and ``layer_sparsity.csv``."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        fig, ax = plt.subplots(figsize=(5, 3.5))
        steps = [c[0] for c in self.curve]
        ax.plot(steps, [c[1] for c in self.curve], "o--", label="target")
        ax.plot(steps, [c[2] for c in self.curve], ".-", label="reached")
        ax.set(xlabel="step", ylabel="sparsity", title=f"{self.schedule.name} schedule")
        ax.legend()
        fig.tight_layout()
        paths.append(folder / "sparsity_curve.png")
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)

        names = list(self.layer_sparsity)
        fig, ax = plt.subplots(figsize=(max(5, 0.35 * len(names) + 2), 3.8))
        ax.bar(range(len(names)), [self.layer_sparsity[n] for n in names])
        ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
        ax.set(ylabel="sparsity", ylim=(0, 1), title="per-layer sparsity")
        fig.tight_layout()
        paths.append(folder / "layer_sparsity.png")
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)

        paths.append(folder / "layer_sparsity.csv")
        with paths[-1].open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["layer", *self.csv_columns()])
            for name in names:
                writer.writerow([name, *self.csv_row(name)])
        return paths

    def csv_columns(self) -> list[str]:
        return ["sparsity"]

    def csv_row(self, name: str) -> list[Any]:
        return [f"{self.layer_sparsity[name]:.6f}"]

    # -- helpers ------------------------------------------------------------------------------
    def calibration_gradients(self, accumulate: Callable[[], None]) -> None:
        """Forward and backward ``calibration_batches`` training batches (plain CE, eval mode so
        that BatchNorm statistics stay put); ``accumulate`` reads the gradients after each."""
        model = self.model
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        for p in model.parameters():
            p.grad = None
        for i, (inputs, targets) in enumerate(self.data.train):
            if i >= self.calibration_batches:
                break
            with torch.enable_grad():
                loss = self.criterion(model(inputs.to(device)), targets.to(device))
                loss.backward()
            accumulate()
            for p in model.parameters():
                p.grad = None
        model.train(was_training)
