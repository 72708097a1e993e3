"""``kdexp-report``: compare finished runs as a table (Markdown and CSV) and plots (PNG).

One row per configuration: runs that differ only in their seed are grouped, and each column gives
mean ± std over the seeds. Best-epoch and last-epoch validation accuracy stay in separate columns,
since comparisons with papers often confuse the two. The plots put accuracy (test accuracy, or the
metric ``--accuracy`` names) against parameters, model size, latency and density with the Pareto
front marked, and ``pareto.csv`` lists the configurations on each front; the other plots overlay
the runs' sparsity curves and each configuration's validation curve.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from kdexp.config import EXECUTION_KEYS
from kdexp.errors import ConfigError
from kdexp.tracking.query import RunRecord, load_runs, log_report

#: Top-level keys whose params do not make a configuration different: the seed, and how a run
#: is executed or recorded.
_IGNORED = ("seed", *EXECUTION_KEYS)
#: (column, metric) pairs of the table; accuracies are in %.
COLUMNS = (
    ("test/acc1", "test/acc1"),
    ("best val/acc1", "best/val_acc1"),
    ("last val/acc1", "last/val_acc1"),
    ("params", "model/params"),
    ("nonzero params", "model/nonzero_params"),
    ("size (bytes)", "model/size_bytes"),
    ("latency (ms)", "model/latency_ms"),
    ("FLOPs", "model/flops"),
)


@dataclass
class Row:
    """One configuration: its label, its runs, and mean and std of each metric over them."""

    label: str
    runs: list[RunRecord]
    mean: dict[str, float]
    std: dict[str, float]


def _config_key(run: RunRecord) -> str:
    kept = {k: v for k, v in run.params.items() if k.split(".")[0] not in _IGNORED}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()


def group(runs: Sequence[RunRecord]) -> list[Row]:
    """Group runs by configuration (all params but the seed) and aggregate their metrics.

    A row is labelled method/model/dataset (and teacher); where several configurations share
    that label, the params that tell them apart are appended.
    """
    groups: dict[str, list[RunRecord]] = {}
    for run in runs:
        groups.setdefault(_config_key(run), []).append(run)
    by_label: dict[str, list[list[RunRecord]]] = {}
    for members in groups.values():
        tags = members[0].tags
        parts = [tags.get(k, "?") for k in ("method", "model", "dataset")]
        if "teacher" in tags:
            parts.append(f"teacher {tags['teacher']}")
        by_label.setdefault(" / ".join(parts), []).append(members)
    rows = []
    for label, configs in by_label.items():
        varying = _varying_params([members[0] for members in configs]) if len(configs) > 1 else []
        for members in configs:
            extra = [f"{k}={members[0].params[k]}" for k in varying if k in members[0].params]
            rows.append(_aggregate(" ".join([label, *extra]), members))
    return sorted(rows, key=lambda r: -r.mean.get("test/acc1", float("-inf")))


def _varying_params(representatives: list[RunRecord]) -> list[str]:
    """Params whose value differs between configurations (what tells the rows apart)."""
    keys = sorted({k for r in representatives for k in r.params if k.split(".")[0] not in _IGNORED})
    return [
        k
        for k in keys
        if not k.endswith("_target_") and len({r.params.get(k) for r in representatives}) > 1
    ]


def _aggregate(label: str, runs: list[RunRecord]) -> Row:
    mean, std = {}, {}
    for _, metric in COLUMNS:
        values = [r.metrics[metric] for r in runs if metric in r.metrics]
        if values:
            mean[metric] = statistics.fmean(values)
            std[metric] = statistics.stdev(values) if len(values) > 1 else 0.0
    return Row(label, runs, mean, std)


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point dominates, by increasing x.

    A point (x, y) is dominated when another has x' <= x (cost) and y' >= y (accuracy), one of
    them strictly. Equal points do not dominate each other, so both stay on the front.
    """
    front = [
        i
        for i, (x, y) in enumerate(points)
        if not any(a <= x and b >= y and (a, b) != (x, y) for a, b in points)
    ]
    return sorted(front, key=lambda i: (points[i][0], -points[i][1]))


def _density(row: Row) -> float | None:
    if "model/params" not in row.mean or "model/nonzero_params" not in row.mean:
        return None
    return row.mean["model/nonzero_params"] / row.mean["model/params"]


