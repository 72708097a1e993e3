"""The search loop of :class:`~.sweeper.KdexpOptunaSweeper`: open (or continue) the study, ask
for a batch of trials, launch them as jobs, and tell Optuna how each ended.

A relaunched command continues its study: trials that finished (COMPLETE, PRUNED, FAIL) count
towards ``n_trials``, and a trial left RUNNING by an interrupted launch is marked FAIL (user
attribute ``kdexp.interrupted``) and asked again with the same parameters.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import optuna
from hydra.core.utils import JobReturn
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf
from optuna.trial import FrozenTrial, TrialState

from kdexp import search as job_side
from kdexp.errors import ConfigError
from kdexp.sweep import parent_run, stop_requested

from ._space import SearchSpace, parse

log = logging.getLogger(__name__)

INTERRUPTED = "kdexp.interrupted"
#: Per-epoch metrics a pruner can judge (what the loop logs each epoch).
MONITORS = ("val/acc1", "val/acc5", "val/loss", "train/acc1", "train/epoch_loss")
_FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


def _directions(direction: Any) -> list[str]:
    found = list(direction) if isinstance(direction, ListConfig | list) else [direction]
    names = [str(d) for d in found]
    if not names or any(d not in ("minimize", "maximize") for d in names):
        raise ConfigError("hydra.sweeper.direction", direction, "minimize, maximize or a list")
    return names


def _sampler(config: DictConfig | None, offset: int) -> Any:
    """The sampler; a seeded one is seeded ``seed + offset`` (the trials the study already has),
    so a continued study does not draw its first trials again."""
    if config is None:
        return None
    node = OmegaConf.to_container(config, resolve=True)
    assert isinstance(node, dict)
    if node.get("seed") is not None:
        node["seed"] = int(node["seed"]) + offset
    return instantiate(node)


def _quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _env(name: str, value: str) -> str:
    return f"++hydra.job.env_set.{name}={_quote(value)}"


def _resume(study: optuna.Study) -> int:
    """Mark the trials an interrupted launch left RUNNING as FAIL and ask them again; return the
    number of trials that count towards ``n_trials``."""
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study._storage.set_trial_user_attr(trial._trial_id, INTERRUPTED, True)
        study.tell(trial.number, state=TrialState.FAIL)
        if trial.params:  # empty when the launch stopped while the sampler drew them
            study.enqueue_trial(trial.params, user_attrs={"kdexp.retry_of": trial.number})
            log.info("trial %d was interrupted: asked again with %s", trial.number, trial.params)
    return sum(
        not t.user_attrs.get(INTERRUPTED)
        for t in study.get_trials(deepcopy=False, states=_FINISHED)
    )


def _pruning_study(sweeper: Any, storage: Any, spec: str | None, name: str) -> optuna.Study | None:
    if sweeper.pruner is None:
        return None
    if spec is None:
        raise ConfigError(
            "hydra.sweeper.storage", None, "a journal file or database URL when a pruner is set"
        )
    if sweeper.monitor not in MONITORS:
        raise ConfigError("hydra.sweeper.monitor", sweeper.monitor, f"one of {MONITORS}")
    direction = "minimize" if sweeper.monitor.endswith("loss") else "maximize"
    study = optuna.create_study(
        study_name=job_side.pruning_study_name(name),
        storage=storage,
        direction=direction,  # type: ignore[arg-type]
        load_if_exists=True,
    )
    pruner = OmegaConf.to_container(sweeper.pruner, resolve=True)
    instantiate(pruner)  # a mistake in its config shows here, not in every job
    study.set_user_attr(job_side.PRUNER_ATTR, json.dumps(pruner))
    study.set_user_attr(job_side.MONITOR_ATTR, sweeper.monitor)
    for twin in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(twin.number, state=TrialState.FAIL)
    return study


def _values(ret: JobReturn, count: int) -> list[float] | None:
    """The job's objective value(s), or None when it failed or returned something unusable."""
    try:
        value = ret.return_value
    except Exception as error:  # the job raised: Hydra keeps the exception in the return
        log.warning("trial failed: %s", error)
        return None
    if value is None:
        return None
    values = list(value) if isinstance(value, list | tuple | ListConfig) else [value]
    try:
        floats = [float(v) for v in values]
    except (TypeError, ValueError):
        return None
    if len(floats) != count or not all(math.isfinite(v) for v in floats):
        return None
    return floats


