"""Pipelines and lineage: stages as nested MLflow runs handing models on, reuse of FINISHED runs
with the same config and inputs, skip_finished for jobs, and the bad-input cases."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from kdexp.errors import ConfigError
from kdexp.lineage import file_key, lineage_key
from kdexp.pipeline import stages
from kdexp.run import run
from tests.conftest import run_cli, tracking_overrides

#: The pipeline preset shrunk to seconds: one epoch per stage on 40 images per class.
FAST = [
    "experiment=pipeline_kd_prune_quant",
    "schedule.epochs=1",
    "dataset.train_limit=40",
    "stages.pruned.schedule.epochs=1",
    "stages.pruned.method.frequency=1",
    "stages.pruned.method.updates=4",
    "stages.quantized.schedule.epochs=1",
    "stages.quantized.method.calibration_batches=2",
    "latency_repeats=1",
]


def _runs(tmp_path: Path) -> list:
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("kdexp").experiment_id
    return client.search_runs([experiment], order_by=["attributes.start_time ASC"])


def _by_stage(runs: list) -> dict[str, list]:
    found: dict[str, list] = {}
    for r in runs:
        found.setdefault(r.data.tags.get("kdexp.stage", "(pipeline)"), []).append(r)
    return found


@pytest.mark.slow
def test_pipeline_runs_reuses_and_reruns_only_a_changed_last_stage(tmp_path: Path) -> None:
    first = run_cli([*FAST, "tracking.register_model=kdexp-pipeline"], cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    runs = _runs(tmp_path)
    assert all(r.info.status == "FINISHED" for r in runs)
    by_stage = _by_stage(runs)
    (parent,) = by_stage.pop("(pipeline)")
    assert sorted(by_stage) == ["pruned", "quantized", "student", "teacher"]
    stage = {name: found[0] for name, found in by_stage.items()}
    for r in stage.values():  # nested under the pipeline's run in the MLflow UI
        assert r.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert stage["teacher"].data.tags["method"] == "baseline"
    assert stage["teacher"].data.tags["model"] == "mlp_1200"
    assert stage["student"].data.tags["method"] == "distill/kd"
    # Each stage starts from the previous stage's run: its final.pt artifact.
    assert stage["student"].data.params["teacher_checkpoint"] == stage["teacher"].info.run_id
    assert stage["pruned"].data.params["checkpoint"] == stage["student"].info.run_id
    assert stage["quantized"].data.params["checkpoint"] == stage["pruned"].info.run_id
    assert stage["student"].data.metrics["teacher/test_acc1"] == pytest.approx(
        stage["teacher"].data.metrics["test/acc1"]
    )
    pruned, quantized = stage["pruned"].data.metrics, stage["quantized"].data.metrics
    assert pruned["sparsity/global"] == pytest.approx(0.8, abs=0.01)
    # QAT kept the pruned zeros: the int8 model has no more non-zero weights than its start.
    assert quantized["model/nonzero_params"] <= pruned["model/nonzero_params"]
    assert quantized["quant/bits"] == 8
    assert quantized["model/size_bytes"] < 0.5 * pruned["model/size_bytes"]
    # Stored compressed, the 80% zeros count: pruned is under 40% of the dense student's bytes,
    # and int8 codes of the same non-zeros take well under half the fp32 ones (issue 18).
    student = stage["student"].data.metrics
    assert pruned["model/size_bytes"] == pytest.approx(student["model/size_bytes"], abs=64)
    assert pruned["model/compressed_bytes"] < 0.4 * student["model/compressed_bytes"]
    assert quantized["model/compressed_bytes"] < 0.5 * pruned["model/compressed_bytes"]
    assert pruned["model/compression_ratio"] == pytest.approx(
        4 * pruned["model/dense_params"] / pruned["model/compressed_bytes"]
    )
    # tracking.register_model: the pipeline registers its last stage's model, and only that one
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}")
    (version,) = client.search_model_versions("name = 'kdexp-pipeline'")
    assert version.run_id == stage["quantized"].info.run_id
    registered = [r for r in runs if "kdexp.registered_model" in r.data.tags]
    assert [r.info.run_id for r in registered] == [stage["quantized"].info.run_id]
    # The parent run: the last stage's metrics, per-stage metrics and the summary artifacts.
    assert parent.data.tags["method"] == "pipeline"
    assert parent.data.metrics["test/acc1"] == quantized["test/acc1"]
    assert parent.data.metrics["student/test_acc1"] == stage["student"].data.metrics["test/acc1"]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}")
    names = {a.path for a in client.list_artifacts(parent.info.run_id, "pipeline")}
    assert names == {
        "pipeline/pipeline_summary.csv",
        "pipeline/pipeline_summary.md",
        "pipeline/pipeline_accuracy_size.png",
        "pipeline/pipeline_config.yaml",
    }
    assert parent.data.params["pipeline"] == "['teacher', 'student', 'pruned', 'quantized']"
    assert not any(key.startswith("stages.") for key in parent.data.params)
    table = Path(client.download_artifacts(parent.info.run_id, "pipeline/pipeline_summary.csv"))
    rows = list(csv.DictReader(table.open()))
    assert [row["stage"] for row in rows] == ["teacher", "student", "pruned", "quantized"]
    for row in rows:
        assert row["run"] == stage[row["stage"]].info.run_id and row["reused"] == "no"
        assert float(row["test/acc1"]) == stage[row["stage"]].data.metrics["test/acc1"]
        metrics = stage[row["stage"]].data.metrics
        assert float(row["compressed (bytes)"]) == metrics["model/compressed_bytes"]
    assert float(rows[2]["sparsity"]) > 0.75

    again = run_cli(FAST, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "trained nothing" in again.stdout
    runs = _runs(tmp_path)
    assert len(runs) == 6  # one more pipeline run, no stage run
    assert sum(r.data.tags.get("method") == "pipeline" for r in runs) == 2

    changed = run_cli([*FAST, "stages.quantized.method.bits=4"], cwd=tmp_path)
    assert changed.returncode == 0, changed.stderr
    assert "trained quantized; reused the rest" in changed.stdout
    new = [r for r in _runs(tmp_path) if r.info.run_id not in {x.info.run_id for x in runs}]
    assert sorted(r.data.tags.get("kdexp.stage", "(pipeline)") for r in new) == [
        "(pipeline)",
        "quantized",
    ]
    (four_bit,) = (r for r in new if r.data.tags.get("kdexp.stage") == "quantized")
    assert four_bit.data.metrics["quant/bits"] == 4
    assert four_bit.data.params["checkpoint"] == stage["pruned"].info.run_id


def test_stages_merge_over_the_job_config(compose_cfg) -> None:
    cfg = compose_cfg(*FAST[:2], "stages.pruned.method.sparsity=0.5")
    planned = stages(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), {})
    assert [s.name for s in planned] == ["teacher", "student", "pruned", "quantized"]
    teacher, student, pruned, quantized = (s.cfg for s in planned)
    assert teacher.model.hidden == [1200, 1200] and "teacher" not in teacher
    assert student.method._target_.endswith("KD") and student.teacher.hidden == [1200, 1200]
    assert student.model.hidden == [256, 256]
    # A method node replaces the job's; a schedule node is merged into it.
    assert pruned.method.sparsity == 0.5 and "alpha" not in pruned.method
    assert pruned.schedule.epochs == 10 and pruned.schedule.batch_size == 64
    assert student.schedule.epochs == 1
    assert pruned.method.epochs == 10  # ${schedule.epochs} resolves in the stage's own config
    assert quantized.checkpoint == "stage:pruned" and quantized.method.bits == 8


@pytest.mark.parametrize(
    ("override", "key", "accepted"),
    [
        (
            "stages.student.teacher_checkpoint=stage:pruned",
            "stages.student.teacher_checkpoint",
            "earlier stage",
        ),
        ("+stages.pruned.shedule.epochs=3", "stages.pruned.shedule", "a key of the run config"),
        ("pipeline=[teacher,distilled]", "pipeline", "a stage configured under stages"),
        ("stages.pruned.schedule.epochs=0", "stages.pruned: schedule.epochs", "a positive integer"),
    ],
)
def test_bad_pipelines_fail_before_training(compose_cfg, override, key, accepted) -> None:
    cfg = compose_cfg(*FAST[:2], override)
    with pytest.raises(ConfigError) as caught:
        stages(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), {})
    assert caught.value.key == key and accepted in str(caught.value)


def test_a_bad_pipeline_exits_2_with_the_key_and_leaves_no_run(tmp_path: Path) -> None:
    done = run_cli([*FAST, "stages.quantized.checkpoint=stage:nowhere"], cwd=tmp_path)
    assert done.returncode == 2
    assert "stages.quantized.checkpoint" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "outputs" / "mlflow.db").exists()


def test_lineage_key_follows_config_and_inputs_not_execution_or_input_names(compose_cfg) -> None:
    cfg = compose_cfg("method=baseline")
    base = lineage_key(cfg, {})
    for override in ("device=cpu", "log_every=3", "tracking=none", "skip_finished=true"):
        assert lineage_key(compose_cfg("method=baseline", override), {}) == base
    assert lineage_key(compose_cfg("method=baseline", "seed=1"), {}) != base
    assert lineage_key(compose_cfg("method=baseline", "schedule.lr=0.1"), {}) != base
    student = compose_cfg()
    by_name = lineage_key(student, {"teacher_checkpoint": "abc"})
    renamed = compose_cfg("teacher_checkpoint=auto")
    assert lineage_key(renamed, {"teacher_checkpoint": "abc"}) == by_name
    assert lineage_key(student, {"teacher_checkpoint": "abd"}) != by_name


def test_file_key_is_the_sha256_of_the_bytes(tmp_path: Path) -> None:
    path = tmp_path / "w.pt"
    torch.save({"w": torch.arange(5.0)}, path)
    assert file_key(path) == "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_skip_finished_returns_the_finished_run_instead_of_training(compose_cfg, tmp_path) -> None:
    store = [*tracking_overrides(tmp_path), "method=baseline", "schedule.epochs=1"]
    store += ["dataset.train_limit=20", "latency_repeats=1", "objective=test/acc1"]
    first = run(compose_cfg(*store))
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("test").experiment_id
    assert run(compose_cfg(*store, "skip_finished=true")) == first
    assert len(client.search_runs([experiment])) == 1
    run(compose_cfg(*store, "skip_finished=true", "seed=1"))  # another config: it trains
    run(compose_cfg(*store))  # skip_finished=false: it trains again
    assert len(client.search_runs([experiment])) == 3


@pytest.mark.slow
def test_a_relaunched_sweep_with_skip_finished_runs_only_the_missing_jobs(tmp_path: Path) -> None:
    common = ["method=baseline", "schedule.epochs=1", "dataset.train_limit=20", "latency_repeats=1"]
    done = run_cli(["-m", *common, "seed=0,1"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    again = run_cli(["-m", *common, "seed=0,1,2", "skip_finished=true"], cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("kdexp: reusing run") == 2
    runs = [r for r in _runs(tmp_path) if r.data.tags.get("kdexp.role") != "sweep"]
    assert sorted(r.data.tags["seed"] for r in runs) == ["0", "1", "2"]
    parents = [r for r in _runs(tmp_path) if r.data.tags.get("kdexp.role") == "sweep"]
    assert sorted(p.data.metrics["sweep/reused"] for p in parents) == [0, 2]
