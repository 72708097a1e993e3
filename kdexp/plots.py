"""Plots logged as run artifacts."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on clusters and CI
import matplotlib.pyplot as plt  # noqa: E402


def learning_curves(history: list[dict[str, float]], path: Path) -> Path:
    """Accuracy (train and val) and validation loss against the epoch, saved as a PNG."""
    epochs = [h["epoch"] + 1 for h in history]
    fig, (acc, loss) = plt.subplots(1, 2, figsize=(9, 3.5))
    acc.plot(epochs, [h["train/acc1"] for h in history], label="train/acc1")
    acc.plot(epochs, [h["val/acc1"] for h in history], label="val/acc1")
    acc.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    acc.legend()
    loss.plot(epochs, [h["val/loss"] for h in history], color="tab:red")
    loss.set(xlabel="epoch", ylabel="loss", title="val/loss")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
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
    fig, ax = plt.subplots(figsize=(5.5, 4))
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
    plt.close(fig)
    return path
