"""The one training loop, and evaluation.

Every method trains through :func:`fit`: it sums the method's named loss terms, steps the optimizer
and the LR schedule, calls the method's hooks, validates each epoch and keeps the best and last
checkpoints. Host-device syncs happen at logging steps, at the end of an epoch, and once per step to
check that the loss is finite. :mod:`kdexp.resume` holds what makes a run resumable.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

# The optimizer's constructor imports torch._dynamo (about 1.5 s): imported here with the rest, so
# that a run's timings (KDEXP_TIMINGS=1) count it among the imports, not in its first epoch.
import torch._dynamo  # noqa: F401
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from tqdm import tqdm

from kdexp import distributed
from kdexp.checkpoint import save_checkpoint
from kdexp.dataset.base import Data
from kdexp.evaluation import evaluate, to_device
from kdexp.method.base import Method, Step
from kdexp.resume import Interrupted, Position, TrainingCheckpoint, stop_signals
from kdexp.tracking.base import Tracker

log = logging.getLogger(__name__)


@dataclass
class FitResult:
    """What :func:`fit` leaves behind: the best epoch and one metrics dict per epoch."""

    best_val_acc1: float = -1.0
    best_epoch: int = -1
    steps: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    stopped_after: int | None = None  # epochs trained when on_epoch stopped the run early


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
    checkpoint_every_steps: int | None = None  # also write last.pt every N steps
    on_nonfinite: str = "stop"  # "stop": raise FloatingPointError; "skip": drop the batch
    # Called after each epoch's validation with (epoch, metrics); True stops training after this
    # epoch (a search trial its pruner stopped: kdexp.search.Reporter.on_epoch).
    on_epoch: Callable[[int, dict[str, float]], bool] | None = None


def _autocast(device: torch.device, amp: str | None) -> AbstractContextManager[Any]:
    if amp is None or device.type != "cuda":
        return nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


_LINE_EVERY_S = 30.0  # where output is not a terminal, a progress line at most this often


def _progress(loader: Iterable[Any], epoch: int, epochs: int, total: int) -> Any:
    """A progress bar on a terminal (``total`` batches left in the epoch, so it shows an ETA);
    elsewhere (CI, cluster logs) the loader itself, and plain lines report progress."""
    if sys.stderr.isatty() and distributed.is_main():
        desc = f"epoch {epoch} ({_epochs(epochs)})"
        return tqdm(loader, desc=desc, total=total, leave=False, dynamic_ncols=True)
    return loader


def _epochs(epochs: int) -> str:
    """Epochs count from 0, as MLflow's ``epoch`` and ``best/epoch`` do: ``0-19`` for 20."""
    return f"0-{epochs - 1}"


