"""The one training loop, and evaluation.

Every method trains through :func:`fit`: it sums the method's named loss terms, steps the optimizer
and the LR schedule, calls the method's hooks, validates each epoch and keeps the best and last
checkpoints. Host-device syncs happen only at logging steps and at the end of an epoch.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from tqdm import tqdm

from kdexp.checkpoint import save_checkpoint
from kdexp.dataset.base import Batch, Data
from kdexp.method.base import Method
from kdexp.tracking.base import Tracker

log = logging.getLogger(__name__)


@dataclass
class FitResult:
    """What :func:`fit` leaves behind: the best epoch and one metrics dict per epoch."""

    best_val_acc1: float = -1.0
    best_epoch: int = -1
    steps: int = 0
    history: list[dict[str, float]] = field(default_factory=list)


@dataclass
class LoopOptions:
    """Settings of the loop that are not the model, data, method or optimizer."""

    epochs: int
    device: torch.device
    grad_clip: float | None = None
    amp: str | None = None  # "bf16" | "fp16" | None; CUDA only
    channels_last: bool = False
    log_every: int = 10
    checkpoint_dir: Path | None = None


def _autocast(device: torch.device, amp: str | None):
    if amp is None or device.type != "cuda":
        return nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def _to_device(batch: Batch, device: torch.device, channels_last: bool) -> Batch:
    x, y = batch
    x = x.to(device, non_blocking=True)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y.to(device, non_blocking=True)


_LINE_EVERY_S = 30.0  # where output is not a terminal, a progress line at most this often


def _progress(loader: Iterable[Batch], epoch: int, epochs: int) -> Iterable[Batch]:
    """A progress bar on a terminal; elsewhere (CI, cluster logs) the loader itself."""
    if sys.stderr.isatty():
        return tqdm(loader, desc=f"epoch {epoch + 1}/{epochs}", leave=False, dynamic_ncols=True)
    return loader


def fit(
    model: nn.Module,
    method: Method,
    data: Data,
    optimizer: Optimizer,
    scheduler: LRScheduler,
    tracker: Tracker,
    options: LoopOptions,
) -> FitResult:
    """Train ``model`` for ``options.epochs`` epochs; log per step and per epoch.

    Per step (every ``log_every`` steps): ``train/loss``, ``train/loss_<term>``, ``train/lr``.
    Per epoch (at the global step): ``train/epoch_loss`` and ``train/epoch_loss_<term>`` (means
    over the epoch's batches), ``train/acc1``, ``val/loss``, ``val/acc1``, ``val/acc5``,
    ``epoch_time_s``, plus whatever ``method.after_epoch`` returns.
    """
    device, result = options.device, FitResult()
    scaler = torch.amp.GradScaler("cuda", enabled=options.amp == "fp16" and device.type == "cuda")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    step, last_line, terminal = 0, time.monotonic(), sys.stderr.isatty()
    for epoch in range(options.epochs):
        model.train()
        method.train()
        start = time.perf_counter()
        correct, seen = torch.zeros((), device=device, dtype=torch.long), 0
        term_sums: dict[str, Tensor] = {}
        for batch in _progress(data.train, epoch, options.epochs):
            inputs, targets = _to_device(batch, device, options.channels_last)
            with _autocast(device, options.amp):
                logits = model(inputs)
                terms = method.loss(inputs, targets, logits)
                loss: Tensor = sum(terms.values())  # type: ignore[assignment]
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if options.grad_clip:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(params, options.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            extra = method.after_step(step)
            correct += (logits.detach().argmax(1) == targets).sum()
            seen += len(targets)
            for name, value in terms.items():
                term_sums[name] = term_sums.get(name, 0) + value.detach()
            if step % options.log_every == 0:
                metrics = {"train/loss": loss.item(), "train/lr": optimizer.param_groups[0]["lr"]}
                metrics.update({f"train/loss_{k}": v.item() for k, v in terms.items()})
                tracker.log_metrics({**metrics, **extra}, step)
                _check_finite(metrics, step)
                if not terminal and time.monotonic() - last_line >= _LINE_EVERY_S:
                    last_line = time.monotonic()
                    log.info(
                        "epoch %d/%d  step %d  train/loss %.4f",
                        epoch + 1,
                        options.epochs,
                        step,
                        metrics["train/loss"],
                    )
            elif extra:
                tracker.log_metrics(extra, step)
            step += 1

        val = evaluate(model, data.val, device, method.criterion, options.channels_last)
        batches = max(1, len(data.train))  # type: ignore[arg-type]
        means = {f"train/epoch_loss_{k}": v.item() / batches for k, v in term_sums.items()}
        metrics = {
            "epoch": epoch,
            "train/epoch_loss": sum(means.values()),
            **means,
            "train/acc1": 100.0 * correct.item() / max(1, seen),
            "val/loss": val["loss"],
            "val/acc1": val["acc1"],
            "val/acc5": val["acc5"],
            "epoch_time_s": time.perf_counter() - start,
            **method.after_epoch(epoch),
        }
        result.history.append(metrics)
        if val["acc1"] > result.best_val_acc1:
            result.best_val_acc1, result.best_epoch = val["acc1"], epoch
            _save(options.checkpoint_dir, "best.pt", model, epoch, step, val["acc1"])
        _save(options.checkpoint_dir, "last.pt", model, epoch, step, val["acc1"])
        tracker.log_metrics(metrics, step)
        log.info(
            "epoch %d/%d  loss %.4f  train/acc1 %.2f  val/acc1 %.2f  (%.1fs)",
            epoch + 1,
            options.epochs,
            val["loss"],
            metrics["train/acc1"],
            val["acc1"],
            metrics["epoch_time_s"],
        )
    result.steps = step
    return result


def _check_finite(metrics: dict[str, float], step: int) -> None:
    for name, value in metrics.items():
        if not math.isfinite(value):
            raise FloatingPointError(f"{name} is {value} at step {step}: training diverged")


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
        inputs, targets = _to_device(batch, device, channels_last)
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


def _save(
    folder: Path | None, name: str, model: nn.Module, epoch: int, step: int, val_acc1: float
) -> None:
    if folder is not None:
        save_checkpoint(folder / name, model, epoch=epoch, step=step, val_acc1=val_acc1)
