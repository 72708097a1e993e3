"""Issue 16: stopping a whole sweep (basic, joblib, submitit) leaves every job KILLED and
resumable and the parent run KILLED, and the same command with resume=auto finishes only what
was missing; at a SLURM time limit or preemption (SIGUSR2, simulated with submitit's local
executor) a job checkpoints, is requeued and carries on in the same MLflow run by itself."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import run_cli, tracking_overrides
from tests.test_stop_anywhere import _slow_site

TINY = ["method=baseline", "dataset=synthetic", "model=mlp", "schedule.epochs=2"]
TINY += ["latency_repeats=1", "log_every=1", "tracking.log_model=false"]
STEPS = 2 * 7


def _client(tmp_path: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")


def _runs(tmp_path: Path) -> tuple[list, list]:
    """(the jobs' runs, the sweeps' parent runs)."""
    client = _client(tmp_path)
    found = client.get_experiment_by_name("test")
    runs = client.search_runs([found.experiment_id]) if found else []
    parents = [r for r in runs if r.data.tags.get("kdexp.role") == "sweep"]
    return [r for r in runs if r.data.tags.get("kdexp.role") != "sweep"], parents


def _table(sweep: Path) -> dict[str, dict[str, str]]:
    with (sweep / "sweep_jobs.csv").open() as handle:
        return {row["job"]: row for row in csv.DictReader(handle)}


def _launch(args: list[str], tmp_path: Path, sleep_s: float) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "kdexp", *args],
        cwd=tmp_path,
        env=_slow_site(tmp_path, sleep_s),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(child: subprocess.Popen, tmp_path: Path, pattern: str, count: int = 1) -> None:
    deadline = time.monotonic() + 180
    while len(list(tmp_path.glob(pattern))) < count:
        if child.poll() is not None or time.monotonic() > deadline:
            child.kill()
            raise AssertionError(child.communicate())
        time.sleep(0.05)


def _each_step_once(tmp_path: Path, run_id: str) -> None:
    steps = sorted(m.step for m in _client(tmp_path).get_metric_history(run_id, "train/loss"))
    assert steps == list(range(STEPS))


def _stop_then_resume(
    tmp_path: Path, launcher: list[str], signum: int, running: str, one_done: bool = True
) -> None:
    """Launch 3 jobs; once job 0 is done (``one_done``) and job ``running`` has a checkpoint,
    send ``signum`` to the launching process; then relaunch with resume=auto."""
    args = ["-m", *launcher, "seed=1,2,3", *TINY, "checkpoint_every_steps=2"]
    args += tracking_overrides(tmp_path)
    child = _launch(args, tmp_path, 0.2)
    try:
        if one_done:
            _wait_for(child, tmp_path, "outputs/multirun/*/*/0/job.json")
        _wait_for(child, tmp_path, f"outputs/multirun/*/*/{running}/checkpoints/last.pt")
        child.send_signal(signum)
        _, err = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == 128 + signum, err
    assert "resume=auto" in err
    runs, (parent,) = _runs(tmp_path)
    assert parent.info.status == "KILLED"
    assert all(r.info.status in ("FINISHED", "KILLED") for r in runs)
    killed = {r.data.tags["seed"]: r.info.run_id for r in runs if r.info.status == "KILLED"}
    assert killed and all(
        r.data.tags.get("kdexp.resume") for r in runs if r.info.status == "KILLED"
    )
    (sweep,) = tmp_path.glob("outputs/multirun/*/*")
    table = _table(sweep)
    assert table["0"]["status"] == ("FINISHED" if one_done else "KILLED")
    assert {row["status"] for row in table.values()} <= {"FINISHED", "KILLED"}
    assert sum(row["status"] == "KILLED" for row in table.values()) >= 1

    again = run_cli([*args, "resume=auto"], cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    runs, parents = _runs(tmp_path)
    assert sorted(r.data.tags["seed"] for r in runs) == ["1", "2", "3"]  # one run per job
    assert all(r.info.status == "FINISHED" for r in runs)
    for run in runs:
        if run.data.tags["seed"] in killed:  # carried on in its own MLflow run
            assert run.info.run_id == killed[run.data.tags["seed"]]
        _each_step_once(tmp_path, run.info.run_id)
    (second,) = [p for p in tmp_path.glob("outputs/multirun/*/*") if p != sweep]
    table = _table(second)
    if one_done:
        assert table["0"]["status"] == "REUSED"  # finished before the stop: not trained again
    assert {row["status"] for row in table.values()} <= {"FINISHED", "REUSED"}


@pytest.mark.slow
def test_ctrl_c_stops_a_basic_sweep_and_resume_auto_finishes_only_what_was_missing(
    tmp_path: Path,
) -> None:
    _stop_then_resume(tmp_path, [], signal.SIGINT, running="1")


@pytest.mark.slow
def test_sigterm_stops_a_joblib_sweep_and_resume_auto_finishes_only_what_was_missing(
    tmp_path: Path,
) -> None:
    joblib = ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]
    _stop_then_resume(tmp_path, joblib, signal.SIGTERM, running="2")


@pytest.mark.slow
def test_sigterm_stops_a_submitit_sweep_and_resume_auto_finishes_only_what_was_missing(
    tmp_path: Path,
) -> None:
    # submitit's local executor starts the 3 jobs at once: stopped while they all train
    _stop_then_resume(
        tmp_path, ["hydra/launcher=submitit_local"], signal.SIGTERM, running="*", one_done=False
    )


@pytest.mark.slow
def test_preempted_submitit_job_is_requeued_and_finishes_in_the_same_run(tmp_path: Path) -> None:
    args = ["-m", "hydra/launcher=submitit_local", "seed=1", *TINY, *tracking_overrides(tmp_path)]
    child = _launch(args, tmp_path, 0.15)
    try:
        _wait_for(child, tmp_path, "outputs/multirun/*/*/0/checkpoints/last.pt")
        runs, _ = _runs(tmp_path)
        (job,) = runs
        beat = json.loads(job.data.tags["kdexp.heartbeat"])
        # What SLURM does at a time limit or a preemption, and submitit's local executor
        # simulates at its timeout: SIGUSR2 to the job's process.
        subprocess.run(["kill", "-USR2", str(beat["pid"])], check=True)
        out, err = child.communicate(timeout=180)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == 0, err
    runs, (parent,) = _runs(tmp_path)
    (job,) = runs  # carried on in the same MLflow run, with no resume= typed
    assert job.info.status == "FINISHED" and parent.info.status == "FINISHED"
    assert job.data.tags["kdexp.resume"]  # it was stopped once ...
    assert job.data.tags.get("kdexp.requeued") == "1"
    _each_step_once(tmp_path, job.info.run_id)
    (sweep,) = tmp_path.glob("outputs/multirun/*/*")
    row = _table(sweep)["0"]
    assert (row["status"], row["requeued"]) == ("FINISHED", "1")  # requeued, then FINISHED


@pytest.mark.slow
def test_a_job_that_does_not_compose_leaves_no_parent_run_running(tmp_path: Path) -> None:
    store = tracking_overrides(tmp_path, created=False)  # the test: no store is made
    args = ["-m", "method=baseline,prune/no_such_method", *TINY[1:], *store]
    done = run_cli(args, cwd=tmp_path)
    # The command line is checked before the sweep starts (kdexp.preflight): no parent run is
    # opened, no job runs, nothing is left RUNNING or written.
    assert done.returncode == 2, done.stderr
    assert "prune/no_such_method" in done.stderr and "prune/magnitude" in done.stderr
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "outputs").exists()


def test_a_stopped_job_says_how_to_resume_or_that_it_had_not_begun() -> None:
    from kdexp.cli import _stopped_message
    from kdexp.resume import Interrupted

    begun = Interrupted(signal.SIGINT, 607, Path("out/checkpoints/last.pt"))
    begun.command = "kdexp seed=1 resume=0da3"
    assert _stopped_message(begun) == (
        "kdexp: stopped by SIGINT at step 607; checkpoint in out/checkpoints/last.pt\n"
        "kdexp: resume with: kdexp seed=1 resume=0da3"
    )
    no_checkpoint = Interrupted(signal.SIGTERM, 0, None)
    no_checkpoint.command = "kdexp seed=1 resume=0da3"
    assert _stopped_message(no_checkpoint) == (
        "kdexp: stopped by SIGTERM at step 0\nkdexp: resume with: kdexp seed=1 resume=0da3"
    )
    # a job of a stopped sweep that never started: no "checkpoint in None", no empty command
    assert _stopped_message(Interrupted(signal.SIGINT, 0, None)) == (
        "kdexp: stopped by SIGINT at step 0: the job had not begun; nothing to resume"
    )
