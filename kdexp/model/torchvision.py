"""Torchvision classification models, optionally initialised from a local state_dict file.

Nothing is ever downloaded: ``weights`` is a path to a file saved with
``torch.save(model.state_dict(), path)``.
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path
from typing import cast

import torch
import torchvision
from torch import Tensor, nn

from kdexp.errors import ConfigError

_log = logging.getLogger(__name__)

#: What ``nn.Conv2d`` stores its size arguments as (typed ``tuple[int, ...]`` on the module).
_Pair = tuple[int, int]


def build(
    name: str,
    num_classes: int,
    in_channels: int = 3,
    weights: str | None = None,
    image_size: int | None = None,
) -> nn.Module:
    """A torchvision classifier ``name`` with a ``num_classes`` head and ``in_channels`` inputs.

    ``weights`` is a local state_dict of the same architecture. Classifier-head tensors whose
    shapes differ only in their class dimension (an ImageNet head for a 10-class model) are
    dropped with a warning and keep their fresh initialisation; any other missing, unexpected or
    mis-shaped key is a :class:`ConfigError`. With ``in_channels != 3`` the first convolution is
    rebuilt for that many channels; a file with RGB filters there (an ImageNet checkpoint) has them
    averaged over channels and spread over the new ones, a file saved from an ``in_channels``
    model loads as is. ``image_size`` is accepted and ignored.
    """
    known = torchvision.models.list_models(module=torchvision.models)
    if name not in known:
        raise ConfigError(
            "model.name",
            name,
            "one of torchvision.models.list_models(module=torchvision.models), e.g. "
            + ", ".join(known[:10]),
        )
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    first_conv = _rebuild_first_conv(model, in_channels) if in_channels != 3 else None
    if weights is not None:
        _load_weights(model, name, str(weights), num_classes, first_conv)
    return model


def _load_weights(
    model: nn.Module, name: str, path: str, num_classes: int, first_conv: str | None
) -> None:
    """Load a state_dict file into ``model``, dropping a classifier head of another class count.

    ``first_conv`` names a first convolution rebuilt for non-RGB input; RGB filters saved for it
    are converted with :func:`_grey_filters`.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError("model.weights", path, "an existing state_dict file (no such file)")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError) as error:
        raise ConfigError("model.weights", path, f"a file saved by torch.save ({error})") from error
    expected = f"a state_dict of torchvision {name}"
    if not isinstance(state, dict):
        raise ConfigError("model.weights", path, f"{expected}, not a {type(state).__name__}")
    wrapped = next((key for key, value in state.items() if not isinstance(value, Tensor)), None)
    if wrapped is not None:
        kind = type(state[wrapped]).__name__
        raise ConfigError(
            "model.weights",
            path,
            f"{expected}: a flat dict of tensors, but {wrapped!r} is a {kind}",
        )

    own = model.state_dict()
    if first_conv is not None:
        key = f"{first_conv}.weight"
        saved = state.get(key)
        if saved is not None and saved.dim() == 4 and saved.shape[1] == 3:
            state = {**state, key: _grey_filters(saved, own[key].shape[1])}
    head: list[str] = []
    misshaped: list[str] = []
    for key, tensor in state.items():
        if key in own and tensor.shape != own[key].shape:
            (head if _is_head_mismatch(tensor, own[key], num_classes) else misshaped).append(key)
    dropped = set(head + misshaped)
    fitting = {key: tensor for key, tensor in state.items() if key not in dropped}
    result = model.load_state_dict(fitting, strict=False)
    problems = {
        "mis-shaped": misshaped,
        "missing": [key for key in result.missing_keys if key not in dropped],
        "unexpected": result.unexpected_keys,
    }
    if any(problems.values()):
        raise ConfigError("model.weights", path, f"{expected}; " + _describe(problems))
    if head:
        _log.warning(
            "%s: dropped classifier-head weights %s (their class count differs from %d); "
            "the head starts from a fresh initialisation",
            path,
            ", ".join(head),
            num_classes,
        )


def _is_head_mismatch(saved: Tensor, own: Tensor, num_classes: int) -> bool:
    """Whether two tensors differ only in a leading class dimension (a classifier head)."""
    return (
        saved.dim() == own.dim() >= 1
        and own.shape[0] == num_classes
        and saved.shape[1:] == own.shape[1:]
    )


def _describe(problems: dict[str, list[str]]) -> str:
    """'missing keys: a, b, c and 7 more; unexpected keys: ...', the first few keys of each kind."""
    parts = []
    for kind, keys in problems.items():
        if keys:
            more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
            parts.append(f"{kind} keys: {', '.join(keys[:3])}{more}")
    return "; ".join(parts)


def _rebuild_first_conv(model: nn.Module, in_channels: int) -> str:
    """Replace the first Conv2d (in module order) by one taking ``in_channels``; return its name."""
    found = next(
        ((key, module) for key, module in model.named_modules() if isinstance(module, nn.Conv2d)),
        None,
    )
    if found is None:
        raise ConfigError("model.in_channels", in_channels, "3: this model has no Conv2d to adapt")
    key, old = found
    if old.groups != 1:
        raise ConfigError("model.in_channels", in_channels, "3: the first conv is grouped")
    new = nn.Conv2d(
        in_channels,
        old.out_channels,
        cast(_Pair, old.kernel_size),
        cast(_Pair, old.stride),
        cast("str | _Pair", old.padding),
        cast(_Pair, old.dilation),
        bias=old.bias is not None,
        padding_mode=old.padding_mode,
    )
    parent_key, _, attribute = key.rpartition(".")
    setattr(model.get_submodule(parent_key), attribute, new)
    return key


def _grey_filters(rgb: Tensor, in_channels: int) -> Tensor:
    """RGB filters averaged over colour and spread over ``in_channels`` inputs.

    Scaled by 3 / in_channels, so an image with the same value in every channel gets the
    response the RGB filters gave to that grey image.
    """
    return rgb.mean(dim=1, keepdim=True).expand(-1, in_channels, -1, -1) * (3 / in_channels)
