"""Fake quantization for quantization-aware training: quantizers, and the layers that use them.

Weights are quantized per output channel and symmetrically (zero-point 0), so zero stays exactly
representable: a pruned weight stays zero. At ``b`` ≥ 2 bits a weight maps to the integer grid
``q = clamp(round(w / s), -Qn, Qp)`` with ``Qn = 2^(b-1)``, ``Qp = 2^(b-1) - 1`` and back to
``q · s``; rounding passes gradients straight through (the straight-through estimator, Bengio et
al. 2013). The step ``s`` is either ``max|w| / Qp`` of the current weights (min-max) or learned
(LSQ, Esser et al. 2020, "Learned Step Size Quantization", with its gradient scale
``1 / sqrt(N · Qp)`` and its initialisation ``2 · mean|w| / sqrt(Qp)``). At 1 bit a weight is
``sign(w) · mean|w|`` per output channel (XNOR-Net, Rastegari et al. 2016), ``sign(0) = +1``.

Activations (optional) are quantized per tensor at the input of each quantized layer: unsigned
when the layer's inputs were non-negative on the first batch, signed otherwise; the step follows an
exponential moving average of ``max|x| / Qp`` or is learned (LSQ). 1-bit layers quantize their
inputs at 2 bits.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def qrange(bits: int, signed: bool = True) -> tuple[int, int]:
    """``(Qn, Qp)``: the integer grid is ``[-Qn, Qp]`` (signed) or ``[0, 2^b - 1]`` (unsigned)."""
    if signed:
        return 2 ** (bits - 1), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def round_ste(x: Tensor) -> Tensor:
    """``round(x)`` forward, identity backward (the straight-through estimator)."""
    return x + (x.round() - x).detach()


def sign_ste(x: Tensor) -> Tensor:
    """``sign(x)`` with ``sign(0) = +1`` forward; backward passes the gradient where |x| ≤ 1."""
    clipped = x.clamp(-1.0, 1.0)
    return clipped + (torch.where(x >= 0, 1.0, -1.0).to(x.dtype) - clipped).detach()


def grad_scale(x: Tensor, factor: float) -> Tensor:
    """``x`` forward; its gradient multiplied by ``factor`` backward (LSQ's step-size scale)."""
    return (x - x * factor).detach() + x * factor


def quantize(x: Tensor, scale: Tensor, bits: int, signed: bool = True) -> Tensor:
    """Integer codes ``clamp(round(x / scale), -Qn, Qp)`` (as a float tensor)."""
    qn, qp = qrange(bits, signed)
    return torch.clamp(torch.round(x / scale), -qn, qp)


def dequantize(q: Tensor, scale: Tensor) -> Tensor:
    """``q · scale``."""
    return q * scale


def binarize(w: Tensor) -> tuple[Tensor, Tensor]:
    """XNOR-Net: ``(signs ∈ {-1, +1}, per-output-channel scale mean|w|)`` of a weight tensor."""
    scale = w.detach().abs().flatten(1).mean(1)
    return torch.where(w >= 0, 1.0, -1.0).to(w.dtype), scale


def _per_channel(scale: Tensor, like: Tensor) -> Tensor:
    return scale.view(-1, *([1] * (like.dim() - 1)))


class WeightQuantizer(nn.Module):
    """Per-output-channel symmetric fake quantization of a weight tensor at ``bits`` bits."""

    def __init__(self, bits: int, out_channels: int, lsq: bool = False) -> None:
        super().__init__()
        self.bits, self.lsq = bits, lsq and bits > 1
        self.scale: nn.Parameter | None = None
        if self.lsq:
            self.scale = nn.Parameter(torch.ones(out_channels))

    @torch.no_grad()
    def init_from(self, weight: Tensor) -> None:
        """LSQ's initial step ``2 · mean|w| / sqrt(Qp)`` per output channel."""
        if self.scale is not None:
            _, qp = qrange(self.bits)
            mean = weight.abs().flatten(1).mean(1).clamp_min(1e-8)
            self.scale.copy_(2 * mean / math.sqrt(qp))

    def step(self, weight: Tensor) -> Tensor:
        """The per-channel step size (1-D) that quantizes ``weight`` now."""
        if self.bits == 1:
            return binarize(weight)[1]
        if self.scale is not None:
            return self.scale.detach().abs().clamp_min(1e-8)
        _, qp = qrange(self.bits)
        return (weight.detach().abs().flatten(1).amax(1) / qp).clamp_min(1e-8)

    def forward(self, weight: Tensor) -> Tensor:
        """The fake-quantized weight: quantized values, straight-through gradients."""
        if self.bits == 1:
            scale = weight.abs().flatten(1).mean(1)
            return sign_ste(weight) * _per_channel(scale, weight)
        qn, qp = qrange(self.bits)
        if self.scale is None:  # min-max: every weight lies inside [-Qp·s, Qp·s], no clipping
            step = _per_channel(self.step(weight), weight)
            return round_ste(weight / step) * step
        per_channel = weight[0].numel()
        step = grad_scale(self.scale.abs().clamp_min(1e-8), 1.0 / math.sqrt(per_channel * qp))
        step = _per_channel(step, weight)
        return round_ste(torch.clamp(weight / step, -qn, qp)) * step

    def codes(self, weight: Tensor) -> tuple[Tensor, Tensor]:
        """``(integer codes, per-channel scale)`` of ``weight`` as this quantizer rounds it."""
        with torch.no_grad():
            if self.bits == 1:
                signs, scale = binarize(weight)
                return signs, scale
            scale = self.step(weight)
            return quantize(weight, _per_channel(scale, weight), self.bits), scale

    def extra_repr(self) -> str:
        return f"bits={self.bits}, lsq={self.lsq}"


class ActQuantizer(nn.Module):
    """Per-tensor fake quantization of a layer's input; signedness fixed on the first batch."""

    signed: Tensor
    initialized: Tensor
    running_scale: Tensor

    def __init__(self, bits: int, lsq: bool = False, momentum: float = 0.1) -> None:
        super().__init__()
        self.bits, self.lsq, self.momentum = max(bits, 2), lsq, momentum
        self.register_buffer("signed", torch.zeros((), dtype=torch.bool))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self.register_buffer("running_scale", torch.ones(()))
        self.scale: nn.Parameter | None = nn.Parameter(torch.ones(())) if lsq else None
        self._ready, self._signed = False, False  # host-side copies: no device sync per call

    def current_scale(self) -> Tensor:
        """The step size used in evaluation (and by the packed model)."""
        if self.scale is not None:
            return self.scale.detach().abs().clamp_min(1e-8)
        return self.running_scale.clamp_min(1e-8)

    @torch.no_grad()
    def _initialize(self, x: Tensor) -> None:
        self.signed.fill_(bool(x.min() < 0))
        _, qp = qrange(self.bits, bool(self.signed))
        self.running_scale.fill_(float(x.abs().max().clamp_min(1e-8)) / qp)
        if self.scale is not None:
            self.scale.fill_(2 * float(x.abs().mean().clamp_min(1e-8)) / math.sqrt(qp))
        self.initialized.fill_(True)

    def forward(self, x: Tensor) -> Tensor:
        """``x`` fake-quantized on its per-tensor grid."""
        if not self._ready:
            if not bool(self.initialized):
                self._initialize(x)
            self._ready, self._signed = True, bool(self.signed)
        qn, qp = qrange(self.bits, self._signed)
        if self.scale is not None:
            step = grad_scale(self.scale.abs().clamp_min(1e-8), 1.0 / math.sqrt(x[0].numel() * qp))
        else:
            if self.training:
                with torch.no_grad():
                    now = x.abs().max() / qp
                    self.running_scale.mul_(1 - self.momentum).add_(self.momentum * now)
            step = self.running_scale.clamp_min(1e-8)
        return round_ste(torch.clamp(x / step, -qn, qp)) * step

    def extra_repr(self) -> str:
        return f"bits={self.bits}, lsq={self.lsq}"


class QuantConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` whose weight (and optionally input) is fake-quantized in ``forward``."""

    weight_quantizer: WeightQuantizer
    act_quantizer: ActQuantizer | None

    def forward(self, x: Tensor) -> Tensor:
        """The convolution with quantized weights (and inputs)."""
        if self.act_quantizer is not None:
            x = self.act_quantizer(x)
        return self._conv_forward(x, self.weight_quantizer(self.weight), self.bias)


class QuantLinear(nn.Linear):
    """An ``nn.Linear`` whose weight (and optionally input) is fake-quantized in ``forward``."""

    weight_quantizer: WeightQuantizer
    act_quantizer: ActQuantizer | None

    def forward(self, x: Tensor) -> Tensor:
        """The linear map with quantized weights (and inputs)."""
        if self.act_quantizer is not None:
            x = self.act_quantizer(x)
        return F.linear(x, self.weight_quantizer(self.weight), self.bias)


QUANTIZED_TYPES = (nn.Conv2d, nn.Linear)


def quantizable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's Conv2d and Linear layers, in the order of ``named_modules``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QUANTIZED_TYPES)]


def to_fake(module: nn.Module, bits: int, lsq: bool, activations: bool) -> nn.Module:
    """A Quant* copy of a Conv2d or Linear sharing its parameters, quantizers initialised."""
    fake: nn.Module
    if isinstance(module, nn.Conv2d):
        fake = QuantConv2d.__new__(QuantConv2d)
    elif isinstance(module, nn.Linear):
        fake = QuantLinear.__new__(QuantLinear)
    else:
        raise TypeError(f"cannot fake-quantize {type(module).__name__}")
    fake.__dict__.update(module.__dict__)
    fake._parameters = dict(module._parameters)
    fake._buffers = dict(module._buffers)
    fake._modules = dict(module._modules)
    fake.weight_quantizer = WeightQuantizer(bits, module.weight.shape[0], lsq).to(
        module.weight.device
    )
    fake.weight_quantizer.init_from(module.weight)
    fake.act_quantizer = ActQuantizer(bits, lsq).to(module.weight.device) if activations else None
    return fake


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted path ``name``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def plain_copy(module: nn.Module) -> nn.Module:
    """A plain Conv2d/Linear with ``module``'s settings and its *fake-quantized* weights."""
    assert isinstance(module, (QuantConv2d, QuantLinear))
    plain: nn.Module
    plain = (
        nn.Conv2d.__new__(nn.Conv2d)
        if isinstance(module, nn.Conv2d)
        else nn.Linear.__new__(nn.Linear)
    )
    plain.__dict__.update(module.__dict__)
    plain._modules = {}
    plain._parameters = dict(module._parameters)
    with torch.no_grad():
        quantized = module.weight_quantizer(module.weight).detach().clone()
    plain._parameters["weight"] = nn.Parameter(quantized, requires_grad=False)
    return plain
