"""Low-bit weights stored packed: 8 / b values of ``b`` bits per byte, plus per-channel scales.

:class:`PackedConv2d` and :class:`PackedLinear` hold ``packed`` (uint8) and ``scale`` (float32,
one per output channel) buffers, and the bias, and unpack the weight on every forward call, so
``state_dict()`` (and ``kdexp.stats.size_bytes``, ``final.pt``) holds the packed tensors. Codes are
the signed integers ``q ∈ [-2^(b-1), 2^(b-1) - 1]`` shifted by ``2^(b-1)``; at 1 bit a code is
1 for +scale and 0 for -scale. With quantized activations a layer also holds ``act_qparams``
(step, lowest code, highest code).

:func:`kdexp.method.quantize.load_packed` rebuilds a runnable model from a freshly built fp32 model
of the same architecture and such a state_dict (or a ``final.pt``), read with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

BITS = (1, 2, 4, 8)


def pack(codes: Tensor, bits: int) -> Tensor:
    """Unsigned integer ``codes`` in ``[0, 2^bits)`` → uint8, ``8 // bits`` codes per byte."""
    if bits not in BITS:
        raise ValueError(f"bits={bits}: one of {BITS}")
    per_byte = 8 // bits
    flat = codes.flatten().to(torch.int32)
    pad = (-flat.numel()) % per_byte
    flat = torch.cat([flat, flat.new_zeros(pad)]).view(-1, per_byte)
    shifts = torch.arange(per_byte, device=flat.device, dtype=torch.int32) * bits
    return (flat << shifts).sum(1).to(torch.uint8)


def unpack(packed: Tensor, bits: int, numel: int) -> Tensor:
    """The first ``numel`` codes stored in ``packed`` (int32)."""
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, device=packed.device, dtype=torch.int32) * bits
    codes = (packed.to(torch.int32)[:, None] >> shifts) & (2**bits - 1)
    return codes.flatten()[:numel]


def packed_bytes(numel: int, bits: int) -> int:
    """Bytes that ``numel`` codes of ``bits`` bits take packed."""
    return -(-numel * bits // 8)


def bits_of(packed_numel: int, numel: int) -> int:
    """The bit width of a packed tensor of ``packed_numel`` bytes holding ``numel`` codes."""
    for bits in BITS:
        if packed_bytes(numel, bits) == packed_numel:
            return bits
    raise ValueError(f"{packed_numel} bytes do not hold {numel} codes of {BITS} bits")


class _Packed:
    """What both packed layers share: the weight's shape, its bit width, unpacking."""

    packed: Tensor
    scale: Tensor
    act_qparams: Tensor | None
    weight_shape: tuple[int, ...]

    @property
    def bits(self) -> int:
        """Bits per weight, from the sizes of ``packed`` and the weight."""
        return bits_of(self.packed.numel(), int(torch.Size(self.weight_shape).numel()))

    def unpacked_weight(self) -> Tensor:
        """The dequantized weight, as the quantizer left it."""
        bits, numel = self.bits, int(torch.Size(self.weight_shape).numel())
        codes = unpack(self.packed, bits, numel).view(self.weight_shape).to(self.scale.dtype)
        values = codes * 2 - 1 if bits == 1 else codes - 2 ** (bits - 1)
        return values * self.scale.view(-1, *([1] * (len(self.weight_shape) - 1)))

    def quantize_input(self, x: Tensor) -> Tensor:
        if self.act_qparams is None:
            return x
        step, low, high = self.act_qparams.tolist()
        return torch.clamp(torch.round(x / step), low, high) * step

    def set_packed(self, codes: Tensor, scale: Tensor, bits: int) -> None:
        """Store signed ``codes`` (or ±1 at 1 bit) and per-channel ``scale`` packed."""
        unsigned = (codes > 0).to(torch.int32) if bits == 1 else codes + 2 ** (bits - 1)
        self.packed = pack(unsigned, bits)
        self.scale = scale.detach().to(torch.float32).clone()


class PackedConv2d(nn.Conv2d, _Packed):
    """A Conv2d whose weight is stored packed at 1, 2, 4 or 8 bits and unpacked per call."""

    def forward(self, x: Tensor) -> Tensor:
        """The convolution with the unpacked weight."""
        return self._conv_forward(self.quantize_input(x), self.unpacked_weight(), self.bias)


class PackedLinear(nn.Linear, _Packed):
    """A Linear whose weight is stored packed at 1, 2, 4 or 8 bits and unpacked per call."""

    def forward(self, x: Tensor) -> Tensor:
        """The linear map with the unpacked weight."""
        return F.linear(self.quantize_input(x), self.unpacked_weight(), self.bias)


def packed_from(module: nn.Module) -> nn.Module:
    """An empty packed layer with ``module``'s settings (a Conv2d or Linear); weight dropped."""
    cls: type[nn.Module]
    if isinstance(module, nn.Conv2d):
        cls = PackedConv2d
    elif isinstance(module, nn.Linear):
        cls = PackedLinear
    else:
        raise TypeError(f"cannot pack {type(module).__name__}")
    layer = cls.__new__(cls)
    layer.__dict__.update(module.__dict__)
    layer._parameters = {k: v for k, v in module._parameters.items() if k != "weight"}
    layer._buffers = {}
    layer._modules = {}
    layer.__dict__["weight_shape"] = tuple(module.weight.shape)
    device = module.weight.device
    layer.register_buffer("packed", torch.zeros(0, dtype=torch.uint8, device=device))
    layer.register_buffer("scale", torch.zeros(module.weight.shape[0], device=device))
    layer.register_buffer("act_qparams", None)
    return layer


def quantized_kind(state: Mapping[str, object]) -> str | None:
    """What quantized model ``state`` is the state_dict of, or None for a float model.

    torch.ao int8 models hold quantized tensors or ``_packed_params`` entries; the low-bit models
    of ``quantize/qat`` hold uint8 ``packed`` weights (this module's format).
    """
    for name, value in state.items():
        if name.endswith("._packed_params") or (isinstance(value, Tensor) and value.is_quantized):
            return "an int8 model"
    for name, value in state.items():
        if name.endswith(".packed") and isinstance(value, Tensor) and value.dtype == torch.uint8:
            return "a model with packed low-bit weights"
    return None


@contextmanager
def quantized_storage_quietly() -> Iterator[None]:
    """Silence torch's TypedStorage deprecation, which torch's own (un)pickling of quantized
    tensors raises (torch/_utils.py) on every int8 model or checkpoint; other warnings show."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "TypedStorage is deprecated", UserWarning)
        yield