def fit(
    model: nn.Module,
    method: Method,
    data: Data,
    optimizer: Optimizer,
    scheduler: LRScheduler,
    tracker: Tracker,
    options: LoopOptions,
    resume: dict[str, Any] | None = None,
    train_module: nn.Module | None = None,
) -> FitResult:
    """Train ``model`` for ``options.epochs`` epochs; log per step and per epoch.

    Every hook of ``method`` gets a :class:`~kdexp.method.base.Step` context: the epoch, the global
    step, the batch's sample indices.

    Per step (every ``log_every`` steps): ``train/loss``, ``train/loss_<term>``, ``train/lr``.
    Per epoch (at the global step): ``train/epoch_loss`` and ``train/epoch_loss_<term>`` (means
    over the epoch's batches), ``train/acc1``, ``val/loss``, ``val/acc1``, ``val/acc5``,
    ``epoch_time_s``, plus whatever the method's ``after_epoch`` returns (and
    ``train/skipped_steps`` with ``on_nonfinite="skip"``).

    ``checkpoint_dir/last.pt`` receives the full training state (:mod:`kdexp.resume`) after each
    epoch, every ``checkpoint_every_steps`` steps and on SIGINT/SIGTERM, which then raise
    :class:`~kdexp.resume.Interrupted`. ``resume`` is such a state to carry on from.

    ``train_module`` runs the training forward passes instead of ``model`` (the
    DistributedDataParallel wrapper of :mod:`kdexp.distributed`); metrics are then reduced across
    ranks, and evaluation and checkpoints use the plain ``model``.
    """
    forward = train_module or model
    device, result = options.device, FitResult()
    scaler = torch.amp.GradScaler("cuda", enabled=options.amp == "fp16" and device.type == "cuda")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    last = options.checkpoint_dir / "last.pt" if options.checkpoint_dir else None
    saver = TrainingCheckpoint(
        last, model, method, optimizer, scheduler, scaler, data.train, tracker.run_id
    )
    at = Position()
    if resume is not None:
        at, best = saver.restore(resume, device)
        result = FitResult(**best)
    last_line = time.monotonic()
    sparsity: float | None = None  # the latest sparsity/global a pruning method reported
    steps_per_epoch = len(data.train)  # type: ignore[arg-type]
    with stop_signals() as stop:
        for epoch in range(at.epoch, options.epochs):
            model.train()
            method.train()
            start = time.perf_counter()
            bar = _progress(saver.batches(at), epoch, options.epochs, steps_per_epoch - at.batch)
            for x, y, rows in bar:
                inputs, targets = to_device((x, y), device, options.channels_last)
                ctx = Step(epoch, at.step, at.batch, rows, options.epochs, steps_per_epoch)
                with _autocast(device, options.amp):
                    logits = forward(inputs)
                    terms = method.loss(inputs, targets, logits, ctx)
                    loss: Tensor = sum(terms.values())  # type: ignore[assignment]
                optimizer.zero_grad(set_to_none=True)
                finite = bool(torch.isfinite(loss))  # one host-device sync per step
                finite = distributed.all_ranks(finite, device)  # every rank skips, or none
                if not finite and options.on_nonfinite == "stop":
                    raise FloatingPointError(_diverged(loss, terms, at.step))
                if finite:
                    scaler.scale(loss).backward()
                    if options.grad_clip:
                        scaler.unscale_(optimizer)
                        nn.utils.clip_grad_norm_(params, options.grad_clip)
                    scaler.step(optimizer)
                    scaler.update()
                    at.add(logits, targets, distributed.batch_terms(terms, data.train))
                else:  # on_nonfinite="skip": no update, and the batch counts in no mean
                    at.skipped, at.epoch_skipped = at.skipped + 1, at.epoch_skipped + 1
                scheduler.step()
                extra = method.step_done(ctx)
                if at.step % options.log_every == 0 and finite:
                    metrics = {
                        "train/loss": loss.item(),
                        "train/lr": optimizer.param_groups[0]["lr"],
                    }
                    metrics.update({f"train/loss_{k}": v.item() for k, v in terms.items()})
                    metrics = distributed.batch_metrics(metrics, data.train, device)
                    tracker.log_metrics({**metrics, **extra}, at.step)
                    _check_finite(metrics, at.step)
                    if isinstance(bar, tqdm):
                        bar.set_postfix({"train/loss": f"{metrics['train/loss']:.4f}"})
                    elif time.monotonic() - last_line >= _LINE_EVERY_S:
                        last_line = time.monotonic()
                        log.info(
                            "epoch %d (%s)  step %d  train/loss %.4f",
                            epoch,
                            _epochs(options.epochs),
                            at.step,
                            metrics["train/loss"],
                        )
                elif extra:
                    tracker.log_metrics(extra, at.step)
                if "sparsity/global" in extra:  # printed on the epoch's line
                    sparsity = extra["sparsity/global"]
                at.step, at.batch = at.step + 1, at.batch + 1
                every = options.checkpoint_every_steps
                if stop.signum is not None or (every and at.step % every == 0):
                    saver.save(at, asdict(result))
                if stop.signum is not None:
                    raise Interrupted(stop.signum, at.step, last)

            val = evaluate(model, data.val, device, method.criterion, options.channels_last)
            done = Step(epoch, at.step, at.batch, None, options.epochs, steps_per_epoch)
            batches = max(1, at.batch - at.epoch_skipped)
            correct, seen, term_sums = distributed.epoch_totals(at.correct, at.seen, at.term_sums)
            means = {f"train/epoch_loss_{k}": v / batches for k, v in term_sums.items()}
            metrics = {
                "epoch": epoch,
                "train/epoch_loss": sum(means.values()),
                **means,
                "train/acc1": 100.0 * correct / max(1, seen),
                "val/loss": val["loss"],
                "val/acc1": val["acc1"],
                "val/acc5": val["acc5"],
                "epoch_time_s": time.perf_counter() - start,
                **method.epoch_done(done),
            }
            if options.on_nonfinite == "skip":
                metrics["train/skipped_steps"] = at.skipped
            result.history.append(metrics)
            stop_here = options.on_epoch is not None and options.on_epoch(epoch, metrics)
            last_epoch = epoch == options.epochs - 1 or stop_here
            if (val["acc1"] > result.best_val_acc1 and method.selects_best()) or (
                last_epoch and result.best_epoch < 0  # no epoch qualified: the last one is best
            ):
                result.best_val_acc1, result.best_epoch = val["acc1"], epoch
                _save(options.checkpoint_dir, "best.pt", model, epoch, at.step, val["acc1"])
            tracker.log_metrics(metrics, at.step)
            at.next_epoch()
            saver.save(at, asdict(result))
            log.info(
                "epoch %d (%s)  train/epoch_loss %.4f  val/loss %.4f  train/acc1 %.2f  "
                "val/acc1 %.2f%s  (%.1fs)",
                epoch,
                _epochs(options.epochs),
                metrics["train/epoch_loss"],
                val["loss"],
                metrics["train/acc1"],
                val["acc1"],
                f"  sparsity {sparsity:.4f}" if sparsity is not None else "",
                metrics["epoch_time_s"],
            )
            if stop.signum is not None:
                raise Interrupted(stop.signum, at.step, last)
            if stop_here:
                result.stopped_after = epoch + 1
                break
    result.steps = at.step
    return result


