"""Symbol streams and their entropy coders: bit packing, canonical Huffman, zlib and lzma.

A stream is a sequence of unsigned integer symbols of a known width ``w`` (bits). It is stored by
whichever coder gives the fewest bytes, chosen per stream and recorded in one byte:

- ``raw``: the symbols bit-packed at ``w`` bits each, most significant bit first;
- ``huffman``: a canonical Huffman code of the symbols (Huffman 1952; Deep Compression, Han et al.
  2016, §4, Huffman-codes the quantized weights and the index differences). The code table is
  stored as the code length of each symbol, so decoding needs no tree. Lengths are limited to
  :data:`MAX_CODE_LENGTH` bits by flattening the counts, so one table lookup decodes a symbol;
- ``zlib`` and ``lzma``: the raw packed bytes through the standard library's codecs.
"""

from __future__ import annotations

import heapq
import lzma
import struct
import zlib

import numpy as np

RAW, HUFFMAN, ZLIB, LZMA = 0, 1, 2, 3
CODECS = {"raw": RAW, "huffman": HUFFMAN, "zlib": ZLIB, "lzma": LZMA}
#: Longest Huffman code: 15 bits, so that a length fits a nibble of the dense table.
MAX_CODE_LENGTH = 15
#: Streams longer than this (bytes packed) skip lzma (about 0.4 s a MB) and use zlib's fastest
#: level, 1, for its tenfold speed (up to 12% larger on a stream of weight bytes, 1.2% on a whole
#: ResNet-18): a ResNet-18's compressed size takes a few seconds, not 14-16.
FAST_ABOVE = 1 << 18
#: lzma without its .xz container (the container's ~60 bytes would cost more than small streams).
_LZMA_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 6}]
_CHUNK = 1 << 20  # symbols bit-packed at once (bounds the memory of the bit matrix)


# -- bit packing ----------------------------------------------------------------------------------
def pack_bits(symbols: np.ndarray, width: int) -> bytes:
    """``symbols`` (unsigned, each < 2^width) packed at ``width`` bits each, MSB first."""
    symbols = np.asarray(symbols, dtype=np.uint64)
    if width % 8 == 0:  # byte-aligned: big-endian bytes of each symbol
        nbytes = width // 8
        as_bytes = symbols.astype(">u8").view(np.uint8).reshape(-1, 8)[:, 8 - nbytes :]
        return as_bytes.tobytes()
    shifts = np.arange(width - 1, -1, -1, dtype=np.uint64)
    parts = []
    step = _CHUNK - _CHUNK % 8  # whole bytes per chunk: chunks concatenate
    for start in range(0, len(symbols), step):
        chunk = symbols[start : start + step]
        bits = ((chunk[:, None] >> shifts) & np.uint64(1)).astype(np.uint8)
        parts.append(bits.reshape(-1))
    flat = np.concatenate(parts) if parts else np.zeros(0, np.uint8)
    return np.packbits(flat).tobytes()


def unpack_bits(data: bytes, width: int, count: int) -> np.ndarray:
    """The ``count`` symbols of ``width`` bits in ``data`` (uint64)."""
    raw = np.frombuffer(data, dtype=np.uint8)
    if width % 8 == 0:
        nbytes = width // 8
        if raw.size < count * nbytes:
            raise ValueError("stream shorter than its symbols")
        padded = np.zeros((count, 8), np.uint8)
        padded[:, 8 - nbytes :] = raw[: count * nbytes].reshape(count, nbytes)
        return padded.view(">u8").reshape(-1).astype(np.uint64)
    bits = np.unpackbits(raw)
    if bits.size < count * width:
        raise ValueError("stream shorter than its symbols")
    matrix = bits[: count * width].reshape(count, width).astype(np.uint64)
    weights = np.uint64(1) << np.arange(width - 1, -1, -1, dtype=np.uint64)
    return (matrix * weights).sum(axis=1, dtype=np.uint64)


