"""What the training loop needs to stop anywhere and carry on exactly: training checkpoints,
random-number states, and stopping cleanly on SIGINT and SIGTERM.

A training checkpoint (``checkpoints/last.pt``) holds the model, the method
(``method.state_dict()``, which includes whatever a method returns from ``get_extra_state``,
the hook for state that is not a parameter or buffer), the optimizer, the LR schedule,
the AMP scaler, every random-number state, the data loader's state, the position in the epoch, the
epoch's running sums, the best result so far and the MLflow run id. It holds only tensors, numbers,
strings, lists and dicts, so it loads with ``torch.load(weights_only=True)``.

Resuming mid-epoch puts the random states and the loader back where they stood when the epoch
began, draws the batches already trained and drops them (so the shuffle and the augmentation draws
repeat exactly), then restores the random states of the moment the checkpoint was written.
"""

from __future__ import annotations

import logging
import random
import signal
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from kdexp.checkpoint import save_state
from kdexp.dataset.base import indexed

log = logging.getLogger(__name__)

FORMAT = "kdexp-training-state/1"


class Interrupted(KeyboardInterrupt):
    """The loop stopped on a signal after writing a checkpoint; the CLI exits 128 + ``signum``.

    A :class:`KeyboardInterrupt`, so that the tracker closes the run KILLED.
    """

    def __init__(self, signum: int, step: int, checkpoint: Path | None) -> None:
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.command = ""  # how to resume; the run fills it in
        self.run_id: str | None = None  # the stopped MLflow run, if one was open
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}")


class StopFlag:
    """Set by SIGINT or SIGTERM (or a scheduler's SIGUSR2); the loop reads :attr:`signum` after
    each step, the run between its phases (:func:`raise_if_stopped`).

    ``stop_file`` is a file whose appearance asks the same (a sweep stopped as a whole writes it,
    holding the signal's number); it is looked at no more than once a second.
    """

    def __init__(self, stop_file: Path | None = None) -> None:
        self._signum: int | None = None
        self.stop_file = stop_file
        self._looked = 0.0

    @property
    def signum(self) -> int | None:
        """The signal that asked to stop, or None."""
        if self._signum is None and self.stop_file is not None:
            now = time.monotonic()
            if now - self._looked >= 1.0:
                self._looked = now
                if self.stop_file.is_file():
                    text = self.stop_file.read_text().strip()
                    self._signum = int(text) if text.isdigit() else int(signal.SIGTERM)
        return self._signum

    @signum.setter
    def signum(self, value: int | None) -> None:
        self._signum = value


#: The flag of the outermost open :func:`stop_signals`, and the handlers it replaced.
_ACTIVE: StopFlag | None = None
_REPLACED: dict[signal.Signals, Any] = {}


@contextmanager
def stop_signals(stop_file: Path | None = None) -> Iterator[StopFlag]:
    """While open, SIGINT and SIGTERM ask the loop to stop after the current step.

    A second SIGINT raises :class:`KeyboardInterrupt` at once. Outside the main thread (where
    handlers cannot be installed) the flag is never set and signals act as usual. Nested, it
    yields the outer flag: a run installs it once for its whole length (build, training, final
    phases), and :func:`fit` inside reads the same flag. Where a handler for SIGUSR2 was already
    installed (submitit's, which checkpoints and requeues a job at a SLURM time limit or
    preemption), SIGUSR2 stops the run the same way; :func:`hand_over` then calls that handler.
    """
    global _ACTIVE
    if _ACTIVE is not None:
        yield _ACTIVE
        return
    flag = StopFlag(stop_file)
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        if flag.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        flag.signum = signum
        log.warning("%s: stopping after this step", signal.Signals(signum).name)

    signals = [signal.SIGINT, signal.SIGTERM]
    if callable(signal.getsignal(signal.SIGUSR2)):
        signals.append(signal.SIGUSR2)
    previous = {sig: signal.signal(sig, handler) for sig in signals}
    _ACTIVE = flag
    try:
        yield flag
    finally:
        _ACTIVE = None
        for sig, old in previous.items():
            signal.signal(sig, old)
        _REPLACED.clear()
        _REPLACED.update(previous)


def raise_if_stopped(step: int = 0, checkpoint: Path | None = None) -> None:
    """Raise :class:`Interrupted` if a signal asked the run to stop: called between phases."""
    if _ACTIVE is not None and _ACTIVE.signum is not None:
        raise Interrupted(_ACTIVE.signum, step, checkpoint)


def hand_over(signum: int) -> bool:
    """Call the handler that :func:`stop_signals` replaced for ``signum``, if it was a Python
    function (submitit's requeue on SIGUSR2); False when there was none."""
    previous = _REPLACED.get(signal.Signals(signum))
    if not callable(previous):
        return False
    previous(signum, None)
    return True


