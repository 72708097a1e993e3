"""What every distillation method shares: the frozen teacher, feature taps, the CE and KD terms,
cached teacher outputs, connectors, and the validation metrics comparing student with teacher.

A method subclasses :class:`Distiller` and overrides

- ``distill_terms(s_logits, t_logits, s_feats, t_feats, targets) -> dict[str, Tensor]``: its own
  weighted loss terms (the CE and KD terms are added by the base class), and, if it needs them,
- ``build_connectors(s_shapes, t_shapes)``: modules that bridge feature shapes (a 1×1 conv, a
  linear head), built from one dry forward pass before training. They are trained with the
  student (they are parameters of the method) and are not part of the saved student.

Features come from ``student_layers`` and ``teacher_layers``: module paths captured with forward
hooks (:class:`kdexp.features.FeatureTap`); ``penultimate`` is the classifier's input.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor, nn

from kdexp.dataset.base import Data, TensorLoader
from kdexp.errors import ConfigError
from kdexp.features import FeatureTap
from kdexp.method.base import Method, Needs, Step


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


def kd_loss(s_logits: Tensor, t_logits: Tensor, T: float) -> Tensor:
    """T² · KL(softmax(t/T) ‖ softmax(s/T)), averaged over the batch (Hinton et al. 2015)."""
    log_s = F.log_softmax(s_logits / T, dim=1)
    log_t = F.log_softmax(t_logits / T, dim=1)
    return F.kl_div(log_s, log_t, reduction="batchmean", log_target=True) * T * T


class Distiller(Method):
    """Base of the distillation methods: loss = ce_weight·CE + kd_weight·KD_T + method terms.

    A distiller is a method of its own (``method=distill/kd``) or the distill component of another
    method (``+method/distill@method.distill=kd``: pruning or quantization while distilling).
    """

    teacher: nn.Module

    def __init__(
        self,
        *,
        data: Data,
        criterion: nn.Module,
        teacher: nn.Module,
        key: str = "method",
        T: float = 4.0,
        ce_weight: float = 1.0,
        kd_weight: float = 0.0,
        student_layers: Sequence[str] = (),
        teacher_layers: Sequence[str] = (),
        cache_teacher: str | bool = "auto",
    ) -> None:
        super().__init__(data=data, criterion=criterion, key=key)
        if not T > 0:
            raise ConfigError(self.key_of("T"), T, "a positive temperature")
        for name, value in (("ce_weight", ce_weight), ("kd_weight", kd_weight)):
            if value < 0:
                raise ConfigError(self.key_of(name), value, "a non-negative weight")
        if len(student_layers) != len(teacher_layers):
            raise ConfigError(
                self.key_of("teacher_layers"),
                list(teacher_layers),
                f"as many layers as {self.key_of('student_layers')} ({list(student_layers)})",
            )
        if cache_teacher not in ("auto", True, False):
            raise ConfigError(self.key_of("cache_teacher"), cache_teacher, "auto, true or false")
        self.T, self.ce_weight, self.kd_weight = T, ce_weight, kd_weight
        self.student_layers, self.teacher_layers = list(student_layers), list(teacher_layers)
        self.cache_teacher = cache_teacher
        # Not a submodule: the teacher is not the method's state (checkpoints would carry a copy
        # of it every epoch) and never trains; _apply still moves it with the method.
        self.__dict__["teacher"] = teacher.eval().requires_grad_(False)
        self.teacher_tap = FeatureTap(teacher, self.teacher_layers, self.key_of("teacher_layers"))
        self.student: nn.Module | None = None
        self.student_tap: FeatureTap | None = None
        self._cache: tuple[Tensor, list[Tensor]] | None = None

    @classmethod
    def needs(cls, cfg: DictConfig) -> Needs:
        """A trained teacher."""
        return Needs(teacher=True)

    # -- hooks for subclasses -----------------------------------------------------------------
    def build_connectors(self, s_shapes: list[torch.Size], t_shapes: list[torch.Size]) -> None:
        """Create modules that bridge student and teacher features; none by default."""

    def distill_terms(
        self,
        s_logits: Tensor,
        t_logits: Tensor,
        s_feats: list[Tensor],
        t_feats: list[Tensor],
        targets: Tensor,
        ctx: Step,
    ) -> dict[str, Tensor]:
        """The method's own weighted loss terms; none by default. ``ctx`` is the loop's step."""
        return {}

    # -- the Method protocol ------------------------------------------------------------------
    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        self.teacher._apply(fn, recurse)
        return super()._apply(fn, recurse)

    def train(self, mode: bool = True) -> Distiller:
        """Train the connectors; the teacher always stays in eval mode."""
        super().train(mode)
        self.teacher.eval()
        return self

    def prepare(self, model: nn.Module) -> nn.Module:
        """Hook the student's layers, build connectors from a dry pass, cache teacher outputs."""
        # Kept out of the method's submodules: its parameters belong to the model, not the method.
        self.__dict__["student"] = model
        self.student_tap = FeatureTap(model, self.student_layers, self.key_of("student_layers"))
        inputs, _ = next(iter(self.data.val))
        inputs = inputs.to(next(model.parameters()).device)
        was_training = model.training
        model.eval()
        with torch.no_grad():
            model(inputs)
            self.teacher(inputs)
        s_shapes = [f.shape for f in self.student_tap.features]
        t_shapes = [f.shape for f in self.teacher_tap.features]
        model.train(was_training)
        self.build_connectors(s_shapes, t_shapes)
        return model

    def loss(self, inputs: Tensor, targets: Tensor, logits: Tensor, ctx: Step) -> dict[str, Tensor]:
        """CE and KD terms (those with a non-zero weight) plus the method's own terms."""
        t_logits, t_feats = self._teacher_outputs(inputs, ctx.rows)
        s_feats = self.student_tap.features if self.student_tap else []
        terms: dict[str, Tensor] = {}
        if self.ce_weight:
            terms["ce"] = self.ce_weight * self.criterion(logits, targets)
        if self.kd_weight:
            terms["kd"] = self.kd_weight * kd_loss(logits, t_logits, self.T)
        terms.update(self.distill_terms(logits, t_logits, s_feats, t_feats, targets, ctx))
        return terms

    def after_epoch(self, ctx: Step) -> dict[str, float]:
        """``val/agreement`` (top-1, %) and ``val/kl`` (KL(teacher ‖ student) at T=1)."""
        return self._compare_on(self.data.val, "val")

    def final_metrics(self) -> dict[str, float]:
        """``teacher/test_acc1``: the teacher's accuracy on the test set."""
        device = next(self.teacher.parameters()).device
        correct = count = 0
        with torch.no_grad():
            for inputs, targets in self.data.test:
                logits = self.teacher(inputs.to(device))
                correct += int((logits.argmax(1) == targets.to(device)).sum())
                count += len(targets)
        return {"teacher/test_acc1": 100.0 * correct / max(count, 1)}

    # -- internals ----------------------------------------------------------------------------
    def _use_cache(self) -> bool:
        train = self.data.train
        cacheable = isinstance(train, TensorLoader) and train.augment is None
        if self.cache_teacher is True and not cacheable:
            raise ConfigError(
                self.key_of("cache_teacher"),
                True,
                "auto or false: the training batches are augmented (or not held in memory), so "
                "the teacher's outputs change every epoch",
            )
        return self.cache_teacher is not False and cacheable

    @torch.no_grad()
    def _fill_cache(self, device: torch.device) -> tuple[Tensor, list[Tensor]]:
        train = self.data.train
        assert isinstance(train, TensorLoader)
        logits, feats = [], []
        for start in range(0, len(train.inputs), 512):
            logits.append(self.teacher(train.inputs[start : start + 512].to(device)))
            feats.append([f.detach() for f in self.teacher_tap.features])
        columns = [torch.cat(column) for column in zip(*feats, strict=True)] if feats[0] else []
        return torch.cat(logits), columns

    def _teacher_outputs(self, inputs: Tensor, rows: Tensor | None) -> tuple[Tensor, list[Tensor]]:
        """The teacher's logits and features for a training batch: from the cache, by the batch's
        sample indices ``rows``, where there is one."""
        if self.training and rows is not None and self._use_cache():
            if self._cache is None:
                self._cache = self._fill_cache(inputs.device)
            logits, feats = self._cache
            rows = rows.to(logits.device)
            return logits[rows], [f[rows] for f in feats]
        with torch.no_grad():
            t_logits = self.teacher(inputs)
        return t_logits, [f.detach() for f in self.teacher_tap.features]

    @torch.no_grad()
    def _compare_on(self, loader, split: str) -> dict[str, float]:  # type: ignore[no-untyped-def]
        assert self.student is not None
        was_training = self.student.training
        self.student.eval()
        device = next(self.teacher.parameters()).device
        agree, kl, count = 0, 0.0, 0
        for inputs, _ in loader:
            inputs = inputs.to(device)
            s_logits, t_logits = self.student(inputs).float(), self.teacher(inputs).float()
            agree += int((s_logits.argmax(1) == t_logits.argmax(1)).sum())
            kl += float(kd_loss(s_logits, t_logits, 1.0)) * len(inputs)
            count += len(inputs)
        self.student.train(was_training)
        count = max(count, 1)
        return {f"{split}/agreement": 100.0 * agree / count, f"{split}/kl": kl / count}


