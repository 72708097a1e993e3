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
- :func:`kdexp.method.restore.restore`: that state_dict into a freshly built model of the
  architecture;
- :func:`compressed_size`, :func:`layout_report`: the size, and where the bytes go.
"""

from __future__ import annotations

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
    "save_compressed",
]
