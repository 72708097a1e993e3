"""Structured (channel) pruning with Torch-Pruning's dependency graph (Fang et al. 2023, DepGraph).

Channels are pruned by *group*: the output channels of a Conv/Linear layer together with every
parameter coupled to them (its BatchNorm, the next layers' input channels, and, across residual
additions, the other layers writing to the same tensor). DepGraph finds the groups by tracing the
model once.

During training a pruned channel is zeroed in every parameter of its group (out-channel slices of
weights and biases, BatchNorm scale and shift, in-channel slices of the consumers), which makes the
masked model compute exactly what the shrunk one does. :meth:`Channel.finalize` then removes the
channels for real and returns the smaller model. ``sparsity`` is the fraction of channels removed:
of each group (``scope: layerwise``) or of all groups together with normalised importance
(``scope: global``, at least one channel left per group). The classifier's outputs are never pruned.

Importance (``importance``, :mod:`kdexp.method.prune.importance`): ``l1`` / ``l2`` group filter
norms (Li et al. 2017), ``bn_scale`` (|γ| of the BatchNorm, network slimming, Liu et al. 2017) or
``taylor`` (|w·∂L/∂w| over ``calibration_batches`` batches, Molchanov et al. 2019); a new one is
a :class:`~kdexp.method.prune.importance.ChannelImportance` and a yaml.

A shrunk checkpoint is an ordinary state_dict with smaller shapes: :func:`load_pruned` rebuilds the
architecture from its config, removes channels until the shapes fit, and loads it (weights_only).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
import torch_pruning as tp
from omegaconf import DictConfig
from torch import Tensor, nn

from kdexp.errors import ConfigError
from kdexp.features import describe_modules
from kdexp.method.base import Needs
from kdexp.method.prune.base import Pruner
from kdexp.method.prune.importance import ChannelImportance, build_importance
from kdexp.surgery import PRUNABLE, classifier, trace

Slice = tuple[Tensor, int, Tensor]  # (parameter, dim, channel indices)


class _Unsupported(Exception):
    """A group holds a parameter that cannot be zeroed channel-wise (so it cannot be masked)."""


def _slices(graph: tp.DependencyGraph, group: Any) -> list[Slice]:
    """Every parameter slice that a group's channels occupy, to zero them."""
    out: list[Slice] = []
    for dep, idxs in group:
        module = dep.target.module
        if isinstance(module, nn.Parameter):
            raise _Unsupported(module)
        if not isinstance(module, nn.Module) or next(module.parameters(False), None) is None:
            continue  # activations, pooling, flatten, additions: nothing to zero
        index = torch.as_tensor(list(idxs), dtype=torch.long)
        is_out = graph.is_out_channel_pruning_fn(dep.handler)
        if isinstance(module, nn.modules.conv._ConvNd):
            depthwise = module.groups == module.out_channels == module.in_channels
            if module.groups > 1 and not depthwise:
                raise _Unsupported(module)
            if is_out or depthwise:
                out.append((module.weight, 1 if module.transposed else 0, index))
                if module.bias is not None:
                    out.append((module.bias, 0, index))
            else:
                out.append((module.weight, 0 if module.transposed else 1, index))
        elif isinstance(module, nn.Linear):
            if is_out:
                out.append((module.weight, 0, index))
                if module.bias is not None:
                    out.append((module.bias, 0, index))
            else:
                out.append((module.weight, 1, index))
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            if module.affine:
                out += [(module.weight, 0, index), (module.bias, 0, index)]
            else:
                raise _Unsupported(module)
        elif isinstance(module, nn.PReLU):
            continue  # PReLU(0) = 0: a zero channel stays zero
        else:
            raise _Unsupported(module)
    return out


def _example(data_loader: Any, device: torch.device) -> Tensor:
    inputs, _ = next(iter(data_loader))
    return inputs[:2].to(device)


