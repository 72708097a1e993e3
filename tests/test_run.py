"""End to end through the real ``kdexp`` entry point, read back from MLflow."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from kdexp.run import run
from kdexp.train import evaluate
from tests.conftest import run_cli, tracking_overrides

STEP_METRICS = ["train/loss", "train/loss_ce", "train/lr"]
EPOCH_METRICS = ["train/acc1", "val/loss", "val/acc1", "val/acc5", "epoch_time_s"]
FINAL_METRICS = [
    "best/val_acc1",
    "test/acc1",
    "test/acc5",
    "model/params",
    "model/nonzero_params",
    "model/flops",
    "model/size_bytes",
    "model/latency_ms",
    "model/latency_ms_batch",
]


def _runs(db: Path, experiment: str = "kdexp", parents: bool = False) -> list:
    """The runs of ``experiment``: the jobs', and with ``parents`` the sweeps' parent runs too."""
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    found = client.get_experiment_by_name(experiment)
    runs = [] if found is None else client.search_runs([found.experiment_id])
    return [r for r in runs if parents or r.data.tags.get("kdexp.role") != "sweep"]


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in client.get_metric_history(run_id, key)]


@pytest.mark.slow
def test_default_store_holds_run_with_params_metrics_and_artifacts(tmp_path: Path) -> None:
    args = ["method=baseline", "schedule.epochs=2", "latency_repeats=3", "log_every=5"]
    done = run_cli(args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    db = tmp_path / "outputs" / "mlflow.db"  # the default store, under the launch directory
    assert db.is_file()
    assert not (tmp_path / "mlruns").exists()

    (found,) = _runs(db)
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    run_id = found.info.run_id
    assert found.info.status == "FINISHED"
    assert found.info.run_name == "baseline epochs=2 seed0"  # what the command changed
    assert found.info.artifact_uri.startswith((tmp_path / "outputs").as_uri())

    params = found.data.params
    assert params["schedule.epochs"] == "2"
    assert params["model._target_"] == "kdexp.model.mlp.MLP"
    assert params["model.num_classes"] == "10"  # resolved, not ${dataset.num_classes}
    assert params["schedule.optimizer.lr"] == params["schedule.lr"] == "0.05"
    tags = found.data.tags
    assert (tags["method"], tags["model"], tags["dataset"], tags["seed"]) == (
        "baseline",
        "mlp",
        "digits",
        "0",
    )
    assert tags["torch_version"] == torch.__version__
    assert "schedule.epochs=2" in tags["overrides"]
    assert {"git_commit", "git_dirty", "kdexp_version", "kdexp.config_hash"} <= tags.keys()

    metrics = found.data.metrics
    for key in STEP_METRICS + EPOCH_METRICS + FINAL_METRICS:
        assert key in metrics, key
    steps_per_epoch = -(-(1438 - 144) // 64)  # 1,438 training images less a 10% val split
    assert [s for s, _ in _history(client, run_id, "val/acc1")] == [
        steps_per_epoch,
        2 * steps_per_epoch,
    ]
    assert [s for s, _ in _history(client, run_id, "train/loss")] == list(
        range(0, 2 * steps_per_epoch, 5)
    )
    assert metrics["best/val_acc1"] == max(v for _, v in _history(client, run_id, "val/acc1"))
    assert metrics["model/params"] == (64 * 256 + 256) + (256 * 256 + 256) + (256 * 10 + 10)
    assert metrics["model/nonzero_params"] <= metrics["model/params"]
    assert metrics["model/flops"] == 2 * (64 * 256 + 256 * 256 + 256 * 10)
    assert f"test/acc1 {metrics['test/acc1']:.2f}%" in done.stdout
    assert run_id in done.stdout

    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"config_resolved.yaml", "hydra", "checkpoints", "learning_curves.png"} <= artifacts
    assert {a.path for a in client.list_artifacts(run_id, "checkpoints")} == {
        "checkpoints/best.pt",
        "checkpoints/final.pt",
    }
    assert {a.path for a in client.list_artifacts(run_id, "hydra")} >= {
        "hydra/config.yaml",
        "hydra/overrides.yaml",
        "hydra/hydra.yaml",
    }
    # The logged best checkpoint reloads with weights_only and reproduces the logged accuracy.
    local = Path(client.download_artifacts(run_id, "checkpoints/best.pt", str(tmp_path)))
    state = torch.load(local, weights_only=True)
    cfg = OmegaConf.load(client.download_artifacts(run_id, "config_resolved.yaml", str(tmp_path)))
    model = instantiate(cfg.model)
    model.load_state_dict(state["model"])
    data = instantiate(cfg.dataset)(batch_size=64, seed=0)
    assert evaluate(model, data.test, torch.device("cpu"))["acc1"] == pytest.approx(
        metrics["test/acc1"]
    )


@pytest.mark.slow
def test_same_seed_same_metrics_other_seed_different(tmp_path: Path) -> None:
    args = ["-m", "seed=1,1,2", "method=baseline", "dataset=synthetic", "schedule.epochs=2"]
    args += ["latency_repeats=1"]
    done = run_cli(args + tracking_overrides(tmp_path), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    runs = _runs(tmp_path / "mlflow.db", "test")
    assert [r.info.status for r in runs] == ["FINISHED"] * 3
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    by_job = {r.data.tags["job_num"]: r for r in runs}
    # unique even with equal seeds: the same config again is numbered
    assert sorted(r.info.run_name for r in runs) == [
        "baseline seed1 synthetic epochs=2",
        "baseline seed1 synthetic epochs=2 (2)",
        "baseline seed2 synthetic epochs=2",
    ]

    def curve(run) -> list[tuple[int, float]]:
        return _history(client, run.info.run_id, "train/loss") + _history(
            client, run.info.run_id, "val/loss"
        )

    assert curve(by_job["0"]) == curve(by_job["1"])
    assert by_job["0"].data.metrics["test/acc1"] == by_job["1"].data.metrics["test/acc1"]
    assert curve(by_job["0"]) != curve(by_job["2"])


def test_default_mlp_reaches_95_percent_on_digits(compose_cfg) -> None:
    cfg = compose_cfg(
        "method=baseline", "tracking=none", "objective=test/acc1", "latency_repeats=1"
    )
    assert cfg.model._target_ == "kdexp.model.mlp.MLP" and cfg.dataset._target_.endswith(
        "digits.load"
    )
    assert run(cfg) >= 95.0


BAD_INPUT = {
    "zero_epochs": (["schedule.epochs=0"], "schedule.epochs=0: a positive integer"),
    "negative_batch": (["schedule.batch_size=-4"], "schedule.batch_size=-4: a positive integer"),
    "zero_lr": (["schedule.lr=0"], "schedule.lr=0: a positive number"),
    "val_too_big": (["dataset.val_size=1438"], "dataset.val_size=1438: a fraction in (0, 1)"),
    "classes": (["model.num_classes=5"], "model.num_classes=5: the dataset's class count, 10"),
    "no_checkpoint": (
        ["checkpoint=missing.pt"],
        "checkpoint='missing.pt': the path of an existing",
    ),
    "no_data": (["dataset=mnist", "dataset.root=nodata"], "dataset.root="),
    "device": (["device=tpu"], "device='tpu': auto, cpu, cuda, cuda:N or mps"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_input_exits_with_clear_message_and_no_run(tmp_path: Path, case: str) -> None:
    overrides, message = BAD_INPUT[case]
    done = run_cli(overrides + tracking_overrides(tmp_path), cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    if case == "no_data":
        assert str(tmp_path / "nodata") in done.stderr and "dataset.download=true" in done.stderr
    assert _runs(tmp_path / "mlflow.db", "test") == []
    left = [p for p in (tmp_path / "outputs").rglob("*") if p.is_file()]
    assert left == []  # Hydra's .hydra/ and log of the job are removed


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["other_model", "garbage"])
def test_checkpoint_that_does_not_fit_is_refused(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "weights.pt"
    if kind == "other_model":
        torch.save(torch.nn.Linear(64, 10).state_dict(), path)
    else:
        path.write_bytes(b"not a checkpoint at all")
    done = run_cli([f"checkpoint={path}", *tracking_overrides(tmp_path)], cwd=tmp_path)
    assert done.returncode == 2
    assert f"checkpoint='{path}'" in done.stderr
    expected = (
        "does not fit it: missing: layers"
        if kind == "other_model"
        else "not a file that torch.save wrote"
    )
    assert expected in done.stderr
    assert "Traceback" not in done.stderr
    assert _runs(tmp_path / "mlflow.db", "test") == []


@pytest.mark.slow
def test_unknown_group_option_lists_the_choices(tmp_path: Path) -> None:
    done = run_cli(["model=resnet9000"], cwd=tmp_path)
    assert done.returncode == 2  # kdexp answers before Hydra (kdexp.preflight)
    assert "model='resnet9000': an option of the config group model: " in done.stderr
    assert "resnet8x4" in done.stderr  # every option is listed


@pytest.mark.slow
def test_failing_jobs_do_not_stop_a_sweep_and_are_listed_at_its_end(tmp_path: Path) -> None:
    args = ["-m", "method=baseline", "dataset=synthetic", "schedule.epochs=1", "latency_repeats=1"]
    args += ["schedule.lr=1e30,0.05,0.1,0"]  # diverges; trains; trains; refused before it starts
    done = run_cli(args + tracking_overrides(tmp_path), cwd=tmp_path)
    assert done.returncode == 1
    assert "kdexp: 2 job(s) of the sweep failed:" in done.stderr
    diverged = r"#0 .*schedule.lr=1e\+30 .*: FloatingPointError: train/loss is nan"
    assert re.search(diverged, done.stderr)
    assert re.search(r"#3 .*schedule.lr=0 .*: schedule.lr=0: a positive number", done.stderr)
    assert "Traceback" not in done.stderr
    assert "kdexp: sweep of 4 jobs: 2 finished, 0 reused, 2 failed" in done.stdout
    runs = _runs(tmp_path / "mlflow.db", "test", parents=True)
    (parent,) = (r for r in runs if r.data.tags.get("kdexp.role") == "sweep")
    jobs = [r for r in runs if r is not parent]
    assert sorted((r.data.tags["job_num"], r.info.status) for r in jobs) == [
        ("0", "FAILED"),
        ("1", "FINISHED"),
        ("2", "FINISHED"),
    ]
    # The sweep's parent run: every job carries its sweep_id and nests under it; it lists them.
    assert parent.info.status == "FAILED"  # a job failed
    for r in jobs:
        assert r.data.tags["sweep_id"] == parent.data.tags["sweep_id"]
        assert r.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert parent.data.metrics["sweep/jobs"] == 4 and parent.data.metrics["sweep/failed"] == 2
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    table = Path(client.download_artifacts(parent.info.run_id, "sweep/sweep_jobs.csv"))
    rows = list(csv.DictReader(table.open()))
    assert [(row["job"], row["status"]) for row in rows] == [
        ("0", "FAILED"),
        ("1", "FINISHED"),
        ("2", "FINISHED"),
        ("3", "FAILED"),
    ]
    by_id = {r.info.run_id: r for r in jobs}
    for row in rows[1:3]:
        run = by_id[row["run"]]
        assert "schedule.lr=" + run.data.params["schedule.lr"] in row["overrides"]
        assert float(row["best/val_acc1"]) == pytest.approx(run.data.metrics["best/val_acc1"])
    assert "a positive number" in rows[3]["error"]