#: (axis label, short name, cost) of the accuracy-against-cost plots and of ``pareto.csv``.
COSTS: tuple[tuple[str, str, Callable[[Row], float | None]], ...] = (
    ("parameters", "params", lambda r: r.mean.get("model/params")),
    ("model size (bytes)", "size_bytes", lambda r: r.mean.get("model/size_bytes")),
    ("latency at batch 1 (ms)", "latency_ms", lambda r: r.mean.get("model/latency_ms")),
    ("density (nonzero / params)", "density", _density),
)
#: Metrics ``--accuracy`` may put on the y axis (all are aggregated as table columns).
ACCURACIES = ("test/acc1", "best/val_acc1", "last/val_acc1")


def fronts(rows: Sequence[Row], accuracy: str = "test/acc1") -> dict[str, list[tuple[Row, float]]]:
    """For each cost of :data:`COSTS`, the rows on the Pareto front of ``accuracy`` against it,
    each with its cost, by increasing cost."""
    found = {}
    for _, name, cost in COSTS:
        costs = [(r, cost(r)) for r in rows if accuracy in r.mean]
        usable = [(r, x) for r, x in costs if x is not None]
        points = [(x, r.mean[accuracy]) for r, x in usable]
        found[name] = [(usable[i][0], points[i][0]) for i in pareto_front(points)]
    return found


def write_pareto(rows: Sequence[Row], folder: Path, accuracy: str = "test/acc1") -> Path:
    """``pareto.csv``: one line per (cost, configuration on that cost's front), with the run ids."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "pareto.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["cost", "configuration", accuracy, "cost value", "run ids"])
        for name, front in fronts(rows, accuracy).items():
            for row, x in front:
                ids = " ".join(run.run_id for run in row.runs)
                writer.writerow([name, row.label, row.mean[accuracy], x, ids])
    return path


def _cell(row: Row, metric: str) -> str:
    if metric not in row.mean:
        return "—"
    mean, std = row.mean[metric], row.std[metric]
    if metric.endswith(("acc1", "acc5")):
        return f"{mean:.2f} ± {std:.2f}"
    if metric.endswith("latency_ms"):
        return f"{mean:.3f} ± {std:.3f}"
    return f"{mean:,.0f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table of ``header`` and ``rows`` (cells as given, ``|`` escaped)."""

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"

    return "\n".join([line(header), "|" + "---|" * len(header), *map(line, rows)]) + "\n"


def write_tables(rows: list[Row], folder: Path) -> list[Path]:
    """``comparison.md`` and ``comparison.csv`` (the CSV holds plain means and stds)."""
    folder.mkdir(parents=True, exist_ok=True)
    header = ["configuration", "seeds", *[c for c, _ in COLUMNS]]
    cells = [[row.label, str(len(row.runs)), *[_cell(row, m) for _, m in COLUMNS]] for row in rows]
    markdown = folder / "comparison.md"
    markdown.write_text(markdown_table(header, cells))
    table = folder / "comparison.csv"
    with table.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            ["configuration", "seeds"] + [f"{m} {s}" for _, m in COLUMNS for s in ("mean", "std")]
        )
        for row in rows:
            values = [v for _, m in COLUMNS for v in (row.mean.get(m, ""), row.std.get(m, ""))]
            writer.writerow([row.label, len(row.runs), *values])
    return [markdown, table]


