"""Plots logged as run artifacts."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _figure(figsize: tuple[float, float]) -> Figure:
    """A figure drawn by Agg without pyplot: no display needed, and matplotlib (about 1 s of
    imports with pyplot) is imported only when a plot is made, not by ``import kdexp.run``."""
    from matplotlib.figure import Figure

    return Figure(figsize=figsize)


def learning_curves(history: list[dict[str, float]], path: Path) -> Path:
    """Accuracy (train and val) and validation loss against the epoch, saved as a PNG."""
    epochs = [h["epoch"] + 1 for h in history]
    fig = _figure((9, 3.5))
    acc, loss = fig.subplots(1, 2)
    acc.plot(epochs, [h["train/acc1"] for h in history], label="train/acc1")
    acc.plot(epochs, [h["val/acc1"] for h in history], label="val/acc1")
    acc.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    acc.legend()
    loss.plot(epochs, [h["val/loss"] for h in history], color="tab:red")
    loss.set(xlabel="epoch", ylabel="loss", title="val/loss")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def accuracy_against_size(
    labels: list[str], sizes: list[float], accuracies: list[float], path: Path
) -> Path:
    """Test accuracy against model size (bytes, log scale), one labelled point per stage, joined
    in order: how a compression pipeline trades accuracy for size."""
    fig = _figure((5.5, 4))
    ax = fig.subplots()
    ax.plot(sizes, accuracies, marker="o", color="tab:blue")
    for label, size, accuracy in zip(labels, sizes, accuracies, strict=True):
        ax.annotate(label, (size, accuracy), textcoords="offset points", xytext=(5, 5))
    ax.set(xlabel="model size (bytes)", ylabel="test/acc1 (%)", title="accuracy against size")
    ax.set_xscale("log")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path
