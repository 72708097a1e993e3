"""Compressed storage of final models: sizes that count the zeros.

``compress(model)`` stores each tensor of a state_dict with its non-zeros in a sparse layout
(bitmask or relative indices, whichever is smaller), its values at their bit width (fp32/fp16
floats; the int8 codes of torch.ao models; the 4/2/1-bit codes of packed layers; the centroid
indices of weight sharing), entropy-coded stream by stream (own canonical Huffman, or zlib /
lzma, whichever is smallest), behind a header with a magic, a version and a CRC-32. This is the
last step of Deep Compression (Han, Mao & Dally 2016, ICLR), which stores pruned, weight-shared
networks in sparse form with Huffman coding.

- :func:`compress` / :func:`save_compressed`: model or state_dict → bytes / file;
- :func:`decompress` / :func:`load_compressed`: bytes / file → the same state_dict, bit for bit;
- :func:`restore`: that state_dict into a freshly built model of the architecture;
- :func:`compressed_size`, :func:`layout_report`: the size, and where the bytes go.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from kdexp.compress.container import (
    CompressedFileError,
    compress,
    compressed_size,
    decompress,
    layout_report,
    load_compressed,
    save_compressed,
)

__all__ = [
    "CompressedFileError",
    "compress",
    "compressed_size",
    "decompress",
    "layout_report",
    "load_compressed",
    "restore",
    "save_compressed",
]


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
        from kdexp.method.quantize.weight_sharing import load_shared

        return load_shared(model, state)
    if any(str(k).endswith(".packed") for k in state):
        from kdexp.method.quantize.packed import load_packed

        return load_packed(model, state)
    if input_shape is not None:
        from kdexp.method.prune.channel import shrink_to_fit

        shrink_to_fit(model, state, input_shape)
    model.load_state_dict(dict(state))
    return model
