"""kdexp-report at publication quality (issue 14): distinct seeds, no pipeline parents, one folder
per report, page-sized figures, a marked one-point front, labels that do not overlap, and plots
that stay readable with thousands of configurations."""

from __future__ import annotations

import csv
import random
from pathlib import Path

import pytest
from matplotlib.figure import Figure

from kdexp.comparison import Row
from kdexp.report import main, report_folder, report_name
from kdexp.report_plots import GRID_SIZE, LEGEND_MAX, place_labels, short_labels, write_plots
from kdexp.tracking.mlflow import MlflowTracker
from kdexp.tracking.query import RunRecord


def _row(label: str, acc: float, params: float, seeds: int = 1, curve: bool = False) -> Row:
    runs = []
    for seed in range(seeds):
        history = {"val/acc1": [(s, acc - 5 + s) for s in range(5)]} if curve else {}
        runs.append(
            RunRecord(f"{label}{seed}", label, "FINISHED", {}, {"seed": str(seed)}, {}, history)
        )
    mean = {
        "test/acc1": acc,
        "model/params": params,
        "model/size_bytes": 4 * params,
        "model/latency_ms": params / 1e4,
        "model/nonzero_params": params,
    }
    return Row(label, runs, mean, dict.fromkeys(mean, 0.0))


@pytest.fixture
def figures(monkeypatch) -> list[Figure]:
    saved: list[Figure] = []
    original = Figure.savefig

    def keep(self: Figure, *args, **kwargs):  # type: ignore[no-untyped-def]
        saved.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    return saved


def test_a_one_point_front_is_marked_and_the_figure_fits_a_page(tmp_path: Path, figures) -> None:
    rows = [_row("kd / mlp / digits T=4", 95.0, 1000.0)]
    write_plots(rows, tmp_path)
    grid = figures[0]
    assert tuple(grid.get_size_inches()) == GRID_SIZE  # 8 x 7 in: a page's width
    for ax in grid.axes:
        assert "Pareto front (1)" in ax.get_legend_handles_labels()[1]
        assert [t.get_text() for t in ax.texts] == ["kd / mlp / digits T=4"]  # labelled


def test_labels_do_not_overlap_and_stay_inside(tmp_path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 3))
    ax.set(xlim=(0, 10), ylim=(0, 10))
    fig.canvas.draw()
    points = [(5.0, 5.0, f"configuration number {i}") for i in range(12)]  # all at one spot
    placed = place_labels(ax, points)
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in placed]
    assert 1 <= len(placed) < 12  # the rest have no free place and are left to the table
    for i, a in enumerate(boxes):
        assert not any(a.overlaps(b) for b in boxes[i + 1 :])
        frame = ax.get_window_extent(renderer)
        assert frame.x0 <= a.x0 and a.x1 <= frame.x1 and frame.y0 <= a.y0 and a.y1 <= frame.y1
    plt.close(fig)


def test_short_labels_drop_the_words_all_rows_share() -> None:
    rows = [_row("kd / mlp / digits method.T=4", 1, 1), _row("kd / mlp / digits method.T=8", 1, 1)]
    assert short_labels(rows) == {0: "method.T=4", 1: "method.T=8"}


@pytest.mark.slow
def test_thousands_of_configurations_stay_readable(tmp_path: Path, figures) -> None:
    rng = random.Random(0)
    rows = [
        _row(f"nas / net{i} / digits", rng.uniform(80, 99), rng.uniform(1e3, 1e6), curve=True)
        for i in range(2000)
    ]
    paths = write_plots(rows, tmp_path)
    assert [p.name for p in paths] == ["accuracy_vs_cost.png", "training_curves.png"]
    grid, curves = figures
    for ax in grid.axes:
        assert len(ax.texts) <= 12  # the front and the best, not 2,000 labels
    (ax,) = curves.axes
    labels = ax.get_legend_handles_labels()[1]
    assert len(labels) == LEGEND_MAX + 1
    assert labels[0] == f"{2000 - LEGEND_MAX} other configurations"
    assert ax.get_legend() is not None  # inside the axes, not spilling off the figure
    assert curves.legends == []  # no figure legend beside the axes


def test_report_folders_are_named_and_never_overwritten(tmp_path: Path) -> None:
    assert report_name("2026-12-02_10-00-00-1", None, "") == "2026-12-02_10-00-00-1"
    assert report_name(None, None, "tags.method = 'distill/kd'") == "tags.method_=_distill_kd"
    assert report_name(None, None, "") == "all"
    first = report_folder(tmp_path, "all")
    assert first == tmp_path / "all"
    first.mkdir()
    assert report_folder(tmp_path, "all") == first  # empty: used
    (first / "comparison.md").write_text("x")
    assert report_folder(tmp_path, "all") == tmp_path / "all-2"


@pytest.mark.slow
def test_seeds_are_distinct_seeds_and_pipeline_parents_are_left_out(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    runs = [  # (name, seed, tags, test/acc1)
        ("a", 0, {}, 90.0),
        ("b", 0, {}, 92.0),
        ("c", 0, {}, 94.0),  # three runs of seed 0: one seed
        ("p", 0, {"method": "pipeline", "kdexp.pipeline": "s > t"}, 99.0),
    ]
    for name, seed, extra, acc in runs:
        tracker = MlflowTracker(uri=uri, experiment="rep", system_metrics=False)
        tags = {"method": "baseline", "model": "mlp", "dataset": "digits", **extra}
        with tracker.run(name, {"seed": seed}, tags):
            tracker.log_summary({"test/acc1": acc, "model/params": 10.0}, 1)
    base = ["--experiment", "rep", "--tracking-uri", uri]
    assert main([*base, "--out", str(tmp_path / "out")]) == 0
    (row,) = csv.DictReader((tmp_path / "out" / "comparison.csv").open())
    assert row["seeds"] == "1"
    assert float(row["test/acc1 mean"]) == pytest.approx(92.0)  # the pipeline's 99 is not in it
    assert "1 (3 runs)" in (tmp_path / "out" / "comparison.md").read_text()
    assert main([*base, "--out", str(tmp_path / "out")]) == 0  # again: beside, not over it
    assert (tmp_path / "out-2" / "comparison.csv").is_file()
