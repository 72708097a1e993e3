"""Rebuilding a runnable model from the final state_dict of any method.

The final model of a run may hold weight-shared layers (``quantize/weight_sharing``), packed
low-bit layers (``quantize/qat`` below 8 bits) or narrower channels (``prune/channel``); a
compressed file (:mod:`kdexp.compress`) reloads to such a state_dict. :func:`restore` puts it back
into a freshly built model of the architecture.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from kdexp.method.quantize.packed import load_packed
from kdexp.method.quantize.weight_sharing import load_shared
from kdexp.surgery import shrink_to_fit


def restore(
    model: nn.Module, state: Mapping[str, Any], input_shape: tuple[int, ...] | None = None
) -> nn.Module:
    """``model`` (a freshly built model of the architecture) holding ``state``, ready to run.

    Weight-shared layers (``<layer>.codebook``) and packed low-bit layers (``<layer>.packed``)
    replace the model's Conv2d/Linear layers; with ``input_shape`` a channel-pruned state first
    shrinks the model to its widths. An int8 state_dict of torch.ao needs ``model`` to be an int8
    model of the same architecture already (``backend.quantize_static``): it is loaded as is.
    """
    if any(str(k).endswith(".codebook") for k in state):
        return load_shared(model, state)
    if any(str(k).endswith(".packed") for k in state):
        return load_packed(model, state)
    if input_shape is not None:
        shrink_to_fit(model, state, input_shape)
    model.load_state_dict(dict(state))
    return model
