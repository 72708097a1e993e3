"""MLflow beyond metrics and params: a sweep's parent run, the UI's runs page, the dataset as a
run input, and MLflow's system metrics monitor. Used by :mod:`kdexp.tracking.mlflow` and the
sweep callbacks; mlflow is imported lazily."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def open_sweep_run(
    uri: str | None,
    experiment: str,
    artifact_root: str | None,
    name: str,
    tags: Mapping[str, str],
) -> str:
    """Create a sweep's parent run (RUNNING) and return its id; its jobs nest under it."""
    from mlflow.tracking import MlflowClient

    from kdexp.tracking.store import default_uri, prepare_store

    uri = uri or default_uri()
    experiment_id = prepare_store(uri, experiment, artifact_root)
    run = MlflowClient(tracking_uri=uri).create_run(experiment_id, run_name=name, tags=dict(tags))
    return run.info.run_id


def close_sweep_run(
    uri: str | None,
    run_id: str,
    metrics: Mapping[str, float],
    paths: list[Path],
    status: str,
) -> None:
    """Log the sweep's job table and counts to its parent run and close it with ``status``
    (FINISHED, FAILED or KILLED)."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from kdexp.tracking.store import default_uri

    client = MlflowClient(tracking_uri=uri or default_uri())
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])
    for path in paths:
        client.log_artifact(run_id, str(path), "sweep")
    client.set_terminated(run_id, status=status)


def delete_run(uri: str | None, run_id: str) -> None:
    """Delete a run (a sweep's parent that no job ran under)."""
    from mlflow.tracking import MlflowClient

    from kdexp.tracking.store import default_uri

    MlflowClient(tracking_uri=uri or default_uri()).delete_run(run_id)


#: Metric names that are better low: a runs page sorted by one of them sorts ascending.
_LOWER_IS_BETTER = ("loss", "latency", "size", "params", "flops", "time")


def runs_page(
    uri: str, experiment_id: str, search: str | None = None, order_by: str | None = None
) -> str:
    """The URL of the experiment's runs table in the MLflow UI (``#/experiments/<id>/runs``;
    the experiment's own URL opens MLflow 3's GenAI overview).

    ``search`` is an MLflow filter (``tags.sweep_id = '...'``) and ``order_by`` a metric to sort
    by, best first. With either, the UI lists the runs flat instead of folded under their parent.
    For a tracking server the URL is on that server; for a SQLite store, on ``mlflow ui``'s
    default address, with the command that serves it.
    """
    from urllib.parse import quote, urlencode

    query = {}
    if search:
        query["searchFilter"] = search
    if order_by:
        query["orderByKey"] = f"metrics.`{order_by}`"
        query["orderByAsc"] = str(any(w in order_by for w in _LOWER_IS_BETTER)).lower()
    path = f"#/experiments/{experiment_id}/runs"
    if query:
        path += "?" + urlencode(query, quote_via=quote)
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/{path}"
    return f"http://127.0.0.1:5000/{path} (after: mlflow ui --backend-store-uri {uri})"


def count_samples(split: object) -> int | None:
    """How many samples a split holds (a TensorLoader's tensors, a DataLoader's dataset)."""
    for holder in (split, getattr(split, "dataset", None)):
        targets = getattr(holder, "targets", None)
        if targets is not None:
            try:
                return len(targets)
            except TypeError:
                pass
    dataset = getattr(split, "dataset", None)
    try:
        return len(dataset) if dataset is not None else None  # type: ignore[arg-type]
    except TypeError:
        return None


def dataset_input(data: object, name: str, dataset_cfg: Mapping[str, object]) -> Any:
    """The run's dataset as an MLflow ``DatasetInput`` (the run page's Dataset field).

    Name: the dataset option (``mnist``); source: its ``root`` folder, or the loader that makes
    it; digest: a hash of its config and split sizes (the data itself is not read again);
    profile: the split sizes, class count and input shape. Context ``training``.
    """
    from mlflow.entities import Dataset, DatasetInput, InputTag

    from kdexp.config import canonical, digest

    config = {k: v for k, v in dataset_cfg.items() if k != "_partial_"}
    sizes = {s: count_samples(getattr(data, s, None)) for s in ("train", "val", "test")}
    profile = {
        **{f"{split}_size": n for split, n in sizes.items() if n is not None},
        "num_classes": getattr(data, "num_classes", None),
        "input_shape": list(getattr(data, "input_shape", ()) or ()),
    }
    root = config.get("root")
    source = {"uri": str(Path(str(root)).expanduser().resolve())} if root else None
    entity = Dataset(
        name=name,
        digest=digest({"config": canonical(config), "sizes": sizes}),
        source_type="local" if source else "code",
        source=json.dumps(source or {"loader": str(config.get("_target_", name))}),
        profile=json.dumps(profile),
    )
    context = InputTag(key="mlflow.data.context", value="training")
    return DatasetInput(entity, tags=[context])


def start_system_metrics(uri: str, run_id: str, every_s: float, resumed: bool) -> Any | None:
    """Start MLflow's monitor of CPU, memory, disk, network (and GPU where present), logged as
    ``system/*`` metrics every ``every_s`` seconds (the run's System metrics tab); stop it with
    its ``finish()``. None, with a warning, where it cannot run (psutil missing)."""
    # MLflow's monitor says at INFO that it starts, stops, and skips a GPU there is not.
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(
            run_id, sampling_interval=every_s, resume_logging=resumed, tracking_uri=uri
        )
    except Exception as error:  # psutil missing, a monitor that fails to start
        log.warning("tracking: no system metrics (%s)", str(error).splitlines()[0][:200])
        return None
    monitor.start()
    return monitor