def _tell(
    study: optuna.Study, trial: optuna.Trial, twin: optuna.Trial | None, ret: JobReturn
) -> str:
    """Tell ``study`` (and the pruning study, through the twin) how the trial's job ended."""
    values = _values(ret, len(study.directions))
    twin_state = None
    if twin is not None:
        frozen = twin.study._storage.get_trial(twin._trial_id)
        twin_state = frozen.state
        if twin_state == TrialState.RUNNING:  # not pruned: its last report is its value
            reports = frozen.intermediate_values
            last = reports[max(reports)] if reports else None
            ok = values is not None and last is not None
            twin.study.tell(twin, last if ok else None, state=None if ok else TrialState.FAIL)
    if twin_state == TrialState.PRUNED and values is not None:
        study.tell(trial, state=TrialState.PRUNED)
        return "PRUNED"
    if values is None:
        study.tell(trial, state=TrialState.FAIL)
        return "FAIL"
    study.tell(trial, values)
    return "COMPLETE"


def _write_results(study: optuna.Study, folder: Path) -> None:
    """``optimization_results.yaml``: the best trial, or the Pareto front (several objectives)."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return
    results: dict[str, Any] = {"name": "kdexp_optuna", "study_name": study.study_name}
    if len(study.directions) == 1:
        results["best_params"] = study.best_params
        results["best_value"] = study.best_value
    else:
        results["solutions"] = [
            {"params": t.params, "values": list(t.values), "number": t.number}
            for t in study.best_trials
        ]
    folder.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create(results), folder / "optimization_results.yaml")


def _summary(trials: list[FrozenTrial]) -> str:
    counts = {s: sum(t.state == s for t in trials) for s in _FINISHED}
    return ", ".join(f"{n} {s.name.lower()}" for s, n in counts.items())


def search(sweeper: Any, arguments: list[str]) -> None:
    """Run ``sweeper``'s search over ``arguments`` (its own ``params`` first)."""
    config = sweeper.config
    params = sweeper.params or {}
    space: SearchSpace = parse([f"{k}={v}" for k, v in params.items()] + list(arguments))
    directions = _directions(sweeper.direction)
    name = job_side.study_name(config)
    spec = job_side.storage_spec(config)
    storage = job_side.open_storage(spec) if spec else optuna.storages.InMemoryStorage()
    try:
        existing = len(optuna.load_study(study_name=name, storage=storage).trials)
    except KeyError:
        existing = 0
    study = optuna.create_study(
        study_name=name,
        storage=storage,
        sampler=_sampler(sweeper.sampler, existing),
        directions=directions,  # type: ignore[arg-type]
        load_if_exists=True,
    )
    if [d.name.lower() for d in study.directions] != directions:
        raise ConfigError(
            "hydra.sweeper.direction",
            directions,
            f"the directions of study {name!r} ({[d.name.lower() for d in study.directions]}); "
            "or a new hydra.sweeper.study_name",
        )
    pruning = _pruning_study(sweeper, storage, spec, name)
    folder = Path(config.hydra.sweep.dir)
    run_id = parent_run(folder)
    if run_id is not None:  # the study and the sweep's MLflow parent run name each other
        runs = list(study.user_attrs.get("kdexp.mlflow_parent_runs", [])) + [run_id]
        study.set_user_attr("kdexp.mlflow_parent_runs", runs)
        study.set_user_attr("kdexp.mlflow_parent_run", run_id)
    done = _resume(study)
    log.info(
        "study %s in %s: %d of %d trials done; sampler %s, pruner %s",
        name,
        spec or "memory",
        done,
        sweeper.n_trials,
        type(study.sampler).__name__,
        None if sweeper.pruner is None else sweeper.pruner.get("_target_"),
    )
    job_idx = 0
    while done < sweeper.n_trials:
        size = min(sweeper.n_jobs, sweeper.n_trials - done)
        trials = [study.ask(space.distributions) for _ in range(size)]
        twins = [pruning.ask() if pruning is not None else None for _ in trials]
        overrides = []
        for trial, twin in zip(trials, twins, strict=True):
            env = [
                _env(job_side.ENV_STORAGE, spec or "memory"),
                _env(job_side.ENV_STUDY, name),
                _env(job_side.ENV_TRIAL, str(trial.number)),
            ]
            if twin is not None:
                twin.set_user_attr("kdexp.trial", trial.number)
                env.append(_env(job_side.ENV_PRUNING_TRIAL, str(twin.number)))
            overrides.append([*space.overrides(trial.params), *env])
        returns = sweeper.launcher.launch(overrides, initial_job_idx=job_idx)
        job_idx += len(returns)
        stopped = stop_requested(folder) is not None  # Ctrl-C or SIGTERM to the sweep
        for trial, twin, ret in zip(trials, twins, returns, strict=True):
            if stopped and _values(ret, len(study.directions)) is None:
                # Left RUNNING: a relaunch marks it interrupted and asks it again.
                log.info("trial %d stopped with the sweep: %s", trial.number, trial.params)
                continue
            state = _tell(study, trial, twin, ret)
            log.info("trial %d %s: %s", trial.number, state, trial.params)
        done += size
        if stopped:
            break
    _write_results(study, folder)
    log.info("study %s: %s", name, _summary(study.get_trials(deepcopy=False, states=_FINISHED)))
