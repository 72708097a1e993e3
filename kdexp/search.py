"""The job's side of a search by kdexp's Optuna sweeper (``hydra/sweeper=kdexp_optuna``).

The sweeper (``hydra_plugins.kdexp_optuna_sweeper``) asks Optuna for a trial, and hands each job
the trial's coordinates as environment variables through ``hydra.job.env_set``, so that they
reach the job whatever the launcher (basic, joblib, submitit) and stay out of the job's config,
its hash and its lineage. The job finds its trial in the shared storage from them:

- ``KDEXP_OPTUNA_STORAGE``: the study's storage (a journal file, or a database URL);
- ``KDEXP_OPTUNA_STUDY`` and ``KDEXP_OPTUNA_TRIAL``: the study and the trial's number;
- ``KDEXP_OPTUNA_PRUNING_TRIAL``: with a pruner, the number of the trial's twin in the study's
  pruning study (``<study>:pruning``), to which the job reports its monitored metric each epoch.

Optuna prunes single-objective studies only, and a search may have several objectives, so each
trial has a single-objective twin in the pruning study (Optuna's median, successive-halving or
Hyperband pruner, Li et al. 2018, over one metric such as ``val/acc1``). The pruning study holds
the pruner's config and the metric as user attributes; the sweeper tells the search trial
PRUNED when its twin was pruned.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENV_STORAGE = "KDEXP_OPTUNA_STORAGE"
ENV_STUDY = "KDEXP_OPTUNA_STUDY"
ENV_TRIAL = "KDEXP_OPTUNA_TRIAL"
ENV_PRUNING_TRIAL = "KDEXP_OPTUNA_PRUNING_TRIAL"
#: The MLflow tag of a pruned run: the number of epochs it trained.
PRUNED_TAG = "kdexp.pruned"
#: Study user attributes that tell the job how to prune (set by the sweeper).
PRUNER_ATTR, MONITOR_ATTR = "kdexp.pruner", "kdexp.monitor"
#: The MLflow tags that name a job's study and trial.
STUDY_TAG, TRIAL_TAG = "optuna.study", "optuna.trial"


def pruning_study_name(study_name: str) -> str:
    """The name of the single-objective study whose trials a search's jobs report to."""
    return f"{study_name}:pruning"


def open_storage(spec: str) -> Any:
    """Optuna storage for ``spec``: a file ending in ``.journal`` or ``.log`` is a journal
    (Optuna's ``JournalStorage`` on a locked file), anything else a database URL
    (``sqlite:///...``, ``postgresql://...``)."""
    import optuna
    from optuna.storages import JournalStorage, RDBStorage
    from optuna.storages.journal import JournalFileBackend

    if spec.endswith((".journal", ".log")):
        Path(spec).parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(spec))
    if spec.startswith("sqlite:"):
        # Several processes write to one file: wait for the lock instead of failing at 5 s.
        return RDBStorage(spec, engine_kwargs={"connect_args": {"timeout": 60}})
    return optuna.storages.get_storage(spec)


def trial_tags() -> dict[str, str]:
    """The MLflow tags naming this job's study and trial; empty outside a kdexp_optuna search."""
    if ENV_STUDY not in os.environ or ENV_TRIAL not in os.environ:
        return {}
    return {STUDY_TAG: os.environ[ENV_STUDY], TRIAL_TAG: os.environ[ENV_TRIAL]}


@dataclass
class Reporter:
    """Reports a job's monitored metric to its trial's twin in the pruning study, each epoch.

    ``pruned_after`` is the number of epochs trained when the pruner stopped it (None: never).
    """

    study: Any  # optuna.Study
    trial: Any  # optuna.Trial
    monitor: str
    pruned_after: int | None = field(default=None)

    def report(self, epoch: int, value: float) -> bool:
        """Report ``value`` at ``epoch`` (0-based); True when the pruner says stop here, in
        which case the twin trial is told PRUNED."""
        import optuna

        self.trial.report(value, epoch)
        if not self.trial.should_prune():
            return False
        self.study.tell(self.trial, state=optuna.trial.TrialState.PRUNED)
        self.pruned_after = epoch + 1
        return True

    def on_epoch(self, epoch: int, metrics: Mapping[str, float]) -> bool:
        """The loop's per-epoch hook (``LoopOptions.on_epoch``): reports ``metrics[monitor]``."""
        return self.report(epoch, float(metrics[self.monitor]))

    def prune(self) -> None:
        """Tell the twin trial PRUNED without a report (the job reused a pruned run)."""
        import optuna

        self.study.tell(self.trial, state=optuna.trial.TrialState.PRUNED)


def trial_reporter(tags: Mapping[str, str]) -> Reporter | None:
    """The reporter of the search trial that ``tags`` name (the job's own tags; a teacher's or
    a starting model's run has none), or None when the sweeper set no pruner."""
    if tags.get(TRIAL_TAG) is None or ENV_PRUNING_TRIAL not in os.environ:
        return None
    import optuna

    name = pruning_study_name(os.environ[ENV_STUDY])
    storage = open_storage(os.environ[ENV_STORAGE])
    attrs = storage.get_study_user_attrs(storage.get_study_id_from_name(name))
    from hydra.utils import instantiate

    pruner = instantiate(json.loads(attrs[PRUNER_ATTR]))
    study = optuna.load_study(study_name=name, storage=storage, pruner=pruner)
    number = int(os.environ[ENV_PRUNING_TRIAL])
    trial_id = storage.get_trial_id_from_study_id_trial_number(study._study_id, number)
    return Reporter(study, optuna.trial.Trial(study, trial_id), attrs[MONITOR_ATTR])


#: The sweeper this module serves, as ``hydra.sweeper._target_`` names it.
SWEEPER_TARGET = "hydra_plugins.kdexp_optuna_sweeper.sweeper.KdexpOptunaSweeper"


def study_name(config: Any) -> str:
    """The study of a multirun's config: ``hydra.sweeper.study_name``, or else the experiment's
    name (``experiment=nas_student``: ``nas_student``), or else ``kdexp``."""
    name = config.hydra.sweeper.get("study_name")
    if name:
        return str(name)
    return str(config.hydra.runtime.choices.get("experiment") or "kdexp")


def storage_spec(config: Any) -> str | None:
    """``hydra.sweeper.storage`` with a relative file taken from the launch directory; a URL
    as given; None for a study in memory."""
    value = config.hydra.sweeper.get("storage")
    if value is None:
        return None
    text = str(value)
    if "://" in text:
        return text
    return str(Path(config.hydra.runtime.cwd, text).resolve())


def sweep_tags(config: Any) -> dict[str, str]:
    """Tags for a sweep's MLflow parent run that name its study (kdexp_optuna sweeps only)."""
    if config.hydra.sweeper.get("_target_") != SWEEPER_TARGET:
        return {}
    return {STUDY_TAG: study_name(config), "optuna.storage": storage_spec(config) or "memory"}
