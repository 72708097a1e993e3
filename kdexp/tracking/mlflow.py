"""MLflow tracking through ``MlflowClient``, never the fluent API.

The client takes the run id explicitly, so no call can open an implicit run that would leak into
the next job of a multirun. Metrics are buffered and sent in batches of up to 1,000 at the end of
each epoch, which keeps the training loop's overhead negligible.
"""

from __future__ import annotations

import copy
import logging
import os
import pickle
import time
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from kdexp.errors import ConfigError
from kdexp.timings import phase
from kdexp.tracking.base import Tracker
from kdexp.tracking.extras import (
    dataset_input,
    publish_view,
    runs_page,
    start_system_metrics,
)
from kdexp.tracking.liveness import HEARTBEAT_TAG, Heartbeat, is_dead, logged_steps
from kdexp.tracking.spool import Record, Spool
from kdexp.tracking.store import (
    check_reachable,
    default_uri,
    limit_http_retries,
    mlflow_client,
    prepare_store,
)

if TYPE_CHECKING:  # mlflow is imported lazily at run time
    import numpy as np
    from mlflow.tracking import MlflowClient
    from torch import nn

log = logging.getLogger(__name__)

_RETRY_FIRST_S, _RETRY_MAX_S = 5.0, 60.0  # backoff between sends while the store is away

_MAX_METRICS, _MAX_PARAMS, _MAX_TAGS = 1000, 100, 100
_MAX_PARAM_CHARS = 6000  # MLflow 3's limit on a param value
#: What torch.export and pickle raise for a model they cannot store (packed int8 weights, lambdas,
#: data-dependent control flow).
_UNSTORABLE = (pickle.PicklingError, AttributeError, TypeError, RuntimeError, NotImplementedError)


def _known_requirements(packages: tuple[str, ...]) -> None:
    """Tell MLflow which module each of ``packages`` provides before it logs a model.

    MLflow checks the model's listed requirements against the environment through a map of every
    installed distribution's files, which it builds on first use by reading them all (seconds in
    a large environment). kdexp lists its requirements itself, so a map of those few is enough.
    MLflow builds the full map if a later caller needs it (this only fills it while empty).
    """
    try:
        from mlflow.utils import requirements_utils
    except ImportError:  # pragma: no cover - layout of another MLflow version
        return
    if getattr(requirements_utils, "_MODULES_TO_PACKAGES", 0) is None:
        requirements_utils._MODULES_TO_PACKAGES = {n: [n] for n in packages}  # type: ignore[assignment]


