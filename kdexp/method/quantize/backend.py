"""The one place that knows how an int8 model is produced: torch.ao's FX graph mode quantization.

Measured on a small convnet, torch.ao FX int8 ran ~8× faster than fp32 on CPU, the pt2e path of
torchao only 1.2× after a 17 s compile; everything backend-specific stays here so that it can move.
The engine is x86 (fbgemm kernels) on x86 CPUs and qnnpack on ARM. Weights are int8 per output
channel and symmetric; activations are uint8 per tensor, calibrated with histogram observers.
Quantized models run on CPU only.
"""

from __future__ import annotations

import copy
import platform
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from kdexp.errors import ConfigError

#: Float layers whose weights the backend turns into int8.
WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@contextmanager
def _quiet() -> Iterator[None]:
    """torch.ao.quantization warns that it is deprecated on every call; once is in the docs."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.ao\..*")
        warnings.filterwarnings("ignore", message=r".*quantize_per_tensor.*")
        warnings.filterwarnings("ignore", message=r".*reduce_range will be deprecated.*")
        yield


def engine() -> str:
    """The quantized engine for this CPU: x86 (fbgemm) on x86-64, qnnpack on ARM."""
    supported = torch.backends.quantized.supported_engines
    arm = platform.machine().lower() in ("arm64", "aarch64") or platform.machine().startswith("arm")
    for name in ("qnnpack",) if arm else ("x86", "fbgemm", "qnnpack"):
        if name in supported:
            return name
    raise RuntimeError(f"no int8 engine in {supported}")


def _use_engine() -> str:
    name = engine()
    if torch.backends.quantized.engine != name:
        torch.backends.quantized.engine = name
    return name


class _PathTracer(torch.fx.Tracer):
    """An FX tracer that remembers which module it is inside, to name the one that fails."""

    def __init__(self) -> None:
        super().__init__()
        self.path: list[str] = []

    def call_module(
        self,
        m: nn.Module,
        forward: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        self.path.append(self.path_of_module(m))
        result = super().call_module(m, forward, args, kwargs)
        self.path.pop()
        return result


def check_traceable(model: nn.Module, key: str = "model") -> None:
    """ConfigError naming the module whose forward FX cannot trace (data-dependent control flow,
    for example): graph mode quantization needs the whole forward as a graph."""
    tracer = _PathTracer()
    try:
        tracer.trace(model)
    except Exception as error:  # TraceError, TypeError, NotImplementedError, ...
        where = tracer.path[-1] if tracer.path and tracer.path[-1] else "the top-level forward"
        module = model.get_submodule(tracer.path[-1]) if tracer.path else model
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(
            key,
            type(model).__name__,
            f"a model the int8 backend ({engine()}) can quantize: module '{where}' "
            f"({type(module).__name__}) cannot be traced into a graph ({reason})",
        ) from None


def float_layers(model: nn.Module) -> list[str]:
    """Names of layers still holding float weights (the backend did not quantize them)."""
    return [name for name, m in model.named_modules() if type(m) in WEIGHTED]


def quantize_static(model: nn.Module, batches: Iterable[Tensor], key: str = "model") -> nn.Module:
    """An int8 copy of ``model`` (on CPU, eval mode) with activation ranges from ``batches``.

    Conv-BN(-ReLU) and Linear(-ReLU) are fused first. Raises ConfigError naming the module when the
    model cannot be traced or a layer keeps float weights.
    """
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    check_traceable(model, key)
    name = _use_engine()
    float_model = copy.deepcopy(model).cpu().eval()
    batches = [b.cpu() for b in batches]
    if not batches:
        raise ConfigError("method.calibration_batches", 0, "at least one batch of inputs")
    with _quiet(), torch.no_grad():
        prepared = prepare_fx(float_model, get_default_qconfig_mapping(name), (batches[0],))
        for batch in batches:
            prepared(batch)
        quantized = convert_fx(prepared)
    left = float_layers(quantized)
    if left:
        raise ConfigError(
            key,
            type(model).__name__,
            f"a model the int8 backend ({name}) can quantize: "
            f"{', '.join(repr(n) for n in left)} kept float weights",
        )
    return quantized


def quantize_dynamic(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with int8 Linear weights, activations quantized per batch at run time."""
    from torch.ao.quantization import quantize_dynamic as dynamic

    _use_engine()
    with _quiet():
        return dynamic(copy.deepcopy(model).cpu().eval(), {nn.Linear}, dtype=torch.qint8)


def int8_weights(quantized: nn.Module) -> dict[str, Tensor]:
    """The dequantized weight of every int8 layer of a converted model, by module name."""
    found = {}
    for name, module in quantized.named_modules():
        weight = getattr(module, "weight", None)
        if callable(weight) and not isinstance(weight, nn.Module):
            with _quiet():
                value = weight()
            if isinstance(value, Tensor) and value.is_quantized:
                found[name] = value.dequantize()
    return found


def fused_float_weights(model: nn.Module, example: Tensor) -> dict[str, Tensor]:
    """The float weights the backend quantizes (BatchNorm folded in), by module name."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_fx

    with _quiet(), torch.no_grad():
        prepared = prepare_fx(
            copy.deepcopy(model).cpu().eval(), get_default_qconfig_mapping(engine()), (example,)
        )
    from torch.ao.nn.intrinsic import _FusedModule

    found: dict[str, Tensor] = {}
    for name, module in prepared.named_modules():
        if any(name.startswith(f"{done}.") for done in found):
            continue  # the conv inside a fused Conv-ReLU, already recorded under the fused name
        inner = module[0] if isinstance(module, _FusedModule) else module
        if isinstance(inner, WEIGHTED):
            found[name] = inner.weight.detach().clone()
    return found


class OnCpu(nn.Module):
    """Runs an int8 model on CPU whatever device its inputs come from; outputs go back there."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: Tensor) -> Tensor:
        """``module(x)`` on CPU, returned on ``x``'s device."""
        return self.module(x.cpu()).to(x.device)
