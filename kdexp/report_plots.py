"""The figures of ``kdexp-report``, sized for a page and readable from three runs to thousands.

- ``accuracy_vs_cost.png``: a 2×2 grid (parameters, size, latency, density), 8×7 inches. Every
  configuration is a point; the Pareto front is drawn and its points marked, a front of one point
  included; only the front and the most accurate configuration are labelled, and labels are
  placed where they overlap neither each other nor the axes' edges.
- ``training_curves.png`` and ``sparsity_curves.png``: one curve per configuration (its first
  seed's run). Up to :data:`LEGEND_MAX` curves each get a legend entry, inside the axes; beyond
  that the most accurate ones are drawn in colour with a legend and the rest in grey, counted in
  one legend entry.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kdexp.comparison import Row

#: Curves drawn in colour, each with a legend entry; the rest are grey.
LEGEND_MAX = 8
#: Page-sized figures (inches): a grid of four plots, and one plot of curves.
GRID_SIZE, CURVES_SIZE = (8.0, 7.0), (8.0, 4.5)
_LABEL_CHARS = 40


def short_labels(rows: Sequence[Row]) -> dict[int, str]:
    """Row labels without the words every row shares (``distill/kd / mlp / digits T=4`` ->
    ``T=4`` when all rows are KD on an MLP on digits), cut at the front to a plot label's
    length."""
    words = [row.label.split() for row in rows]
    common = set.intersection(*(set(w) for w in words)) if len(rows) > 1 else set()
    labels = {}
    for i, row_words in enumerate(words):
        kept = [w for w in row_words if w not in common and w != "/"] if common else []
        text = " ".join(kept) or " ".join(row_words)
        # cut at the front: a label's end (its overrides) is what tells configurations apart
        labels[i] = text if len(text) <= _LABEL_CHARS else "…" + text[1 - _LABEL_CHARS :]
    return labels


def _overlaps(box: Any, boxes: list[Any]) -> bool:
    return any(box.overlaps(other) for other in boxes)


_OFFSETS = [(6, 6), (6, -12), (-6, 6), (-6, -12), (10, 0), (-10, 0), (0, 12), (0, -16)]


def place_labels(ax: Any, points: list[tuple[float, float, str]]) -> list[Any]:
    """Annotate ``points`` (x, y, text) where no label overlaps another label, a marker or the
    axes' edges, trying eight offsets around each point; a label with no free place is dropped
    (the table and pareto.csv still name it). Returns the placed texts."""
    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    taken: list[Any] = []
    placed = []
    for x, y, text in points:
        for dx, dy in _OFFSETS:
            ha = "left" if dx >= 0 else "right"
            note = ax.annotate(
                text, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=7, ha=ha
            )
            box = note.get_window_extent(renderer).expanded(1.05, 1.1)
            inside = frame.contains(box.x0, box.y0) and frame.contains(box.x1, box.y1)
            if inside and not _overlaps(box, taken):
                taken.append(box)
                placed.append(note)
                break
            note.remove()
    return placed


def write_plots(
    rows: list[Row], folder: Path, accuracy: str = "test/acc1", size: str = "dense"
) -> list[Path]:
    """Accuracy against parameters, size (on the ``size`` basis: ``dense`` or ``compressed``),
    latency and density (Pareto fronts marked); sparsity and validation curves. Returns the PNGs
    written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    from kdexp.comparison import costs, fronts

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    usable = [r for r in rows if accuracy in r.mean]
    labels = short_labels(usable)
    index = {id(row): i for i, row in enumerate(usable)}
    marked = fronts(usable, accuracy, size)
    best = max(usable, key=lambda r: r.mean[accuracy]) if usable else None
    fig, axes = plt.subplots(2, 2, figsize=GRID_SIZE)
    small = len(usable) <= 50
    for ax, (xlabel, name, cost) in zip(axes.flat, costs(size), strict=True):
        points: list[tuple[Row, float]] = []
        for row in usable:
            x = cost(row)
            if x is not None:
                points.append((row, x))
        xs = [x for _, x in points]
        ax.scatter(
            xs,
            [row.mean[accuracy] for row, _ in points],
            s=18 if small else 6,
            alpha=0.8 if small else 0.35,
            color="tab:blue",
            label="configuration",
            zorder=2,
        )
        sized = name in ("params", "size_bytes", "compressed_bytes")
        if sized and xs and min(xs) > 0 and max(xs) > 20 * min(xs):
            ax.set_xscale("log")  # a search's students span orders of magnitude in size
            ax.xaxis.set_minor_formatter(NullFormatter())  # "3×10⁵ 4×10⁵ ..." would overlap
        front = marked[name]
        if front:
            fx, fy = [x for _, x in front], [row.mean[accuracy] for row, _ in front]
            ax.plot(fx, fy, "k--", linewidth=1, zorder=3)
            ax.scatter(
                fx, fy, s=60, facecolors="none", edgecolors="black", zorder=4,
                label=f"Pareto front ({len(front)})",
            )  # fmt: skip
        ax.set(xlabel=xlabel, ylabel=f"{accuracy} (%)")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=7)
        fig.canvas.draw()  # label placement measures text on the final axes
        named = [(row, x) for row, x in front]
        if best is not None and all(row is not best for row, _ in named):
            named += [(best, x) for row, x in points if row is best]
        place_labels(ax, [(x, row.mean[accuracy], labels[index[id(row)]]) for row, x in named])
    fig.suptitle(f"{accuracy} against cost, {len(usable)} configurations", fontsize=10)
    fig.tight_layout()
    written.append(folder / "accuracy_vs_cost.png")
    fig.savefig(written[-1], dpi=150)
    plt.close(fig)

    for metric, file, ylabel in (
        ("sparsity/global", "sparsity_curves.png", "sparsity"),
        ("val/acc1", "training_curves.png", "val/acc1 (%)"),
    ):
        curves = [(row, run) for row in rows for run in row.runs[:1] if metric in run.histories]
        if curves:
            written.append(_curves(curves, metric, ylabel, folder / file, accuracy))
    return written


def _curves(curves: list, metric: str, ylabel: str, path: Path, accuracy: str) -> Path:
    import matplotlib.pyplot as plt

    ranked = sorted(curves, key=lambda c: -c[0].mean.get(accuracy, float("-inf")))
    labels = short_labels([row for row, _ in ranked])
    coloured = ranked[:LEGEND_MAX]
    fig, ax = plt.subplots(figsize=CURVES_SIZE)
    for _, run in ranked[LEGEND_MAX:]:
        steps, values = zip(*run.histories[metric], strict=True)
        ax.plot(steps, values, color="0.75", linewidth=0.6, alpha=0.5, zorder=1)
    if len(ranked) > LEGEND_MAX:
        ax.plot([], [], color="0.75", label=f"{len(ranked) - LEGEND_MAX} other configurations")
    for i, (_, run) in enumerate(coloured):
        steps, values = zip(*run.histories[metric], strict=True)
        ax.plot(steps, values, label=labels[i], linewidth=1.4, zorder=2)
    title = f"{metric}, first seed of each configuration"
    if len(ranked) > LEGEND_MAX:
        title += f" (the {LEGEND_MAX} best by {accuracy} in colour)"
    ax.set(xlabel="step", ylabel=ylabel, title=title)
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=7, framealpha=0.85)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path
