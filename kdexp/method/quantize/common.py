"""What every quantization method shares: the fp32 reference measured before conversion, the
per-layer weight error table, calibration batches, and the metrics that the converted model cannot
report about itself."""

from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from kdexp.dataset.base import Data
from kdexp.errors import ConfigError
from kdexp.evaluation import evaluate
from kdexp.method.base import Method, Needs
from kdexp.stats import count_params, flops


def calibration_inputs(data: Data, batches: int) -> list[Tensor]:
    """The inputs of the first ``batches`` training batches (CPU)."""
    found = []
    for inputs, _ in data.train:
        found.append(inputs.cpu())
        if len(found) >= batches:
            break
    return found


def check_calibration(data: Data, batches: object) -> None:
    """ConfigError unless ``batches`` is a positive integer and the training data is not empty."""
    if isinstance(batches, bool) or not isinstance(batches, int) or batches < 1:
        raise ConfigError("method.calibration_batches", batches, "a positive number of batches")
    try:
        empty = len(data.train) == 0  # type: ignore[arg-type]
    except TypeError:
        empty = next(iter(data.train), None) is None
    if empty:
        raise ConfigError(
            "dataset", "train split", "training data to calibrate on: the split has no batches"
        )


class QuantMethod(Method):
    """Base of the quantization methods: records the fp32 model before :meth:`finalize` converts.

    ``final_metrics`` adds ``quant/bits``, ``test/acc1_fp32`` and, because int8 and packed layers
    hide their weights from ``parameters()`` and from the FLOP counter, ``model/params``,
    ``model/nonzero_params`` (of the quantized weights) and ``model/flops`` counted on the fp32
    model: the same multiply-adds that the integer kernels run.
    """

    bits = 8

    def __init__(self, *, data: Data, criterion: nn.Module, **kwargs: Any) -> None:
        super().__init__(data=data, criterion=criterion, **kwargs)
        self._metrics: dict[str, float] = {}
        self._errors: list[dict[str, object]] = []

    @classmethod
    def needs(cls, cfg: DictConfig) -> Needs:
        """A trained model to quantize (and a teacher with a distill component)."""
        return replace(super().needs(cfg), trained_start=True)

    @torch.no_grad()
    def record_fp32(self, model: nn.Module) -> None:
        """Test accuracy, parameter count and FLOPs of the fp32 model, before conversion."""
        device = next(model.parameters()).device
        self._metrics["test/acc1_fp32"] = evaluate(model, self.data.test, device)["acc1"]
        self._metrics["model/params"] = count_params(model)[0]
        was_training = model.training
        model.eval()
        example = torch.randn(1, *self.data.input_shape, device=device)
        self._metrics["model/flops"] = flops(model, example)
        model.train(was_training)

    def record_errors(
        self, fp32: dict[str, Tensor], quantized: dict[str, Tensor], bits: dict[str, int]
    ) -> None:
        """Per-layer MSE between fp32 and dequantized weights; non-zero count of the latter."""
        self._errors = []
        for name, weight in fp32.items():
            if name not in quantized:
                continue
            w, q = weight.detach().float().cpu(), quantized[name].detach().float().cpu()
            mse = float((w - q).pow(2).mean())
            self._errors.append(
                {
                    "layer": name,
                    "bits": bits.get(name, self.bits),
                    "numel": w.numel(),
                    "mse": mse,
                    "relative_mse": mse / max(float(w.pow(2).mean()), 1e-30),
                    "max_abs_error": float((w - q).abs().max()),
                }
            )

    def set_nonzero(self, model: nn.Module, quantized: dict[str, Tensor]) -> None:
        """``model/nonzero_params``: non-zero quantized weights plus non-zero other parameters."""
        total = sum(int(torch.count_nonzero(w)) for w in quantized.values())
        weights = {f"{name}.weight" for name in quantized}
        total += sum(
            int(torch.count_nonzero(p.detach()))
            for name, p in model.named_parameters()
            if name not in weights
        )
        self._metrics["model/nonzero_params"] = total

    def final_metrics(self) -> dict[str, float]:
        """``quant/bits``, ``test/acc1_fp32`` and the ``model/*`` counts of the fp32 model."""
        return {"quant/bits": float(self.bits), **self._metrics}

    def write_artifacts(self, folder: Path) -> list[Path]:
        """``quant_error.csv``: per layer, bits, weights, MSE (absolute and relative), max error."""
        if not self._errors:
            return []
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "quant_error.csv"
        with path.open("w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=list(self._errors[0]))
            writer.writeheader()
            writer.writerows(self._errors)
        return [path]
