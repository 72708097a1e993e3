"""Multiruns: every job records its outcome in its folder, a failing job does not stop the sweep,
and at the end the sweep's jobs are listed (:func:`write_jobs_table`) and the failures reported
(:class:`ReportFailedJobs`).

Each job of a multirun carries the sweep's ``sweep_id`` tag and, when MLflow tracks it, the
sweep's parent run as ``mlflow.parentRunId`` (:class:`kdexp.tracking.callback.SweepRun` opens
that run before the jobs start and writes its id to ``<sweep dir>/sweep_run.json``).
"""

from __future__ import annotations

import csv
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from kdexp.tables import markdown_table

try:
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover - hydra < 1.1
    Callback = object  # type: ignore[misc,assignment]

FAILURE_FILE = "failed.txt"
JOB_FILE = "job.json"
SWEEP_FILE = "sweep_run.json"
#: In a sweep's folder: written when the sweep is stopped (it holds the signal's number); every
#: job polls it and stops KILLED and resumable, and jobs not yet begun do not begin.
STOP_FILE = "stop_requested"
#: In a job's folder: how many times the job was requeued (SLURM time limit or preemption).
REQUEUE_FILE = "requeued.json"


def sweep_id(sweep_dir: Path) -> str:
    """The sweep's id: its folder's last two parts (``<date>_<time>`` for the default folders)."""
    return "_".join(Path(sweep_dir).resolve().parts[-2:])


def parent_run(sweep_dir: Path) -> str | None:
    """The id of the sweep's parent run, if one was opened for it."""
    path = Path(sweep_dir) / SWEEP_FILE
    return json.loads(path.read_text())["run_id"] if path.is_file() else None


def _hydra_dirs() -> tuple[Path, Path] | None:
    """(sweep folder, job folder) of the current multirun job, or None outside one."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    hc = HydraConfig.get()
    return Path(hc.sweep.dir), Path(hc.runtime.output_dir)


def stop_file() -> Path | None:
    """The file whose appearance stops the current sweep's jobs; None outside a multirun."""
    dirs = _hydra_dirs()
    return dirs[0] / STOP_FILE if dirs else None


def request_stop(sweep_dir: Path, signum: int) -> None:
    """Ask every job of the sweep to stop (see :data:`STOP_FILE`)."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    path = sweep_dir / STOP_FILE
    if not path.is_file():
        path.write_text(str(int(signum)))


def stop_requested(sweep_dir: Path) -> int | None:
    """The signal that stopped the sweep, or None if it was not stopped."""
    path = Path(sweep_dir) / STOP_FILE
    if not path.is_file():
        return None
    text = path.read_text().strip()
    return int(text) if text.isdigit() else 15


def requeues(job_dir: Path) -> int:
    """How many times the job in ``job_dir`` was requeued."""
    path = Path(job_dir) / REQUEUE_FILE
    return int(json.loads(path.read_text())["count"]) if path.is_file() else 0


def record_requeue(job_dir: Path) -> int:
    """Count one more requeue of the job in ``job_dir``; return the count."""
    count = requeues(job_dir) + 1
    job_dir.mkdir(parents=True, exist_ok=True)
    (job_dir / REQUEUE_FILE).write_text(json.dumps({"count": count}))
    return count


def requeue_tags() -> dict[str, str]:
    """``kdexp.requeued``: how many times the current job was requeued, when it was."""
    dirs = _hydra_dirs()
    count = requeues(dirs[1]) if dirs else 0
    return {"kdexp.requeued": str(count)} if count else {}


def requeued_checkpoint(out_dir: Path) -> Path | None:
    """In a job that was requeued, the training state it left in ``out_dir`` (its own folder or
    a sub-run's, a teacher's say): the job carries on from it with no ``resume=`` typed."""
    dirs = _hydra_dirs()
    if dirs is None or not requeues(dirs[1]):
        return None
    path = Path(out_dir) / "checkpoints" / "last.pt"
    return path.resolve() if path.is_file() else None


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def record_job(
    job_dir: Path,
    overrides: list[str],
    run_id: str | None,
    objective: float | list[float],
    reused: bool,
    pruned: bool = False,
) -> None:
    """Write a finished job's outcome to ``<job dir>/job.json`` for the sweep's table.

    ``objective`` is one value, or a list of them for a multi-objective sweep. Status: PRUNED
    (a search trial its pruner stopped, :mod:`kdexp.search`), REUSED or FINISHED.
    """
    job_dir.mkdir(parents=True, exist_ok=True)
    record = {
        "overrides": " ".join(overrides),
        "status": "PRUNED" if pruned else "REUSED" if reused else "FINISHED",
        "run_id": run_id,
        "objective": (
            [_finite(v) for v in objective] if isinstance(objective, list) else _finite(objective)
        ),
    }
    (job_dir / JOB_FILE).write_text(json.dumps(record))


def record_stopped(job_dir: Path, overrides: list[str], run_id: str | None, message: str) -> None:
    """Write a job stopped by a signal (KILLED, resumable) to ``<job dir>/job.json``."""
    job_dir.mkdir(parents=True, exist_ok=True)
    record = {
        "overrides": " ".join(overrides),
        "status": "KILLED",
        "run_id": run_id,
        "objective": None,
        "message": message,
    }
    (job_dir / JOB_FILE).write_text(json.dumps(record))


@dataclass
class JobRow:
    """One job of a sweep as its table shows it."""

    job: str
    overrides: str
    status: str
    objective: float | list[float | None] | None
    run_id: str
    message: str
    requeued: int = 0


def jobs(sweep_dir: Path) -> list[JobRow]:
    """Every job of a sweep that finished, was reused or failed, in job order."""
    rows = []
    for folder in sorted((p for p in Path(sweep_dir).iterdir() if p.is_dir()), key=_job_order):
        if (folder / JOB_FILE).is_file():
            record = json.loads((folder / JOB_FILE).read_text())
            rows.append(
                JobRow(
                    folder.name,
                    record["overrides"],
                    record["status"],
                    record["objective"],
                    record["run_id"] or "",
                    record.get("message", ""),
                    requeues(folder),
                )
            )
        elif (folder / FAILURE_FILE).is_file():
            overrides, _, message = (folder / FAILURE_FILE).read_text().partition("\n")
            row = JobRow(folder.name, overrides, "FAILED", None, "", message.strip())
            row.requeued = requeues(folder)
            rows.append(row)
    return rows


def _values(objective: float | list[float | None] | None, count: int) -> list[str]:
    """``count`` table cells for a job's objective value(s); empty where there is none."""
    values = objective if isinstance(objective, list) else [objective]
    cells = ["" if v is None else f"{v:.6g}" for v in values]
    return cells + [""] * (count - len(cells))


