"""The contract between a run and its compression method.

A method is a :class:`Method`: an ``nn.Module`` whose yaml (``conf/method/...``) is a ``_partial_``
that the run completes with the runtime objects (``data=``, ``criterion=``, and ``teacher=`` when it
distils). The run and the loop know a method through three things only:

1. **What it needs**, declared once as a :class:`Needs` value by the class method
   :meth:`Method.needs` (a teacher, trained starting weights, whether it trains in the loop, whether
   it runs under torchrun, the export forms it cannot give). ``kdexp.run``, ``kdexp.pipeline`` and
   ``kdexp.pretrained`` read nothing else about a method: no attribute probes, no class checks.
2. **Hooks** that a method overrides, each given a :class:`Step` context where it runs inside the
   loop (epoch, global step, the batch's sample indices):

   - ``prepare(model) -> model`` once before the optimizer is built (wrap layers, find what to
     prune);
   - ``loss(inputs, targets, logits, ctx) -> {name: term}``: the loop sums the terms,
     back-propagates and logs each as ``train/loss_<name>``;
   - ``after_step(ctx) -> metrics`` after each optimizer step (mask updates, schedules);
   - ``after_epoch(ctx) -> metrics`` after each epoch's validation;
   - ``finalize(model) -> model`` at the end (fold masks, shrink, convert to int8);
   - ``final_metrics()`` and ``write_artifacts(folder)`` for what it logs once.

   Three more change how it starts (fine-tuning uses them): ``start_config``, ``load_start`` and
   ``param_groups``; ``selects_best`` lets pruning keep denser epochs out of ``best.pt``.
3. **One distillation component** (:attr:`Method.distill`), held by composition: any method whose
   config has ``distill: <a distillation config>`` (``+method/distill@method.distill=kd``) gets a
   distiller built with the teacher, and the run calls it through the same code path for every
   method (:meth:`Method.begin`, :meth:`Method.step_done`, ...). Its loss replaces the plain
   cross-entropy of :meth:`Method.loss`; its hooks run after the method's own. A method never
   forwards a hook to it by hand.

State a method needs after a resume lives in its ``state_dict`` by construction: parameters, buffers
and what ``get_extra_state`` returns. What changes with the loop's position (a warm-up's factor, a
schedule's step) is read from the :class:`Step` context, never counted on the side.

Config keys in error messages are named where the method sits: :meth:`Method.key_of` gives
``method.T`` for a distillation method and ``method.distill.T`` for the same distiller held by a
pruning method.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.utils import get_class, instantiate
from omegaconf import DictConfig
from torch import Tensor, nn

from kdexp.checkpoint import load_weights, read_state_dict
from kdexp.dataset.base import Data
from kdexp.errors import ConfigError
from kdexp.surgery import shrink_to_fit

#: What the run passes a method at call time (``key`` names where its config sits): never a key
#: of its yaml.
RUNTIME_ARGS = ("data", "criterion", "teacher", "key")


@dataclass(frozen=True)
class Needs:
    """What a method needs from the run, declared once by :meth:`Method.needs`.

    - ``teacher``: a trained teacher (``model@teacher=...``), passed to the method as ``teacher=``.
    - ``trained_start``: it starts from trained weights; ``checkpoint: null`` then means ``auto``
      (reuse, or train once, a baseline of the same model, data, schedule and seed).
    - ``trains``: it trains in the loop. A method that does not (post-training quantization) is
      evaluated once on the validation split and then finalized: no optimizer, no epochs.
    - ``distributed``: it trains alike on every rank of a torchrun job.
    - ``is_baseline``: its final model is plain supervised training from scratch, the run that
      ``teacher_checkpoint=auto`` and ``checkpoint=auto`` reuse.
    - ``cannot_export``: export form (``"onnx"``) → why this method's final model cannot be
      exported to it; a form not listed can be.
    """

    teacher: bool = False
    trained_start: bool = False
    trains: bool = True
    distributed: bool = True
    is_baseline: bool = False
    cannot_export: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Step:
    """Where the loop stands, handed to every hook that runs inside it.

    ``epoch`` and ``step`` count from 0 (``step`` is the global optimizer step, the x axis of every
    per-step metric); ``batch`` is the batch's index within its epoch. ``rows`` holds the indices of
    the batch's samples in the training split where the loader knows them (the in-memory loader
    does), else None. ``epochs`` and ``steps_per_epoch`` give the run's length. After a resume the
    loop hands the same values as an uninterrupted run would at that step.
    """

    epoch: int
    step: int
    batch: int = 0
    rows: Tensor | None = None
    epochs: int = 1
    steps_per_epoch: int = 1


def needs_of(cfg: DictConfig) -> Needs:
    """The :class:`Needs` of the method that config node ``cfg`` (a ``method`` node) builds."""
    method_class = get_class(cfg._target_)
    if not (isinstance(method_class, type) and issubclass(method_class, Method)):
        raise ConfigError("method._target_", cfg._target_, "a subclass of kdexp.method.base.Method")
    return method_class.needs(cfg)


class Method(nn.Module):
    """Plain supervised training; subclasses add loss terms and hooks.

    loss = CE(s, y), with the label smoothing set in the schedule; or, with a ``distill``
    component, that component's terms.
    """

    def __init__(
        self,
        *,
        data: Data,
        criterion: nn.Module,
        key: str = "method",
        distill: Callable[..., Method] | None = None,
        teacher: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.data = data
        self.criterion = criterion
        self.key = key  # where this method's config sits, for error messages
        self.distill: Method | None = None
        if distill is not None:
            if teacher is None:  # the run passes one whenever needs().teacher
                raise TypeError("a method with a distill component needs teacher=")
            if isinstance(distill, DictConfig):  # under a method config with _recursive_: false
                distill = instantiate(distill)
            self.distill = distill(
                data=data, criterion=criterion, teacher=teacher, key=f"{key}.distill"
            )

    def key_of(self, name: str) -> str:
        """The full config key of this method's setting ``name`` (``method.distill.T``)."""
        return f"{self.key}.{name}"

    # -- what the run reads -------------------------------------------------------------------
    @classmethod
    def needs(cls, cfg: DictConfig) -> Needs:
        """What a method of this class, configured by its config node ``cfg``, needs.

        The base: a teacher exactly when ``cfg`` holds a ``distill`` component. Subclasses return
        ``dataclasses.replace(super().needs(cfg), ...)`` with what they add.
        """
        return Needs(teacher=cfg.get("distill") is not None)

    # -- the one code path the run and the loop call: the method, then its distill component ----
    def begin(self, model: nn.Module) -> nn.Module:
        """:meth:`prepare` of the method, then of its distill component, whose student the
        prepared model is."""
        model = self.prepare(model)
        return self.distill.prepare(model) if self.distill is not None else model

    def step_done(self, ctx: Step) -> dict[str, float]:
        """After each optimizer step: the metrics of the method's and the component's hooks."""
        extra = self.distill.after_step(ctx) if self.distill is not None else {}
        return {**self.after_step(ctx), **extra}

    def epoch_done(self, ctx: Step) -> dict[str, float]:
        """After each epoch's validation: both hooks' metrics."""
        extra = self.distill.after_epoch(ctx) if self.distill is not None else {}
        return {**self.after_epoch(ctx), **extra}

    def end(self, model: nn.Module) -> nn.Module:
        """The final model: the component's :meth:`finalize` (which drops its hooks), then the
        method's."""
        if self.distill is not None:
            model = self.distill.finalize(model)
        return self.finalize(model)

    def summary(self) -> dict[str, float]:
        """The final metrics of the method and of its component."""
        extra = self.distill.final_metrics() if self.distill is not None else {}
        return {**self.final_metrics(), **extra}

    def artifacts(self, folder: Path) -> list[Path]:
        """The artifacts of the method and of its component."""
        paths = self.write_artifacts(folder)
        return paths + (self.distill.write_artifacts(folder) if self.distill is not None else [])

    # -- hooks for subclasses -----------------------------------------------------------------
    def start_config(self, cfg: DictConfig) -> DictConfig | None:
        """The run config whose baseline ``checkpoint=auto`` trains or reuses: ``cfg`` itself.

        None means there is nothing to load (the model config brought its own weights).
        """
        return cfg

    def load_start(self, model: nn.Module, path: Path, key: str) -> None:
        """Load the starting weights in ``path`` (named by config key ``key``) into ``model``.

        A channel-pruned checkpoint of this model (the same entries, narrower channels) first
        shrinks ``model``, in place, to its widths; any other misfit is a ConfigError.
        """
        shrink_to_fit(model, read_state_dict(path, key), self.data.input_shape)
        load_weights(model, path, key)

    def param_groups(self, model: nn.Module, lr: float) -> list[dict[str, Any]] | None:
        """Optimizer parameter groups for the prepared ``model`` and this method, or None.

        None (the default) trains every parameter of both that requires grad at ``lr``.
        """
        return None

    def prepare(self, model: nn.Module) -> nn.Module:
        """Return the model to train; called once before the optimizer is built."""
        return model

    def loss(self, inputs: Tensor, targets: Tensor, logits: Tensor, ctx: Step) -> dict[str, Tensor]:
        """Named loss terms for one batch; the loop minimises their sum.

        Cross-entropy, or the distill component's terms where the method holds one.
        """
        if self.distill is not None:
            return self.distill.loss(inputs, targets, logits, ctx)
        return {"ce": self.criterion(logits, targets)}

    def after_step(self, ctx: Step) -> dict[str, float]:
        """Called after each optimizer step (``ctx.step`` counts from 0); returns metrics to log."""
        return {}

    def after_epoch(self, ctx: Step) -> dict[str, float]:
        """Called after epoch ``ctx.epoch``'s validation (counting from 0); returns metrics."""
        return {}

    def finalize(self, model: nn.Module) -> nn.Module:
        """Return the final model after training (fold masks, shrink, convert)."""
        return model

    def selects_best(self) -> bool:
        """Whether this epoch may become ``best.pt``; pruning waits for its final masks."""
        return True

    def final_metrics(self) -> dict[str, float]:
        """Metrics the method logs once at the end of the run."""
        return {}

    def write_artifacts(self, folder: Path) -> list[Path]:
        """Write the method's own artifacts (plots, CSV) under ``folder``; return their paths."""
        return []
