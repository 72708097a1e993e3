"""The compressed file: a header (magic, version, length, checksum), the metadata, the streams.

Layout (integers little-endian)::

    b"KDXC"  u8 version  u64 body length  u32 CRC-32 of the body      (17 bytes)
    body:    u8 coder  u32 stored length  u32 raw length  metadata (JSON, entropy-coded)
             the tensors' streams, one after another

The metadata lists the state_dict's entries in order; each is a tensor record
(:mod:`kdexp.compress.tensors`), a tuple or list of entries, ``None``, a ``torch.dtype`` or a plain
number or string: what the state_dicts of float models, torch.ao int8 models (quantized tensors,
``_packed_params`` tuples) and kdexp's packed and weight-shared layers hold. A truncated or
altered file fails the length or checksum test and is refused, naming the file.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from kdexp.compress import entropy, tensors
from kdexp.errors import ConfigError

MAGIC = b"KDXC"
VERSION = 1
_HEADER = struct.Struct("<4sBQI")
_META = struct.Struct("<BII")
_CODER_NAMES = {number: name for name, number in entropy.CODECS.items()}
_QDTYPES = {torch.qint8: "qint8", torch.quint8: "quint8", torch.qint32: "qint32"}


class CompressedFileError(ValueError):
    """A file (or bytes) that is not an intact kdexp compressed model; the message names it."""

    def __init__(self, name: str, reason: str) -> None:
        self.name, self.reason = name, reason
        super().__init__(f"{name}: {reason}")


class _Writer:
    """Collects the streams while the metadata tree is built."""

    def __init__(self, codec: str | None) -> None:
        self.codec = codec
        self.streams: list[tuple[int, bytes]] = []
        self.entry = ""  # the state_dict key being written
        self.rows: list[dict[str, Any]] = []

    def tensor(self, tensor: Tensor, zero: int | None = 0, **extra: Any) -> dict[str, Any]:
        meta, streams = tensors.encode(tensor, self.codec, zero)
        meta["c"] = [[codec, len(data)] for codec, data in streams]
        self.streams += streams
        sizes = [len(data) for _, data in streams]
        self.rows.append(
            {
                "entry": self.entry,
                "numel": tensor.numel(),
                "layout": {"d": "dense", "m": "bitmask", "r": "relative"}[meta["l"]],
                "index_bits": meta.get("pw"),
                "value_bits": meta.get("vw", 8 * tensor.element_size()),
                "position_bytes": sum(sizes[:-1]),
                "value_bytes": sizes[-1],
                "coders": [_CODER_NAMES[codec] for codec, _ in streams],
            }
        )
        return {"T": {**meta, **extra}}


def _packed_hints(model: nn.Module) -> dict[str, tuple[int, int]]:
    """``{"<layer>.packed": (bits, number of weights)}`` of the model's packed low-bit layers."""
    from kdexp.packed import PackedConv2d, PackedLinear

    return {
        f"{name}.packed" if name else "packed": (
            module.bits,
            int(torch.Size(module.weight_shape).numel()),
        )
        for name, module in model.named_modules()
        if isinstance(module, (PackedConv2d, PackedLinear))
    }


def _node(value: Any, writer: _Writer, hint: tuple[int, int] | None = None) -> Any:
    """The metadata of one state_dict value; its tensors' streams go to ``writer``."""
    if isinstance(value, Tensor):
        if value.is_quantized:
            return _quantized(value, writer)
        if hint is not None and value.dtype == torch.uint8:
            return _packed(value, writer, *hint)
        return writer.tensor(value)
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, torch.dtype):
        return {"D": str(value).removeprefix("torch.")}
    if isinstance(value, tuple | list):
        return {"U" if isinstance(value, tuple) else "L": [_node(v, writer) for v in value]}
    raise TypeError(f"cannot compress a state_dict value of type {type(value).__name__}")


