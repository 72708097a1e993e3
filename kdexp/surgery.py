"""Model surgery that both pruning and the loaders of pruned checkpoints need.

A channel-pruned model is saved as its plain ``state_dict``, narrower than the architecture it
came from. :func:`shrink_to_fit` cuts a freshly built model, in place, to the widths found in such
a state_dict (with Torch-Pruning's DepGraph; Fang et al. 2023), so that it loads; the channel
pruning method (:mod:`kdexp.method.prune.channel`) and any method's ``load_start`` use it, and
:func:`load_pruned` is its public front door.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import torch
import torch_pruning as tp
from omegaconf import DictConfig
from torch import Tensor, nn

from kdexp.checkpoint import load_weights, read_state_dict

PRUNABLE = (nn.modules.conv._ConvNd, nn.Linear)


def classifier(model: nn.Module) -> nn.Module | None:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if linears:
        return linears[-1]
    prunable = [m for m in model.modules() if isinstance(m, PRUNABLE)]
    return prunable[-1] if prunable else None


def trace(model: nn.Module, example: Tensor) -> tp.DependencyGraph:
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            return tp.DependencyGraph().build_dependency(model, example, verbose=False)
    finally:
        model.train(was_training)


def is_narrower(state: Mapping[str, Tensor], model: nn.Module, skip: Collection[str] = ()) -> bool:
    """Whether ``state`` looks like a channel-pruned version of ``model``: the same entries, each
    with the same number of dimensions, none wider, some narrower. ``skip`` entries (a
    fine-tuned model's new head) are left out of the comparison."""
    own = {k: v for k, v in model.state_dict().items() if k not in skip}
    theirs = {k: v for k, v in state.items() if k not in skip}
    if set(own) != set(theirs):
        return False
    shapes = [(tuple(theirs[k].shape), tuple(v.shape)) for k, v in own.items()]
    if any(len(a) != len(b) or any(x > y for x, y in zip(a, b, strict=True)) for a, b in shapes):
        return False
    return any(a != b for a, b in shapes)


def shrink_to_fit(
    model: nn.Module,
    state: Mapping[str, Tensor],
    input_shape: tuple[int, ...],
    skip: Collection[str] = (),
) -> bool:
    """Cut ``model``'s channel groups, in place, to the widths found in ``state``; True if it did.

    Nothing changes unless ``state`` :func:`is_narrower` than ``model`` (a checkpoint of another
    model is left to the loader's shape check). Which channels go is irrelevant: all weights
    are loaded afterwards. The classifier's outputs are kept, as :class:`Channel` keeps them.
    """
    if not is_narrower(state, model, skip):
        return False
    device = next(model.parameters()).device
    graph = trace(model, torch.zeros(2, *input_shape, device=device))
    names = {m: n for n, m in model.named_modules()}
    ignored = [m for m in [classifier(model)] if m is not None]
    for group in list(graph.get_all_groups(ignored_layers=ignored, root_module_types=PRUNABLE)):
        root = group[0].dep.target.module
        weight = state.get(f"{names[root]}.weight")
        if weight is None:
            continue
        pruner = graph.get_pruner_of_module(root)
        have = pruner.get_out_channels(root)
        dim = 1 if isinstance(root, nn.modules.conv._ConvNd) and root.transposed else 0
        want = weight.shape[dim] * (root.groups if dim == 1 else 1)
        if want < have:
            graph.get_pruning_group(
                root, pruner.prune_out_channels, list(range(have - want))
            ).prune()
    return True


def load_pruned(
    model: nn.Module | DictConfig | Mapping[str, Any],
    path: str | Path,
    input_shape: tuple[int, ...] | None = None,
    key: str = "checkpoint",
) -> nn.Module:
    """Load a channel-pruned checkpoint (weights_only) into ``model`` after shrinking it to fit.

    ``model`` is the dense architecture (a module, or its model config: then it is instantiated
    and ``input_shape`` is taken from ``in_channels`` and ``image_size``). Each channel group is
    cut to the width found in the checkpoint (:func:`shrink_to_fit`), so a shrunk model is saved
    as its plain ``state_dict``. A dense checkpoint loads too.
    """
    if isinstance(model, nn.Module):
        net = model
    else:
        from hydra.utils import instantiate

        net = instantiate(model)
        if input_shape is None:
            size = model["image_size"]
            input_shape = (model["in_channels"], size, size)
    if input_shape is None:
        raise ValueError("input_shape is needed to trace a model given as a module")
    shrink_to_fit(net, read_state_dict(path, key), input_shape)
    load_weights(net, path, key)
    return net