def rng_state() -> dict[str, Any]:
    """Python's, NumPy's and torch's (CPU and every CUDA device) random states, as tensors."""
    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()  # type: ignore[misc]
    return {
        "python": {"version": version, "state": torch.tensor(words), "gauss": gauss},
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(np.asarray(keys).astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(w) for w in py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    keys = npy["keys"].numpy().astype(np.uint32)
    np.random.set_state((npy["kind"], keys, npy["pos"], npy["has_gauss"], npy["cached"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _loader_state(loader: Iterable[Any]) -> dict[str, Any]:
    """The loader's own state (its shuffling generator), when it has one."""
    get = getattr(loader, "state_dict", None)
    return get() if callable(get) else {}


def _set_loader_state(loader: Iterable[Any], state: dict[str, Any]) -> None:
    if state:
        loader.load_state_dict(state)  # type: ignore[attr-defined]


@dataclass
class Position:
    """Where the loop stands and what it has summed so far in the current epoch."""

    epoch: int = 0
    step: int = 0  # optimizer steps taken (skipped batches included)
    batch: int = 0  # batches of the current epoch already done
    correct: int | Tensor = 0  # right top-1 predictions in this epoch (a device tensor)
    seen: int = 0
    term_sums: dict[str, Tensor] = field(default_factory=dict)
    epoch_skipped: int = 0  # batches of this epoch skipped for a non-finite loss
    skipped: int = 0  # ... over the whole run
    epoch_start: dict[str, Any] = field(default_factory=dict)  # RNG and loader at epoch start

    def add(self, logits: Tensor, targets: Tensor, terms: dict[str, Tensor]) -> None:
        """Add one trained batch to the epoch's sums."""
        self.correct = (logits.detach().argmax(1) == targets).sum() + self.correct
        self.seen += len(targets)
        for name, value in terms.items():
            self.term_sums[name] = self.term_sums.get(name, 0) + value.detach()

    def next_epoch(self) -> None:
        """Clear the epoch's sums once its metrics are logged."""
        self.epoch, self.batch, self.correct, self.seen = self.epoch + 1, 0, 0, 0
        self.term_sums, self.epoch_skipped, self.epoch_start = {}, 0, {}


class TrainingCheckpoint:
    """Writes and restores the full training state; see the module docstring."""

    def __init__(
        self,
        path: Path | None,
        model: nn.Module,
        method: nn.Module,
        optimizer: Optimizer,
        scheduler: LRScheduler,
        scaler: torch.amp.GradScaler,
        loader: Iterable[Any],
        run_id: str | None = None,
    ) -> None:
        self.path, self.model, self.method = path, model, method
        self.optimizer, self.scheduler, self.scaler = optimizer, scheduler, scaler
        self.loader, self.run_id = loader, run_id

    def save(self, at: Position, best: dict[str, Any]) -> None:
        """Write the state atomically to :attr:`path` (nothing when it is None)."""
        if self.path is None:
            return
        correct = at.correct if isinstance(at.correct, Tensor) else torch.tensor(at.correct)
        save_state(
            self.path,
            {
                "format": FORMAT,
                "model": self.model.state_dict(),
                "method": self.method.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "rng": rng_state(),
                "loader": _loader_state(self.loader),
                "epoch": at.epoch,
                "step": at.step,
                "batch": at.batch,
                "sums": {
                    "correct": correct.cpu(),
                    "seen": at.seen,
                    "terms": {k: v.cpu() for k, v in at.term_sums.items()},
                    "epoch_skipped": at.epoch_skipped,
                    "skipped": at.skipped,
                },
                "epoch_start": at.epoch_start,
                "best": best,
                "run_id": self.run_id or "",
            },
        )

    def restore(self, state: dict[str, Any], device: torch.device) -> tuple[Position, dict]:
        """Load ``state`` into the objects; return the position and the best-so-far dict."""
        self.model.load_state_dict(state["model"])
        self.method.load_state_dict(state.get("method", {}))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state.get("scaler", {}))
        set_rng_state(state["rng"])
        _set_loader_state(self.loader, state.get("loader", {}))
        sums = state.get("sums", {})
        at = Position(
            epoch=state["epoch"],
            step=state["step"],
            batch=state["batch"],
            correct=sums.get("correct", torch.tensor(0)).to(device),
            seen=sums.get("seen", 0),
            term_sums={k: v.to(device) for k, v in sums.get("terms", {}).items()},
            epoch_skipped=sums.get("epoch_skipped", 0),
            skipped=sums.get("skipped", 0),
            epoch_start=state.get("epoch_start", {}),
        )
        return at, state.get("best", {})

    def batches(self, at: Position) -> Iterator[tuple[Tensor, Tensor, Tensor | None]]:
        """The epoch's batches from ``at.batch`` on, drawn exactly as an uninterrupted run would,
        each with its sample indices (:func:`kdexp.dataset.base.indexed`).

        At the start of an epoch it records the random and loader states; mid-epoch (after a
        resume) it rewinds to them, draws and drops the ``at.batch`` batches already trained, and
        puts back the random states of the checkpoint.
        """
        if at.batch == 0:
            at.epoch_start = {"rng": rng_state(), "loader": _loader_state(self.loader)}
            yield from indexed(self.loader)
            return
        now = rng_state()
        set_rng_state(at.epoch_start["rng"])
        _set_loader_state(self.loader, at.epoch_start["loader"])
        batches = indexed(self.loader)
        for _ in range(at.batch):
            next(batches)
        set_rng_state(now)
        yield from batches
