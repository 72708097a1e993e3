"""``hydra/sweeper=kdexp_optuna``: Hydra's Sweeper interface around :mod:`._study`.

This module is imported whenever Hydra scans its plugins, so it imports neither Optuna nor
kdexp's run code; :meth:`KdexpOptunaSweeper.sweep` does.
"""

from __future__ import annotations

from typing import Any

from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


class KdexpOptunaSweeper(Sweeper):
    """Search with Optuna (>= 4), each trial a job of Hydra's launcher, in batches of ``n_jobs``.

    ``direction`` is one of minimize / maximize, or a list of them (multi-objective; the job
    returns a list of values in that order). ``sampler`` and ``pruner`` are ``_target_`` configs
    (conf/hydra/sweeper/sampler, conf/hydra/sweeper/pruner). ``storage`` is a journal file
    (``*.journal``), a database URL, or null for a study in memory; a relative path is taken
    from the launch directory. ``study_name`` null names the study after the experiment.
    ``monitor`` is the per-epoch metric a pruner judges. ``params`` maps keys to search
    spaces (``choice``, ``range``, ``interval``, ``tag(log, interval(...))``).
    """

    def __init__(
        self,
        direction: Any = "maximize",
        n_trials: int = 20,
        n_jobs: int = 1,
        storage: str | None = "outputs/optuna.journal",
        study_name: str | None = None,
        sampler: DictConfig | None = None,
        pruner: DictConfig | None = None,
        monitor: str = "val/acc1",
        params: DictConfig | None = None,
    ) -> None:
        self.direction = direction
        self.n_trials = n_trials
        self.n_jobs = n_jobs
        self.storage = storage
        self.study_name = study_name
        self.sampler = sampler
        self.pruner = pruner
        self.monitor = monitor
        self.params = params
        self.config: DictConfig | None = None
        self.launcher: Any = None

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        """Keep the config and build the launcher the trials run through."""
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            config=config, hydra_context=hydra_context, task_function=task_function
        )

    def sweep(self, arguments: list[str]) -> None:
        """Run the search: ``params`` and the command line's ``arguments`` give its space."""
        from ._study import search

        assert self.config is not None and self.launcher is not None, "setup() first"
        search(self, arguments)