def evaluate_only(
    model: nn.Module, method: Method, data: Data, tracker: Tracker, device: torch.device
) -> FitResult:
    """The loop for a method that does not train (``Needs.trains`` false): the prepared model is
    validated once, logged as epoch 0, and is its own best epoch."""
    val = evaluate(model, data.val, device, method.criterion)
    ctx = Step(epoch=0, step=0)
    metrics = {
        "epoch": 0,
        "val/loss": val["loss"],
        "val/acc1": val["acc1"],
        "val/acc5": val["acc5"],
    }
    metrics.update(method.epoch_done(ctx))
    tracker.log_metrics(metrics, 0)
    return FitResult(val["acc1"], 0, 0, [metrics])


def _diverged(loss: Tensor, terms: dict[str, Tensor], step: int) -> str:
    """The message for a non-finite loss: which terms, at which step, and what to try."""
    bad = [f"train/loss_{k} is {v.item()}" for k, v in terms.items() if not torch.isfinite(v)]
    return (
        f"train/loss is {loss.item()} at step {step} ({', '.join(bad) or 'the sum overflowed'}): "
        "training diverged; lower schedule.lr, set schedule.grad_clip, or skip such batches "
        "with on_nonfinite=skip (checkpoints/last.pt holds the last good state)"
    )


def _check_finite(metrics: dict[str, float], step: int) -> None:
    for name, value in metrics.items():
        if not math.isfinite(value):
            raise FloatingPointError(f"{name} is {value} at step {step}: training diverged")


def _save(
    folder: Path | None, name: str, model: nn.Module, epoch: int, step: int, val_acc1: float
) -> None:
    if folder is not None:
        save_checkpoint(folder / name, model, epoch=epoch, step=step, val_acc1=val_acc1)
