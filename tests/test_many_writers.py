"""Issue 16: many jobs writing at once (16 jobs, 8 at a time under joblib) all end FINISHED with
every metric, on one fresh SQLite store and on a local ``mlflow server``."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import run_cli

TINY = ["method=baseline", "dataset=synthetic", "model=mlp", "schedule.epochs=1"]
TINY += ["latency_repeats=1", "log_every=1", "tracking.log_model=false", "seed=range(16)"]
TINY += ["dataset.train_samples=128", "dataset.test_samples=32", "tracking.experiment=test"]
STEPS = 2  # 112 training images, batches of 64


def _check_all_finished(uri: str) -> None:
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("test").experiment_id
    runs = [r for r in client.search_runs([experiment]) if r.data.tags.get("kdexp.role") != "sweep"]
    assert sorted(int(r.data.tags["seed"]) for r in runs) == list(range(16))
    for run in runs:
        assert run.info.status == "FINISHED"
        for key in ("test/acc1", "best/val_acc1", "model/params", "model/latency_ms"):
            assert key in run.data.metrics, (run.data.tags["seed"], key)
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss"))
        assert steps == list(range(STEPS))  # every step, once
        assert len(client.get_metric_history(run.info.run_id, "val/acc1")) == 1


@pytest.mark.slow
@pytest.mark.parametrize("store", ["sqlite", "server"])
def test_sixteen_jobs_eight_at_a_time_all_finish_with_every_metric(
    tmp_path: Path, store: str, request: pytest.FixtureRequest
) -> None:
    uri = f"sqlite:///{tmp_path / 'fresh.db'}"
    if store == "server":
        uri = request.getfixturevalue("mlflow_server")
    args = ["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=8", *TINY, f"tracking.uri={uri}"]
    done = run_cli(args, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr
    _check_all_finished(uri)
