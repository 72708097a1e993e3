"""Fault tolerance: checkpoints that resume exactly, signals, divergence, tracking outages."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from torch import nn

from kdexp.checkpoint import read_training_state
from kdexp.dataset.synthetic import load as synthetic
from kdexp.errors import ConfigError
from kdexp.method.base import Step
from kdexp.method.baseline import Baseline
from kdexp.resume import Interrupted, rng_state, set_rng_state
from kdexp.schedule import cosine
from kdexp.tracking.base import Tracker
from kdexp.tracking.mlflow import MlflowTracker
from kdexp.tracking.spool import FILE_NAME, Spool
from kdexp.tracking.sync import main as sync_main
from kdexp.train import LoopOptions, fit
from tests.conftest import (
    ROOT,
    free_port,
    run_cli,
    start_mlflow_server,
    stop_mlflow_server,
    tracking_overrides,
)


class _Recorder(Tracker):
    def __init__(self) -> None:
        self.logged: list[tuple[int, dict[str, float]]] = []

    def log_metrics(self, metrics, step):  # type: ignore[no-untyped-def]
        self.logged.append((step, dict(metrics)))


class _SignalAt(Baseline):
    """Baseline that sends itself ``signum`` after step ``at``."""

    def __init__(self, *, at: int, signum: int, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(**kwargs)
        self.at, self.signum = at, signum

    def after_step(self, ctx: Step) -> dict[str, float]:
        if ctx.step == self.at:
            os.kill(os.getpid(), self.signum)
        return {}


def _train(tmp_path: Path, method_factory, resume=None):  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    data = synthetic(batch_size=32, seed=0, noise=1.0)
    data.train.augment = "flip"  # type: ignore[attr-defined]  # the loader's generator matters
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Dropout(0.2), nn.Linear(32, 10))
    method = method_factory(data=data, criterion=nn.CrossEntropyLoss())
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = cosine(opt, 3, len(data.train))
    options = LoopOptions(
        epochs=3, device=torch.device("cpu"), log_every=1, checkpoint_dir=tmp_path
    )
    tracker = _Recorder()
    result = fit(model, method, data, opt, sched, tracker, options, resume)
    return model, result, tracker.logged


def _comparable(logged: list[tuple[int, dict[str, float]]]) -> list[tuple[int, dict]]:
    return [(s, {k: v for k, v in m.items() if k != "epoch_time_s"}) for s, m in logged]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_fit_stopped_mid_epoch_resumes_exactly(tmp_path: Path, signum: int) -> None:
    model, result, logged = _train(tmp_path / "a", Baseline)
    with pytest.raises(Interrupted) as stopped:
        _train(tmp_path / "b", lambda **kw: _SignalAt(at=17, signum=signum, **kw))
    assert stopped.value.signum == signum and stopped.value.step == 18
    state = read_training_state(tmp_path / "b" / "last.pt")
    assert (state["epoch"], state["step"], state["batch"]) == (1, 18, 4)  # 14 batches an epoch
    resumed, result_b, logged_b = _train(tmp_path / "b", Baseline, resume=state)
    assert _comparable(logged_b) == _comparable([(s, m) for s, m in logged if s >= 18])
    for a, b in zip(model.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert (result_b.best_val_acc1, result_b.best_epoch, result_b.steps) == (
        result.best_val_acc1,
        result.best_epoch,
        result.steps,
    )
    assert len(result_b.history) == 3


def test_rng_state_round_trips_through_weights_only(tmp_path: Path) -> None:
    import random

    import numpy as np

    state = rng_state()
    torch.save(state, tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_skip_drops_non_finite_batches_and_counts_them(tmp_path: Path) -> None:
    class Poisoned(Baseline):
        def loss(self, inputs, targets, logits, ctx):  # type: ignore[no-untyped-def]
            terms = super().loss(inputs, targets, logits, ctx)
            if self.training and targets[0] == 3:  # some batches only
                terms["ce"] = terms["ce"] * float("nan")
            return terms

    data = synthetic(batch_size=32, seed=0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = _Recorder()
    options = LoopOptions(epochs=2, device=torch.device("cpu"), on_nonfinite="skip")
    fit(model, Poisoned(data=data, criterion=nn.CrossEntropyLoss()), data, opt,
        cosine(opt, 2, len(data.train)), tracker, options)  # fmt: skip
    epochs = [m for _, m in tracker.logged if "val/acc1" in m]
    assert 0 < epochs[-1]["train/skipped_steps"] < 28
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(v == v for m in epochs for v in m.values())  # no nan in the epoch means


def test_corrupt_and_crafted_training_checkpoints_are_refused(tmp_path: Path) -> None:
    good = tmp_path / "last.pt"
    _train(tmp_path, Baseline)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:1000])
    with pytest.raises(ConfigError, match=r"truncated\.pt.*weights_only=True"):
        read_training_state(truncated)
    weights_only = tmp_path / "best.pt"  # a weights file, not a training state
    with pytest.raises(ConfigError, match=r"best\.pt lacks optimizer"):
        read_training_state(weights_only)


def _crafted_pickle(path: Path) -> None:
    class Exploit:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (os.system, ("echo pwned > " + str(path.parent / "pwned"),))

    torch.save({"model": Exploit()}, path)


# --- end to end through the CLI --------------------------------------------------------------

_SLOW_STEPS = """
import sys, time
from kdexp.method.base import Method
_after = Method.after_step
def after_step(self, ctx):
    time.sleep(0.05)
    return _after(self, ctx)
