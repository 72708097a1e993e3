"""The protocol through which a compression method plugs into the one training loop.

The loop (:func:`kdexp.train.fit`) never branches on a method's name. It calls, in order:

1. ``method = Method(data=..., criterion=...)`` (the yaml is a ``_partial_``; runtime objects are
   passed at call time), then ``model = method.prepare(model)``: a method may wrap or transform the
   model (insert fake quantizers, register feature hooks, load a teacher).
2. Per step: ``method.loss(inputs, targets, logits)`` returns named loss terms; the loop sums them,
   back-propagates and logs each as ``train/loss_<name>``. After the optimizer step,
   ``method.after_step(step)`` may update masks or schedules and return metrics to log.
3. Per epoch: ``method.after_epoch(epoch)`` returns metrics to log (sparsity, for example).
4. At the end: ``method.finalize(model)`` returns the model to evaluate and save (masks folded,
   channels removed, weights converted to int8), and ``method.final_metrics()`` adds metrics.

A method that needs a trained teacher sets ``uses_teacher = True`` and takes ``teacher=`` at
construction; the run builds the teacher from the ``teacher`` config node. A method whose config
has a non-null ``distill`` key (a distillation method's config, for example pruning while
distilling) gets ``teacher=`` too. A method that starts from a trained model sets
``starts_from_trained = True``: with ``checkpoint: null`` the run then uses ``checkpoint=auto``
(reuse, or train once, a baseline of the same model, dataset, schedule and seed).
A method that cannot train alike on every rank of a torchrun job (it reads training batches to
decide masks, changes the model's shapes, or trains nothing) sets ``supports_distributed = False``
(:mod:`kdexp.distributed`).

Three hooks let a method change how it starts (fine-tuning uses all three):
``method.start_config(cfg)`` names the config whose baseline ``checkpoint=auto`` (or null, for a
``starts_from_trained`` method) trains or reuses; ``method.load_start(model, path, key)`` loads
the starting weights, before ``prepare``; ``method.param_groups(model, lr)`` may return optimizer
parameter groups (with their own ``lr``) instead of one flat list of trainable parameters.

A method is an ``nn.Module`` so that its own trainable parts (connectors, regressors, learned
quantizer scales) are optimised with the model (``method.parameters()``), move with ``.to()``, and
are saved in checkpoints (``method.state_dict()``). State that is neither a parameter nor a buffer
(a schedule's position, a Python-side counter) belongs in ``get_extra_state``/``set_extra_state``
(plain numbers, strings, lists, dicts or tensors), so that a resumed run carries it on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from torch import Tensor, nn

from kdexp.checkpoint import load_weights, read_state_dict
from kdexp.dataset.base import Data


class Method(nn.Module):
    """Plain supervised training; subclasses add loss terms and hooks.

    loss = CE(s, y), with the label smoothing set in the schedule.
    """

    supports_distributed = True  # trains with DistributedDataParallel under torchrun

    def __init__(self, *, data: Data, criterion: nn.Module) -> None:
        super().__init__()
        self.data = data
        self.criterion = criterion

    @classmethod
    def onnx_unsupported(cls, cfg: DictConfig) -> str | None:
        """Why ``export_onnx`` cannot export the final model of method config ``cfg``, or None.

        Checked before training; a method whose final model torch.onnx cannot export overrides it.
        """
        return None

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
        from kdexp.method.prune.channel import shrink_to_fit  # it imports this module

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

    def loss(self, inputs: Tensor, targets: Tensor, logits: Tensor) -> dict[str, Tensor]:
        """Named loss terms for one batch; the loop minimises their sum."""
        return {"ce": self.criterion(logits, targets)}

    def after_step(self, step: int) -> dict[str, float]:
        """Called after each optimizer step (``step`` counts from 0); returns metrics to log."""
        return {}

    def after_epoch(self, epoch: int) -> dict[str, float]:
        """Called after each epoch's validation (``epoch`` counts from 0); returns metrics."""
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