def write_jobs_table(rows: list[JobRow], folder: Path, objective: str | list[str]) -> list[Path]:
    """``sweep_jobs.csv`` and ``sweep_jobs.md``: one row per job (overrides, status, objective,
    one column per metric when ``objective`` lists several, run, error, times requeued)."""
    names = objective if isinstance(objective, list) else [objective]
    header = ["job", "overrides", "status", *names, "run", "error", "requeued"]
    cells = [
        [
            r.job,
            r.overrides,
            r.status,
            *_values(r.objective, len(names)),
            r.run_id,
            r.message,
            str(r.requeued),
        ]
        for r in rows
    ]
    folder.mkdir(parents=True, exist_ok=True)
    table = folder / "sweep_jobs.csv"
    with open(table, "w", newline="") as handle:
        csv.writer(handle).writerows([header, *cells])
    markdown = folder / "sweep_jobs.md"
    markdown.write_text(markdown_table(header, cells))
    return [table, markdown]


def record_failure(job_dir: Path, overrides: list[str], message: str) -> None:
    """Write the job's overrides and its error message to ``<job dir>/failed.txt``."""
    job_dir.mkdir(parents=True, exist_ok=True)
    (job_dir / FAILURE_FILE).write_text(" ".join(overrides) + "\n" + message + "\n")


def failures(sweep_dir: Path) -> list[tuple[str, str, str]]:
    """(job folder, overrides, message) of every failed job of a sweep, in job order."""
    found = []
    for path in sorted(sweep_dir.glob(f"*/{FAILURE_FILE}"), key=lambda p: _job_order(p.parent)):
        overrides, _, message = path.read_text().partition("\n")
        found.append((path.parent.name, overrides, message.strip()))
    return found


def _job_order(folder: Path) -> tuple[int, str]:
    return (int(folder.name), "") if folder.name.isdigit() else (sys.maxsize, folder.name)


class ReportFailedJobs(Callback):  # type: ignore[misc]
    """At the end of a multirun, list the failed jobs and exit with status 1 if there are any."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Print one line per failed job (its overrides and error); exit 1 when any failed."""
        found = failures(Path(config.hydra.sweep.dir))
        if not found:
            return
        lines = [f"kdexp: {len(found)} job(s) of the sweep failed:"]
        lines += [f"  #{job} {overrides}: {message}" for job, overrides, message in found]
        print("\n".join(lines), file=sys.stderr, flush=True)
        sys.exit(1)
