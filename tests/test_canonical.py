"""Canonical values: however a number or a list was typed, the lineage key, the config hash, the
logged params and the report's rows are the same (issue 14: ``method.T=4`` against ``T: 4.0``)."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from kdexp.config import canonical, canonical_text, config_hash, flatten, pretrain_key
from kdexp.lineage import lineage_key
from kdexp.run import run
from tests.conftest import tracking_overrides


def _strip(cfg):
    from omegaconf import OmegaConf

    return OmegaConf.masked_copy(cfg, [str(k) for k in cfg if k != "hydra"])


def test_canonical_by_hand() -> None:
    assert canonical(4.0) == 4 and type(canonical(4.0)) is int
    assert canonical(1e-3) == 0.001 and str(canonical(1e-3)) == "0.001"
    assert canonical(True) is True and canonical(None) is None
    assert canonical({"a": [1.0, 2.5, "x"]}) == {"a": [1, 2.5, "x"]}
    assert canonical_text("4.0") == "4"
    assert canonical_text("5.0e-4") == "0.0005"
    assert canonical_text("[256,256]") == canonical_text("[256, 256.0]") == "[256, 256]"
    assert canonical_text("distill/kd") == "distill/kd"
    assert canonical_text("True") == "True"
    assert canonical_text("1.5") == "1.5"


@pytest.mark.parametrize(
    "typed",
    [
        ["method.T=4"],  # the default is T: 4.0
        ["schedule.lr=5e-2"],  # the default is 0.05
        ["schedule.optimizer.weight_decay=0.0005"],  # the default is 5.0e-4
        ["model.hidden=[256,256]"],  # the default is [256, 256]
        ["model.hidden=[256.0,256]", "schedule.label_smoothing=0", "method.alpha=0.90"],
    ],
)
def test_typed_values_give_one_lineage_hash_and_params(compose_cfg, typed: list[str]) -> None:
    default = _strip(compose_cfg())
    other = _strip(compose_cfg(*typed))
    assert config_hash(other) == config_hash(default)
    assert lineage_key(other, {"teacher_checkpoint": "t"}) == lineage_key(
        default, {"teacher_checkpoint": "t"}
    )
    assert pretrain_key(other) == pretrain_key(default)
    logged = {k: str(v) for k, v in flatten(other)}
    assert logged == {k: str(v) for k, v in flatten(default)}
    assert logged["method.T"] == "4"
    assert logged["model.hidden"] == "[256, 256]"


def test_a_different_value_still_changes_the_hash(compose_cfg) -> None:
    assert config_hash(_strip(compose_cfg("method.T=4.5"))) != config_hash(_strip(compose_cfg()))


@pytest.mark.slow
def test_skip_finished_reuses_a_run_typed_differently(compose_cfg, tmp_path: Path) -> None:
    store = [*tracking_overrides(tmp_path), "method=baseline", "schedule.epochs=1"]
    store += ["dataset.train_limit=20", "latency_repeats=1", "objective=test/acc1"]
    first = run(compose_cfg(*store))  # label_smoothing: 0.0 and weight_decay: 5.0e-4 as defaults
    typed = ["schedule.label_smoothing=0", "schedule.optimizer.weight_decay=0.0005"]
    assert run(compose_cfg(*store, *typed, "skip_finished=true")) == first
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    (only,) = client.search_runs([client.get_experiment_by_name("test").experiment_id])
    assert only.data.params["schedule.label_smoothing"] == "0"
    assert only.data.params["schedule.optimizer.weight_decay"] == "0.0005"


def test_report_puts_values_typed_differently_in_one_row(tmp_path: Path) -> None:
    """Params logged before kdexp canonicalised them ("4" and "4.0") still make one row."""
    import csv

    from kdexp.report import main
    from kdexp.tracking.mlflow import MlflowTracker

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    for seed, t in ((0, "4"), (1, "4.0"), (2, "8")):
        tracker = MlflowTracker(uri=uri, experiment="rep")
        tags = {"method": "distill/kd", "model": "mlp", "dataset": "digits"}
        with tracker.run(f"r{seed}", {"seed": seed, "method.T": t}, tags):
            tracker.log_metrics({"test/acc1": 90.0 + seed}, 1)
    out = tmp_path / "report"
    assert main(["--experiment", "rep", "--tracking-uri", uri, "--out", str(out)]) == 0
    rows = {r["configuration"]: r for r in csv.DictReader((out / "comparison.csv").open())}
    assert sorted(rows) == [
        "distill/kd / mlp / digits method.T=4",
        "distill/kd / mlp / digits method.T=8",
    ]
    assert rows["distill/kd / mlp / digits method.T=4"]["seeds"] == "2"
