"""Multiruns that survive failing jobs: each failure is recorded in its job folder, the sweep goes
on, and at its end :class:`ReportFailedJobs` says which jobs failed and why."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

try:
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover - hydra < 1.1
    Callback = object  # type: ignore[misc,assignment]

FAILURE_FILE = "failed.txt"


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
