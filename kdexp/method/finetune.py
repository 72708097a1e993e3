"""Transfer learning: fine-tune a model trained on other data, with a new classifier head."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn
from torch.utils.hooks import RemovableHandle

from kdexp.checkpoint import load_weights, read_state_dict
from kdexp.errors import ConfigError
from kdexp.method.base import Method, Needs
from kdexp.surgery import shrink_to_fit

MODES = ("full", "linear_probe")
#: Keys of ``method.source``: what the source baseline changes in this run's config.
SOURCE_KEYS = ("dataset",)


def classifier_head(model: nn.Module) -> str:
    """The name of the model's classifier head: its last ``nn.Linear`` or 1×1 ``nn.Conv2d``."""
    found = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        or (isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1))
    ]
    if not found:
        raise ConfigError(
            "method",
            "finetune",
            f"a model with a classifier head (a Linear or 1x1 Conv2d); {type(model).__name__} "
            "has none",
        )
    return found[-1]


def _stay_in_eval(module: nn.Module, args: tuple[Any, ...]) -> None:
    """Forward pre-hook: a frozen BatchNorm normalises with, and never updates, its statistics."""
    module.training = False


class Finetune(Method):
    """Fine-tuning from a source model (Yosinski et al. 2014; Kornblith et al. 2019).

    loss = CE(s, y). The source's weights are loaded except for the classifier head (the model's
    last Linear or 1×1 conv), which stays freshly initialised for the target classes; only its
    output dimension may differ from the source's. ``mode=full`` trains every layer, the backbone
    at ``backbone_lr_scale`` × lr and the head at lr; ``mode=linear_probe`` trains only the head
    (the backbone's parameters frozen, its BatchNorm statistics too). ``freeze_bn`` keeps every
    BatchNorm layer in eval mode: it normalises with the source's running statistics and never
    updates them (its affine weights still train in ``full`` mode).

    The source is ``checkpoint=<path | run id | runs:/...>``; with ``checkpoint: null``,
    ``source`` (``{dataset: {...}}``) names the source data and ``checkpoint=auto`` reuses, or
    trains once, a baseline of this model on it. The source's ``dataset`` is merged into the
    run's own (replacing it when it names a ``_target_``), with ``train_limit`` reset to null
    unless the source sets it: a label budget is the target's.
    """

    def __init__(
        self,
        *,
        mode: str = "full",
        freeze_bn: bool = False,
        backbone_lr_scale: float = 1.0,
        transfer: list[str] | None = None,
        source: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if mode not in MODES:
            raise ConfigError("method.mode", mode, "one of " + ", ".join(MODES))
        if not isinstance(freeze_bn, bool):
            raise ConfigError("method.freeze_bn", freeze_bn, "true or false")
        if (
            isinstance(backbone_lr_scale, bool)
            or not isinstance(backbone_lr_scale, (int, float))
            or backbone_lr_scale < 0
        ):
            raise ConfigError("method.backbone_lr_scale", backbone_lr_scale, "a number >= 0")
        if transfer is not None:
            transfer = list(transfer)
            if not transfer or not all(isinstance(t, str) and t for t in transfer):
                raise ConfigError(
                    "method.transfer", transfer, "null or a list of module names (e.g. [features])"
                )
        if isinstance(source, DictConfig):
            source = OmegaConf.to_container(source, resolve=True)  # type: ignore[assignment]
        if source is not None and (
            not isinstance(source, Mapping) or set(source) - set(SOURCE_KEYS) or not source
        ):
            raise ConfigError(
                "method.source", source, "null or a mapping with key(s) " + ", ".join(SOURCE_KEYS)
            )
        super().__init__(**kwargs)
        self.mode, self.freeze_bn = mode, freeze_bn
        self.backbone_lr_scale = float(backbone_lr_scale)
        self.source = dict(source) if source is not None else None
        self.transfer = transfer
        self.head: str | None = None
        self.transferred: set[str] | None = None  # the tensors taken from the source
        self._hooks: list[RemovableHandle] = []

    @classmethod
    def needs(cls, cfg: DictConfig) -> Needs:
        """A trained source model (and a teacher with a distill component)."""
        return replace(super().needs(cfg), trained_start=True)

    def start_config(self, cfg: DictConfig) -> DictConfig | None:
        """The config of the source baseline: ``cfg`` with ``source``'s dataset in place."""
        if cfg.get("checkpoint") == "auto" and self.source is None:
            return cfg  # asked for explicitly: a baseline of this very model and dataset
        if self.source is None:
            if OmegaConf.select(cfg, "model.weights") is not None:
                return None  # the model config loads pretrained weights itself
            raise ConfigError(
                "checkpoint",
                None,
                "the source model to fine-tune: a checkpoint path, an MLflow run id or "
                "runs:/<id>; or set method.source.dataset (e.g. method.source.dataset.classes="
                "[0,1,2,3,4] method.source.dataset.num_classes=5) to train or reuse a baseline "
                "on the source data. Fine-tuning needs a source, not this dataset's own baseline",
            )
        sub = OmegaConf.create(OmegaConf.to_container(cfg))
        assert isinstance(sub, DictConfig)
        dataset = self.source.get("dataset") or {}
        with open_dict(sub):
            if "_target_" in dataset:
                sub.dataset = dataset
            else:
                sub.dataset = OmegaConf.merge(sub.dataset, {"train_limit": None}, dataset)
        return sub

    def load_start(self, model: nn.Module, path: Path, key: str) -> None:
        """Load every tensor of ``path`` except the classifier head's; any other misfit fails.

        With ``transfer`` (module names, e.g. ``[features]``) only the tensors under those modules
        are taken; the other layers start fresh and train at the head's lr (Yosinski et al. 2014:
        the first layers' features are general, the last ones specific to the source's classes).

        A channel-pruned source first shrinks ``model`` to its widths (the head's inputs too). The
        file may hold a head for any class count (a torchvision ImageNet state_dict) or none (a
        bare backbone); a file of another architecture fails on its backbone keys.
        """
        head = classifier_head(model)
        state = read_state_dict(path, key)
        names = list(model.state_dict())
        taken: tuple[str, ...] = ("",)  # every tensor, by default
        if self.transfer is not None:
            taken = tuple(prefix + "." for prefix in self.transfer)
            if not all(any(k.startswith(prefix) for k in names) for prefix in taken):
                modules = sorted({k.rsplit(".", 1)[0] for k in names})
                raise ConfigError(
                    self.key_of("transfer"),
                    self.transfer,
                    f"module names of {type(model).__name__} (or their parents): "
                    + ", ".join(modules),
                )
        skip = [k for k in names if k.startswith(head + ".") or not k.startswith(taken)]
        self.transferred = {k for k in names if k not in skip}
        shrink_to_fit(model, state, self.data.input_shape, skip)
        for name in skip:
            own = model.state_dict()[name]
            found = state.get(name)
            if found is not None and found.shape[1:] != own.shape[1:]:
                shape = str(tuple(found.shape))
                raise ConfigError(
                    key,
                    str(path),
                    f"weights of this model ({type(model).__name__}) up to its classifier head "
                    f"{head}; its {name} is {shape} there, {tuple(own.shape)} here (only the "
                    "class count may differ)",
                )
        load_weights(model, path, key, skip=skip)

    def prepare(self, model: nn.Module) -> nn.Module:
        """Find the head; freeze the backbone (linear probe) and the BatchNorm statistics."""
        self.head = classifier_head(model)
        fresh = self._fresh(model)
        if self.mode == "linear_probe":
            for p in model.parameters():
                if id(p) not in fresh:
                    p.requires_grad_(False)
        if self.freeze_bn or self.mode == "linear_probe":
            for module in model.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    self._hooks.append(module.register_forward_pre_hook(_stay_in_eval))
        return model

    def param_groups(self, model: nn.Module, lr: float) -> list[dict[str, Any]] | None:
        """The backbone at ``backbone_lr_scale`` × lr, the head (and this method) at lr."""
        if self.head is None:
            raise RuntimeError("Finetune.param_groups before prepare")
        head = self._fresh(model)
        trainable = [p for p in model.parameters() if p.requires_grad]
        backbone = [p for p in trainable if id(p) not in head]
        top = [p for p in trainable if id(p) in head] + [
            p for p in self.parameters() if p.requires_grad
        ]
        groups = [{"params": top, "lr": lr, "name": "head"}]
        if backbone:
            groups.insert(
                0, {"params": backbone, "lr": lr * self.backbone_lr_scale, "name": "backbone"}
            )
        return groups

    def _fresh(self, model: nn.Module) -> set[int]:
        """ids of the parameters not taken from the source: the head's, and with ``transfer``
        every layer outside it. They train at lr, and in a linear probe they are what trains."""
        assert self.head is not None
        fresh = {id(p) for p in model.get_submodule(self.head).parameters()}
        if self.transferred is not None:
            fresh |= {id(p) for n, p in model.named_parameters() if n not in self.transferred}
        return fresh

    def finalize(self, model: nn.Module) -> nn.Module:
        """Drop the BatchNorm hooks: the saved model is a plain one."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        return model
