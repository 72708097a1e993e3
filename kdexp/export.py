"""ONNX export of a run's final model (``export_onnx=true``), checked with onnxruntime.

The final model (dense, unstructured-pruned with its zeros folded in, or channel-pruned and
physically smaller) is written to ``<run dir>/model.onnx`` with a dynamic batch dimension and
logged as the artifact ``onnx/model.onnx``. Float models go through torch.onnx's default exporter
(``torch.export`` based; it needs the ``onnx`` and ``onnxscript`` packages). Static int8 models of
torch.ao (``quantize/ptq_int8``, ``quantize/qat`` at 8 bits) cannot be captured by
``torch.export``; they go through the TorchScript exporter (``dynamo=False``), which maps them to
ONNX's QuantizeLinear / QLinearConv / QLinearMatMul operators.

Where onnxruntime is installed, the exported file is run on the input example and compared with
the torch model: ``onnx/max_abs_diff`` is logged, and a difference beyond the tolerance fails the
run (:class:`OnnxMismatch`), because a deployment file that does not compute what was evaluated
is worse than none. Without onnxruntime the check is skipped and the log says so once.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from kdexp.errors import ConfigError
from kdexp.method.base import needs_of

if TYPE_CHECKING:
    from kdexp.tracking.base import Tracker

log = logging.getLogger(__name__)

FILE_NAME = "model.onnx"
ARTIFACT_DIR = "onnx"
#: Float models: onnxruntime and torch differ by float rounding only (about 1e-7 measured);
#: allowed: this fraction of the largest logit magnitude (at least 1).
FLOAT_TOLERANCE = 1e-4
#: Int8 models: onnxruntime's integer kernels may round a requantized value one step apart from
#: torch's fbgemm ones; allowed: this fraction of the largest logit magnitude (at least 1).
INT8_TOLERANCE = 0.05


class OnnxMismatch(RuntimeError):
    """onnxruntime's outputs of the exported model differ from the torch model's."""


def check_config(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` when ``export_onnx`` is not a bool, or is set for a method whose
    final model cannot be exported (its :class:`~kdexp.method.base.Needs` give the reason)."""
    value = OmegaConf.select(cfg, "export_onnx", default=False)
    if not isinstance(value, bool):
        raise ConfigError("export_onnx", value, "true or false")
    if not value:
        return
    missing = [name for name in ("onnx", "onnxscript") if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(
            "export_onnx",
            True,
            f"false, or install {' and '.join(missing)} first (pip install 'kdexp[onnx]')",
        )
    reason = needs_of(cfg.method).cannot_export.get("onnx")
    if reason:
        raise ConfigError(
            "export_onnx",
            True,
            f"false with this method ({reason}); ONNX export takes float models, dense or "
            "pruned, and static int8 models",
        )


def is_int8(model: nn.Module) -> bool:
    """Whether ``model`` holds torch.ao quantized modules (an int8 model of the backend)."""
    return any(type(m).__module__.startswith("torch.ao.nn.quantized") for m in model.modules())


@contextmanager
def _quiet() -> Iterator[None]:
    """The exporters' deprecation notes and the ONNX optimizer's per-pass INFO lines, silenced."""
    loggers = [logging.getLogger(name) for name in ("onnxscript", "onnx_ir", "torch.onnx")]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated; it is still the one that maps torch.ao int8.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\..*")
        for logger in loggers:
            logger.setLevel(logging.WARNING)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels, strict=True):
                logger.setLevel(level)


def export_onnx(model: nn.Module, example: torch.Tensor, path: Path) -> Path:
    """Write ``model`` (a CPU copy in eval mode) to ``path`` as ONNX, batch dimension dynamic.

    ``example`` is a batch of inputs (batch size at least 2, so that the batch stays dynamic).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    cpu = copy.deepcopy(model).cpu().eval()
    names = {"input_names": ["input"], "output_names": ["logits"], "external_data": False}
    with _quiet():
        if is_int8(cpu):
            torch.onnx.export(
                cpu,
                (example,),
                str(path),
                dynamo=False,
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                **names,  # type: ignore[arg-type]
            )
        else:
            torch.onnx.export(
                cpu,
                (example,),
                str(path),
                dynamo=True,
                verbose=False,
                dynamic_shapes=({0: torch.export.Dim("batch")},),
                **names,  # type: ignore[arg-type]
            )
    return path


@cache
def _say_no_onnxruntime() -> None:
    log.warning("onnxruntime is not installed: ONNX exports are not checked by running them")


def run_onnx(path: Path, inputs: np.ndarray) -> np.ndarray | None:
    """onnxruntime's (CPU) outputs of the ONNX file ``path`` for ``inputs``; None without ort."""
    try:
        import onnxruntime
    except ImportError:
        _say_no_onnxruntime()
        return None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {session.get_inputs()[0].name: inputs})[0])


def log_onnx(
    tracker: Tracker, model: nn.Module, example: np.ndarray, out_dir: Path, step: int
) -> float | None:
    """Export ``model`` to ``out_dir/model.onnx``, log it, check it; return the max abs diff.

    The check (with onnxruntime, if installed) runs the file on ``example`` and logs
    ``onnx/max_abs_diff``; beyond the tolerance it raises :class:`OnnxMismatch`, after the file
    and the metric are logged. None when onnxruntime is missing.
    """
    inputs = torch.from_numpy(example)
    path = export_onnx(model, inputs, out_dir / FILE_NAME)
    tracker.log_artifact(path, ARTIFACT_DIR)
    got = run_onnx(path, example)
    if got is None:
        return None
    with torch.no_grad():
        want = copy.deepcopy(model).cpu().eval()(inputs).float().numpy()
    diff = float(np.max(np.abs(got.astype(np.float32) - want)))
    tracker.log_metrics({"onnx/max_abs_diff": diff}, step)
    tracker.flush()
    relative = INT8_TOLERANCE if is_int8(model) else FLOAT_TOLERANCE
    tolerance = relative * max(float(np.max(np.abs(want))), 1.0)
    log.info("onnx: %s, checked with onnxruntime: max abs diff %.3g", path, diff)
    if not diff <= tolerance:
        raise OnnxMismatch(
            f"onnxruntime's outputs of {path} differ from the torch model's by up to {diff:.3g} "
            f"(tolerance {tolerance:.3g}); the file is kept for inspection"
        )
    return diff
