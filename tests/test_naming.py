"""Run names that say what differs, the description and the group tag, read back from MLflow
(issue 14)."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from kdexp.naming import run_label, short_overrides, sweep_name
from tests.conftest import run_cli, tracking_overrides


def test_short_overrides_by_hand() -> None:
    words = ["method=distill/kd", "method.T=8.0", "seed=1", "model=resnet20", "device=cpu"]
    words += ["model@teacher=wrn_40_2", "tracking.uri=sqlite:///x.db", "dataset.root=/data/m"]
    words += ["model.hidden=[256, 256]", "schedule.lr=1e-3", "+method.student_layers=[fc]"]
    assert short_overrides(words) == [
        "T=8",
        "resnet20",
        "teacher=wrn_40_2",
        "hidden=[256,256]",
        "lr=0.001",
        "student_layers=[fc]",
    ]
    # two keys with one last part keep their whole key
    assert short_overrides(["model.width=2", "teacher.width=4"]) == [
        "model.width=2",
        "teacher.width=4",
    ]
    assert short_overrides("(none)") == []


def test_run_label_leads_with_the_method_and_stage() -> None:
    assert run_label("distill/kd", ["method.T=8", "seed=1"]) == "kd T=8"
    assert run_label("prune/unstructured", [], stage="prune") == "prune unstructured"
    assert run_label("baseline", [], stage="baseline") == "baseline"


def test_sweep_name_says_what_varies() -> None:
    assert sweep_name(["method.T=2,4,8", "seed=0,1"]) == "sweep T=2,4,8 seed=0,1"
    assert sweep_name(["method=distill/at", "seed=range(0,3)"]) == "sweep at seed=range(0,3)"
    assert sweep_name(["method=distill/kd,distill/at"]) == "sweep method=distill/kd,distill/at"


def test_swept_keys_by_hand() -> None:
    from kdexp.naming import swept_keys

    overrides = [
        "method.T=2,4",
        "seed=range(0,3)",
        "schedule.epochs=1",
        "+hydra.sweeper.params.x=a",
    ]
    assert swept_keys(overrides) == ["method.T", "seed", "x"]


@pytest.mark.slow
def test_a_sweeps_runs_are_named_by_what_differs(tmp_path: Path) -> None:
    args = ["-m", "method=baseline", "schedule.epochs=1", "dataset.train_limit=10"]
    args += ["latency_repeats=1", "schedule.lr=0.05,1e-1", "seed=0,1"]
    args += ["tracking.system_metrics=false", *tracking_overrides(tmp_path)]
    done = run_cli(args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("test").experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("kdexp.role") == "sweep"]
    jobs = [r for r in runs if r is not parent]
    assert parent.info.run_name == "sweep baseline lr=0.05,1e-1 seed=0,1"
    assert parent.data.tags["mlflow.note.content"].startswith("`kdexp -m ")
    names = sorted(r.info.run_name for r in jobs)
    shared = "epochs=1 train_limit=10"  # what every job of the sweep shares
    assert names == [
        f"baseline lr=0.05 seed0 {shared}",
        f"baseline lr=0.05 seed1 {shared}",
        f"baseline lr=0.1 seed0 {shared}",
        f"baseline lr=0.1 seed1 {shared}",
    ]
    by_name = {r.info.run_name.removesuffix(" " + shared): r for r in jobs}
    note = by_name["baseline lr=0.1 seed1"].data.tags["mlflow.note.content"]
    assert note.startswith("`kdexp ") and "schedule.lr=0.1" in note and "seed=1" in note
    groups = {name: r.data.tags["kdexp.group"] for name, r in by_name.items()}
    assert groups["baseline lr=0.1 seed0"] == groups["baseline lr=0.1 seed1"]
    assert groups["baseline lr=0.05 seed0"] == groups["baseline lr=0.05 seed1"]
    assert groups["baseline lr=0.05 seed0"] != groups["baseline lr=0.1 seed0"]
    assert groups["baseline lr=0.1 seed0"].startswith(f"baseline lr=0.1 {shared} [")
