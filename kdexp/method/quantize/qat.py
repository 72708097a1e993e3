"""Quantization-aware training at 8, 4, 2 or 1 bits, optionally with a distillation loss."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, cast

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from kdexp.dataset.base import Data
from kdexp.errors import ConfigError
from kdexp.method.base import Needs, Step
from kdexp.method.quantize import backend
from kdexp.method.quantize.common import QuantMethod, calibration_inputs, check_calibration
from kdexp.method.quantize.fake import (
    QuantConv2d,
    QuantLinear,
    plain_copy,
    qrange,
    quantizable_layers,
    set_module,
    to_fake,
)
from kdexp.packed import packed_from

BITS = (8, 4, 2, 1)


class QAT(QuantMethod):
    """Quantization-aware training: fake-quantized weights (and optionally activations).

    Every Conv2d and Linear is replaced in ``prepare`` by a fake-quantizing copy
    (:mod:`kdexp.method.quantize.fake`): per-output-channel symmetric quantizers with the
    straight-through estimator at 8/4/2 bits, min-max steps or learned ones (``lsq``; Esser et al.
    2020), and ``sign(w) · mean|w|`` at 1 bit (XNOR-Net; Rastegari et al. 2016). The first and
    last layers stay at 8 bits unless ``keep_first_last_8bit`` is false. With ``keep_sparsity``
    the weights that are exactly zero at the start (a pruned model) stay zero while training: a
    mask buffer on each such layer is re-applied after every step.

    ``finalize`` returns, at 8 bits, the int8 model of the backend (activations calibrated on
    ``calibration_batches`` training batches); at 4/2/1 bits a model whose quantized layers hold
    their weights packed (:mod:`kdexp.method.quantize.packed`; reload with ``load_packed``).

    With ``distill`` (a distillation method's partial config, e.g. ``+method/distill@method.distill
    =kd``) the loss is that method's, with the fake-quantized model as its student.
    """

    def __init__(
        self,
        *,
        data: Data,
        criterion: nn.Module,
        bits: int = 4,
        lsq: bool = False,
        quantize_activations: bool = False,
        keep_first_last_8bit: bool = True,
        calibration_batches: int = 8,
        keep_sparsity: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(data=data, criterion=criterion, **kwargs)
        if isinstance(bits, bool) or bits not in BITS:
            raise ConfigError("method.bits", bits, "one of 8, 4, 2, 1")
        if bits == 8:
            check_calibration(data, calibration_batches)
        self.bits, self.lsq = int(bits), bool(lsq)
        self.quantize_activations = bool(quantize_activations)
        self.keep_first_last_8bit = bool(keep_first_last_8bit)
        self.calibration_batches = calibration_batches
        self.keep_sparsity = bool(keep_sparsity)
        self._masked: list[nn.Module] = []  # fake layers whose pruned zeros stay zero
        self.layer_bits: dict[str, int] = {}

    @classmethod
    def needs(cls, cfg: DictConfig) -> Needs:
        """Below 8 bits the weights are unpacked with bit shifts that torch.onnx cannot export."""
        needs = super().needs(cfg)
        bits = cfg.get("bits", 4)
        if bits == 8:
            return needs
        reason = (
            f"method.bits={bits} stores packed weights that torch.onnx cannot export; "
            "method.bits=8 or method=quantize/ptq_int8 give int8 layers that it can"
        )
        return replace(needs, cannot_export={"onnx": reason})

    # -- the Method protocol ------------------------------------------------------------------
    def prepare(self, model: nn.Module) -> nn.Module:
        """Replace each Conv2d/Linear by its fake-quantizing copy."""
        layers = quantizable_layers(model)
        if not layers:
            raise ConfigError(
                "method", "quantize/qat", f"a model with Conv2d or Linear layers ({type(model)})"
            )
        ends = {layers[0][0], layers[-1][0]} if self.keep_first_last_8bit else set()
        for name, module in layers:
            bits = 8 if name in ends else self.bits
            self.layer_bits[name] = bits
            fake = to_fake(module, bits, self.lsq, self.quantize_activations)
            weight = cast(Tensor, module.weight)
            if self.keep_sparsity and bool((weight == 0).any()):
                fake.register_buffer("sparsity_mask", (weight != 0).to(weight.dtype))
                self._masked.append(fake)
            set_module(model, name, fake)
        return model

    def after_step(self, ctx: Step) -> dict[str, float]:
        """Re-zero the pruned weights (``keep_sparsity``)."""
        with torch.no_grad():
            for fake in self._masked:
                cast(Tensor, fake.weight).mul_(cast(Tensor, fake.sparsity_mask))
        return {}

    def finalize(self, model: nn.Module) -> nn.Module:
        """The int8 model (8 bits) or the packed model (fewer bits)."""
        fakes = {
            n: m for n, m in model.named_modules() if isinstance(m, (QuantConv2d, QuantLinear))
        }
        latent = {n: m.weight.detach().clone() for n, m in fakes.items()}
        with torch.no_grad():
            dequantized = {n: m.weight_quantizer(m.weight).detach() for n, m in fakes.items()}
        plain = model
        for name, module in fakes.items():  # the fp32 model with the quantized weights
            set_module(plain, name, plain_copy(module))
        device = next(plain.parameters()).device
        self.record_fp32(plain)
        self.record_errors(latent, dequantized, self.layer_bits)
        self.set_nonzero(plain, dequantized)
        if self.bits == 8:
            batches = calibration_inputs(self.data, self.calibration_batches)
            quantized = backend.quantize_static(plain, batches)
            return quantized if device.type == "cpu" else backend.OnCpu(quantized)
        for name, module in fakes.items():
            set_module(plain, name, _packed(module))
        return plain.eval()


def _packed(module: QuantConv2d | QuantLinear) -> nn.Module:
    """The packed layer holding ``module``'s quantized weight (and its activation step)."""
    codes, scale = module.weight_quantizer.codes(module.weight)
    layer = packed_from(module)
    layer.set_packed(codes.to(torch.int32), scale, module.weight_quantizer.bits)  # type: ignore[operator]
    act = module.act_quantizer
    if act is not None:
        qn, qp = qrange(act.bits, bool(act.signed))
        layer.act_qparams = torch.tensor(
            [float(act.current_scale()), -qn, qp], device=module.weight.device
        )
    return layer