def _quantized(value: Tensor, writer: _Writer) -> dict[str, Any]:
    """An int8 tensor of torch.ao: its integer representation and its quantization parameters."""
    codes = value.int_repr()
    if value.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
        zero_point = int(value.q_zero_point())
        record = writer.tensor(codes, zero=zero_point)
        record["Q"] = {"dtype": _QDTYPES[value.dtype], "scale": value.q_scale(), "zp": zero_point}
        return record
    zero_points = value.q_per_channel_zero_points()
    sparse = 0 if not bool(zero_points.any()) else None  # zero is code 0 only when all zp are 0
    record = writer.tensor(codes, zero=sparse)
    record["Q"] = {
        "dtype": _QDTYPES[value.dtype],
        "axis": int(value.q_per_channel_axis()),
        "scales": _node(value.q_per_channel_scales(), writer),
        "zps": _node(zero_points, writer),
    }
    return record


def _packed(value: Tensor, writer: _Writer, bits: int, numel: int) -> dict[str, Any]:
    """A packed layer's uint8 buffer as its ``bits``-bit codes (zero weight: code 2^(bits-1))."""
    from kdexp.packed import pack, unpack

    codes = unpack(value.cpu(), bits, numel)
    if not torch.equal(pack(codes, bits), value.cpu()):  # not what pack() writes: keep the bytes
        return writer.tensor(value)
    return writer.tensor(codes, zero=2 ** (bits - 1) if bits > 1 else None, pk=[bits, numel])


def compress(source: nn.Module | Mapping[str, Any], codec: str | None = None) -> bytes:
    """The compressed file of a model (its ``state_dict()``) or of a state_dict, as bytes.

    ``codec`` forces one entropy coder (``raw``, ``huffman``, ``zlib``, ``lzma``) for every stream;
    by default each stream takes the smallest. Give the model rather than its state_dict for
    models with packed low-bit layers: their codes are then stored at their bit width with the
    zeros left out (a state_dict alone does not say how many weights a packed buffer holds).
    """
    return _compress(source, codec)[0]


def _compress(
    source: nn.Module | Mapping[str, Any], codec: str | None = None
) -> tuple[bytes, list[dict[str, Any]]]:
    """:func:`compress`, and the rows of :func:`layout_report`."""
    if codec is not None and codec not in entropy.CODECS:
        raise ValueError(f"codec={codec!r}: one of {', '.join(entropy.CODECS)}, or None")
    hints = _packed_hints(source) if isinstance(source, nn.Module) else {}
    state = source.state_dict() if isinstance(source, nn.Module) else source
    writer = _Writer(codec)
    entries = []
    for key, value in state.items():
        writer.entry = str(key)
        entries.append([str(key), _node(value, writer, hints.get(str(key)))])
    versions = getattr(state, "_metadata", None)  # module versions that load_state_dict reads
    document: dict[str, Any] = {"entries": entries}
    if versions:
        document["versions"] = {str(k): dict(v) for k, v in versions.items()}
    meta = json.dumps(document, separators=(",", ":")).encode()
    meta_codec, meta_data = entropy.encode(np.frombuffer(meta, np.uint8), 8, codec)
    body = b"".join(
        [_META.pack(meta_codec, len(meta_data), len(meta)), meta_data]
        + [data for _, data in writer.streams]
    )
    return _HEADER.pack(MAGIC, VERSION, len(body), zlib.crc32(body)) + body, writer.rows


def layout_report(
    source: nn.Module | Mapping[str, Any], codec: str | None = None
) -> tuple[int, list[dict[str, Any]]]:
    """(file bytes, one row per stored tensor): its layout (dense, bitmask or relative indices),
    index and value bits, bytes of positions and of values after coding, and the coders used.

    The file is the rows' bytes plus the header and the metadata.
    """
    data, rows = _compress(source, codec)
    return len(data), rows


def compressed_size(source: nn.Module | Mapping[str, Any], codec: str | None = None) -> int:
    """Bytes of :func:`compress` ``(source)``: what the model takes stored compressed."""
    return len(compress(source, codec))


