"""The tracker interface, and the no-op tracker used by ``tracking=none``."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

from kdexp.errors import ConfigError

if TYPE_CHECKING:  # the tracker modules stay light to import
    import numpy as np
    from torch import nn


class Tracker:
    """Records nothing. :class:`~kdexp.tracking.mlflow.MlflowTracker` overrides every method."""

    run_id: str | None = None

    def describe(self) -> str:
        """Where the run's records went, for the last line the CLI prints."""
        return "nowhere (tracking=none)"

    @contextmanager
    def run(
        self,
        name: str,
        params: Mapping[str, object],
        tags: Mapping[str, str],
        *,
        resume_id: str | None = None,
        spool: Path | None = None,
    ) -> Iterator[Tracker]:
        """Open one run for the body of the ``with``; close it FINISHED, or FAILED on error.

        ``resume_id`` reopens that run instead (no params are logged again); ``spool`` is a file
        that keeps every record until the store has it (see :mod:`kdexp.tracking.spool`).
        """
        yield self

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Record metric values at ``step`` (buffered; see :meth:`flush`)."""

    def log_summary(self, metrics: Mapping[str, float], last_step: int) -> None:
        """Record end-of-run values: at step 0, where MLflow's UI draws a metric with no later
        step as a bar chart (one bar per run); a key already logged during training keeps
        going, at ``last_step``, so that its latest value is this one."""
        self.log_metrics(metrics, last_step)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Add tags to the open run."""

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Store a file, or every file under a folder, with the run."""

    def flush(self) -> None:
        """Send buffered metrics now."""

    def log_model(self, model: nn.Module, input_example: np.ndarray) -> None:
        """Store ``model`` with the run, loadable as is; ``input_example`` is a batch of inputs."""

    def find_finished(self, tags: Mapping[str, str]) -> str | None:
        """The id of the newest FINISHED run carrying all ``tags``, if the store has one."""
        return None

    def find_resumable(self, tags: Mapping[str, str]) -> str | None:
        """The id of the newest KILLED or FAILED run carrying all ``tags``, if any."""
        return None

    def config_hashes_named(self, name: str) -> list[str]:
        """The ``kdexp.config_hash`` tag of each of this experiment's runs named ``name``."""
        return []

    def log_dataset(self, data: object, name: str, dataset_cfg: Mapping[str, object]) -> None:
        """Record the run's dataset as an input: name, source, digest and split sizes."""

    def run_metrics(self, run_id: str) -> dict[str, float]:
        """The latest value of each metric of run ``run_id`` (a reused run's results)."""
        return {}

    def run_tag(self, run_id: str, tag: str, key: str) -> str | None:
        """The value of ``tag`` on run ``run_id``; ``key`` names the config key for errors."""
        raise ConfigError(key, run_id, "a checkpoint path: with tracking=none no run can be read")

    def fetch(self, source: str, paths: tuple[str, ...], destination: Path, key: str) -> Path:
        """Download the first of ``paths`` that run ``source`` (a run id or ``runs:/`` URI) holds.

        ``key`` is the config key that named the run, for error messages.
        """
        raise ConfigError(key, source, "a checkpoint path: with tracking=none no run can be read")

    def lock(self, name: str) -> AbstractContextManager[object]:
        """A lock shared by every job on this store, so that only one job trains a given model."""
        return nullcontext()