class Channel(Pruner):
    """Remove whole channels (filters) chosen by group importance; the model really shrinks."""

    @classmethod
    def needs(cls, cfg: DictConfig) -> Needs:
        """Single-process only: DistributedDataParallel cannot follow shrinking parameters."""
        return replace(super().needs(cfg), distributed=False)

    def __init__(self, *, importance: str | ChannelImportance = "l1", **kwargs: Any) -> None:
        criterion = build_importance(importance)
        super().__init__(**kwargs)
        self.importance = criterion
        self.graph: tp.DependencyGraph | None = None
        # name -> (root module, root pruning function, channel count)
        self.groups: dict[str, tuple[nn.Module, Any, int]] = {}
        self.pruned: dict[str, list[int]] = {}
        self._slices: list[Slice] = []
        self._shrunk = False

    # -- setup --------------------------------------------------------------------------------
    def setup(self, model: nn.Module) -> None:
        device = next(model.parameters()).device
        graph = trace(model, _example(self.data.val, device))
        self.graph = graph
        names = {m: n for n, m in model.named_modules()}
        ignored = [m for m in [classifier(model)] if m is not None]
        if self.keep_first:
            ignored.append(next(m for m in model.modules() if isinstance(m, PRUNABLE)))
        modules = dict(model.named_modules())
        if self.layers is not None:
            for path in self.layers:
                if not path or path not in modules:
                    raise ConfigError(
                        "method.layers",
                        path,
                        f"a module path of {type(model).__name__}: "
                        + describe_modules(model, penultimate=False),
                    )
                reason = self._unprunable(graph, modules[path], ignored, names)
                if reason:
                    raise ConfigError(
                        "method.layers",
                        path,
                        "a layer whose output channels can be removed without breaking the "
                        f"graph, but {reason}",
                    )
                self._add_group(graph, path, modules[path])
        else:
            for group in graph.get_all_groups(ignored_layers=ignored, root_module_types=PRUNABLE):
                root = group[0].dep.target.module
                if not self._unprunable(graph, root, ignored, names):
                    self._add_group(graph, names[root], root)
        if not self.groups:
            raise ConfigError(
                "method.layers", self.layers, "a model with at least one prunable channel group"
            )

    def _add_group(self, graph: tp.DependencyGraph, name: str, root: nn.Module) -> None:
        pruner = graph.get_pruner_of_module(root)
        self.groups[name] = (root, pruner.prune_out_channels, pruner.get_out_channels(root))
        self.pruned[name] = []

    def _unprunable(
        self,
        graph: tp.DependencyGraph,
        module: nn.Module,
        ignored: list[nn.Module],
        names: dict[nn.Module, str],
    ) -> str:
        """Why ``module``'s output channels cannot be pruned, or ``""``."""
        if not isinstance(module, PRUNABLE):
            return f"it is a {type(module).__name__}, not a Conv or Linear layer"
        if module not in graph.module2node:
            return "it is not used in the forward pass"
        pruner = graph.get_pruner_of_module(module)
        channels = pruner.get_out_channels(module) if pruner is not None else None
        if not channels or channels < 2:
            return "it has fewer than two output channels"
        group = graph.get_pruning_group(module, pruner.prune_out_channels, list(range(channels)))
        for dep, _ in group:
            target = dep.target.module
            if graph.is_out_channel_pruning_fn(dep.handler) and target in ignored:
                what = "the classifier's outputs" if target is ignored[0] else "a kept layer"
                return f"its channels are coupled to {what} ({names.get(target, '?')})"
        try:
            _slices(graph, group)
        except _Unsupported as error:
            culprit = error.args[0]
            return f"its group holds {type(culprit).__name__} {names.get(culprit, '')}, which " + (
                "cannot be masked channel-wise"
            )
        return self.importance.unprunable(group)

    # -- masks --------------------------------------------------------------------------------
    def _group(self, name: str, idxs: list[int]) -> Any:
        assert self.graph is not None
        root, fn, _ = self.groups[name]
        return self.graph.get_pruning_group(root, fn, idxs)

    def _scores(self) -> dict[str, Tensor]:
        scorer = self.importance.scorer()
        grads: dict[nn.Parameter, Tensor] = {}
        if self.importance.needs_gradients:

            def add() -> None:
                for p in self.model.parameters():
                    if p.grad is not None:
                        grads[p] = grads.get(p, 0) + p.grad  # type: ignore[assignment]

            self.calibration_gradients(add)
            for p, g in grads.items():
                p.grad = g
        scores = {}
        for name, (_, _, n) in self.groups.items():
            s = scorer(self._group(name, list(range(n))))
            if s is None:
                raise RuntimeError(f"importance {self.importance.name} gave no score for {name}")
            s = s.detach().float().cpu().clone()
            s[self.pruned[name]] = float("-inf")
            scores[name] = s
        for p in grads:
            p.grad = None
        return scores

    @torch.no_grad()
    def update(self, target: float) -> dict[str, float]:
        scores = self._scores()
        chosen: dict[str, list[int]] = {name: [] for name in scores}
        if self.scope == "layerwise":
            for name, s in scores.items():
                k = min(round(target * len(s)), len(s) - 1)
                chosen[name] = sorted(torch.argsort(s)[:k].tolist())
        else:
            total = sum(len(s) for s in scores.values())
            k = round(target * total)
            entries = sorted(
                (float(v), name, i) for name, s in scores.items() for i, v in enumerate(s)
            )
            for _, name, i in entries:
                if k == 0:
                    break
                if len(chosen[name]) < len(scores[name]) - 1:
                    chosen[name].append(i)
                    k -= 1
            chosen = {n: sorted(c) for n, c in chosen.items()}
        self._choose(chosen)
        return self.sparsities()

    def _choose(self, chosen: dict[str, list[int]]) -> None:
        """Record the pruned channels of each group and the parameter slices they zero."""
        self.pruned = chosen
        assert self.graph is not None
        self._slices = []
        for name, idxs in chosen.items():
            if idxs:
                slices = _slices(self.graph, self._group(name, idxs))
                self._slices += [(p, d, i.to(p.device)) for p, d, i in slices]

    def mask_state(self) -> dict[str, Any]:
        return {name: list(idxs) for name, idxs in self.pruned.items()}

    def load_mask_state(self, state: dict[str, Any]) -> None:
        if state:
            self._choose({name: [int(i) for i in idxs] for name, idxs in state.items()})

    def sparsities(self) -> dict[str, float]:
        """Fraction of each group's channels pruned, and of all channels (key ``""``)."""
        out = {name: len(self.pruned[name]) / n for name, (_, _, n) in self.groups.items()}
        total = sum(n for _, _, n in self.groups.values())
        out[""] = sum(len(p) for p in self.pruned.values()) / max(total, 1)
        return out

    def apply_masks(self) -> None:
        if self._shrunk:
            return
        for param, dim, index in self._slices:
            param.data.index_fill_(dim, index, 0.0)

    def finalize(self, model: nn.Module) -> nn.Module:
        """Zero the pruned channels, then remove them: the smaller model."""
        model = super().finalize(model)
        if model is not self.model:
            raise RuntimeError("finalize got another model than prepare")
        for name, idxs in self.pruned.items():
            if idxs:
                self._group(name, idxs).prune()
        self._shrunk = True
        return model

    def csv_columns(self) -> list[str]:
        return ["channels", "kept", "sparsity"]

    def csv_row(self, name: str) -> list[Any]:
        n = self.groups[name][2]
        return [n, n - len(self.pruned[name]), f"{self.layer_sparsity[name]:.6f}"]