def _body(data: bytes, name: str) -> bytes:
    """The checked body of ``data``; CompressedFileError (naming ``name``) if it is not intact."""
    if len(data) < _HEADER.size:
        if not MAGIC.startswith(data[:4]):
            raise CompressedFileError(name, "not a kdexp compressed model (no KDXC header)")
        raise CompressedFileError(name, f"truncated: {len(data)} bytes, shorter than the header")
    magic, version, length, checksum = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise CompressedFileError(name, "not a kdexp compressed model (no KDXC header)")
    if version != VERSION:
        raise CompressedFileError(
            name, f"format version {version}; this kdexp reads version {VERSION}"
        )
    body = data[_HEADER.size :]
    if len(body) != length:
        state = "truncated" if len(body) < length else "longer than written"
        raise CompressedFileError(
            name, f"{state}: the header says {length} bytes follow it, {len(body)} do"
        )
    if zlib.crc32(body) != checksum:
        raise CompressedFileError(name, "checksum mismatch: the file was altered or is corrupt")
    return body


def decompress(data: bytes, name: str = "<bytes>") -> dict[str, Any]:
    """The state_dict stored by :func:`compress`; ``name`` names the source in errors."""
    body = _body(data, name)
    try:
        meta_codec, meta_len, raw_len = _META.unpack_from(body)
        at = _META.size
        meta_bytes = entropy.decode(meta_codec, body[at : at + meta_len], 8, raw_len)
        meta = json.loads(meta_bytes.astype(np.uint8).tobytes())
        reader = _Reader(body, at + meta_len)
        state = OrderedDict((key, reader.node(node)) for key, node in meta["entries"])
        if "versions" in meta:  # as state_dict() leaves them: torch.ao modules read them
            state._metadata = OrderedDict(meta["versions"])  # type: ignore[attr-defined]
        return state
    except CompressedFileError:
        raise
    except Exception as error:  # intact checksum but unreadable content: a writer's bug
        raise CompressedFileError(name, f"unreadable content ({error})") from None


class _Reader:
    """Rebuilds the state_dict's values, taking the streams in the order they were written."""

    def __init__(self, body: bytes, start: int) -> None:
        self.body, self.at = body, start

    def _streams(self, counts: list[list[int]]) -> list[tuple[int, bytes]]:
        found = []
        for codec, size in counts:
            found.append((int(codec), self.body[self.at : self.at + size]))
            self.at += size
        return found

    def node(self, node: Any) -> Any:
        if not isinstance(node, dict):
            return node
        if "D" in node:
            return getattr(torch, node["D"])
        if "U" in node:
            return tuple(self.node(v) for v in node["U"])
        if "L" in node:
            return [self.node(v) for v in node["L"]]
        meta = node["T"]
        value = tensors.decode(meta, self._streams(meta["c"]))
        if "pk" in meta:
            from kdexp.packed import pack

            return pack(value, int(meta["pk"][0]))
        if "Q" in node:
            return self._quantized(value, node["Q"])
        return value

    def _quantized(self, codes: Tensor, q: dict[str, Any]) -> Tensor:
        if "scale" in q:
            return torch._make_per_tensor_quantized_tensor(codes, q["scale"], q["zp"])
        scales, zero_points = self.node(q["scales"]), self.node(q["zps"])
        return torch._make_per_channel_quantized_tensor(codes, scales, zero_points, q["axis"])


def save_compressed(
    path: str | Path, source: nn.Module | Mapping[str, Any], codec: str | None = None
) -> int:
    """Write :func:`compress` ``(source)`` to ``path`` atomically; return the bytes written."""
    data = compress(source, codec)
    file = Path(path)
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(f".{file.name}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(file)
    return len(data)


def load_compressed(path: str | Path, key: str | None = None) -> dict[str, Any]:
    """The state_dict in the compressed file ``path``.

    A missing, truncated, altered or foreign file raises :class:`CompressedFileError` naming the
    file, or, when the path came from config key ``key``, a :class:`ConfigError` naming both.
    """
    file = Path(path).expanduser()
    try:
        if not file.is_file():
            raise CompressedFileError(str(file), "no such file")
        return decompress(file.read_bytes(), str(file))
    except CompressedFileError as error:
        if key is None:
            raise
        raise ConfigError(key, str(path), f"a kdexp compressed model; {error}") from None