Method.after_step = after_step
from kdexp.cli import main
main()
"""

_E2E = ["method=baseline", "schedule.epochs=3", "deterministic=true", "latency_repeats=1"]
_E2E += ["log_every=1", "checkpoint_every_steps=2"]
_SAME = ["best/val_acc1", "best/epoch", "last/val_acc1", "test/loss", "test/acc1", "test/acc5"]


def _store(tmp_path: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")


def _only_run(tmp_path: Path):  # type: ignore[no-untyped-def]
    client = _store(tmp_path)
    (found,) = client.search_runs([client.get_experiment_by_name("test").experiment_id])
    return client, found


@pytest.mark.slow
def test_sigterm_mid_epoch_then_resume_auto_equals_uninterrupted_run(tmp_path: Path) -> None:
    stopped, reference = tmp_path / "stopped", tmp_path / "reference"
    stopped.mkdir()
    reference.mkdir()
    args = _E2E + tracking_overrides(stopped)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    child = subprocess.Popen(
        [sys.executable, "-c", _SLOW_STEPS, *args],
        cwd=stopped,
        env={**env, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not list(stopped.glob("outputs/runs/*/*/checkpoints/last.pt")):
            assert child.poll() is None and time.monotonic() < deadline, child.communicate()
            time.sleep(0.02)
        child.send_signal(signal.SIGTERM)
        _, err = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == 143, err
    assert "resume with: kdexp" in err and "Traceback" not in err
    (checkpoint,) = stopped.glob("outputs/runs/*/*/checkpoints/last.pt")
    state = read_training_state(checkpoint)
    assert 0 < state["step"] < 3 * 21 and state["batch"] > 0  # stopped in the middle of an epoch
    client, killed = _only_run(stopped)
    assert killed.info.status == "KILLED"
    assert killed.data.tags["kdexp.resume"].endswith(f"resume={killed.info.run_id}")

    done = run_cli(args + ["resume=auto"], cwd=stopped)
    assert done.returncode == 0, done.stderr
    base = run_cli(_E2E + tracking_overrides(reference), cwd=reference)
    assert base.returncode == 0, base.stderr

    client, resumed = _only_run(stopped)
    ref_client, uninterrupted = _only_run(reference)
    assert resumed.info.run_id == killed.info.run_id and resumed.info.status == "FINISHED"

    def own(params: dict[str, str]) -> dict[str, str]:
        return {k: v for k, v in params.items() if not k.startswith("tracking.")}

    assert own(resumed.data.params) == own(uninterrupted.data.params)  # resume=auto not logged
    for key in _SAME:
        assert resumed.data.metrics[key] == uninterrupted.data.metrics[key], key
    for key in ("train/loss", "train/lr", "val/acc1", "train/epoch_loss"):
        got = [(m.step, m.value) for m in client.get_metric_history(resumed.info.run_id, key)]
        want = [(m.step, m.value) for m in ref_client.get_metric_history(
            uninterrupted.info.run_id, key)]  # fmt: skip
        assert sorted(got) == sorted(want), key  # every step once: no gap, no duplicate
    steps = sorted(m.step for m in client.get_metric_history(resumed.info.run_id, "train/loss"))
    assert steps == list(range(3 * 21))


@pytest.mark.slow
def test_diverging_run_fails_naming_term_and_step_and_skip_finishes(tmp_path: Path) -> None:
    args = ["method=baseline", "dataset=synthetic", "schedule.epochs=1", "latency_repeats=1"]
    args += ["schedule.lr=1e12", *tracking_overrides(tmp_path)]
    failed = run_cli(args, cwd=tmp_path)
    assert failed.returncode == 1
    assert "FloatingPointError: train/loss is" in failed.stderr
    assert "train/loss_ce is" in failed.stderr and " at step " in failed.stderr
    skipped = run_cli(args + ["on_nonfinite=skip"], cwd=tmp_path)
    assert skipped.returncode == 0, skipped.stderr
    client = _store(tmp_path)
    runs = client.search_runs([client.get_experiment_by_name("test").experiment_id])
    by_status = {r.info.status: r for r in runs}
    assert set(by_status) == {"FAILED", "FINISHED"}
    assert by_status["FINISHED"].data.metrics["train/skipped_steps"] > 0
    (last,) = tmp_path.glob("outputs/runs/*/*/checkpoints/last.pt")  # the finished run's
    assert read_training_state(last)["step"] == 7


@pytest.mark.slow
def test_unreachable_tracking_server_fails_fast_and_clearly(tmp_path: Path) -> None:
    uri = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    done = run_cli(["method=baseline", "dataset=synthetic", f"tracking.uri={uri}"], cwd=tmp_path)
    assert time.monotonic() - start < 30
    assert done.returncode != 0
    assert f"tracking.uri='{uri}': a tracking server that answers" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.slow
def test_crafted_and_truncated_resume_checkpoints_give_a_clear_error(tmp_path: Path) -> None:
    crafted, truncated = tmp_path / "crafted.pt", tmp_path / "truncated.pt"
    _crafted_pickle(crafted)
    torch.save({"model": {"w": torch.zeros(1000)}}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:500])
    for path in (crafted, truncated):
        done = run_cli(["method=baseline", "dataset=synthetic", f"resume={path}"], cwd=tmp_path)
        assert done.returncode == 2
        assert f"resume='{path}': a training checkpoint that torch.load(weights_only=True)" in (
            done.stderr
        )
        assert "Traceback" not in done.stderr
    assert not (tmp_path / "pwned").exists()


# --- a real MLflow server that goes away and comes back ---------------------------------------


@pytest.mark.slow
def test_tracking_server_outage_loses_no_metric(tmp_path: Path) -> None:
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    spool1, spool2 = tmp_path / "run1" / FILE_NAME, tmp_path / "run2" / FILE_NAME
    tracker1 = MlflowTracker(uri=uri, experiment="outage", flush_every_s=0)
    tracker2 = MlflowTracker(uri=uri, experiment="outage", flush_every_s=0)
    servers = [start_mlflow_server(tmp_path, port)]
    try:
        # Run 1: the server goes away mid-run and is back before it ends; it sends everything.
        with tracker1.run("r1", {"p": 1}, {}, spool=spool1) as run1:
            for step in range(10):
                run1.log_metrics({"loss": float(step), "lr": 0.1}, step)
            run1.flush()
            # Run 2 ends while the server is away; kdexp-sync sends the rest later.
            with tracker2.run("r2", {"p": 2}, {}, spool=spool2) as run2:
                run2.log_metrics({"loss": 0.0}, 0)
                run2.flush()
                assert run1.unsent == run2.unsent == 0
                stop_mlflow_server(servers[-1])
                for step in range(10, 20):
                    run1.log_metrics({"loss": float(step), "lr": 0.1}, step)  # training goes on
                run1.flush()
                assert run1.unsent >= 20
                for step in range(1, 15):
                    run2.log_metrics({"loss": float(step)}, step)
            _, left = Spool.read(spool2)
            assert len(left.pending) == 15  # 14 metrics and the FINISHED status
            servers.append(start_mlflow_server(tmp_path, port))
            for step in range(20, 30):
                run1.log_metrics({"loss": float(step), "lr": 0.1}, step)
            run1.flush()
            assert run1.unsent == 0
        assert sync_main([str(spool2.parent)]) == 0
        assert sync_main([str(spool2.parent)]) == 0  # nothing left: nothing is sent twice
        client = MlflowClient(tracking_uri=uri)
        first, second = tracker1.run_id, tracker2.run_id
        assert client.get_run(first).info.status == client.get_run(second).info.status
        assert client.get_run(first).info.status == "FINISHED"
        for run_id, key, count in ((first, "loss", 30), (first, "lr", 30), (second, "loss", 15)):
            steps = sorted(m.step for m in client.get_metric_history(run_id, key))
            assert steps == list(range(count)), key
    finally:
        for server in servers:
            stop_mlflow_server(server)
