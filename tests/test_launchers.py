"""Launchers: the SLURM presets, submitit_local, joblib, Ray, failing jobs in parallel sweeps, and
a sweep tracked on a real ``mlflow server``; every sweep is read back from MLflow."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import submitit
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from tests.conftest import CONF, run_cli, tracking_overrides

TINY = ["method=baseline", "dataset=synthetic", "schedule.epochs=1", "latency_repeats=1"]
TINY += ["tracking.log_model=false"]
PRESETS = sorted(p.stem for p in (CONF / "hydra" / "launcher").glob("*.yaml"))


@pytest.fixture
def packaged_cfg() -> Iterator:
    """``packaged_cfg(*overrides)``: the config composed from ``pkg://kdexp.conf``, as the CLI
    finds it, with Hydra's node."""

    def _compose(*overrides: str) -> DictConfig:
        GlobalHydra.instance().clear()
        with initialize_config_module(config_module="kdexp.conf", version_base="1.3"):
            cfg = compose("train", overrides=list(overrides), return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        return cfg

    yield _compose
    GlobalHydra.instance().clear()


def _runs(uri: str, experiment: str = "test") -> list:
    """The jobs' runs of ``experiment`` (a sweep's own parent run, if it has one, left out)."""
    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    runs = [] if found is None else client.search_runs([found.experiment_id])
    return [r for r in runs if r.data.tags.get("kdexp.role") != "sweep"]


def _store(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def _check_finished(uri: str, runs: list) -> None:
    """Each run FINISHED with its final metrics; best/val_acc1 is the best logged val/acc1."""
    client = MlflowClient(tracking_uri=uri)
    for found in runs:
        assert found.info.status == "FINISHED"
        metrics = found.data.metrics
        assert 0.0 <= metrics["test/acc1"] <= 100.0
        assert metrics["model/params"] > 0
        history = client.get_metric_history(found.info.run_id, "val/acc1")
        assert metrics["best/val_acc1"] == max(m.value for m in history)


# --- the SLURM presets, without a cluster ----------------------------------------------------


class _Submitted(Exception):
    """Raised instead of submitting the job array."""


@pytest.mark.parametrize("preset", PRESETS)
def test_every_launcher_preset_composes_from_the_package(packaged_cfg, preset: str) -> None:
    cfg = packaged_cfg(f"hydra/launcher={preset}")
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert set(launcher) >= {"partition", "cpus_per_task", "gpus_per_node", "mem_gb", "timeout_min"}
    assert launcher.submitit_folder == f"{cfg.hydra.sweep.dir}/.submitit/%j"  # in the sweep dir


@pytest.mark.parametrize(
    ("preset", "expected"),
    [
        ("slurm_gpu", {"partition": "gpu", "gpus-per-node": "1", "cpus-per-task": "8",
                       "mem": "32GB", "time": "240", "signal": "USR2@120"}),
        ("slurm_cpu", {"partition": "cpu", "cpus-per-task": "4", "mem": "8GB", "time": "120",
                       "signal": "USR2@120"}),
    ],
)  # fmt: skip
def test_slurm_preset_becomes_the_expected_sbatch_options(
    packaged_cfg, preset: str, expected: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # submitit only checks that `srun` exists before it builds the sbatch script.
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "srun").write_text("#!/bin/sh\nexit 0\n")
    (tmp_path / "bin" / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.chdir(tmp_path)
    submitted = {}

    def capture(executor: submitit.AutoExecutor, *args: object) -> None:
        submitted["executor"] = executor
        raise _Submitted

    monkeypatch.setattr(submitit.AutoExecutor, "map_array", capture)

    def sbatch(*overrides: str) -> dict[str, str]:
        cfg = packaged_cfg(f"hydra/launcher={preset}", *overrides)
        launcher = instantiate(cfg.hydra.launcher)
        launcher.setup(hydra_context=None, task_function=None, config=cfg)
        with pytest.raises(_Submitted):
            launcher.launch([["seed=1"]], initial_job_idx=0)
        script = submitted["executor"]._executor._make_submission_file_text("kdexp", "id")
        options = dict(re.findall(r"^#SBATCH --([\w-]+)=(.*)$", script, re.MULTILINE))
        assert options["output"].startswith(str(tmp_path / cfg.hydra.sweep.dir / ".submitit"))
        return options

    options = sbatch()
    assert {key: options.get(key) for key in expected} == expected
    if preset == "slurm_cpu":
        assert "gpus-per-node" not in options and "gres" not in options
    changed = sbatch(
        "hydra.launcher.partition=a100",
        "hydra.launcher.timeout_min=30",
        "hydra.launcher.mem_gb=64",
        "hydra.launcher.cpus_per_task=2",
        "hydra.launcher.gpus_per_node=4",
        "+hydra.launcher.additional_parameters.mail-type=END",
    )
    assert changed["partition"] == "a100" and changed["time"] == "30"
    assert changed["mem"] == "64GB" and changed["cpus-per-task"] == "2"
    assert changed["gpus-per-node"] == "4" and changed["mail-type"] == "END"


# --- sweeps end to end -----------------------------------------------------------------------


@pytest.mark.slow
def test_joblib_four_at_a_time_eight_jobs_on_a_fresh_store(tmp_path: Path) -> None:
    args = ["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=4", "seed=range(1,9)"]
    done = run_cli(args + TINY + tracking_overrides(tmp_path), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    runs = _runs(_store(tmp_path))
    assert sorted(int(r.data.tags["seed"]) for r in runs) == list(range(1, 9))
    assert sorted(int(r.data.tags["job_num"]) for r in runs) == list(range(8))
    _check_finished(_store(tmp_path), runs)


@pytest.mark.slow
def test_submitit_local_sweep_two_jobs_finish_one_fails_and_is_reported(tmp_path: Path) -> None:
    # The jobs are pickled and run in other processes: they log to the store that the parent
    # prepared and still record their failure. (The basic launcher's case is in test_run.py.)
    args = ["-m", "hydra/launcher=submitit_local", "schedule.lr=0.05,1e30,0.1"]  # #1 diverges
    done = run_cli(args + TINY + tracking_overrides(tmp_path), cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    report = done.stderr.partition("kdexp: 1 job(s) of the sweep failed:\n")[2].splitlines()
    listed = [line for line in report if line.startswith("  #")]
    assert len(listed) == 1, done.stderr
    assert re.match(
        r"  #1 schedule\.lr=1e\+30 .*: FloatingPointError: train/loss is nan", listed[0]
    )
    runs = _runs(_store(tmp_path))
    by_job = {r.data.tags["job_num"]: r for r in runs}
    assert {job: r.info.status for job, r in by_job.items()} == {
        "0": "FINISHED",
        "1": "FAILED",
        "2": "FINISHED",
    }
    _check_finished(_store(tmp_path), [by_job["0"], by_job["2"]])
    (sweep,) = {Path(r.data.tags["sweep_dir"]) for r in runs}
    assert [p.parent.name for p in sweep.glob("*/failed.txt")] == ["1"]
    assert len(list(sweep.glob(".submitit/*/*_result.pkl"))) == 3  # each ran under submitit


@pytest.mark.slow
def test_ray_launcher_two_jobs_finish_with_their_metrics(tmp_path: Path) -> None:
    # Ray 2.x dropped ray.init(local_mode=True); the launcher starts a local Ray instance (2 CPUs,
    # no dashboard) in the kdexp process, which stops it when it exits.
    args = ["-m", "hydra/launcher=ray", "+hydra.launcher.ray.init.num_cpus=2", "seed=1,2"]
    args += ["+hydra.launcher.ray.init.include_dashboard=false"]
    done = run_cli(args + TINY + tracking_overrides(tmp_path), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    runs = _runs(_store(tmp_path))
    assert sorted(r.data.tags["seed"] for r in runs) == ["1", "2"]
    _check_finished(_store(tmp_path), runs)


# --- a sweep tracked on a real tracking server -------------------------------------------------


@pytest.mark.slow
def test_sweep_against_a_real_mlflow_server(tmp_path: Path, mlflow_server: str) -> None:
    args = ["-m", "seed=1,2", *TINY, f"tracking.uri={mlflow_server}", "tracking.experiment=test"]
    done = run_cli(args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    runs = _runs(mlflow_server)
    assert sorted(r.data.tags["seed"] for r in runs) == ["1", "2"]
    _check_finished(mlflow_server, runs)
    client = MlflowClient(tracking_uri=mlflow_server)
    for found in runs:
        assert found.info.artifact_uri.startswith("mlflow-artifacts:/")  # sent through the server
        local = client.download_artifacts(found.info.run_id, "config_resolved.yaml", str(tmp_path))
        assert OmegaConf.load(local).seed == int(found.data.tags["seed"])
        (stored,) = (tmp_path / "artifacts").rglob(f"{found.info.run_id}/**/config_resolved.yaml")
        assert stored.read_text() == Path(local).read_text()
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "outputs" / "mlflow.db").exists()
