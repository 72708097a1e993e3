"""Post-training quantization: int8 static (calibrated) and int8 dynamic.

Neither trains: they declare ``Needs(trains=False)``, so the run evaluates the trained model once
on the validation split and goes straight to ``finalize``, which converts with
:mod:`kdexp.method.quantize.backend`. ``schedule.epochs`` keeps meaning the recipe of the baseline
the run starts from (with ``checkpoint: auto`` and no finished baseline of this model, dataset and
seed, that baseline is trained first with the run's schedule).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from omegaconf import DictConfig
from torch import nn

from kdexp.dataset.base import Data
from kdexp.errors import ConfigError
from kdexp.method.base import Needs
from kdexp.method.quantize import backend
from kdexp.method.quantize.common import QuantMethod, calibration_inputs, check_calibration


class _PostTraining(QuantMethod):
    """Check in ``prepare`` that the backend can convert the model; convert in ``finalize``."""

    @classmethod
    def needs(cls, cfg: DictConfig) -> Needs:
        """Nothing to train (so nothing to train in parallel: calibration wants every batch)."""
        return replace(super().needs(cfg), trains=False, distributed=False)

    def prepare(self, model: nn.Module) -> nn.Module:
        """The trained model in eval mode, unchanged; raises ConfigError if it cannot convert."""
        self.check(model)
        return model.requires_grad_(False).eval()

    def check(self, model: nn.Module) -> None:
        """Raise ConfigError if the backend cannot quantize ``model``."""

    def finalize(self, model: nn.Module) -> nn.Module:
        """The converted model, on CPU (wrapped to accept inputs from another device)."""
        device = next(model.parameters()).device
        self.record_fp32(model)
        quantized = self.convert(model)
        return quantized if device.type == "cpu" else backend.OnCpu(quantized)

    def convert(self, model: nn.Module) -> nn.Module:
        raise NotImplementedError


class PTQInt8(_PostTraining):
    """Post-training static int8 quantization (Jacob et al. 2018; Krishnamoorthi 2018).

    Weights int8 per output channel (symmetric), activations uint8 per tensor with ranges observed
    on ``calibration_batches`` training batches; Conv-BN-ReLU fused; integer kernels on CPU
    (x86/fbgemm, qnnpack on ARM).
    """

    def __init__(
        self, *, data: Data, criterion: nn.Module, calibration_batches: int = 32, **kwargs: Any
    ) -> None:
        super().__init__(data=data, criterion=criterion, **kwargs)
        check_calibration(data, calibration_batches)
        self.calibration_batches = calibration_batches

    def check(self, model: nn.Module) -> None:
        """A dry conversion on one validation batch: untraceable modules and layers the backend
        leaves in float raise ConfigError before anything trains or is written."""
        inputs, _ = next(iter(self.data.val))
        backend.quantize_static(model, [inputs[:2]])

    def convert(self, model: nn.Module) -> nn.Module:
        """Calibrate on training batches and convert to int8."""
        batches = calibration_inputs(self.data, self.calibration_batches)
        example = batches[0][:1]
        fp32 = backend.fused_float_weights(model, example)
        quantized = backend.quantize_static(model, batches)
        int8 = backend.int8_weights(quantized)
        self.record_errors(fp32, int8, {})
        self.set_nonzero(model, int8)
        return quantized


class DynamicInt8(_PostTraining):
    """Dynamic int8 quantization of the Linear layers: int8 weights, activations quantized per
    batch at run time (no calibration). Suits Linear-heavy models (MLPs, transformers)."""

    @classmethod
    def needs(cls, cfg: DictConfig) -> Needs:
        """torch.onnx has no mapping for torch.ao's dynamic int8 Linear (linear_dynamic)."""
        reason = (
            "torch.onnx cannot export dynamic int8 layers; method=quantize/ptq_int8 gives "
            "static int8 layers that it can"
        )
        return replace(super().needs(cfg), cannot_export={"onnx": reason})

    def check(self, model: nn.Module) -> None:
        """A model without Linear layers has nothing to quantize dynamically."""
        if not any(isinstance(m, nn.Linear) for m in model.modules()):
            raise ConfigError(
                "method",
                "quantize/dynamic_int8",
                "a model with Linear layers; for convolutional models use method=quantize/ptq_int8",
            )

    def convert(self, model: nn.Module) -> nn.Module:
        """Linear weights to int8."""
        quantized = backend.quantize_dynamic(model)
        fp32 = {n: m.weight for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        int8 = backend.int8_weights(quantized)
        self.record_errors(fp32, int8, {})
        self.set_nonzero(model, int8)
        return quantized
