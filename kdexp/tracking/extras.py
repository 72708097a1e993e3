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
    uri: str,
    experiment_id: str,
    search: str | None = None,
    order_by: str | None = None,
    view: str | None = None,
) -> str:
    """The URL of the experiment's runs page in the MLflow UI (``#/experiments/<id>/runs``;
    the experiment's own URL opens MLflow 3's GenAI overview).

    With ``view``, the key of a saved view (:func:`publish_view`), the page opens on its charts
    with that view's runs and section order. Otherwise ``search`` is an MLflow filter
    (``tags.sweep_id = '...'``) and ``order_by`` a metric to sort by, best first; with either, the
    UI lists the runs flat instead of folded under their parent. For a tracking server the URL is
    on that server; for a SQLite store, on ``mlflow ui``'s default address, with the command that
    serves it.
    """
    from urllib.parse import quote, urlencode

    query: dict[str, str] = {}
    if view:  # a search facet in the URL would make the UI ignore the view
        query = {"viewStateShareKey": view, "compareRunsMode": "CHART"}
    else:
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


#: The chart sections of kdexp's saved views, in order: the curves (metrics logged every step or
#: epoch), then the end-of-run values (bar charts), then MLflow's system metrics. A section not
#: listed (a method's own prefix) goes just before the system metrics.
CHART_SECTIONS = (
    "train",
    "val",
    "sparsity",
    "Model metrics",  # MLflow's section of keys without a prefix: epoch, epoch_time_s
    "test",
    "best",
    "last",
    "teacher",
    "model",
    "prune",
    "quant",
    "onnx",
    "sweep",
    "System metrics",
)

#: MLflow 3's UI keeps a saved view of its runs page in an experiment tag of this prefix; the
#: page opens it with ``?viewStateShareKey=<the rest of the key>``.
VIEW_TAG = "mlflow.sharedViewState."


def chart_section(key: str) -> str:
    """The chart section MLflow's UI puts a metric in: its prefix up to the last ``/``, "Model
    metrics" for a key without one, "System metrics" for ``system/*``."""
    if key.startswith("system/"):
        return "System metrics"
    return key.rpartition("/")[0] or "Model metrics"


def _section_rank(section: str) -> tuple[float, str]:
    if section in CHART_SECTIONS:
        return float(CHART_SECTIONS.index(section)), section
    return len(CHART_SECTIONS) - 1.5, section  # unknown: after the known, before system metrics


def saved_view(
    name: str,
    sections: set[str],
    search: str | None = None,
    order_by: str | None = None,
    now_ms: int | None = None,
) -> str:
    """The value of an MLflow saved view (experiment tag :data:`VIEW_TAG` + key): the runs
    page's chart ``sections`` in :data:`CHART_SECTIONS` order, kept in that order
    (``isAccordionReordered``) instead of MLflow's alphabetical one, so that the first screen of
    charts holds the curves; and, with ``search`` / ``order_by``, the runs it lists.

    The envelope (name, createdAt, updatedAt, and the state as a JSON string) is the one MLflow
    3.17's UI writes for the views it saves. Charts are left to the UI, which adds one per metric
    to its section: a line chart for a metric logged at several steps, a bar chart for an
    end-of-run value.
    """
    state: dict[str, Any] = {
        "compareRunSections": [
            {
                "uuid": f"kdexp-{section}",
                "name": section,
                "display": True,
                "isReordered": False,
                "deleted": False,
                "isGenerated": True,
            }
            for section in sorted(sections, key=_section_rank)
        ],
        "compareRunCharts": [],
        "isAccordionReordered": True,
    }
    if search:
        state["searchFilter"] = search
    if order_by:
        state["orderByKey"] = f"metrics.`{order_by}`"
        state["orderByAsc"] = any(w in order_by for w in _LOWER_IS_BETTER)
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    envelope = {"name": name, "createdAt": now_ms, "updatedAt": now_ms, "state": json.dumps(state)}
    return json.dumps(envelope)


def view_sections(value: str) -> set[str]:
    """The chart sections a saved view (the tag's value) lists; empty if it cannot be read."""
    try:
        state = json.loads(json.loads(value)["state"])
        return {section["name"] for section in state["compareRunSections"]}
    except (ValueError, KeyError, TypeError):
        return set()


def publish_view(
    client: Any,
    experiment_id: str,
    key: str,
    name: str,
    metric_keys: set[str],
    search: str | None = None,
    order_by: str | None = None,
    existing: Mapping[str, str] | None = None,
) -> str | None:
    """Save :func:`saved_view` in the experiment under ``key`` (listed in the UI's saved views),
    with a section for each of ``metric_keys`` and every section it had; return ``key``, or None
    where the store refused it (the caller links the plain runs page). ``existing``, the
    experiment's tags, skips the write when the view there already has every section.
    """
    tag = VIEW_TAG + key
    sections = {chart_section(k) for k in metric_keys}
    if existing is not None and tag in existing:
        had = view_sections(existing[tag])
        if sections <= had:
            return key
        sections |= had
    try:
        client.set_experiment_tag(experiment_id, tag, saved_view(name, sections, search, order_by))
    except Exception as error:  # a read-only store or an older server: the plain link stays
        log.debug("saved view %s not written: %s", key, error)
        return None
    return key


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