def require_layers(method: Distiller, name: str) -> None:
    """Raise :class:`ConfigError` unless ``method`` taps at least one pair of layers."""
    if not method.student_layers:
        raise ConfigError(
            method.key_of("student_layers"),
            method.student_layers,
            f"at least one layer: {name} compares student and teacher features "
            "(with method.teacher_layers of the same length)",
        )


def require_feature_maps(
    method: Distiller, s_shapes: Sequence[torch.Size], t_shapes: Sequence[torch.Size], name: str
) -> None:
    """Raise :class:`ConfigError` unless every tapped feature is a ``b×c×h×w`` map."""
    for key, layers, shapes in (
        (method.key_of("student_layers"), method.student_layers, s_shapes),
        (method.key_of("teacher_layers"), method.teacher_layers, t_shapes),
    ):
        for layer, shape in zip(layers, shapes, strict=True):
            if len(shape) != 4:
                raise ConfigError(
                    key,
                    layer,
                    f"a convolutional layer with b×c×h×w outputs: {name} compares spatial maps, "
                    f"and {layer!r} gives shape {tuple(shape)}",
                )


class PairedFeatureLoss(Distiller):
    """A method whose own term is β · Σ over the layer pairs of one feature loss.

    Subclasses set ``term`` (the loss term's name) and ``feature_maps`` (whether the tapped
    layers must give ``b×c×h×w`` maps), and implement :meth:`pair_loss`. Features are compared in
    float32.
    """

    term = ""
    feature_maps = False

    def __init__(self, *, beta: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if beta < 0:
            raise ConfigError(self.key_of("beta"), beta, "a non-negative weight")
        require_layers(self, type(self).__name__)
        self.beta = beta

    def pair_loss(self, fs: Tensor, ft: Tensor) -> Tensor:
        """The loss between one student feature and one teacher feature."""
        raise NotImplementedError

    def build_connectors(self, s_shapes: list[torch.Size], t_shapes: list[torch.Size]) -> None:
        """No connectors; checks that the layers give feature maps where the loss needs them."""
        if self.feature_maps:
            require_feature_maps(self, s_shapes, t_shapes, type(self).__name__)

    def distill_terms(
        self,
        s_logits: Tensor,
        t_logits: Tensor,
        s_feats: list[Tensor],
        t_feats: list[Tensor],
        targets: Tensor,
        ctx: Step,
    ) -> dict[str, Tensor]:
        """``term``: β times :meth:`pair_loss` summed over the layer pairs."""
        pairs = zip(s_feats, t_feats, strict=True)
        total = torch.stack([self.pair_loss(fs.float(), ft.float()) for fs, ft in pairs]).sum()
        return {self.term: self.beta * total}
