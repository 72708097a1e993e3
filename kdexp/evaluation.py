"""Evaluating a model on a split: mean loss, top-1 and top-5 accuracy.

The training loop uses it each epoch, the run on the test split, and methods that measure a model
before converting it; it knows nothing of methods or of the loop.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from kdexp.dataset.base import Batch


def to_device(batch: Batch, device: torch.device, channels_last: bool) -> Batch:
    """``batch`` on ``device`` (image batches channels-last where asked)."""
    x, y = batch
    x = x.to(device, non_blocking=True)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y.to(device, non_blocking=True)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable[Batch],
    device: torch.device,
    criterion: nn.Module | None = None,
    channels_last: bool = False,
) -> dict[str, float]:
    """Mean loss, top-1 and top-5 accuracy (in %) of ``model`` over ``loader``."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=device)
    top1 = torch.zeros((), device=device, dtype=torch.long)
    top5 = torch.zeros((), device=device, dtype=torch.long)
    count = 0
    for batch in loader:
        inputs, targets = to_device(batch, device, channels_last)
        logits = model(inputs).float()
        if criterion is not None:
            loss_sum += criterion(logits, targets) * len(targets)
        k = min(5, logits.shape[1])
        ranked = logits.topk(k, dim=1).indices
        hits = ranked == targets[:, None]
        top1 += hits[:, 0].sum()
        top5 += hits.any(dim=1).sum()
        count += len(targets)
    model.train(was_training)
    count = max(count, 1)
    return {
        "loss": loss_sum.item() / count,
        "acc1": 100.0 * top1.item() / count,
        "acc5": 100.0 * top5.item() / count,
    }
