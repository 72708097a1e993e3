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


#: Runs per search request: one page of a report's read (MLflow accepts up to 50,000).
PAGE_SIZE = 5_000


def load_runs(
    uri: str,
    experiment: str,
    filter_string: str = "",
    histories: tuple[str, ...] = (),
    statuses: tuple[str, ...] = ("FINISHED",),
) -> list[RunRecord]:
    """The runs of ``experiment`` matching ``filter_string`` (MLflow's search syntax).

    The store filters (``filter_string``, and the status when only one is asked for) and pages
    through the matches, :data:`PAGE_SIZE` runs per request: one request per page, not per run.
    ``histories`` names metrics whose whole history is read as well (``val/acc1``, ...), one
    request per run and metric: read them only for the runs a report draws
    (:func:`load_histories`).
    """
    from mlflow.exceptions import MlflowException

    from kdexp.tracking.mlflow import mlflow_client

    client = mlflow_client(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        names = sorted(e.name for e in client.search_experiments())
        raise ConfigError("--experiment", experiment, f"one of the store's experiments: {names}")
    query = filter_string
    if len(statuses) == 1:
        status = f"attributes.status = '{statuses[0]}'"
        query = f"{query} and {status}" if query else status
    records: list[RunRecord] = []
    token: str | None = None
    while True:
        try:
            page = client.search_runs(
                [found.experiment_id], query, max_results=PAGE_SIZE, page_token=token
            )
        except MlflowException as error:
            raise ConfigError(
                "--filter", filter_string, f"MLflow's search syntax ({error})"
            ) from None
        records.extend(
            RunRecord(
                run_id=run.info.run_id,
                name=run.info.run_name or run.info.run_id,
                status=run.info.status,
                tags=dict(run.data.tags),
                params=dict(run.data.params),
                metrics=dict(run.data.metrics),
            )
            for run in page
            if run.info.status in statuses
        )
        token = page.token
        if not token:
            break
    if histories:
        load_histories(uri, records, histories)
    return records


def load_histories(uri: str, runs: list[RunRecord], keys: tuple[str, ...]) -> None:
    """Read the whole history of each metric of ``keys`` that each of ``runs`` logged, into its
    ``histories`` (a request per run and metric: meant for the few runs a plot draws)."""
    from kdexp.tracking.mlflow import mlflow_client

    client = mlflow_client(uri)
    for record in runs:
        for key in keys:
            if key in record.metrics and key not in record.histories:
                history = client.get_metric_history(record.run_id, key)
                record.histories[key] = sorted((m.step, m.value) for m in history)


def log_report(uri: str, run_id: str, paths: list, artifact_path: str = "report") -> None:
    """Attach report files to an existing run (the sweep's parent run)."""
    from kdexp.tracking.mlflow import mlflow_client

    client = mlflow_client(uri)
    for path in paths:
        client.log_artifact(run_id, str(path), artifact_path)
