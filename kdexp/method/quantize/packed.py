"""Loading a model saved with packed low-bit weights (the format is :mod:`kdexp.packed`)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from kdexp.checkpoint import read_state_dict
from kdexp.errors import ConfigError
from kdexp.packed import BITS, bits_of, packed_from

__all__ = ["BITS", "bits_of", "load_packed"]


def load_packed(model: nn.Module, source: str | Path | Mapping[str, Tensor]) -> nn.Module:
    """``model`` (a freshly built fp32 model) with its layers replaced by the packed layers found in
    ``source`` (a ``final.pt``, a state_dict file, or a state_dict), and the weights loaded.

    Files are read with ``torch.load(weights_only=True)``.
    """
    if isinstance(source, Mapping):
        state = dict(source)
    else:
        state = read_state_dict(source, "packed", quantized=True)
    for name, module in list(model.named_modules()):
        if f"{name}.packed" not in state:
            continue
        if not isinstance(module, (nn.Conv2d, nn.Linear)):
            raise ConfigError(
                "packed", name, f"a Conv2d or Linear layer there, not {type(module).__name__}"
            )
        layer = packed_from(module)
        layer.packed = torch.empty_like(state[f"{name}.packed"])
        if f"{name}.act_qparams" in state:
            layer.act_qparams = torch.empty(3)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise ConfigError(
            "packed", type(model).__name__, f"weights of this model ({error})"
        ) from None
    return model
