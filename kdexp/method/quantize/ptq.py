"""Post-training quantization: int8 static (calibrated) and int8 dynamic.

Neither trains. ``prepare`` freezes the trained model (no gradients, BatchNorm statistics kept) and
asks the run's loop for a single epoch (``loop_epochs = 1``: that epoch only evaluates), so
``schedule.epochs`` keeps meaning the recipe of the baseline the run starts from (with
``checkpoint: auto`` and no finished baseline of this model, dataset and seed, that baseline is
trained first with the run's schedule). ``finalize`` converts with
:mod:`kdexp.method.quantize.backend`.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from kdexp.dataset.base import Data
from kdexp.errors import ConfigError
from kdexp.method.quantize import backend
from kdexp.method.quantize.common import QuantMethod, calibration_inputs, check_calibration


class Frozen(nn.Module):
    """The trained model, unchanged by the loop: no gradients, always in eval mode."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> Frozen:
        """Record the mode, keep the model in eval mode (BatchNorm statistics, no dropout)."""
        self.training = mode
        self.module.eval()
        return self

    def forward(self, x: Tensor) -> Tensor:
        """The frozen model's output."""
        return self.module(x)


class _PostTraining(QuantMethod):
    """Freeze in ``prepare``; the loop's one epoch leaves the model as it was."""

    loop_epochs = 1
    supports_distributed = False  # nothing to train in parallel; calibration wants every batch

    def __init__(self, *, data: Data, criterion: nn.Module) -> None:
        super().__init__(data=data, criterion=criterion)
        # The loop back-propagates the loss and the optimizer needs a parameter; nothing else
        # trains, and this one gets no gradient signal (it enters the loss times zero).
        self.anchor = nn.Parameter(torch.zeros(()))

    def prepare(self, model: nn.Module) -> nn.Module:
        """The model frozen: the loop evaluates it and changes nothing."""
        self.check(model)
        return Frozen(model)

    def check(self, model: nn.Module) -> None:
        """Raise ConfigError if the backend cannot quantize ``model``."""

    def loss(self, inputs: Tensor, targets: Tensor, logits: Tensor) -> dict[str, Tensor]:
        """The frozen model's cross-entropy, for the record (it trains nothing)."""
        return {"ce": self.criterion(logits, targets) + 0.0 * self.anchor}

    def finalize(self, model: nn.Module) -> nn.Module:
        """The converted model, on CPU (wrapped to accept inputs from another device)."""
        inner = model.module if isinstance(model, Frozen) else model
        device = next(inner.parameters()).device
        self.record_fp32(inner)
        quantized = self.convert(inner)
        return quantized if device.type == "cpu" else backend.OnCpu(quantized)

    def convert(self, model: nn.Module) -> nn.Module:
        raise NotImplementedError


class PTQInt8(_PostTraining):
    """Post-training static int8 quantization (Jacob et al. 2018; Krishnamoorthi 2018).

    Weights int8 per output channel (symmetric), activations uint8 per tensor with ranges observed
    on ``calibration_batches`` training batches; Conv-BN-ReLU fused; integer kernels on CPU
    (x86/fbgemm, qnnpack on ARM).
    """

    def __init__(self, *, data: Data, criterion: nn.Module, calibration_batches: int = 32) -> None:
        super().__init__(data=data, criterion=criterion)
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
    def onnx_unsupported(cls, cfg: DictConfig) -> str | None:
        """torch.onnx has no mapping for torch.ao's dynamic int8 Linear (linear_dynamic)."""
        return "torch.onnx cannot export dynamic int8 layers"

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
