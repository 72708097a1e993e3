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
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from kdexp.comparison import (
    ACCURACIES,
    COLUMNS,
    SIZE_BASES,
    Row,
    fronts,
    group,
)
from kdexp.errors import ConfigError
from kdexp.labels import named
from kdexp.tables import markdown_table
from kdexp.tracking.query import RunRecord, load_histories, load_runs, log_report

#: Metrics whose history the curve plots draw.
CURVE_METRICS = ("val/acc1", "sparsity/global")


def write_pareto(
    rows: Sequence[Row], folder: Path, accuracy: str = "test/acc1", size: str = "dense"
) -> Path:
    """``pareto.csv``: one line per (cost, configuration on that cost's front), with the run ids."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "pareto.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["cost", "configuration", accuracy, "cost value", "run ids"])
        for name, front in fronts(rows, accuracy, size).items():
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
    if metric.endswith("ratio"):
        return f"{mean:.1f} ± {std:.1f}×"
    return f"{mean:,.0f}"


def seeds(row: Row) -> int:
    """How many distinct seeds a configuration's runs have (its seed param, else its tag)."""
    return len({r.params.get("seed", r.tags.get("seed", r.run_id)) for r in row.runs})


def _seeds_cell(row: Row) -> str:
    """The distinct seeds, and the run count when a seed was run more than once."""
    count = seeds(row)
    return str(count) if count == len(row.runs) else f"{count} ({len(row.runs)} runs)"


def report_folder(base: Path, name: str) -> Path:
    """``base/name``, or ``base/name-2``, ``-3``, ... when a report is already there: a report
    never overwrites another."""
    folder = base / name
    n = 1
    while folder.exists() and any(folder.iterdir()):
        n += 1
        folder = base / f"{name}-{n}"
    return folder


def report_name(sweep: str | None, sweep_dir: str | None, filter_string: str) -> str:
    """A report's folder name: its sweep's id, else its filter in file-name-safe form, else
    ``all``."""
    if sweep:
        return _safe(sweep)
    if sweep_dir:
        return _safe("_".join(Path(sweep_dir).resolve().parts[-2:]))
    if filter_string:
        return _safe(filter_string)
    return "all"


def _safe(text: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._=-]+", "_", text).strip("_") or "report"
    if len(safe) > 60:
        safe = safe[:51] + "-" + hashlib.sha256(text.encode()).hexdigest()[:8]
    return safe


def write_tables(rows: list[Row], folder: Path) -> list[Path]:
    """``comparison.md`` and ``comparison.csv`` (the CSV holds plain means and stds)."""
    folder.mkdir(parents=True, exist_ok=True)
    header = ["configuration", "seeds", *[c for c, _ in COLUMNS]]
    cells = [[row.label, _seeds_cell(row), *[_cell(row, m) for _, m in COLUMNS]] for row in rows]
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
            writer.writerow([row.label, seeds(row), *values])
    return [markdown, table]


def main(argv: Sequence[str] | None = None) -> int:
    """The console script; returns the exit status."""
    from kdexp.tracking.store import default_uri

    parser = argparse.ArgumentParser(prog="kdexp-report", description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default="kdexp", help="MLflow experiment name")
    parser.add_argument("--tracking-uri", default=None, help="default: outputs/mlflow.db here")
    parser.add_argument("--sweep", default=None, help="only the jobs of this sweep id")
    parser.add_argument("--sweep-dir", default=None, help="only the jobs of this multirun folder")
    parser.add_argument("--filter", default="", help="an MLflow search filter string")
    parser.add_argument(
        "--out",
        default=None,
        help="default: outputs/reports/<experiment>/<sweep id, filter or 'all'>; a folder that "
        "holds a report already gets -2, -3, ...",
    )
    parser.add_argument("--log-to", default=None, help="run id to attach the report to")
    parser.add_argument(
        "--accuracy",
        default="test/acc1",
        choices=ACCURACIES,
        help="the accuracy of the Pareto plots and pareto.csv (best/val_acc1 for a search)",
    )
    parser.add_argument(
        "--size",
        default="dense",
        choices=tuple(SIZE_BASES),
        help="model size in the plots and pareto.csv: dense (torch.save of the state_dict, zeros "
        "included) or compressed (kdexp.compress: sparse, at bit width, entropy-coded)",
    )
    parser.add_argument(
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
            uri, args.experiment, " and ".join(filters), statuses=("FINISHED", "FAILED")
        )
        # A sweep's parent run (FAILED when a job failed) holds its job table, not results; a
        # pipeline's run repeats its last stage's metrics (the stage is a run of its own).
        runs = [
            r
            for r in found
            if r.tags.get("kdexp.role") != "sweep"
            and r.tags.get("method") != "pipeline"
            and r.status == "FINISHED"
        ]
        parents = [r.run_id for r in found if r.tags.get("kdexp.role") == "sweep"]
        if not runs:
            raise ConfigError(
                "--filter", " and ".join(filters), "a filter that FINISHED runs match"
            )
    except ConfigError as error:
        print(f"kdexp-report: error: {error}", file=sys.stderr)
        return 2
    from kdexp.report_plots import write_plots

    rows = group(runs)
    # Histories of the configurations the curve plots draw only: a request per run and metric.
    on_fronts = [r for front in fronts(rows, args.accuracy, args.size).values() for r, _ in front]
    drawn = named(rows, on_fronts, args.accuracy)
    load_histories(uri, [r.runs[0] for r in rows if r.label in drawn], CURVE_METRICS)
    if args.out:
        out = Path(args.out)
        folder = report_folder(out.parent, out.name)
    else:
        name = report_name(args.sweep, args.sweep_dir, args.filter)
        folder = report_folder(Path("outputs", "reports", _safe(args.experiment)), name)
    paths = write_tables(rows, folder) + write_plots(rows, folder, args.accuracy, args.size)
    paths.append(write_pareto(rows, folder, args.accuracy, args.size))
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
