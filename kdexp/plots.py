"""Plots logged as run artifacts."""

from __future__ import annotations

import os
import signal
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure


#: How long a drawing child may take before it is stopped and the drawing done in process.
ASIDE_TIMEOUT_S = 60.0


def draw_aside(draw: Callable[[Path], Path], path: Path) -> Callable[[], Path]:
    """Start ``draw(path)`` in a child process forked from this one; the function returned waits
    for it and gives ``path``.

    A run's learning curves are drawn so while it logs its model: importing matplotlib and
    drawing take about 0.6 s of one core, logging the model as long (``bench/fixed_cost.py``). The
    child only draws, into a temporary file renamed to ``path`` when complete, and ends at once
    (``os._exit``): it touches no store, device or file of this process, and a stop signal ends
    it. On Linux only (macOS forbids much of its system libraries after a fork). Elsewhere, when
    the fork fails, or when the child ends without the file or is still drawing after
    :data:`ASIDE_TIMEOUT_S` (then it is killed), ``draw`` runs in this process when waited for,
    so that an error in it is raised here. A temporary file that a child of an earlier, stopped
    attempt left beside ``path`` (a resumed run draws into the same folder) is removed first.
    """
    path.unlink(missing_ok=True)
    for stale in path.parent.glob(_temporary(path, "*").name):  # a child's of a stopped run
        if stale.name.split(".")[1].isdigit():
            stale.unlink(missing_ok=True)
    pid = -1
    if sys.platform == "linux":
        for stream in (sys.stdout, sys.stderr):  # nothing buffered is written twice
            stream.flush()
        try:
            with warnings.catch_warnings():  # Python 3.12+ warns of fork with threads running
                warnings.simplefilter("ignore", DeprecationWarning)
                pid = os.fork()
        except OSError:
            pid = -1
    if pid == 0:  # the child
        status = 1
        try:
            for stop in (signal.SIGINT, signal.SIGTERM):
                signal.signal(stop, signal.SIG_DFL)
            os.replace(draw(_temporary(path, os.getpid())), path)
            status = 0
        finally:
            os._exit(status)

    def wait() -> Path:
        if pid > 0:
            if _reaped(pid, time.monotonic() + ASIDE_TIMEOUT_S) and path.is_file():
                return path
            _temporary(path, pid).unlink(missing_ok=True)  # what a failed or killed child left
        return draw(path)

    return wait


def _temporary(path: Path, pid: int | str) -> Path:
    """The file the child ``pid`` draws into, beside ``path`` and with its suffix (``pid="*"``:
    the pattern of all of them)."""
    return path.with_name(f".{pid}.{path.name}")


def _reaped(pid: int, deadline: float) -> bool:
    """Wait for child ``pid`` to end until ``deadline``; past it, kill it. Whether it ended."""
    try:
        while time.monotonic() < deadline:
            if os.waitpid(pid, os.WNOHANG) != (0, 0):
                return True
            time.sleep(0.01)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except ChildProcessError:  # reaped by someone else (SIGCHLD ignored): the file tells
        return True
    return False


def _figure(figsize: tuple[float, float]) -> Figure:
    """A figure drawn by Agg without pyplot: no display needed, and matplotlib (about 1 s of
    imports with pyplot) is imported only when a plot is made, not by ``import kdexp.run``."""
    from matplotlib.figure import Figure

    return Figure(figsize=figsize)


def learning_curves(history: list[dict[str, float]], path: Path) -> Path:
    """Per epoch: accuracy (train and val); the training loss against the validation loss; and
    every term of the training loss (``train/epoch_loss_<term>``: CE, KD, ...), saved as a PNG.

    The epoch axis counts from 0, as the ``epoch`` metric and ``best/epoch`` in MLflow do.
    """
    epochs = [h["epoch"] for h in history]
    terms = sorted({k for h in history for k in h if k.startswith("train/epoch_loss_")})
    fig = _figure((12, 3.6))
    acc, loss, parts = fig.subplots(1, 3)
    acc.plot(epochs, [h.get("train/acc1", float("nan")) for h in history], label="train/acc1")
    acc.plot(epochs, [h["val/acc1"] for h in history], label="val/acc1")
    acc.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    acc.legend(loc="lower right", fontsize=8)
    if any("train/epoch_loss" in h for h in history):
        loss.plot(
            epochs,
            [h.get("train/epoch_loss", float("nan")) for h in history],
            label="train/epoch_loss",
        )
    loss.plot(epochs, [h["val/loss"] for h in history], color="tab:red", label="val/loss")
    loss.set(xlabel="epoch", ylabel="loss", title="loss")
    loss.legend(loc="upper right", fontsize=8)
    for term in terms:
        parts.plot(epochs, [h.get(term, float("nan")) for h in history], label=term[17:])
    parts.set(xlabel="epoch", ylabel="loss", title="terms of the training loss")
    if terms:
        parts.legend(loc="upper right", fontsize=8, title="train/epoch_loss_", title_fontsize=8)
    for ax in (acc, loss, parts):
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def accuracy_against_size(
    labels: list[str],
    sizes: list[float],
    accuracies: list[float],
    path: Path,
    compressed: list[float] | None = None,
) -> Path:
    """Test accuracy against model size (bytes, log scale), one labelled point per stage, joined
    in order: how a compression pipeline trades accuracy for size. ``sizes`` are torch.save's
    (dense: zeros included); ``compressed``, if given, the kdexp.compress format's, drawn too."""
    fig = _figure((5.5, 4))
    ax = fig.subplots()
    series = [("torch.save (dense)", sizes, "tab:blue")]
    if compressed is not None:
        series.append(("compressed (kdexp.compress)", compressed, "tab:orange"))
    for name, values, color in series:
        ax.plot(values, accuracies, marker="o", color=color, label=name)
        for label, size, accuracy in zip(labels, values, accuracies, strict=True):
            ax.annotate(label, (size, accuracy), textcoords="offset points", xytext=(5, 5))
    ax.set(xlabel="model size (bytes)", ylabel="test/acc1 (%)", title="accuracy against size")
    if compressed is not None:
        ax.legend(fontsize=8)
    ax.set_xscale("log")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path
