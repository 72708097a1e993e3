"""kdexp's Optuna sweeper (hydra/sweeper=kdexp_optuna): the search space, a study continued
after an interruption, pruning, and two joblib workers on one study, read back from Optuna's
storage, MLflow, the sweep's job table and kdexp-report."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch
from hydra.utils import instantiate
from mlflow.tracking import MlflowClient
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState
from torch import nn

from hydra_plugins.kdexp_optuna_sweeper._space import parse
from kdexp.dataset.synthetic import load as synthetic
from kdexp.method.baseline import Baseline
from kdexp.report import main as report
from kdexp.schedule import constant
from kdexp.search import (
    ENV_PRUNING_TRIAL,
    ENV_STORAGE,
    ENV_STUDY,
    MONITOR_ATTR,
    PRUNER_ATTR,
    open_storage,
    pruning_study_name,
    trial_reporter,
)
from kdexp.tracking.base import Tracker
from kdexp.train import LoopOptions, fit
from tests.conftest import CONF, run_cli, tracking_overrides

TINY = ["schedule.epochs=2", "latency_repeats=1", "tracking.log_model=false"]


def test_search_space_keeps_the_hydra_optuna_syntax() -> None:
    space = parse(
        [
            "a=choice(16, 32, 64)",
            "b=range(1, 10, 3)",  # Hydra's range: 1, 4, 7 (10 excluded)
            "c=interval(0.1, 0.5)",
            "d=tag(log, interval(0.0001, 0.1))",
            "e=tag(log, int(interval(1, 64)))",  # int(): Hydra reads interval bounds as floats
            "f=range(0.5, 2.0, 0.5)",
            "g=5",
            "+h=x",
            "a=choice(8, 16)",  # a later override of a key wins
        ]
    )
    assert space.distributions == {
        "b": IntDistribution(1, 7, step=3),
        "c": FloatDistribution(0.1, 0.5),
        "d": FloatDistribution(0.0001, 0.1, log=True),
        "e": IntDistribution(1, 64, log=True),
        "f": FloatDistribution(0.5, 1.5, step=0.5),
        "a": CategoricalDistribution([8, 16]),
    }
    assert space.fixed == ["g=5", "+h=x"]
    params = {"a": 8, "b": 4, "c": 0.25, "d": 0.001, "e": 2, "f": 1.0}
    assert space.overrides(params) == ["b=4", "c=0.25", "d=0.001", "e=2", "f=1.0", "a=8"] + [
        "g=5",
        "+h=x",
    ]


SWEEPER_OPTIONS = sorted(
    (group, path.stem)
    for group in ("sampler", "pruner")
    for path in (CONF / "hydra" / "sweeper" / group).glob("*.yaml")
)


@pytest.mark.parametrize(("group", "option"), SWEEPER_OPTIONS)
def test_sampler_and_pruner_options_build(compose_cfg, group: str, option: str) -> None:
    cfg = compose_cfg("hydra/sweeper=kdexp_optuna", f"hydra/sweeper/{group}={option}")
    built = instantiate(cfg.hydra.sweeper[group])
    base = optuna.samplers.BaseSampler if group == "sampler" else optuna.pruners.BasePruner
    assert isinstance(built, base)


def test_fit_stops_after_the_epoch_on_epoch_says_so() -> None:
    data = synthetic(batch_size=32, seed=0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    seen: list[tuple[int, float]] = []

    def judge(epoch: int, metrics: dict[str, float]) -> bool:
        seen.append((epoch, metrics["val/acc1"]))
        return epoch == 1

    options = LoopOptions(epochs=5, device=torch.device("cpu"), on_epoch=judge)
    method = Baseline(data=data, criterion=nn.CrossEntropyLoss())
    result = fit(model, method, data, opt, constant(opt, 5, len(data.train)), Tracker(), options)
    assert result.stopped_after == 2
    assert [m["val/acc1"] for m in result.history] == [v for _, v in seen]
    assert [e for e, _ in seen] == [0, 1]
    assert result.best_val_acc1 == max(v for _, v in seen)


def test_reporter_finds_its_trial_through_the_storage(tmp_path: Path, monkeypatch) -> None:
    spec = str(tmp_path / "studies.journal")
    storage = open_storage(spec)
    twins = optuna.create_study(study_name=pruning_study_name("s"), storage=storage)
    twins.set_user_attr(PRUNER_ATTR, '{"_target_": "optuna.pruners.ThresholdPruner", "lower": 50}')
    twins.set_user_attr(MONITOR_ATTR, "val/acc1")
    twins.ask()
    twin = twins.ask()  # the job's twin is trial 1
    for name, value in [(ENV_STORAGE, spec), (ENV_STUDY, "s"), (ENV_PRUNING_TRIAL, "1")]:
        monkeypatch.setenv(name, value)
    assert trial_reporter({}) is None  # a teacher's run, trained inside the job, reports nothing
    reporter = trial_reporter({"optuna.trial": "7"})
    assert reporter is not None
    assert reporter.on_epoch(0, {"val/acc1": 60.0}) is False
    assert reporter.on_epoch(1, {"val/acc1": 40.0}) is True  # below the threshold of 50
    assert reporter.pruned_after == 2
    frozen = open_storage(spec).get_trial(twin._trial_id)
    assert frozen.state == TrialState.PRUNED
    assert frozen.intermediate_values == {0: 60.0, 1: 40.0}
    assert twins.trials[0].state == TrialState.RUNNING  # the other twin is untouched


def _study(tmp_path: Path, name: str) -> optuna.Study:
    storage = open_storage(str(tmp_path / "outputs" / "optuna.journal"))
    return optuna.load_study(study_name=name, storage=storage)


def _student_runs(tmp_path: Path):
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    found = client.search_runs([client.get_experiment_by_name("test").experiment_id])
    parents = [r for r in found if r.data.tags.get("kdexp.role") == "sweep"]
    return [r for r in found if "optuna.trial" in r.data.tags], parents


NAS = ["experiment=nas_student", "method=baseline", "model.depth=1", "skip_finished=false", *TINY]
NAS += ["hydra.sweeper.n_trials=4", "hydra.sweeper.sampler.population_size=4"]


@pytest.mark.slow
def test_interrupted_study_continues_on_relaunch(tmp_path: Path) -> None:
    # Enough epochs that the third trial is still training a second after it starts.
    args = [*NAS, "model.width=choice(16,32,64,128,256)", "schedule.epochs=150"]
    args += tracking_overrides(tmp_path)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    first = subprocess.Popen(
        [sys.executable, "-m", "kdexp", *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    journal = tmp_path / "outputs" / "optuna.journal"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and first.poll() is None:
        if journal.is_file():
            try:
                trials = _study(tmp_path, "nas_student").trials
            except KeyError:  # the study is not created yet
                trials = []
            states = [t.state for t in trials]
            if states[:2] == [TrialState.COMPLETE] * 2 and len(trials) == 3 and trials[2].params:
                time.sleep(1.0)  # the third trial's job is under way
                break
        time.sleep(0.05)
    first.send_signal(signal.SIGINT)  # Ctrl-C while the third trial trains
    out, _ = first.communicate(timeout=60)
    assert first.returncode != 0, out
    before = _study(tmp_path, "nas_student").trials
    assert [t.state for t in before[:2]] == [TrialState.COMPLETE] * 2, out
    assert [t.state for t in before[2:]] == [TrialState.RUNNING], out

    done = run_cli(args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    trials = _study(tmp_path, "nas_student").trials
    counted = [t for t in trials if not t.user_attrs.get("kdexp.interrupted")]
    assert [t.state for t in counted] == [TrialState.COMPLETE] * 4
    assert [t.params for t in trials[:2]] == [t.params for t in before[:2]]
    (stopped,) = trials[2 : len(before)]  # asked again with the same parameters
    assert stopped.state == TrialState.FAIL
    (retry,) = [t for t in trials if t.user_attrs.get("kdexp.retry_of") == stopped.number]
    assert retry.params == stopped.params and retry.state == TrialState.COMPLETE

    # The first two trials trained once, in the first launch; the relaunch ran two jobs.
    runs, parents = _student_runs(tmp_path)
    finished = [r for r in runs if r.info.status == "FINISHED"]
    numbers = sorted(int(r.data.tags["optuna.trial"]) for r in finished)
    assert numbers == sorted(t.number for t in counted)
    sweeps = sorted((tmp_path / "outputs" / "multirun").glob("*/*"))
    assert len(sweeps) == 2
    assert sorted(p.name for p in sweeps[1].iterdir() if p.name.isdigit()) == ["0", "1"]
    # The study and the sweeps' parent runs name each other.
    assert {p.data.tags["optuna.study"] for p in parents} == {"nas_student"}
    attrs = _study(tmp_path, "nas_student").user_attrs
    assert sorted(attrs["kdexp.mlflow_parent_runs"]) == sorted(p.info.run_id for p in parents)


@pytest.mark.slow
def test_pruner_stops_a_hopeless_trial(tmp_path: Path) -> None:
    # lr=1e-7 barely moves the weights: its first epoch is far below the median of the
    # finished trials' first epochs, and the median pruner stops it there. With this seed TPE
    # (drawing at random for its first 10 trials) asks 0.1, 0.1, 1e-7, 0.1.
    args = ["-m", "method=baseline", "model.hidden=[32]", *TINY, "schedule.epochs=3"]
    args += ["hydra/sweeper=kdexp_optuna", "hydra/sweeper/pruner=median"]
    args += ["hydra.sweeper.pruner.n_startup_trials=1", "hydra.sweeper.pruner.n_warmup_steps=0"]
    args += ["hydra.sweeper.n_trials=4", "hydra.sweeper.sampler.seed=6"]
    args += ["schedule.lr=choice(0.1,0.0000001)", *tracking_overrides(tmp_path)]
    done = run_cli(args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    trials = _study(tmp_path, "kdexp").trials
    assert trials[0].params == {"schedule.lr": 0.1}
    assert trials[0].state == TrialState.COMPLETE
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    assert pruned, [(t.params, t.state) for t in trials]
    assert {t.params["schedule.lr"] for t in pruned} == {1e-7}
    assert all(t.state == TrialState.COMPLETE for t in trials if t.params["schedule.lr"] == 0.1)

    runs, _ = _student_runs(tmp_path)
    by_trial = {int(r.data.tags["optuna.trial"]): r for r in runs}
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    for trial in pruned:
        run = by_trial[trial.number]
        assert run.info.status == "FINISHED"
        assert run.data.tags["kdexp.pruned"] == "1"  # stopped after its first epoch
        curve = client.get_metric_history(run.info.run_id, "val/acc1")
        assert len(curve) == 1
        assert run.data.metrics["best/val_acc1"] == pytest.approx(curve[0].value)
    # Its twin in the pruning study holds the report the pruner judged.
    twins = _study(tmp_path, pruning_study_name("kdexp")).trials
    twin_of = {t.user_attrs["kdexp.trial"]: t for t in twins}
    for trial in pruned:
        twin = twin_of[trial.number]
        assert twin.state == TrialState.PRUNED
        value = by_trial[trial.number].data.metrics["best/val_acc1"]
        assert twin.intermediate_values == {0: pytest.approx(value)}

    (sweep,) = (tmp_path / "outputs" / "multirun").glob("*/*")
    table = {row["run"]: row["status"] for row in csv.DictReader((sweep / "sweep_jobs.csv").open())}
    assert {table[by_trial[t.number].info.run_id] for t in pruned} == {"PRUNED"}
    assert f"{len(pruned)} pruned" in done.stdout
    out = tmp_path / "report"
    args = ["--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--experiment", "test"]
    assert report([*args, "--sweep-dir", str(sweep), "--out", str(out)]) == 0
    assert "[pruned at epoch 1]" in (out / "comparison.md").read_text()
    front = {row["run ids"] for row in csv.DictReader((out / "pareto.csv").open())}
    assert not any(by_trial[t.number].info.run_id in ids for t in pruned for ids in front)


@pytest.mark.slow
def test_two_joblib_workers_share_one_study_and_the_fronts_agree(tmp_path: Path) -> None:
    args = ["-m", *NAS, "model.width=choice(8,16,32,64)", "model.depth=choice(1,2)"]
    args += ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "hydra.sweeper.n_jobs=2"]
    args += ["hydra/sweeper/pruner=median", "hydra.sweeper.pruner.n_startup_trials=100"]
    done = run_cli([*args, *tracking_overrides(tmp_path)], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    study = _study(tmp_path, "nas_student")
    assert [t.number for t in study.trials] == [0, 1, 2, 3]
    assert {t.state for t in study.trials} == {TrialState.COMPLETE}
    twins = _study(tmp_path, pruning_study_name("nas_student")).trials
    assert sorted(t.user_attrs["kdexp.trial"] for t in twins) == [0, 1, 2, 3]
    assert all(sorted(t.intermediate_values) == [0, 1] for t in twins)  # both epochs reported
    runs, _ = _student_runs(tmp_path)
    assert sorted(int(r.data.tags["optuna.trial"]) for r in runs) == [0, 1, 2, 3]
    for run in runs:
        trial = study.trials[int(run.data.tags["optuna.trial"])]
        assert trial.values == pytest.approx(
            [run.data.metrics["best/val_acc1"], run.data.metrics["model/params"]]
        )

    # kdexp-report's front of accuracy against parameters is Optuna's best_trials.
    (sweep,) = (tmp_path / "outputs" / "multirun").glob("*/*")
    out = tmp_path / "report"
    args = ["--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--experiment", "test"]
    args += ["--sweep-dir", str(sweep), "--accuracy", "best/val_acc1", "--out", str(out)]
    assert report(args) == 0
    marked = [row for row in csv.DictReader((out / "pareto.csv").open()) if row["cost"] == "params"]
    run_of = {int(r.data.tags["optuna.trial"]): r.info.run_id for r in runs}
    on_front = {run_id for row in marked for run_id in row["run ids"].split()}
    assert on_front == {run_of[t.number] for t in study.best_trials}
