"""An append-only record of everything a run sends to MLflow, so that an outage loses nothing.

Every metric value, tag set, artifact and the final status is appended to a JSON-lines file in
the run's output folder (``tracking_spool.jsonl``) before it is sent. After each successful send a
``{"sent": n}`` line records that the first ``n`` records arrived. A record the store has not
acknowledged stays in the file: the run retries while it trains, and ``kdexp-sync <run dir>``
sends the rest later (see :func:`main`).

Lines: the header ``{"uri", "experiment", "run_id"}``; a metric ``{"m": [key, value,
timestamp_ms, step]}``; an operation ``{"op": "tags" | "artifact" | "status", ...}``; an
acknowledgement ``{"sent": n}``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

FILE_NAME = "tracking_spool.jsonl"
_MAX_METRICS = 1000

Record = dict[str, Any]


class Spool:
    """The records of one run not yet acknowledged, mirrored in a file when ``path`` is set."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.pending: list[Record] = []
        self.sent = 0  # records acknowledged so far, counted from the start of the file

    def _write(self, lines: Iterable[Record]) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.writelines(json.dumps(line) + "\n" for line in lines)

    def start(self, uri: str, experiment: str, run_id: str) -> None:
        """Write the header: where the records go."""
        self._write([{"uri": uri, "experiment": experiment, "run_id": run_id}])

    def add(self, records: list[Record]) -> None:
        """Append records to the file and to the queue of records to send."""
        if records:
            self._write(records)
            self.pending.extend(records)

    def deliver(self, client: MlflowClient, run_id: str) -> int:
        """Send the queue in order; return how many records went. Raises on the first failure,
        keeping what was not acknowledged queued."""
        delivered = 0
        while self.pending:
            chunk = _next_chunk(self.pending)
            _send(client, run_id, chunk)
            del self.pending[: len(chunk)]
            self.sent += len(chunk)
            delivered += len(chunk)
            self._write([{"sent": self.sent}])
        return delivered

    @classmethod
    def read(cls, path: Path) -> tuple[dict[str, str], Spool]:
        """The header of the spool file ``path`` and a spool queueing its unsent records."""
        header: dict[str, str] = {}
        records: list[Record] = []
        sent = 0
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                item = json.loads(line)
            except json.JSONDecodeError:  # a line cut short when the process died
                continue
            if "run_id" in item and not header:
                header = item
            elif "sent" in item:
                sent = max(sent, int(item["sent"]))
            elif "m" in item or "op" in item:
                records.append(item)
        spool = cls(path)
        spool.pending, spool.sent = records[sent:], sent
        return header, spool


def _next_chunk(pending: list[Record]) -> list[Record]:
    """Up to 1,000 consecutive metric records, or the single operation at the head."""
    if "op" in pending[0]:
        return pending[:1]
    chunk = []
    for record in pending[:_MAX_METRICS]:
        if "op" in record:
            break
        chunk.append(record)
    return chunk


def _send(client: MlflowClient, run_id: str, chunk: list[Record]) -> None:
    from mlflow.entities import Metric, RunTag

    op = chunk[0].get("op")
    if op is None:
        metrics = [Metric(k, float(v), int(t), int(s)) for k, v, t, s in (r["m"] for r in chunk)]
        client.log_batch(run_id, metrics=metrics)
    elif op == "tags":
        client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in chunk[0]["tags"].items()])
    elif op == "artifact":
        path, where = chunk[0]["path"], chunk[0].get("artifact_path")
        if Path(path).is_dir():
            client.log_artifacts(run_id, path, where)
        elif Path(path).is_file():
            client.log_artifact(run_id, path, where)
    elif op == "status":
        client.set_terminated(run_id, chunk[0]["status"], chunk[0].get("end_time"))