def raw_bytes(count: int, width: int) -> int:
    """Bytes that ``count`` symbols of ``width`` bits take bit-packed."""
    return -(-count * width // 8)


# -- canonical Huffman ----------------------------------------------------------------------------
def code_lengths(counts: dict[int, int]) -> dict[int, int]:
    """Huffman code length of each symbol with a non-zero count, at most MAX_CODE_LENGTH bits.

    A lone symbol gets one bit. When the optimal code is too deep, counts are halved (rounding up,
    so no symbol disappears) and the code rebuilt: near-optimal, and rare for weight streams.
    """
    if len(counts) == 1:
        return {next(iter(counts)): 1}
    weights = dict(counts)
    while True:
        heap: list[tuple[int, int, tuple[int, ...]]] = [
            (count, i, (symbol,)) for i, (symbol, count) in enumerate(sorted(weights.items()))
        ]
        heapq.heapify(heap)
        depth = dict.fromkeys(weights, 0)
        order = len(heap)
        while len(heap) > 1:
            c1, _, s1 = heapq.heappop(heap)
            c2, _, s2 = heapq.heappop(heap)
            for symbol in s1 + s2:
                depth[symbol] += 1
            heapq.heappush(heap, (c1 + c2, order, s1 + s2))
            order += 1
        if max(depth.values()) <= MAX_CODE_LENGTH:
            return depth
        weights = {s: (c + 1) // 2 for s, c in weights.items()}


def canonical_codes(lengths: dict[int, int]) -> dict[int, int]:
    """The canonical code of each symbol: symbols sorted by (length, symbol), codes counting up."""
    codes, code, previous = {}, 0, 0
    for symbol, length in sorted(lengths.items(), key=lambda item: (item[1], item[0])):
        code <<= length - previous
        codes[symbol] = code
        code += 1
        previous = length
    return codes


def _table_bytes(lengths: dict[int, int], width: int) -> bytes:
    """The code lengths: a dense nibble per symbol of the alphabet, or (symbol, length) pairs."""
    dense_size = 1 + (2**width + 1) // 2
    symbol_bytes = max(1, -(-width // 8))
    sparse_size = 1 + 4 + len(lengths) * (symbol_bytes + 1)
    if width <= 16 and dense_size <= sparse_size:
        nibbles = np.zeros(2**width + (2**width) % 2, np.uint8)
        for symbol, length in lengths.items():
            nibbles[symbol] = length
        return b"\x00" + (nibbles[0::2] << 4 | nibbles[1::2]).astype(np.uint8).tobytes()
    out = bytearray(b"\x01" + struct.pack("<I", len(lengths)))
    for symbol, length in sorted(lengths.items()):
        out += symbol.to_bytes(symbol_bytes, "little") + bytes([length])
    return bytes(out)


def _read_table(data: bytes, width: int) -> tuple[dict[int, int], int]:
    """(code lengths, bytes read) of a table written by :func:`_table_bytes`."""
    if data[:1] == b"\x00":
        size = (2**width + 1) // 2
        packed = np.frombuffer(data[1 : 1 + size], np.uint8)
        nibbles = np.stack([packed >> 4, packed & 15], axis=1).reshape(-1)[: 2**width]
        return {int(s): int(n) for s, n in enumerate(nibbles) if n}, 1 + size
    (count,) = struct.unpack_from("<I", data, 1)
    symbol_bytes = max(1, -(-width // 8))
    lengths, at = {}, 5
    for _ in range(count):
        symbol = int.from_bytes(data[at : at + symbol_bytes], "little")
        lengths[symbol] = data[at + symbol_bytes]
        at += symbol_bytes + 1
    return lengths, at


def _huffman_lengths(symbols: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """(the distinct symbols, sorted; their counts; their code lengths) of a non-empty stream."""
    if width <= 16:  # a small alphabet: counting by bincount beats sorting the stream
        counts = np.bincount(symbols, minlength=1)
        values = np.flatnonzero(counts)
        counts = counts[values]
    else:
        values, counts = np.unique(symbols, return_counts=True)
    return values, counts, code_lengths(dict(zip(values.tolist(), counts.tolist(), strict=True)))


def huffman_size(symbols: np.ndarray, width: int) -> int:
    """Bytes that :func:`huffman_encode` writes for ``symbols``, without coding them."""
    symbols = np.asarray(symbols, dtype=np.int64)
    if symbols.size == 0:
        return len(_table_bytes({}, width))
    values, counts, lengths = _huffman_lengths(symbols, width)
    total_bits = int(np.dot(counts, np.array([lengths[v] for v in values.tolist()], np.int64)))
    return len(_table_bytes(lengths, width)) + -(-total_bits // 8)


def huffman_encode(symbols: np.ndarray, width: int) -> bytes:
    """The code table, then the symbols' codes, MSB first, padded with zero bits to a byte."""
    symbols = np.asarray(symbols, dtype=np.int64)
    if symbols.size == 0:
        return _table_bytes({}, width)
    values, _, lengths = _huffman_lengths(symbols, width)
    codes = canonical_codes(lengths)
    index = np.searchsorted(values, symbols)
    length_of = np.array([lengths[v] for v in values.tolist()], np.int64)[index]
    code_of = np.array([codes[v] for v in values.tolist()], np.int64)[index]
    ends = np.cumsum(length_of)
    starts = ends - length_of
    bits = np.zeros(int(ends[-1]), np.uint8)
    for j in range(MAX_CODE_LENGTH):  # bit j of every code at once
        has = length_of > j
        bits[starts[has] + j] = (code_of[has] >> (length_of[has] - 1 - j)) & 1
    return _table_bytes(lengths, width) + np.packbits(bits).tobytes()


def huffman_decode(data: bytes, width: int, count: int) -> np.ndarray:
    """The ``count`` symbols that :func:`huffman_encode` wrote (uint64)."""
    lengths, at = _read_table(data, width)
    if count == 0:
        return np.zeros(0, np.uint64)
    if not lengths:
        raise ValueError("Huffman stream without a code table")
    codes = canonical_codes(lengths)
    top = max(lengths.values())
    # Every top-bit window that starts with a code decodes to it: one lookup per symbol.
    symbol_table = np.zeros(2**top, np.int64)
    length_table = np.zeros(2**top, np.int64)
    for symbol, code in codes.items():
        span = top - lengths[symbol]
        symbol_table[code << span : (code + 1) << span] = symbol
        length_table[code << span : (code + 1) << span] = lengths[symbol]
    bits = np.unpackbits(np.frombuffer(data, np.uint8, offset=at))
    bits = np.concatenate([bits, np.zeros(top, np.uint8)]).astype(np.int64)
    windows = np.zeros(bits.size - top, np.int64)
    for j in range(top):
        windows += bits[j : j + windows.size] << (top - 1 - j)
    step = length_table[windows].tolist()
    positions, position = [], 0
    limit = len(step)
    for _ in range(count):  # the one sequential part: where the next code starts
        if position >= limit:
            raise ValueError("Huffman stream shorter than its symbols")
        positions.append(position)
        position += step[position]
    return symbol_table[windows[positions]].astype(np.uint64)


# -- choosing a coder -----------------------------------------------------------------------------
def _zlib(data: bytes, level: int = 6) -> bytes:
    deflate = zlib.compressobj(level, zlib.DEFLATED, -15)  # raw deflate: no zlib header
    return deflate.compress(data) + deflate.flush()


def _lzma(data: bytes) -> bytes:
    return lzma.compress(data, format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS)


_GENERAL = {ZLIB: _zlib, LZMA: _lzma}


def encode(symbols: np.ndarray, width: int, codec: str | None = None) -> tuple[int, bytes]:
    """(coder id, bytes) of the smallest coding of ``symbols``, or of the one ``codec`` names.

    Raw and Huffman sizes are exact without coding; zlib and lzma code the stream, except that a
    stream over :data:`FAST_ABOVE` bytes skips lzma and takes zlib at level 1.
    """
    packed = pack_bits(symbols, width)
    if codec is not None:
        wanted = CODECS[codec]
        if wanted == HUFFMAN and width <= 16:
            return HUFFMAN, huffman_encode(symbols, width)
        if wanted in _GENERAL:
            return wanted, _GENERAL[wanted](packed)
        return RAW, packed  # raw asked for, or huffman for a stream too wide for it
    sizes = {RAW: len(packed)}
    if width <= 16:  # Huffman's size, computed without coding: coded only if it wins
        sizes[HUFFMAN] = huffman_size(symbols, width)
    coded: dict[int, bytes] = {}
    if len(packed) > FAST_ABOVE:
        coded[ZLIB] = _zlib(packed, level=1)
    else:
        coded = {coder: code(packed) for coder, code in _GENERAL.items()}
    sizes.update((coder, len(data)) for coder, data in coded.items())
    best = min(sizes, key=lambda k: (sizes[k], k))
    if best == RAW:
        return RAW, packed
    return best, huffman_encode(symbols, width) if best == HUFFMAN else coded[best]


def decode(codec: int, data: bytes, width: int, count: int) -> np.ndarray:
    """The ``count`` symbols of ``width`` bits that :func:`encode` stored as ``(codec, data)``."""
    if codec == RAW:
        return unpack_bits(data, width, count)
    if codec == HUFFMAN:
        return huffman_decode(data, width, count)
    if codec == ZLIB:
        return unpack_bits(zlib.decompress(data, -15), width, count)
    if codec == LZMA:
        raw = lzma.decompress(data, format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS)
        return unpack_bits(raw, width, count)
    raise ValueError(f"unknown stream coder {codec}")
