"""kdexp-report: grouping over seeds, mean ± std, the Pareto front, files written."""

from __future__ import annotations

import csv
import statistics
from pathlib import Path

import pytest

from kdexp.comparison import pareto_front
from kdexp.report import main
from kdexp.tracking.mlflow import MlflowTracker

RUNS = [  # (method, hidden, seed, test/acc1, size)
    ("baseline", "[64]", 0, 90.0, 1000),
    ("baseline", "[64]", 1, 92.0, 1000),
    ("baseline", "[256]", 0, 95.0, 4000),
    ("baseline", "[256]", 1, 96.0, 4000),
    ("distill/kd", "[64]", 0, 93.5, 1000),
]


def _store(tmp_path: Path) -> str:
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    for method, hidden, seed, acc, size in RUNS:
        tracker = MlflowTracker(uri=uri, experiment="rep")
        params = {"seed": seed, "model.hidden": hidden, "method._target_": method}
        tags = {"method": method, "model": "mlp", "dataset": "digits", "sweep_dir": "/s/1"}
        with tracker.run(f"{method}-{seed}", params, tags):
            for epoch in range(3):
                tracker.log_metrics({"val/acc1": acc - 3 + epoch}, 10 * (epoch + 1))
            tracker.log_metrics(
                {
                    "test/acc1": acc,
                    "best/val_acc1": acc + 1,
                    "last/val_acc1": acc,
                    "model/size_bytes": size,
                    "model/params": size // 4,
                    "model/nonzero_params": size // 4,
                    "model/latency_ms": size / 1e4,
                },
                30,
            )
    return uri


def test_pareto_front_by_hand() -> None:
    points = [(1.0, 90.0), (2.0, 95.0), (2.0, 89.0), (3.0, 94.0), (4.0, 97.0)]
    assert pareto_front(points) == [0, 1, 4]


def test_report_groups_seeds_and_writes_files(tmp_path: Path, capsys) -> None:
    uri = _store(tmp_path)
    out = tmp_path / "report"
    assert main(["--experiment", "rep", "--tracking-uri", uri, "--out", str(out)]) == 0
    rows = list(csv.DictReader((out / "comparison.csv").open()))
    by_label = {r["configuration"]: r for r in rows}
    small = by_label["baseline / mlp / digits model.hidden=[64]"]
    assert small["seeds"] == "2"
    assert float(small["test/acc1 mean"]) == pytest.approx(91.0)
    assert float(small["test/acc1 std"]) == pytest.approx(statistics.stdev([90.0, 92.0]))
    assert float(small["best/val_acc1 mean"]) == pytest.approx(92.0)
    assert by_label["distill/kd / mlp / digits"]["seeds"] == "1"
    assert [r["configuration"] for r in rows][0].startswith(
        "baseline / mlp / digits model.hidden=[256]"
    )
    markdown = (out / "comparison.md").read_text()
    assert (
        "| baseline / mlp / digits model.hidden=[64] | 2 | 91.00 ± 1.41 | 92.00 ± 1.41 |"
        in markdown
    )
    for name in ("accuracy_vs_cost.png", "training_curves.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "5 runs, 3 configurations" in capsys.readouterr().out


def test_report_filters_and_explains_bad_input(tmp_path: Path, capsys) -> None:
    uri = _store(tmp_path)
    out = tmp_path / "r"
    args = ["--experiment", "rep", "--tracking-uri", uri, "--out", str(out)]
    assert main([*args, "--filter", "tags.method = 'distill/kd'"]) == 0
    assert "1 runs, 1 configurations" in capsys.readouterr().out
    assert main([*args, "--sweep-dir", "/elsewhere"]) == 2
    assert main(["--experiment", "nope", "--tracking-uri", uri]) == 2
    assert "--experiment='nope': one of the store's experiments: ['Default', 'rep']" in (
        capsys.readouterr().err
    )


def test_pareto_front_keeps_equal_points_and_drops_dominated_ones() -> None:
    # Equal points do not dominate each other (as in Optuna's best_trials); (1, 80) is dominated.
    points = [(2.0, 95.0), (1.0, 90.0), (1.0, 90.0), (1.0, 80.0), (3.0, 95.0)]
    assert pareto_front(points) == [1, 2, 0]


def test_pareto_csv_lists_each_front_on_the_chosen_accuracy(tmp_path: Path) -> None:
    uri = _store(tmp_path)
    out = tmp_path / "report"
    args = ["--experiment", "rep", "--tracking-uri", uri, "--out", str(out)]
    assert main([*args, "--accuracy", "best/val_acc1"]) == 0
    rows = list(csv.DictReader((out / "pareto.csv").open()))
    params = [r for r in rows if r["cost"] == "params"]
    # By hand: KD at [64] (250 params, 94.5) beats the [64] baseline (250, mean 92.0); the
    # [256] baseline (1000, mean 96.5) is the most accurate.
    assert [
        (r["configuration"], float(r["best/val_acc1"]), float(r["cost value"])) for r in params
    ] == [
        ("distill/kd / mlp / digits", 94.5, 250.0),
        ("baseline / mlp / digits model.hidden=[256]", 96.5, 1000.0),
    ]
    assert len(params[1]["run ids"].split()) == 2  # both seeds of that configuration
    assert {r["cost"] for r in rows} == {"params", "size_bytes", "latency_ms", "density"}
    with pytest.raises(SystemExit) as refused:  # argparse names the accepted metrics
        main([*args, "--accuracy", "val/acc1"])
    assert refused.value.code == 2