def _reason(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else type(error).__name__


def _truncate(value: object) -> str:
    text = str(value)
    return text if len(text) <= _MAX_PARAM_CHARS else text[: _MAX_PARAM_CHARS - 3] + "..."


@contextmanager
def _quiet_pickling(serialization: str) -> Iterator[None]:
    """For a model that kdexp pickles because ``pt2`` cannot hold it: no MLflow warning advising
    ``pt2``, and no torch TypedStorage deprecation (raised by torch's own pickling of quantized
    tensors). Any other warning still shows."""
    if serialization != "pickle":
        yield
        return
    from kdexp.packed import quantized_storage_quietly

    logger = logging.getLogger("mlflow.pytorch")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with quantized_storage_quietly():
            yield
    finally:
        logger.setLevel(level)


class MlflowTracker(Tracker):
    """One MLflow run per job; ``uri`` null means SQLite at outputs/mlflow.db.

    ``log_model`` stores the final model with each run (:meth:`log_model`).
    """

    def __init__(
        self,
        uri: str | None = None,
        experiment: str = "kdexp",
        artifact_root: str | None = None,
        flush_every_s: float = 10.0,
        log_model: bool = True,
        system_metrics: bool = True,
        system_metrics_every_s: float = 10.0,
        register_model: str | None = None,
    ) -> None:
        self.uri = uri or default_uri()
        self.model_logging = log_model
        self.system_metrics = system_metrics
        self.system_metrics_every_s = system_metrics_every_s
        if register_model is not None and not log_model:
            raise ConfigError(
                "tracking.register_model",
                register_model,
                "null while tracking.log_model=false: only a logged model can be registered",
            )
        self.register_model = register_model
        self._monitor: object | None = None
        self._trained_for = False
        self._stepped: set[str] = set()  # metric keys logged at a step > 0
        self._keys: set[str] = set()  # every metric key logged (the saved view's chart sections)
        limit_http_retries(self.uri)
        self.experiment = experiment
        self.artifact_root = artifact_root
        self.flush_every_s = flush_every_s
        self._last_flush = time.monotonic()
        self.run_id: str | None = None
        self._client: MlflowClient | None = None
        self._buffer: list[Record] = []
        self._spool = Spool(None)
        self._retry_at, self._retry_s = 0.0, _RETRY_FIRST_S  # while the store is unreachable
        self._down_since: float | None = None
        self._logged: dict[str, int] = {}  # a resumed run's last logged step, per metric

    def _open_run(self) -> tuple[MlflowClient, str]:
        """The client and the id of the open run; a RuntimeError outside :meth:`run`."""
        if self._client is None or self.run_id is None:
            raise RuntimeError("MlflowTracker: no run is open; call this inside tracker.run(...)")
        return self._client, self.run_id

    def describe(self) -> str:
        """The store URI, the experiment and the run id, and the UI's runs page for them."""
        where = f"{self.uri} (experiment {self.experiment!r}, run {self.run_id})"
        try:
            from mlflow.tracking import MlflowClient

            client = MlflowClient(tracking_uri=self.uri)
            found = client.get_experiment_by_name(self.experiment)
        except Exception:  # the store is away: the line still says where the records wait
            return where
        if found is None:
            return where
        keys = set(self._keys)
        if self.system_metrics:  # MLflow's monitor logs system/* itself
            keys.add("system/cpu_utilization_percentage")
        view = publish_view(
            client, found.experiment_id, "kdexp", "kdexp: curves first", keys, existing=found.tags
        )
        page = runs_page(self.uri, found.experiment_id, view=view)
        return f"{where}\nkdexp: compare runs at {page}"

    @contextmanager
    def run(
        self,
        name: str,
        params: Mapping[str, object],
        tags: Mapping[str, str],
        *,
        resume_id: str | None = None,
        spool: Path | None = None,
    ) -> Iterator[MlflowTracker]:
        """Open the run (or reopen ``resume_id``), log params and tags, close FINISHED or FAILED.

        An unreachable http(s) server fails here within seconds. Later outages do not stop the
        run: records wait in ``spool`` and are sent when the server answers again, or by
        ``kdexp-sync``. A :class:`KeyboardInterrupt` closes the run KILLED.
        """
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException

        with phase("store"):  # the MLflow store's imports and schema check, the run's creation
            experiment_id = prepare_store(self.uri, self.experiment, self.artifact_root)
            self._client = client = mlflow_client(self.uri)
        if resume_id is None:
            run_id = client.create_run(experiment_id, run_name=name, tags=dict(tags)).info.run_id
        else:
            try:
                client.get_run(resume_id)
            except MlflowException:
                raise ConfigError(
                    "resume", resume_id, f"the id of a run in {self.uri}, or a checkpoint path"
                ) from None
            run_id = resume_id
            client.update_run(run_id, status="RUNNING")
        self.run_id = run_id
        self._trained_for = bool(tags.get("kdexp.trained_for"))
        # A resumed run logs no step twice; a heartbeat tells a live run from a dead one
        self._logged = logged_steps(client, run_id) if resume_id is not None else {}
        beat = Heartbeat(self.uri, run_id).start()
        self._spool = Spool(spool)
        self._spool.start(self.uri, self.experiment, run_id)
        status = "FAILED"
        try:
            if resume_id is None:
                items = [Param(k, _truncate(v)) for k, v in params.items()]
                for i in range(0, len(items), _MAX_PARAMS):
                    client.log_batch(run_id, params=items[i : i + _MAX_PARAMS])
            else:
                self.set_tags(tags)
            self._start_system_metrics(run_id, resumed=resume_id is not None)
            yield self
            status = "FINISHED"
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            beat.stop()
            self._stop_system_metrics()
            end = {"op": "status", "status": status, "end_time": int(time.time() * 1000)}
            self._spool.add(self._take_buffer() + [end])
            with phase("close"):
                self._deliver()
            if self._spool.pending:
                log.warning(
                    "tracking: %d records could not reach %s; they are kept in %s. Send them "
                    "with: kdexp-sync %s",
                    len(self._spool.pending),
                    self.uri,
                    spool,
                    spool.parent if spool else "(no spool file)",
                )

    def _start_system_metrics(self, run_id: str, resumed: bool) -> None:
        """MLflow's system metrics monitor for the run, unless ``system_metrics`` is off."""
        if self.system_metrics:
            self._monitor = start_system_metrics(
                self.uri, run_id, self.system_metrics_every_s, resumed
            )

    def _stop_system_metrics(self) -> None:
        monitor, self._monitor = self._monitor, None
        if monitor is not None:
            monitor.finish()  # type: ignore[attr-defined]

    def log_dataset(self, data: object, name: str, dataset_cfg: Mapping[str, object]) -> None:
        """Log the run's dataset as an MLflow dataset input (:func:`dataset_input`)."""
        client, run_id = self._open_run()
        try:
            client.log_inputs(run_id, datasets=[dataset_input(data, name, dataset_cfg)])
        except Exception as error:  # the store is away: the dataset is not worth failing for
            log.warning("tracking: the dataset input was not logged (%s)", _reason(error))

    def log_summary(self, metrics: Mapping[str, float], last_step: int) -> None:
        """Record end-of-run values: at step 0, where MLflow's UI draws a metric with no later
        step as a bar chart (one bar per run) instead of a one-point line chart; a key already
        logged at a later step during training goes at ``last_step``, so that it stays the
        metric's latest value."""
        summary = {k: v for k, v in metrics.items() if k not in self._stepped}
        self.log_metrics(summary, 0)
        self.log_metrics({k: v for k, v in metrics.items() if k in self._stepped}, last_step)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Buffer metric values at ``step``.

        They are sent every ``flush_every_s`` seconds, when 1,000 are waiting, and when the run
        closes: one database transaction per epoch would cost a tiny model a third of its speed.
        """
        now = int(time.time() * 1000)
        if step > 0:
            self._stepped.update(metrics)
        self._keys.update(metrics)
        logged = self._logged
        self._buffer.extend(
            {"m": [k, float(v), now, step]}
            for k, v in metrics.items()
            if not logged or step > logged.get(k, -1)  # a resumed run: not logged before
        )
        if (
            len(self._buffer) >= _MAX_METRICS
            or time.monotonic() - self._last_flush >= self.flush_every_s
        ):
            self._last_flush = time.monotonic()
            self._spool.add(self._take_buffer())
            if time.monotonic() >= self._retry_at:
                self._deliver()

    def _take_buffer(self) -> list[Record]:
        taken, self._buffer = self._buffer, []
        return taken

    def _deliver(self) -> None:
        """Send what the spool holds; on failure keep it, warn once, and back off."""
        client, run_id = self._open_run()
        try:
            self._spool.deliver(client, run_id)
        except Exception as error:  # the store is away (connection, timeout, locked database)
            if self._down_since is None:
                self._down_since = time.monotonic()
                log.warning(
                    "tracking: %s is unreachable (%s); training goes on, records wait in %s",
                    self.uri,
                    _reason(error),
                    self._spool.path or "memory",
                )
            self._retry_at = time.monotonic() + self._retry_s
            self._retry_s = min(2 * self._retry_s, _RETRY_MAX_S)
            return
        if self._down_since is not None:
            log.warning(
                "tracking: %s answers again after %.0f s; every record was sent",
                self.uri,
                time.monotonic() - self._down_since,
            )
        self._down_since, self._retry_s = None, _RETRY_FIRST_S

    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Add tags to the open run (queued behind unsent records while the store is away)."""
        self._open_run()
        self._spool.add([{"op": "tags", "tags": {k: str(v) for k, v in tags.items()}}])
        self._deliver()

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Upload a file, or a folder's files, under ``artifact_path`` in the run."""
        self._open_run()
        record = {"op": "artifact", "path": str(Path(path).resolve()), "artifact_path": None}
        record["artifact_path"] = artifact_path
        self._spool.add([record])
        self._deliver()

    def flush(self) -> None:
        """Send every buffered record now (they stay in the spool if the store is away)."""
        self._last_flush = time.monotonic()
        self._open_run()
        self._spool.add(self._take_buffer())
        self._deliver()

    @phase("model logging")
    def log_model(self, model: nn.Module, input_example: np.ndarray) -> None:
        """Log ``model`` as the run's MLflow model ``model``: ``runs:/<run id>/model`` loads it.

        A CPU copy in eval mode goes to ``mlflow.pytorch.log_model`` with the input example (and
        the signature inferred from it), exported with ``torch.export`` (``pt2``: loads back
        without kdexp). A model that ``torch.export`` cannot trace (eager int8 models with packed
        weights) is pickled instead, which needs kdexp importable to load. A model that neither
        way can store is not logged: a warning says why and the run still ends FINISHED, as it
        does when the store cannot take the model.
        """
        if not self.model_logging:
            return
        from importlib.metadata import version

        import mlflow
        import mlflow.pytorch
        from mlflow.entities import LoggedModelStatus
        from mlflow.exceptions import MlflowException

        from kdexp.packed import quantized_kind

        client, run_id = self._open_run()
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # log noise
        try:
            cpu = copy.deepcopy(model).cpu().eval()
        except (RuntimeError, TypeError, pickle.PicklingError) as error:
            log.warning("tracking: the model cannot be copied, so it is not logged (%s)", error)
            return
        previous = mlflow.get_tracking_uri()
        mlflow.set_tracking_uri(self.uri)  # log_model resolves the store from the global URI
        try:
            # Created here, in the run's experiment: log_model alone would file the model under
            # the fluent API's current experiment (Default), where runs:/<id>/model misses it.
            experiment_id = client.get_run(run_id).info.experiment_id
            _known_requirements(("torch", "mlflow"))
            failures = []
            formats = ["pt2", "pickle"]
            if quantized_kind(cpu.state_dict()) == "an int8 model":
                # torch.export cannot trace torch.ao's packed int8 parameters: no attempt, one line.
                formats = ["pickle"]
                failures.append("torch.export cannot trace torch.ao int8 modules")
            for serialization in formats:
                logged = client.create_logged_model(
                    experiment_id, name="model", source_run_id=run_id
                )
                try:
                    with _quiet_pickling(serialization):
                        mlflow.pytorch.log_model(
                            cpu,
                            name="model",
                            model_id=logged.model_id,
                            run_id=run_id,
                            input_example=input_example,
                            serialization_format=serialization,
                            # Listing them skips inference, which loads the model in a subprocess.
                            pip_requirements=[f"torch=={version('torch')}"],
                        )
                except _UNSTORABLE as error:  # torch.export or pickle refused this model
                    failures.append(f"{serialization}: {type(error).__name__}: {_reason(error)}")
                    client.delete_logged_model(logged.model_id)
                    continue
                client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
                self._register(logged.model_id)
                if failures:
                    log.info("tracking: model logged with pickle (%s)", failures[0])
                return
            log.warning(
                "tracking: %s can be neither exported nor pickled, so it is not logged as an "
                "MLflow model (%s); checkpoints/final.pt holds its weights",
                type(model).__name__,
                "; ".join(failures),
            )
        except (MlflowException, OSError) as error:
            log.warning("tracking: the model could not be logged to %s (%s)", self.uri, error)
        finally:
            mlflow.set_tracking_uri(previous)

    def _register(self, model_id: str) -> None:
        """A new version of the registered model ``register_model`` (created if missing) from
        the logged model; the run's ``kdexp.registered_model`` tag says which version."""
        if not self.register_model or self._trained_for:
            return  # a teacher or starting model trained on the way is not the result
        import mlflow

        client, run_id = self._open_run()
        version = mlflow.register_model(f"models:/{model_id}", self.register_model)
        client.set_tag(run_id, "kdexp.registered_model", f"{version.name}/{version.version}")
        log.info("tracking: registered as model %s version %s", version.name, version.version)

    @property
    def unsent(self) -> int:
        """How many records still wait for the store."""
        return len(self._spool.pending) + len(self._buffer)

    def find_finished(self, tags: Mapping[str, str]) -> str | None:
        """The newest FINISHED run of this experiment that carries all ``tags``."""
        client = mlflow_client(self.uri)
        experiment_id = prepare_store(self.uri, self.experiment, self.artifact_root)
        query = " and ".join(
            [f"tags.`{k}` = '{v}'" for k, v in tags.items()] + ["attributes.status = 'FINISHED'"]
        )
        found = client.search_runs(
            [experiment_id], query, max_results=1, order_by=["attributes.start_time DESC"]
        )
        return found[0].info.run_id if found else None

    def find_resumable(self, tags: Mapping[str, str]) -> str | None:
        """The newest KILLED or FAILED run of this experiment that carries all ``tags``, or a
        RUNNING one whose process is dead (:mod:`kdexp.tracking.liveness`)."""
        client = mlflow_client(self.uri)
        experiment_id = prepare_store(self.uri, self.experiment, self.artifact_root)
        query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
        found = client.search_runs(
            [experiment_id], query, max_results=100, order_by=["attributes.start_time DESC"]
        )
        stopped = [
            r
            for r in found
            if r.info.status in ("KILLED", "FAILED")
            or (r.info.status == "RUNNING" and is_dead(r.data.tags.get(HEARTBEAT_TAG)))
        ]
        return stopped[0].info.run_id if stopped else None

    def config_hashes_named(self, name: str) -> list[str]:
        """The ``kdexp.config_hash`` tag of each of this experiment's runs named ``name``."""
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=self.uri)
        experiment_id = prepare_store(self.uri, self.experiment, self.artifact_root)
        quoted = name.replace("'", "\\'")
        found = client.search_runs(
            [experiment_id], f"attributes.run_name = '{quoted}'", max_results=1000
        )
        return [r.data.tags.get("kdexp.config_hash", "") for r in found]

    def run_metrics(self, run_id: str) -> dict[str, float]:
        """The latest value of each metric of run ``run_id``."""
        return dict(mlflow_client(self.uri).get_run(run_id).data.metrics)

    def run_tag(self, run_id: str, tag: str, key: str) -> str | None:
        """The value of ``tag`` on run ``run_id``; a :class:`ConfigError` if there is no run."""
        from mlflow.exceptions import MlflowException

        limit_http_retries(self.uri)
        check_reachable(self.uri)
        try:
            run = mlflow_client(self.uri).get_run(run_id)
        except MlflowException:
            raise ConfigError(key, run_id, f"the id of a run in {self.uri}") from None
        return run.data.tags.get(tag)

    def fetch(self, source: str, paths: tuple[str, ...], destination: Path, key: str) -> Path:
        """The first of ``paths`` held by run ``source`` (an id or ``runs:/<id>[/path]``)."""
        from mlflow.exceptions import MlflowException

        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # log noise
        run_id, _, inner = source.removeprefix("runs:/").partition("/")
        candidates = (inner,) if inner else paths
        client = mlflow_client(self.uri)
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
