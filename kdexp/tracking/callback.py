"""Hydra callbacks around a multirun: the tracking store created before the jobs start, and the
sweep's parent run that lists its jobs."""

from __future__ import annotations

import atexit
import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig

try:
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover - hydra < 1.1
    Callback = object  # type: ignore[misc,assignment]


class PrepareTrackingStore(Callback):  # type: ignore[misc]
    """Creates the MLflow store and experiment once, in the parent process.

    Without it, parallel jobs (joblib, submitit) on a new SQLite file race on schema creation and
    on creating the experiment, and most of them die.
    """

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Prepare the store named by ``config.tracking`` unless tracking is off."""
        tracking = _mlflow_tracking(config)
        if tracking is None:
            return
        from kdexp.tracking.mlflow import prepare_store

        prepare_store(
            tracking.get("uri"), tracking.get("experiment", "kdexp"), tracking.get("artifact_root")
        )


def _mlflow_tracking(config: DictConfig) -> DictConfig | None:
    tracking = config.get("tracking")
    if tracking is None or not str(tracking.get("_target_", "")).endswith("MlflowTracker"):
        return None
    return tracking


def _close_if_running(uri: str | None, run_id: str, folder: Path) -> None:
    """At exit: a parent run still RUNNING ends FAILED (KILLED when the sweep was stopped)."""
    from mlflow.tracking import MlflowClient

    from kdexp.sweep import stop_requested
    from kdexp.tracking.mlflow import default_uri

    try:
        client = MlflowClient(tracking_uri=uri or default_uri())
        if client.get_run(run_id).info.status == "RUNNING":
            status = "KILLED" if stop_requested(folder) is not None else "FAILED"
            client.set_terminated(run_id, status=status)
    except Exception:  # the store is away: kdexp-stale finds the run dead later
        pass


class SweepRun(Callback):  # type: ignore[misc]
    """The sweep's parent run, and its table of jobs.

    Before the jobs start it opens a run named ``sweep-<sweep id>`` (tags ``sweep_id`` and
    ``kdexp.role=sweep``) and writes its id to ``<sweep dir>/sweep_run.json``, where every job
    finds it and tags itself ``mlflow.parentRunId``. At the end it writes ``sweep_jobs.csv`` and
    ``.md`` (one row per job: overrides, FINISHED / REUSED / FAILED, objective, run, error) into
    the sweep folder, logs them and the counts to the parent run, and closes it: FAILED when a job
    failed. Without MLflow only the table is written.
    """

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Open the parent run (MLflow only); SIGINT and SIGTERM stop the sweep from now on."""
        from kdexp.stopping import install_sweep_handler
        from kdexp.sweep import SWEEP_FILE, sweep_id
        from kdexp.tracking.liveness import heartbeat

        install_sweep_handler(Path(config.hydra.sweep.dir))
        tracking = _mlflow_tracking(config)
        if tracking is None:
            return
        from kdexp.tracking.mlflow import open_sweep_run

        folder = Path(config.hydra.sweep.dir)
        identifier = sweep_id(folder)
        tags = {
            "sweep_id": identifier,
            "kdexp.role": "sweep",
            "sweep_dir": str(folder.resolve()),
            "overrides": " ".join(config.hydra.overrides.task) or "(none)",
            "kdexp.heartbeat": heartbeat(every_s=0),  # the launching process: kdexp-stale
        }
        run_id = open_sweep_run(
            tracking.get("uri"),
            tracking.get("experiment", "kdexp"),
            tracking.get("artifact_root"),
            f"sweep-{identifier}",
            tags,
        )
        folder.mkdir(parents=True, exist_ok=True)
        (folder / SWEEP_FILE).write_text(json.dumps({"sweep_id": identifier, "run_id": run_id}))
        # Hydra calls on_multirun_end only when the sweep returns: a job config that does not
        # compose (an unknown option) raises in this process, and the parent would stay RUNNING.
        atexit.register(_close_if_running, tracking.get("uri"), run_id, folder)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Write the table of jobs; log it to the parent run and close that run."""
        from kdexp.sweep import jobs, parent_run, stop_requested, write_jobs_table

        folder = Path(config.hydra.sweep.dir)
        if not folder.is_dir():
            return
        rows = jobs(folder)
        objective = config.get("objective", "objective")
        names = [str(n) for n in objective] if isinstance(objective, ListConfig) else str(objective)
        paths = write_jobs_table(rows, folder, names)
        counts = {
            f"sweep/{status.lower()}": float(sum(r.status == status for r in rows))
            for status in ("FINISHED", "REUSED", "FAILED", "KILLED")
        }
        stopped = stop_requested(folder)
        counts["sweep/jobs"] = float(len(rows))
        run_id = parent_run(folder)
        tracking = _mlflow_tracking(config)
        if run_id is not None and tracking is not None:
            from kdexp.tracking.mlflow import close_sweep_run

            close_sweep_run(
                tracking.get("uri"), run_id, counts, paths, failed=counts["sweep/failed"] > 0
            )
            if stopped is not None:  # issue 16: a stopped sweep's parent run is KILLED
                from mlflow.tracking import MlflowClient

                from kdexp.tracking.mlflow import default_uri

                client = MlflowClient(tracking_uri=tracking.get("uri") or default_uri())
                client.set_terminated(run_id, status="KILLED")
        print(
            f"kdexp: sweep of {len(rows)} jobs: {int(counts['sweep/finished'])} finished, "
            f"{int(counts['sweep/reused'])} reused, {int(counts['sweep/failed'])} failed, "
            f"{int(counts['sweep/killed'])} stopped; jobs listed in {paths[1]}",
            flush=True,
        )
        if stopped is not None:
            import sys

            print(
                "kdexp: the sweep was stopped; run the same command with resume=auto to finish "
                "what is missing",
                file=sys.stderr,
                flush=True,
            )
            sys.exit(128 + stopped)
