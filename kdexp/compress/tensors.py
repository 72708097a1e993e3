"""One tensor in the compressed format: which elements are non-zero, and their values.

Positions (chosen per tensor, whichever makes the fewest bytes after entropy coding):

- ``d`` dense: no positions, every element stored;
- ``m`` bitmask: one bit per element, 1 where non-zero (stored as a byte stream);
- ``r`` relative indices (Deep Compression, Han et al. 2016, §2): for each non-zero element, the
  number of zeros since the previous one, in ``w`` bits; the symbol ``2^w - 1`` is an escape that
  skips ``2^w - 1`` zeros without storing an element (the paper stores a filler zero instead).

Values: floats keep their dtype's bytes (fp32: 4, fp16/bf16: 2), the bytes of all values grouped
by significance ("byte shuffle", as blosc does) so that the entropy coder sees the exponent bytes
together. Integers (int8 weights of torch.ao models, the codes of packed low-bit layers, weight
sharing's centroid indices) are stored as ``value - offset`` in the fewest bits that hold the
range of the non-zero values: 4-bit codes take 4 bits, 6-bit centroid indices 6. "Zero" is the
all-zero bit pattern for floats (``-0.0`` is kept as a value), or the integer that stands for a
zero weight (0; ``2^(b-1)`` for the offset codes of packed layers).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from kdexp.compress import entropy

FLOATS = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32",
          torch.float64: "float64"}  # fmt: skip
INTEGERS = {torch.uint8: "uint8", torch.int8: "int8", torch.int16: "int16",
            torch.int32: "int32", torch.int64: "int64", torch.bool: "bool"}  # fmt: skip
_BY_NAME = {name: dtype for dtype, name in {**FLOATS, **INTEGERS}.items()}
_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
#: Relative indices: the widths tried; above this many non-zeros only the raw-best one is coded.
_MAX_WIDTH, _TRY_ALL_BELOW = 16, 1 << 20
#: Layouts whose bit-packed size exceeds this many times the best coded size are not coded.
_CODED_WITHIN = 4

Streams = list[tuple[int, bytes]]


def _float_bits(tensor: Tensor) -> np.ndarray:
    """The elements' bit patterns as unsigned bytes, one row per element (little-endian)."""
    size = tensor.element_size()
    flat = tensor.detach().cpu().contiguous().reshape(-1).view(_SAME_SIZE_INT[size])
    return flat.numpy().view(np.uint8).reshape(-1, size)


def _relative(positions: np.ndarray, width: int) -> np.ndarray:
    """Relative-index symbols of sorted ``positions`` at ``width`` bits (with escapes)."""
    escape = (1 << width) - 1
    gaps = np.diff(positions, prepend=-1) - 1
    skips = gaps // escape
    symbols = np.full(int(skips.sum()) + gaps.size, escape, np.uint64)
    symbols[np.cumsum(skips + 1) - 1] = (gaps - skips * escape).astype(np.uint64)
    return symbols


def _from_relative(symbols: np.ndarray, width: int) -> np.ndarray:
    """The positions that :func:`_relative` coded."""
    escape = (1 << width) - 1
    values = symbols.astype(np.int64)
    is_escape = values == escape
    advance = np.where(is_escape, escape, values + 1)
    return (np.cumsum(advance) - 1)[~is_escape]


