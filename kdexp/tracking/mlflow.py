"""MLflow tracking through ``MlflowClient``, never the fluent API.

The client takes the run id explicitly, so no call can open an implicit run that would leak into
the next job of a multirun. Metrics are buffered and sent in batches of up to 1,000 at the end of
each epoch, which keeps the training loop's overhead negligible.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from kdexp.errors import ConfigError
from kdexp.tracking.base import Tracker

if TYPE_CHECKING:  # mlflow is imported lazily at run time
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

_MAX_METRICS, _MAX_PARAMS, _MAX_TAGS = 1000, 100, 100
_MAX_PARAM_CHARS = 6000  # MLflow 3's limit on a param value


def default_uri() -> str:
    """SQLite at outputs/mlflow.db under the launch directory, as an absolute URI."""
    return f"sqlite:///{Path(os.getcwd()).resolve() / 'outputs' / 'mlflow.db'}"


def _artifact_location(uri: str, artifact_root: str | None) -> str | None:
    if artifact_root:
        return Path(artifact_root).expanduser().resolve().as_uri()
    if uri.startswith("sqlite:///"):
        # Beside the database, not in a stray ./mlruns.
        return (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()
    return None  # a tracking server chooses its own artifact store


def prepare_store(uri: str | None, experiment: str, artifact_root: str | None = None) -> str:
    """Create the store and the experiment if missing; return the experiment id.

    Called once in the parent process before the jobs of a multirun start (see
    :mod:`kdexp.tracking.callback`): parallel jobs on a new SQLite file otherwise race on schema
    creation and on creating the experiment.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    uri = uri or default_uri()
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(
            experiment, artifact_location=_artifact_location(uri, artifact_root)
        )
    except MlflowException:  # another process created it first
        found = client.get_experiment_by_name(experiment)
        if found is None:
            raise
        return found.experiment_id


def _truncate(value: object) -> str:
    text = str(value)
    return text if len(text) <= _MAX_PARAM_CHARS else text[: _MAX_PARAM_CHARS - 3] + "..."


class MlflowTracker(Tracker):
    """One MLflow run per job; ``uri`` null means SQLite at outputs/mlflow.db."""

    def __init__(
        self,
        uri: str | None = None,
        experiment: str = "kdexp",
        artifact_root: str | None = None,
        flush_every_s: float = 10.0,
    ) -> None:
        self.uri = uri or default_uri()
        self.experiment = experiment
        self.artifact_root = artifact_root
        self.flush_every_s = flush_every_s
        self._last_flush = time.monotonic()
        self.run_id: str | None = None
        self._client: MlflowClient | None = None
        self._buffer: list[Metric] = []

    def _open_run(self) -> tuple[MlflowClient, str]:
        """The client and the id of the open run; a RuntimeError outside :meth:`run`."""
        if self._client is None or self.run_id is None:
            raise RuntimeError("MlflowTracker: no run is open; call this inside tracker.run(...)")
        return self._client, self.run_id

    def describe(self) -> str:
        """The store URI, the experiment and the run id."""
        return f"{self.uri} (experiment {self.experiment!r}, run {self.run_id})"

    @contextmanager
    def run(
        self, name: str, params: Mapping[str, object], tags: Mapping[str, str]
    ) -> Iterator[MlflowTracker]:
        """Open the run, log params and tags, and close it FINISHED or FAILED."""
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        experiment_id = prepare_store(self.uri, self.experiment, self.artifact_root)
        self._client = client = MlflowClient(tracking_uri=self.uri)
        run = client.create_run(experiment_id, run_name=name, tags=dict(tags))
        self.run_id = run_id = run.info.run_id
        status = "FAILED"
        try:
            items = [Param(k, _truncate(v)) for k, v in params.items()]
            for i in range(0, len(items), _MAX_PARAMS):
                client.log_batch(run_id, params=items[i : i + _MAX_PARAMS])
            yield self
            status = "FINISHED"
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            try:
                self.flush()
            finally:
                client.set_terminated(run_id, status)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Buffer metric values at ``step``.

        They are sent every ``flush_every_s`` seconds, when 1,000 are waiting, and when the run
        closes: one database transaction per epoch would cost a tiny model a third of its speed.
        """
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._buffer.extend(Metric(k, float(v), now, step) for k, v in metrics.items())
        if (
            len(self._buffer) >= _MAX_METRICS
            or time.monotonic() - self._last_flush >= self.flush_every_s
        ):
            self.flush()

    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Add tags to the open run."""
        from mlflow.entities import RunTag

        client, run_id = self._open_run()
        items = [RunTag(k, str(v)) for k, v in tags.items()]
        for i in range(0, len(items), _MAX_TAGS):
            client.log_batch(run_id, tags=items[i : i + _MAX_TAGS])

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Upload a file, or a folder's files, under ``artifact_path`` in the run."""
        client, run_id = self._open_run()
        if Path(path).is_dir():
            client.log_artifacts(run_id, str(path), artifact_path)
        else:
            client.log_artifact(run_id, str(path), artifact_path)

    def flush(self) -> None:
        """Send every buffered metric now."""
        self._last_flush = time.monotonic()
        while self._buffer:
            client, run_id = self._open_run()
            chunk, self._buffer = self._buffer[:_MAX_METRICS], self._buffer[_MAX_METRICS:]
            client.log_batch(run_id, metrics=chunk)

    def find_finished(self, tags: Mapping[str, str]) -> str | None:
        """The newest FINISHED run of this experiment that carries all ``tags``."""
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=self.uri)
        experiment_id = prepare_store(self.uri, self.experiment, self.artifact_root)
        query = " and ".join(
            [f"tags.`{k}` = '{v}'" for k, v in tags.items()] + ["attributes.status = 'FINISHED'"]
        )
        found = client.search_runs(
            [experiment_id], query, max_results=1, order_by=["attributes.start_time DESC"]
        )
        return found[0].info.run_id if found else None

    def fetch(self, source: str, paths: tuple[str, ...], destination: Path, key: str) -> Path:
        """The first of ``paths`` held by run ``source`` (an id or ``runs:/<id>[/path]``)."""
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # log noise
        run_id, _, inner = source.removeprefix("runs:/").partition("/")
        candidates = (inner,) if inner else paths
        client = MlflowClient(tracking_uri=self.uri)
        try:
            client.get_run(run_id)
        except MlflowException:
            raise ConfigError(
                key, source, f"a checkpoint path, or the id of a run in {self.uri}"
            ) from None
        destination.mkdir(parents=True, exist_ok=True)
        for path in candidates:
            try:
                return Path(client.download_artifacts(run_id, path, str(destination)))
            except (MlflowException, OSError):
                continue
        raise ConfigError(
            key, source, f"a run that holds one of the artifacts {', '.join(candidates)}"
        )

    def lock(self, name: str) -> AbstractContextManager[object]:
        """A file lock beside the SQLite store (or under outputs/ for a remote store)."""
        from filelock import FileLock

        if self.uri.startswith("sqlite:///"):
            folder = Path(self.uri.removeprefix("sqlite:///")).parent / "locks"
        else:
            folder = Path("outputs", "locks")
        folder.mkdir(parents=True, exist_ok=True)
        return FileLock(str(folder / f"{name}.lock"))
