"""Issue 16: a signal at any moment of a run ends it KILLED and resumable (or FINISHED when it
was done); a run killed without a clean stop is found dead, taken up by resume=auto, or marked
FAILED by kdexp-stale; after any resume each step's metrics are logged exactly once."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

import kdexp.run
from kdexp.resume import Interrupted
from kdexp.tracking.liveness import HEARTBEAT_TAG, is_dead
from kdexp.tracking.mlflow import MlflowTracker
from kdexp.tracking.stale import main as stale_main
from tests.conftest import ROOT, run_cli, tracking_overrides

TINY = ["method=baseline", "dataset=synthetic", "model=mlp", "schedule.epochs=2"]
TINY += ["latency_repeats=1", "log_every=1", "tracking.flush_every_s=0"]
STEPS_PER_EPOCH = 7  # 448 training images of synthetic, batches of 64


def _signal_then(original: Callable, calls: list[int], at: int = 1) -> Callable:
    """``original`` that first sends SIGTERM to this process on its ``at``-th call."""

    def wrapped(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        if len(calls) == at:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(*args, **kwargs)

    return wrapped


#: phase -> (module or class, attribute, which call): where the signal lands.
PHASES = {
    "build": (kdexp.run, "seed_everything", 1),
    "epoch": ("kdexp.train", "to_device", 3),
    "final_evaluation": (kdexp.run, "evaluate", 1),
    "statistics": (kdexp.run, "model_stats", 1),
    "model_logging": (MlflowTracker, "log_model", 1),
    "artifacts": (kdexp.run, "_log_artifacts", 1),  # the last one: FINISHED, it was done
}


def _runs(client: MlflowClient) -> list:
    return client.search_runs([client.get_experiment_by_name("test").experiment_id])


def _each_step_once(client: MlflowClient, run_id: str) -> None:
    for key in ("train/loss", "val/acc1", "test/acc1", "model/params"):
        steps = [m.step for m in client.get_metric_history(run_id, key)]
        assert len(steps) == len(set(steps)), (key, sorted(steps))
    steps = sorted(m.step for m in client.get_metric_history(run_id, "train/loss"))
    assert steps == list(range(2 * STEPS_PER_EPOCH))
    assert len(client.get_metric_history(run_id, "val/acc1")) == 2


@pytest.mark.slow
@pytest.mark.parametrize("phase", list(PHASES))
def test_a_signal_in_any_phase_ends_killed_and_resume_auto_completes_it(
    compose_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, phase: str
) -> None:
    import importlib

    where, name, at = PHASES[phase]
    owner = importlib.import_module(where) if isinstance(where, str) else where
    logs_model = phase == "model_logging"
    args = [*TINY, *tracking_overrides(tmp_path), f"tracking.log_model={str(logs_model).lower()}"]
    calls: list[int] = []
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    with monkeypatch.context() as patch:
        patch.setattr(owner, name, _signal_then(getattr(owner, name), calls, at))
        if phase == "artifacts":  # the last phase: the run was done, so it ends FINISHED
            kdexp.run.run(compose_cfg(*args))
            (finished,) = _runs(client)
            assert finished.info.status == "FINISHED"
            _each_step_once(client, finished.info.run_id)
            return
        with pytest.raises(Interrupted) as stopped:
            kdexp.run.run(compose_cfg(*args))
    assert calls and stopped.value.signum == signal.SIGTERM
    runs = _runs(client) if client.get_experiment_by_name("test") else []
    assert all(r.info.status != "RUNNING" for r in runs)
    if phase == "build":  # no run was opened yet: nothing to carry on, nothing left RUNNING
        assert runs == [] and stopped.value.run_id is None
    else:
        (killed,) = runs
        assert killed.info.status == "KILLED"
        assert killed.data.tags["kdexp.resume"].endswith(f"resume={killed.info.run_id}")
    metrics = kdexp.run.run(compose_cfg(*args, "resume=auto"))
    assert metrics > 0
    (done,) = _runs(client)
    if phase != "build":
        assert done.info.run_id == killed.info.run_id  # the same MLflow run, carried on
    assert done.info.status == "FINISHED"
    assert done.data.metrics["test/acc1"] >= 0 and done.data.metrics["model/params"] > 0
    _each_step_once(client, done.info.run_id)
    if logs_model:  # logged once, though the signal came while it was being logged
        experiment = client.get_experiment_by_name("test").experiment_id
        assert len(client.search_logged_models([experiment])) == 1
        assert done.data.tags["kdexp.model_logged"] == "true"
    artifacts = {a.path for a in client.list_artifacts(done.info.run_id)}
    assert "config_resolved.yaml" in artifacts


def _slow_site(tmp_path: Path, sleep_s: float) -> dict[str, str]:
    """An environment whose Python processes sleep ``sleep_s`` after each training step (a
    sitecustomize on PYTHONPATH), so that a test can stop them mid-epoch."""
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(
        "import os, time\n"
        "if os.environ.get('KDEXP_TEST_STEP_SLEEP'):\n"
        "    from kdexp.method.base import Method\n"
        "    _after = Method.after_step\n"
        "    def after_step(self, ctx):\n"
        "        time.sleep(float(os.environ['KDEXP_TEST_STEP_SLEEP']))\n"
        "        return _after(self, ctx)\n"
        "    Method.after_step = after_step\n"
    )
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "KDEXP_TEST_STEP_SLEEP": str(sleep_s)}
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(ROOT)])
    env.pop("HYDRA_FULL_ERROR", None)
    return env


@pytest.mark.slow
def test_kill_9_mid_epoch_then_resume_auto_logs_every_step_exactly_once(tmp_path: Path) -> None:
    args = [*TINY, "schedule.epochs=3", "checkpoint_every_steps=4", *tracking_overrides(tmp_path)]
    args += ["tracking.log_model=false"]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    child = subprocess.Popen(
        [sys.executable, "-m", "kdexp", *args],
        cwd=tmp_path,
        env=_slow_site(tmp_path, 0.15),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:  # kill -9 once steps past the checkpoint at step 8 are in the store (step 8..11)
        deadline = time.monotonic() + 120
        while True:
            assert child.poll() is None and time.monotonic() < deadline, child.communicate()
            found = _runs(client) if client.get_experiment_by_name("test") else []
            if found:
                steps = [
                    m.step for m in client.get_metric_history(found[0].info.run_id, "train/loss")
                ]
                if steps and max(steps) >= 10:
                    break
            time.sleep(0.1)
        child.kill()
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    (dead,) = _runs(client)
    assert dead.info.status == "RUNNING"  # nothing closed it: kill -9
    assert is_dead(dead.data.tags[HEARTBEAT_TAG])  # ... but MLflow alone shows it is dead
    logged_before = max(m.step for m in client.get_metric_history(dead.info.run_id, "train/loss"))
    assert logged_before >= 10  # past the last checkpoint (step 8): these steps come again
    done = run_cli([*args, "resume=auto"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    (resumed,) = _runs(client)
    assert resumed.info.run_id == dead.info.run_id and resumed.info.status == "FINISHED"
    for key in ("train/loss", "train/lr", "val/acc1", "train/epoch_loss", "test/acc1"):
        steps = [m.step for m in client.get_metric_history(resumed.info.run_id, key)]
        assert len(steps) == len(set(steps)), (key, sorted(steps))  # none twice
    steps = sorted(m.step for m in client.get_metric_history(resumed.info.run_id, "train/loss"))
    assert steps == list(range(3 * STEPS_PER_EPOCH))  # none missing


def test_kdexp_stale_marks_dead_running_runs_failed_all_or_one_sweep(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("test", artifact_location=(tmp_path / "a").as_uri())
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    host, now = socket.gethostname(), time.time()

    def beat(pid: int, at: float, host: str = host, every: float = 30) -> str:
        return json.dumps({"host": host, "pid": pid, "time": at, "every_s": every})

    cases = {  # name -> (heartbeat, sweep, dead?)
        "dead_pid": (beat(gone.pid, now), "s1", True),
        "alive": (beat(os.getpid(), now), "s1", False),
        "alive_but_silent": (beat(os.getpid(), now - 4000), "s2", True),  # pid reused, or hung
        "other_host_recent": (beat(1, now - 10, "elsewhere"), "s2", False),
        "other_host_stale": (beat(1, now - 4000, "elsewhere"), "s2", True),
        "launcher_elsewhere": (beat(1, now - 4000, "elsewhere", 0), "s2", False),  # no beats
        "no_heartbeat": (None, "s1", False),
    }
    ids = {}
    for name, (value, sweep, _) in cases.items():
        tags = {"sweep_id": sweep, **({HEARTBEAT_TAG: value} if value else {})}
        ids[name] = client.create_run(experiment, run_name=name, tags=tags).info.run_id
    assert stale_main(["--uri", uri, "--experiment", "test", "--sweep", "s1"]) == 0
    status = {name: client.get_run(i).info.status for name, i in ids.items()}
    assert status == {**{n: "RUNNING" for n in cases}, "dead_pid": "FAILED"}
    assert stale_main(["--uri", uri, "--experiment", "test"]) == 0
    status = {name: client.get_run(i).info.status for name, i in ids.items()}
    assert status == {n: "FAILED" if dead else "RUNNING" for n, (_, _, dead) in cases.items()}
    assert (
        "marked by kdexp-stale" in client.get_run(ids["other_host_stale"]).data.tags["kdexp.stale"]
    )


def test_a_resumed_run_drops_the_steps_it_already_logged(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = MlflowTracker(uri=uri, experiment="test", flush_every_s=0)
    with pytest.raises(KeyboardInterrupt), first.run("r", {"p": 1}, {}):
        for step in range(10):  # logged up to step 9, checkpointed at step 5 (say)
            first.log_metrics({"loss": float(step)}, step)
        raise KeyboardInterrupt
    again = MlflowTracker(uri=uri, experiment="test", flush_every_s=0)
    with again.run("r", {}, {}, resume_id=first.run_id):
        for step in range(5, 15):  # the resume redoes steps 5-9, with other values
            again.log_metrics({"loss": 100.0 + step, "new": 1.0}, step)
    client = MlflowClient(tracking_uri=uri)
    history = sorted((m.step, m.value) for m in client.get_metric_history(first.run_id, "loss"))
    assert history == [(s, float(s)) for s in range(10)] + [(s, 100.0 + s) for s in range(10, 15)]
    assert len(client.get_metric_history(first.run_id, "new")) == 10  # a new key: every step
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED"
    beat = json.loads(run.data.tags[HEARTBEAT_TAG])
    assert (beat["host"], beat["pid"]) == (socket.gethostname(), os.getpid())
    assert not is_dead(run.data.tags[HEARTBEAT_TAG])  # this process is alive


@pytest.mark.slow
def test_a_pipeline_stopped_in_a_stage_resumes_it_and_reuses_the_finished_one(
    compose_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import kdexp.train

    args = ["experiment=pipeline_kd_prune_quant", "pipeline=[teacher,student]"]
    args += ["~stages.pruned", "~stages.quantized"]
    args += ["schedule.epochs=1", "dataset.train_limit=40", "latency_repeats=1"]
    args += ["tracking.log_model=false", "log_every=1", *tracking_overrides(tmp_path)]
    calls: list[int] = []
    with monkeypatch.context() as patch:  # the teacher trains 6 batches; the student, then
        patch.setattr(kdexp.train, "to_device", _signal_then(kdexp.train.to_device, calls, 9))
        with pytest.raises(Interrupted):
            kdexp.run.run(compose_cfg(*args))
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    stage = {r.data.tags.get("kdexp.stage", "(pipeline)"): r for r in _runs(client)}
    assert {k: r.info.status for k, r in stage.items()} == {
        "(pipeline)": "KILLED",
        "teacher": "FINISHED",
        "student": "KILLED",
    }
    kdexp.run.run(compose_cfg(*args, "resume=auto"))
    runs = _runs(client)
    assert all(r.info.status in ("FINISHED", "KILLED") for r in runs)
    stages = [r for r in runs if "kdexp.stage" in r.data.tags]
    assert len(stages) == 2  # the teacher reused, the student carried on in its own run
    (student,) = (r for r in stages if r.data.tags["kdexp.stage"] == "student")
    assert student.info.run_id == stage["student"].info.run_id
    assert student.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(student.info.run_id, "train/loss")]
    assert sorted(steps) == list(range(len(steps))) and len(steps) > 3  # once each, none missing
    pipelines = [r for r in runs if r.data.tags.get("method") == "pipeline"]
    assert sorted(r.info.status for r in pipelines) == ["FINISHED", "KILLED"]