def _relative_width(positions: np.ndarray) -> int:
    """The width with the fewest raw bits of relative indices (escapes included)."""
    gaps = np.diff(positions, prepend=-1) - 1
    sizes = [(w * (gaps.size + int((gaps // ((1 << w) - 1)).sum())), w) for w in range(1, 17)]
    return min(sizes)[1]


def _positions(nonzero: np.ndarray) -> list[tuple[dict[str, Any], list[tuple[np.ndarray, int]]]]:
    """The sparse position codings of ``nonzero`` (flat bool): bitmask, relative indices."""
    options: list[tuple[dict[str, Any], list[tuple[np.ndarray, int]]]] = [
        ({"l": "m"}, [(np.packbits(nonzero), 8)])
    ]
    positions = np.flatnonzero(nonzero)
    best = _relative_width(positions)
    widths = [best] if positions.size > _TRY_ALL_BELOW else [best, best + 1, best + 2]
    for width in [w for w in widths if w <= _MAX_WIDTH]:
        symbols = _relative(positions, width)
        options.append(({"l": "r", "pw": width, "pn": int(symbols.size)}, [(symbols, width)]))
    return options


def _value_symbols(data: np.ndarray, floats: bool) -> tuple[dict[str, Any], tuple[np.ndarray, int]]:
    """The values' metadata and symbols: shuffled bytes of floats, offset integers."""
    if floats:  # byte shuffle: the k-th bytes of all values together
        return {}, (np.ascontiguousarray(data.T).reshape(-1), 8)
    if data.size == 0:
        return {"vo": 0, "vw": 1}, (data.astype(np.uint64), 1)
    low = int(data.min())
    width = max(1, (int(data.max()) - low).bit_length())
    return {"vo": low, "vw": width}, ((data - low).astype(np.uint64), width)  # exact wrap


def encode(tensor: Tensor, codec: str | None = None, zero: int | None = 0) -> tuple[dict, Streams]:
    """(metadata, streams) of a float or integer ``tensor``; ``zero=None``: no sparse layout.

    Every layout is measured bit-packed first; those within :data:`_CODED_WITHIN` times the
    smallest coded size so far are entropy-coded too, and the smallest wins.
    """
    dtype = FLOATS.get(tensor.dtype) or INTEGERS.get(tensor.dtype)
    if dtype is None:
        raise TypeError(f"cannot compress a tensor of dtype {tensor.dtype}")
    floats = tensor.dtype in FLOATS
    meta: dict[str, Any] = {"s": list(tensor.shape), "d": dtype}
    if floats:
        data = _float_bits(tensor)
        nonzero = np.asarray(data.any(axis=1))
    else:
        data = tensor.detach().cpu().reshape(-1).to(torch.int64).numpy()
        nonzero = np.asarray(data != (0 if zero is None else zero))
        if zero:
            meta["z"] = zero
    value_meta, value = _value_symbols(data, floats)
    candidates = [({"l": "d", **value_meta}, [value])]
    if zero is not None and tensor.numel() and not nonzero.all():
        value_meta, value = _value_symbols(data[nonzero], floats)
        for layout, streams in _positions(nonzero):
            candidates.append(({**layout, **value_meta}, [*streams, value]))
    ranked = sorted(candidates, key=lambda c: sum(entropy.raw_bytes(s.size, w) for s, w in c[1]))
    best: tuple[dict[str, Any], Streams] | None = None
    for layout, symbol_streams in ranked:
        raw = sum(entropy.raw_bytes(s.size, w) for s, w in symbol_streams)
        if best is not None and raw > _CODED_WITHIN * _size(best[1]):
            break
        coded: Streams = [entropy.encode(s, w, codec) for s, w in symbol_streams]
        if best is None or _size(coded) < _size(best[1]):
            best = (layout, coded)
    assert best is not None
    meta.update(best[0])
    return meta, best[1]


def _size(streams: Streams) -> int:
    return sum(len(data) for _, data in streams)


def decode(meta: dict[str, Any], streams: list[tuple[int, bytes]]) -> Tensor:
    """The tensor that :func:`encode` wrote as ``meta`` and ``streams`` (consumed in order)."""
    shape = [int(s) for s in meta["s"]]
    dtype = _BY_NAME[meta["d"]]
    numel = int(np.prod(shape)) if shape else 1
    layout = meta["l"]
    if layout == "d":
        positions = None
        count = numel
    elif layout == "m":
        codec, data = streams.pop(0)
        bits = entropy.decode(codec, data, 8, -(-numel // 8)).astype(np.uint8)
        positions = np.flatnonzero(np.unpackbits(bits)[:numel])
        count = positions.size
    elif layout == "r":
        codec, data = streams.pop(0)
        width = int(meta["pw"])
        positions = _from_relative(entropy.decode(codec, data, width, int(meta["pn"])), width)
        count = positions.size
    else:
        raise ValueError(f"unknown layout {layout!r}")
    if positions is not None and count and int(positions[-1]) >= numel:
        raise ValueError("positions beyond the tensor")
    codec, data = streams.pop(0)
    if dtype in FLOATS:
        size = torch.empty(0, dtype=dtype).element_size()
        planes = entropy.decode(codec, data, 8, count * size).astype(np.uint8)
        rows = np.ascontiguousarray(planes.reshape(size, count).T)
        full = np.zeros((numel, size), np.uint8)
        full[positions if positions is not None else slice(None)] = rows
        ints = torch.from_numpy(full.reshape(-1).view(_numpy_int(size)).copy())
        return ints.view(dtype).reshape(shape)
    symbols = entropy.decode(codec, data, int(meta["vw"]), count).astype(np.int64)
    values = symbols + int(meta["vo"])
    full_int = np.full(numel, int(meta.get("z", 0)), np.int64)
    full_int[positions if positions is not None else slice(None)] = values
    return torch.from_numpy(full_int).to(dtype).reshape(shape)


def _numpy_int(size: int) -> type:
    return {1: np.uint8, 2: np.int16, 4: np.int32, 8: np.int64}[size]
