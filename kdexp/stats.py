"""Model statistics logged at the end of every run: size, sparsity, FLOPs and CPU latency."""

from __future__ import annotations

import copy
import io
import logging
import math
import statistics
import time
from collections.abc import Mapping

import torch
from torch import nn

from kdexp.timings import phase

#: Seconds of timed calls after which :func:`latency_ms` stops early (still at least
#: ``min_repeats`` calls): a large model's twenty calls would otherwise cost seconds per run.
LATENCY_BUDGET_S = 0.5

log = logging.getLogger(__name__)


def count_params(model: nn.Module) -> tuple[int, int]:
    """(all parameters, non-zero parameters); pruning shows up in the second."""
    tensors = list(model.parameters())
    total = sum(t.numel() for t in tensors)
    nonzero = sum(int(torch.count_nonzero(t.detach())) for t in tensors)
    return total, nonzero


def size_bytes(model: nn.Module) -> int:
    """Bytes of the serialized ``state_dict``, as ``torch.save`` writes it."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes


def flops(model: nn.Module, example: torch.Tensor) -> int:
    """FLOPs of one forward pass on ``example`` (torch.utils.flop_counter; a MAC counts 2)."""
    from torch.utils.flop_counter import FlopCounterMode  # imports triton where installed

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(example)
    return int(counter.get_total_flops())


def latency_ms(
    model: nn.Module,
    example: torch.Tensor,
    repeats: int = 20,
    warmup: int = 3,
    budget_s: float = LATENCY_BUDGET_S,
    min_repeats: int = 5,
) -> float:
    """Median wall time in ms of ``repeats`` forward calls on ``example`` after ``warmup`` calls.

    Timing stops early once the timed calls add up to ``budget_s`` seconds, after at least
    ``min_repeats`` of them: the median of a slow model's first calls is already stable.
    """
    times: list[float] = []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            start = time.perf_counter()
            model(example)
            if i >= warmup:
                times.append(time.perf_counter() - start)
                if len(times) >= min_repeats and sum(times) >= budget_s:
                    break
    return 1000.0 * statistics.median(times)


@phase("statistics")
def model_stats(
    model: nn.Module, input_shape: tuple[int, ...], batch_size: int, repeats: int = 20
) -> dict[str, float]:
    """The ``model/*`` metrics, measured on a CPU copy in eval mode.

    ``model/latency_ms`` is at batch 1, ``model/latency_ms_batch`` at the run's batch size.
    """
    cpu = copy.deepcopy(model).cpu().eval()
    total, nonzero = count_params(cpu)
    one = torch.randn(1, *input_shape)
    batch = torch.randn(batch_size, *input_shape)
    return {
        "model/params": total,
        "model/nonzero_params": nonzero,
        "model/size_bytes": size_bytes(cpu),
        "model/flops": flops(cpu, one),
        "model/latency_ms": latency_ms(cpu, one, repeats),
        "model/latency_ms_batch": latency_ms(cpu, batch, max(3, repeats // 4)),
    }


def compression_metrics(model: nn.Module, metrics: Mapping[str, float]) -> dict[str, float]:
    """``model/compressed_bytes`` (the final model in :mod:`kdexp.compress`'s format) and
    ``model/compression_ratio``: the dense fp32 start's bytes over it.

    The dense fp32 start is 4 bytes × the parameters of the model the run started from:
    ``model/dense_params`` where the method logs it (pruning: the model before pruning, wider
    for channel pruning), else ``model/params`` (quantization logs the fp32 count there).
    """
    from kdexp.compress import compressed_size

    try:
        compressed = compressed_size(copy.deepcopy(model).cpu())
    except TypeError as error:  # a state_dict entry the format cannot hold: the run still ends
        log.warning("model/compressed_bytes not measured: %s", error)
        return {"model/compressed_bytes": math.nan, "model/compression_ratio": math.nan}
    dense = metrics.get("model/dense_params", metrics.get("model/params", 0))
    return {
        "model/compressed_bytes": compressed,
        "model/compression_ratio": 4 * float(dense) / compressed,
    }