def write_plots(rows: list[Row], folder: Path, accuracy: str = "test/acc1") -> list[Path]:
    """Accuracy against parameters, size, latency and density (Pareto fronts marked); sparsity
    and validation curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    usable = [r for r in rows if accuracy in r.mean]
    marked = fronts(usable, accuracy)
    fig, axes = plt.subplots(1, len(COSTS), figsize=(5.5 * len(COSTS), 5))
    for ax, (xlabel, name, cost) in zip(axes, COSTS, strict=True):
        xs = []
        for row in usable:
            x = cost(row)
            if x is not None:
                xs.append(x)
                ax.scatter(x, row.mean[accuracy])
                ax.annotate(row.label, (x, row.mean[accuracy]), fontsize=7)
        if name in ("params", "size_bytes") and xs and min(xs) > 0 and max(xs) > 20 * min(xs):
            ax.set_xscale("log")  # a search's students span orders of magnitude in size
        front = marked[name]
        if front:
            xs, ys = [x for _, x in front], [row.mean[accuracy] for row, _ in front]
            ax.plot(xs, ys, "k--", label="Pareto front")
            ax.legend()
        ax.set(xlabel=xlabel, ylabel=f"{accuracy} (%)")
    fig.subplots_adjust(wspace=0.3)
    written.append(folder / "accuracy_vs_cost.png")
    fig.savefig(written[-1], dpi=100)
    plt.close(fig)

    for metric, name, ylabel in (
        ("sparsity/global", "sparsity_curves.png", "sparsity"),
        ("val/acc1", "training_curves.png", "val/acc1 (%)"),
    ):
        curves = [
            (row.label, run) for row in rows for run in row.runs[:1] if metric in run.histories
        ]
        if not curves:
            continue
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for label, run in curves:
            steps, values = zip(*run.histories[metric], strict=True)
            ax.plot(steps, values, label=label)
        ax.set(xlabel="step", ylabel=ylabel)
        ax.legend(fontsize=7)
        written.append(folder / name)
        fig.savefig(written[-1], dpi=100)
        plt.close(fig)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """The console script; returns the exit status."""
    from kdexp.tracking.mlflow import default_uri

    parser = argparse.ArgumentParser(prog="kdexp-report", description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default="kdexp", help="MLflow experiment name")
    parser.add_argument("--tracking-uri", default=None, help="default: outputs/mlflow.db here")
    parser.add_argument("--sweep", default=None, help="only the jobs of this sweep id")
    parser.add_argument("--sweep-dir", default=None, help="only the jobs of this multirun folder")
    parser.add_argument("--filter", default="", help="an MLflow search filter string")
    parser.add_argument("--out", default=None, help="default: outputs/reports/<experiment>")
    parser.add_argument("--log-to", default=None, help="run id to attach the report to")
    parser.add_argument(
        "--accuracy",
        default="test/acc1",
        choices=ACCURACIES,
        help="the accuracy of the Pareto plots and pareto.csv (best/val_acc1 for a search)",
    )
    parser.add_argument(  # issue 13: a preset's arms beside its paper's figures
        "--paper",
        action="store_true",
        help="also print, per arm of a preset with a paper node, measured beside published",
    )
    args = parser.parse_args(argv)
    uri = args.tracking_uri or default_uri()
    filters = [args.filter] if args.filter else []
    if args.sweep:
        filters.append(f"tags.sweep_id = '{args.sweep}'")
    if args.sweep_dir:
        filters.append(f"tags.sweep_dir = '{Path(args.sweep_dir).resolve()}'")
    try:
        found = load_runs(
            uri,
            args.experiment,
            " and ".join(filters),
            histories=("val/acc1", "sparsity/global"),
            statuses=("FINISHED", "FAILED"),
        )
        # A sweep's parent run (FAILED when a job failed) holds its job table, not results.
        runs = [r for r in found if r.tags.get("kdexp.role") != "sweep" and r.status == "FINISHED"]
        parents = [r.run_id for r in found if r.tags.get("kdexp.role") == "sweep"]
        if not runs:
            raise ConfigError(
                "--filter", " and ".join(filters), "a filter that FINISHED runs match"
            )
    except ConfigError as error:
        print(f"kdexp-report: error: {error}", file=sys.stderr)
        return 2
    rows = group(runs)
    folder = Path(args.out or Path("outputs", "reports", args.experiment))
    paths = write_tables(rows, folder) + write_plots(rows, folder, args.accuracy)
    paths.append(write_pareto(rows, folder, args.accuracy))
    # Logged to the sweep's parent run by default when the report is of one sweep.
    log_to = args.log_to or (parents[0] if len(parents) == 1 else None)
    if log_to:
        log_report(uri, log_to, paths)
    print((folder / "comparison.md").read_text())
    if args.paper:
        _print_paper(runs, folder)
    print(f"kdexp-report: {len(runs)} runs, {len(rows)} configurations; written to {folder}")
    if log_to:
        print(f"kdexp-report: logged to run {log_to}")
    return 0


def _print_paper(runs: list[RunRecord], folder: Path) -> None:
    """``--paper``: write ``paper.md`` (:mod:`kdexp.paper`) and print it."""
    from kdexp.paper import paper_rows, paper_table

    rows = paper_rows(runs)
    if not rows:
        print("kdexp-report: --paper: no run carries a paper node (paper.citation)")
        return
    (folder / "paper.md").write_text(paper_table(rows))
    print(paper_table(rows))


if __name__ == "__main__":
    sys.exit(main())
