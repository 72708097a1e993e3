"""Reading finished runs back out of MLflow, for reports."""

from __future__ import annotations

import itertools
import logging
import os
from dataclasses import dataclass, field
from typing import Any

from kdexp.errors import ConfigError
from kdexp.tracking.store import mlflow_client

log = logging.getLogger(__name__)


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
#: A database store (SQLite, PostgreSQL, MySQL, MSSQL) holding more matching runs than this is
#: read by several processes at once, :data:`PARALLEL_PAGE` runs to a request: MLflow builds every
#: param, tag and metric of a run as an ORM object, about 2.7 s of one core per 1,000 runs.
PARALLEL_FROM = 2_000
PARALLEL_PAGE = 1_000
#: At most this many reading processes (each imports MLflow, about 2 s, and holds ~250 MB).
MAX_READERS = 8


def load_runs(
    uri: str,
    experiment: str,
    filter_string: str = "",
    histories: tuple[str, ...] = (),
    statuses: tuple[str, ...] = ("FINISHED",),
) -> list[RunRecord]:
    """The runs of ``experiment`` matching ``filter_string`` (MLflow's search syntax), in
    MLflow's order (newest first).

    The store filters (``filter_string``, and the status when only one is asked for) and pages
    through the matches, :data:`PAGE_SIZE` runs per request: one request per page, not per run.
    From a database store with more than :data:`PARALLEL_FROM` matches, the pages are read by as
    many processes as there are cores (:func:`_read_in_parallel`). ``histories`` names metrics
    whose whole history is read as well (``val/acc1``, ...), one request per run and metric: read
    them only for the runs a report draws (:func:`load_histories`).
    """
    from mlflow.exceptions import MlflowException

    client = mlflow_client(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        names = sorted(e.name for e in client.search_experiments())
        raise ConfigError("--experiment", experiment, f"one of the store's experiments: {names}")
    query = filter_string
    if len(statuses) == 1:
        status = f"attributes.status = '{statuses[0]}'"
        query = f"{query} and {status}" if query else status
    try:
        readers = _readers(uri)
        if readers > 1 and _more_than(client, found.experiment_id, query, PARALLEL_FROM):
            records = _read_in_parallel(uri, found.experiment_id, query, statuses, readers)
        else:
            records = _read_pages(client, found.experiment_id, query, statuses)
    except MlflowException as error:
        raise ConfigError("--filter", filter_string, f"MLflow's search syntax ({error})") from None
    if histories:
        load_histories(uri, records, histories)
    return records


def _record(run: Any) -> RunRecord:
    return RunRecord(
        run_id=run.info.run_id,
        name=run.info.run_name or run.info.run_id,
        status=run.info.status,
        tags=dict(run.data.tags),
        params=dict(run.data.params),
        metrics=dict(run.data.metrics),
    )


def _read_pages(
    client: Any, experiment_id: str, query: str, statuses: tuple[str, ...]
) -> list[RunRecord]:
    """Every match, one request per :data:`PAGE_SIZE` runs, in this process."""
    records: list[RunRecord] = []
    token: str | None = None
    while True:
        page = client.search_runs([experiment_id], query, max_results=PAGE_SIZE, page_token=token)
        records.extend(_record(run) for run in page if run.info.status in statuses)
        token = page.token
        if not token:
            return records


def _readers(uri: str) -> int:
    """How many processes read a large store at ``uri``: one per core this process may use, for
    a database store; 1 for a tracking server (its own workers do the reading)."""
    from mlflow.store.db.db_types import DATABASE_ENGINES

    scheme = uri.partition(":")[0].partition("+")[0].lower()
    if scheme not in DATABASE_ENGINES:
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(cores or 1, MAX_READERS))


def _offset_token(offset: int) -> str | None:
    """The page token of MLflow's database store for the page that starts at ``offset``."""
    from mlflow.utils.search_utils import SearchUtils

    return SearchUtils.create_page_token(offset) if offset else None


def _more_than(client: Any, experiment_id: str, query: str, count: int) -> bool:
    """Whether more than ``count`` runs match: one request for the run after the first
    ``count`` (it also checks ``query``'s syntax)."""
    after = client.search_runs(
        [experiment_id], query, max_results=1, page_token=_offset_token(count)
    )
    return len(after) > 0


