"""Reading finished runs back out of MLflow, for reports."""

from __future__ import annotations

from dataclasses import dataclass, field

from kdexp.errors import ConfigError


@dataclass
class RunRecord:
    """One MLflow run as a report sees it: ids, tags, params, final metrics and some histories."""

    run_id: str
    name: str
    status: str
    tags: dict[str, str]
    params: dict[str, str]
    metrics: dict[str, float]
    histories: dict[str, list[tuple[int, float]]] = field(default_factory=dict)


def load_runs(
    uri: str,
    experiment: str,
    filter_string: str = "",
    histories: tuple[str, ...] = (),
    statuses: tuple[str, ...] = ("FINISHED",),
) -> list[RunRecord]:
    """The runs of ``experiment`` matching ``filter_string`` (MLflow's search syntax).

    ``histories`` names metrics whose whole history is read as well (``val/acc1``, ...).
    """
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        names = sorted(e.name for e in client.search_experiments())
        raise ConfigError("--experiment", experiment, f"one of the store's experiments: {names}")
    try:
        runs = client.search_runs([found.experiment_id], filter_string, max_results=50_000)
    except MlflowException as error:
        raise ConfigError("--filter", filter_string, f"MLflow's search syntax ({error})") from None
    records = []
    for run in runs:
        if run.info.status not in statuses:
            continue
        record = RunRecord(
            run_id=run.info.run_id,
            name=run.info.run_name or run.info.run_id,
            status=run.info.status,
            tags=dict(run.data.tags),
            params=dict(run.data.params),
            metrics=dict(run.data.metrics),
        )
        for key in histories:
            if key in record.metrics:
                history = client.get_metric_history(run.info.run_id, key)
                record.histories[key] = sorted((m.step, m.value) for m in history)
        records.append(record)
    return records


def log_report(uri: str, run_id: str, paths: list, artifact_path: str = "report") -> None:
    """Attach report files to an existing run (the sweep's parent run)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    for path in paths:
        client.log_artifact(run_id, str(path), artifact_path)
