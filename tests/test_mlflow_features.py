"""MLflow's own features, read back from the store: system metrics, the dataset as a run input,
the model registry, every loss term in learning_curves.png, the experiment's kind (issue 14)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from matplotlib.figure import Figure
from mlflow.tracking import MlflowClient

from kdexp.plots import learning_curves
from tests.conftest import run_cli, tracking_overrides


def _client(tmp_path: Path) -> tuple[MlflowClient, str]:
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    return client, client.get_experiment_by_name("test").experiment_id


@pytest.mark.slow
def test_system_metrics_dataset_input_and_registered_model(tmp_path: Path) -> None:
    args = ["method=baseline", "schedule.epochs=2", "latency_repeats=1"]
    args += ["tracking.system_metrics_every_s=0.2", "tracking.register_model=digits-mlp"]
    done = run_cli([*args, *tracking_overrides(tmp_path)], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    client, experiment = _client(tmp_path)
    (run,) = client.search_runs([experiment])
    run_id = run.info.run_id

    system = {k for k in run.data.metrics if k.startswith("system/")}
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= system
    assert 0 <= run.data.metrics["system/cpu_utilization_percentage"] <= 100 * 64

    (given,) = run.inputs.dataset_inputs
    assert given.dataset.name == "digits"
    assert len(given.dataset.digest) == 16
    assert {t.key: t.value for t in given.tags}["mlflow.data.context"] == "training"
    assert json.loads(given.dataset.source)["loader"] == "kdexp.dataset.digits.load"
    profile = json.loads(given.dataset.profile)
    # scikit-learn's digits: 1,797 images, all of them in one of the three splits
    assert profile["train_size"] + profile["val_size"] + profile["test_size"] == 1797
    assert profile["test_size"] == pytest.approx(0.2 * 1797, abs=1)
    assert profile["num_classes"] == 10 and profile["input_shape"] == [1, 8, 8]

    (version,) = client.search_model_versions("name = 'digits-mlp'")
    assert version.run_id == run_id
    assert run.data.tags["kdexp.registered_model"] == f"digits-mlp/{version.version}"
    assert f"#/experiments/{experiment}/runs" in done.stdout  # the runs page, not GenAI's

    # The printed link opens the experiment's saved view, whose chart sections put the curves
    # first (tests/test_ui.py checks the page itself in a browser).
    assert "runs?viewStateShareKey=kdexp&compareRunsMode=CHART" in done.stdout
    view = client.get_experiment(experiment).tags["mlflow.sharedViewState.kdexp"]
    envelope = json.loads(view)
    assert envelope["name"] == "kdexp: curves first" and isinstance(envelope["createdAt"], int)
    state = json.loads(envelope["state"])
    sections = [section["name"] for section in state["compareRunSections"]]
    assert sections[:2] == ["train", "val"] and sections[-1] == "System metrics"
    assert sections.index("Model metrics") < sections.index("best") < sections.index("model")
    assert set(sections) == {
        "System metrics" if k.startswith("system/") else k.rpartition("/")[0] or "Model metrics"
        for k in run.data.metrics
    }
    assert state["isAccordionReordered"] is True and state["compareRunCharts"] == []


@pytest.mark.slow
def test_system_metrics_switch_off(tmp_path: Path) -> None:
    args = ["method=baseline", "schedule.epochs=1", "latency_repeats=1", "dataset.train_limit=10"]
    args += ["tracking.system_metrics=false", "tracking.system_metrics_every_s=0.2"]
    done = run_cli([*args, *tracking_overrides(tmp_path)], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    client, experiment = _client(tmp_path)
    (run,) = client.search_runs([experiment])
    assert not [k for k in run.data.metrics if k.startswith("system/")]


def test_register_model_needs_log_model(compose_cfg, tmp_path: Path) -> None:
    from kdexp.config import validate
    from kdexp.errors import ConfigError

    cfg = compose_cfg("tracking.register_model=x", "tracking.log_model=false")
    with pytest.raises(ConfigError, match="tracking.register_model='x': null while"):
        validate(cfg)


def test_learning_curves_show_every_loss_term(tmp_path: Path, monkeypatch) -> None:
    saved: list[Figure] = []
    original = Figure.savefig

    def keep(self: Figure, *args, **kwargs):  # type: ignore[no-untyped-def]
        saved.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    history = [
        {
            "epoch": e,
            "train/acc1": 50.0 + e,
            "val/acc1": 40.0 + e,
            "val/loss": 2.0 - e / 10,
            "train/epoch_loss": 3.0 - e / 10,
            "train/epoch_loss_ce": 1.0 - e / 20,
            "train/epoch_loss_kd": 2.0 - e / 20,
        }
        for e in range(3)
    ]
    path = learning_curves(history, tmp_path / "lc.png")
    assert path.read_bytes()[:4] == b"\x89PNG"
    (fig,) = saved
    accuracy, loss, terms = fig.axes
    assert terms.get_legend_handles_labels()[1] == ["ce", "kd"]
    assert list(terms.lines[1].get_ydata()) == [2.0, 1.95, 1.9]
    assert loss.get_legend_handles_labels()[1] == ["train/epoch_loss", "val/loss"]
    assert list(accuracy.lines[0].get_xdata()) == [0, 1, 2]  # epochs from 0, as in MLflow


class _Recorder:
    """A client that records set_experiment_tag, or refuses it."""

    def __init__(self, refuse: bool = False) -> None:
        self.tags: dict[str, str] = {}
        self.refuse = refuse

    def set_experiment_tag(self, experiment_id: str, key: str, value: str) -> None:
        if self.refuse:
            raise PermissionError("read-only")
        self.tags[key] = value


def test_a_saved_view_grows_with_new_sections_and_is_not_rewritten_otherwise() -> None:
    from kdexp.tracking.extras import publish_view, view_sections

    client = _Recorder()
    tag = "mlflow.sharedViewState.kdexp"
    keys = {"train/loss", "val/acc1", "test/acc1", "epoch"}
    assert publish_view(client, "1", "kdexp", "v", keys) == "kdexp"
    assert view_sections(client.tags[tag]) == {"train", "val", "test", "Model metrics"}

    existing = dict(client.tags)
    client.tags.clear()  # the same sections again: nothing written
    assert publish_view(client, "1", "kdexp", "v", {"train/loss"}, existing=existing) == "kdexp"
    assert client.tags == {}

    # a pruning run adds sparsity/ and a method's own prefix: the view keeps what it had
    more = {"sparsity/global", "mine/thing", "train/loss"}
    assert publish_view(client, "1", "kdexp", "v", more, existing=existing) == "kdexp"
    state = json.loads(json.loads(client.tags[tag])["state"])
    order = [section["name"] for section in state["compareRunSections"]]
    assert order == ["train", "val", "sparsity", "Model metrics", "test", "mine"]

    # a store that refuses the tag: no view, and the caller links the plain page
    assert publish_view(_Recorder(refuse=True), "1", "kdexp", "v", keys) is None