def _read_share(
    uri: str,
    experiment_id: str,
    query: str,
    statuses: tuple[str, ...],
    first: int,
    step: int,
    size: int,
) -> tuple[dict[int, list[RunRecord]], int]:
    """Pages ``first``, ``first + step``, ... of ``size`` runs, up to the first page
    that comes back short (the end of the matches): ``{page index: its records}`` and the index
    of that last page."""
    client = mlflow_client(uri)
    pages: dict[int, list[RunRecord]] = {}
    for index in itertools.count(first, step):
        page = client.search_runs(
            [experiment_id],
            query,
            max_results=size,
            page_token=_offset_token(index * size),
        )
        pages[index] = [_record(run) for run in page if run.info.status in statuses]
        if len(page) < size:
            return pages, index
    raise AssertionError("unreachable")  # pragma: no cover


#: What a reading process runs: its share of the pages, pickled to stdout.
_READER = (
    "import pickle, sys; from kdexp.tracking.query import _read_share; "
    "uri, experiment, query, statuses, *numbers = sys.argv[1:]; "
    "share = _read_share(uri, experiment, query, tuple(statuses.split(',')), "
    "*map(int, numbers)); sys.stdout.buffer.write(pickle.dumps(share, pickle.HIGHEST_PROTOCOL))"
)


def _read_in_parallel(
    uri: str, experiment_id: str, query: str, statuses: tuple[str, ...], readers: int
) -> list[RunRecord]:
    """Every match, read by ``readers`` processes, :data:`PARALLEL_PAGE` runs to a request.

    Reader ``i`` reads pages ``i``, ``i + readers``, ... (:func:`_read_share`); this process is
    reader 0, the others are new interpreters (``python -c``, with this process's ``sys.path``:
    nothing of the caller's main module is run again, as multiprocessing's spawn would, and no
    open database connection is shared, as a fork would). The pages are joined in order up to the
    first short one, so the result is the one :func:`_read_pages` gives. Should a reader fail,
    a warning says why and this process reads everything itself.
    """
    import pickle
    import subprocess
    import sys
    import tempfile

    spec = [uri, experiment_id, query, ",".join(statuses)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    children = []
    try:
        for first in range(1, readers):
            errors = tempfile.TemporaryFile()  # a pipe could fill up while this process reads
            numbers = [str(first), str(readers), str(PARALLEL_PAGE)]
            command = [sys.executable, "-c", _READER, *spec, *numbers]
            child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=errors, env=env)
            children.append((child, errors))
        pages, end = _read_share(uri, experiment_id, query, statuses, 0, readers, PARALLEL_PAGE)
        for child, errors in children:
            out, _ = child.communicate()
            if child.returncode != 0:
                errors.seek(0)
                lines = errors.read().decode(errors="replace").strip().splitlines() or ["?"]
                log.warning("a process reading %s failed (%s); reading it here", uri, lines[-1])
                return _read_pages(mlflow_client(uri), experiment_id, query, statuses)
            share, last = pickle.loads(out)
            pages.update(share)
            end = min(end, last)
    finally:
        for child, errors in children:
            if child.poll() is None:
                child.kill()
                child.wait()
            errors.close()
    return [record for index in sorted(pages) if index <= end for record in pages[index]]


def load_histories(uri: str, runs: list[RunRecord], keys: tuple[str, ...]) -> None:
    """Read the whole history of each metric of ``keys`` that each of ``runs`` logged, into its
    ``histories`` (a request per run and metric: meant for the few runs a plot draws)."""
    client = mlflow_client(uri)
    for record in runs:
        for key in keys:
            if key in record.metrics and key not in record.histories:
                history = client.get_metric_history(record.run_id, key)
                record.histories[key] = sorted((m.step, m.value) for m in history)


def log_report(uri: str, run_id: str, paths: list, artifact_path: str = "report") -> None:
    """Attach report files to an existing run (the sweep's parent run)."""
    client = mlflow_client(uri)
    for path in paths:
        client.log_artifact(run_id, str(path), artifact_path)
