"""MLflow tracking: runs close in one place, params go in chunks, the store is made up front."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from kdexp.config import flatten
from kdexp.tracking.callback import PrepareTrackingStore
from kdexp.tracking.mlflow import MlflowTracker


def _client(tmp_path: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'm.db'}")


def test_run_records_params_in_chunks_and_finishes(tmp_path: Path) -> None:
    tracker = MlflowTracker(uri=f"sqlite:///{tmp_path / 'm.db'}", experiment="e")
    params = {f"p{i:03d}": i for i in range(250)} | {"long": "x" * 7000}
    with tracker.run("name-1", params, {"seed": "3"}):
        for step in range(3):
            tracker.log_metrics({"train/loss": 1.0 / (step + 1)}, step)
    run = _client(tmp_path).get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "name-1"
    assert len(run.data.params) == 251 and run.data.params["p249"] == "249"
    assert len(run.data.params["long"]) == 6000 and run.data.params["long"].endswith("...")
    history = _client(tmp_path).get_metric_history(tracker.run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(0, 1.0), (1, 0.5), (2, pytest.approx(1 / 3))]
    experiment = _client(tmp_path).get_experiment_by_name("e")
    assert experiment.artifact_location == (tmp_path / "mlartifacts").as_uri()


def test_failing_body_marks_run_failed_and_keeps_metrics(tmp_path: Path) -> None:
    tracker = MlflowTracker(uri=f"sqlite:///{tmp_path / 'm.db'}", experiment="e")
    with pytest.raises(RuntimeError, match="boom"), tracker.run("r", {}, {}):
        tracker.log_metrics({"x": 2.0}, 0)
        raise RuntimeError("boom")
    run = _client(tmp_path).get_run(tracker.run_id)
    assert run.info.status == "FAILED"
    assert run.data.metrics == {"x": 2.0}  # buffered metrics are flushed before closing


def test_multirun_callback_creates_store_and_experiment(tmp_path: Path) -> None:
    db = tmp_path / "sub" / "m.db"
    config = OmegaConf.create(
        {
            "tracking": {
                "_target_": "kdexp.tracking.mlflow.MlflowTracker",
                "uri": f"sqlite:///{db}",
                "experiment": "sweep",
                "artifact_root": None,
            }
        }
    )
    PrepareTrackingStore().on_multirun_start(config)
    assert MlflowClient(tracking_uri=f"sqlite:///{db}").get_experiment_by_name("sweep")
    off = OmegaConf.create({"tracking": {"_target_": "kdexp.tracking.base.Tracker"}})
    PrepareTrackingStore().on_multirun_start(off)  # tracking=none: nothing to prepare


def test_flatten_gives_dotted_keys() -> None:
    cfg = OmegaConf.create({"a": {"b": 1, "c": [1, 2], "d": [{"e": 3}]}, "f": "${a.b}"})
    assert dict(flatten(cfg)) == {"a.b": 1, "a.c": [1, 2], "a.d.0.e": 3, "f": 1}
