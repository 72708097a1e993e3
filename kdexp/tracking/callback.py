"""Hydra callbacks around a multirun: the tracking store created before the jobs start, and the
sweep's parent run that lists its jobs."""

from __future__ import annotations

import atexit
import json
import shlex
import shutil
import sys
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
        from kdexp.tracking.store import prepare_store

        prepare_store(
            tracking.get("uri"), tracking.get("experiment", "kdexp"), tracking.get("artifact_root")
        )


def _mlflow_tracking(config: DictConfig) -> DictConfig | None:
    tracking = config.get("tracking")
    if tracking is None or not str(tracking.get("_target_", "")).endswith("MlflowTracker"):
        return None
    return tracking


_Pending = tuple[DictConfig, Any, str, Path, bool]


class SweepRun(Callback):  # type: ignore[misc]
    """The sweep's parent run, and its table of jobs.

    Before the jobs start it opens a run named ``sweep-<sweep id>`` (tags ``sweep_id`` and
    ``kdexp.role=sweep``) and writes its id to ``<sweep dir>/sweep_run.json``, where every job
    finds it and tags itself ``mlflow.parentRunId``; a kdexp_optuna sweep's parent also names its
    study (tags ``optuna.study``, ``optuna.storage``). At the end it writes ``sweep_jobs.csv`` and
    ``.md`` (one row per job: overrides, FINISHED / REUSED / PRUNED / FAILED, objective, run,
    error) into the sweep folder, logs them and the counts to the parent run, and closes it:
    FAILED when a job failed. Without MLflow only the table is written.
    """

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Open the parent run (MLflow only); SIGINT and SIGTERM stop the sweep from now on.

        The launching process's garbage collector, off since it started, is turned back on
        (:func:`kdexp.timings.resume_gc`): a sweep may wait on its jobs for days.
        """
        from kdexp.timings import resume_gc

        try:
            self._open(config)
        finally:
            resume_gc()

    def _open(self, config: DictConfig) -> None:
        from kdexp.search import sweep_tags
        from kdexp.stopping import install_sweep_handler
        from kdexp.sweep import SWEEP_FILE, sweep_id
        from kdexp.tracking.liveness import heartbeat

        install_sweep_handler(Path(config.hydra.sweep.dir))
        tracking = _mlflow_tracking(config)
        if tracking is None:
            return
        from kdexp.naming import NOTE_TAG, sweep_name, swept_keys
        from kdexp.tracking.extras import open_sweep_run

        folder = Path(config.hydra.sweep.dir)
        identifier = sweep_id(folder)
        overrides = [str(o) for o in config.hydra.overrides.task]
        command = " ".join(["kdexp", "-m", *(shlex.quote(o) for o in overrides)])
        tags = {
            "sweep_id": identifier,
            "kdexp.role": "sweep",
            "sweep_dir": str(folder.resolve()),
            "overrides": " ".join(overrides) or "(none)",
            NOTE_TAG: f"`{command}`\n\nSweep `{identifier}` ({folder.resolve()}).",
            "kdexp.heartbeat": heartbeat(every_s=0),  # the launching process: kdexp-stale
            **sweep_tags(config),  # the Optuna study of a kdexp_optuna sweep
        }
        existed = folder.is_dir()
        run_id = open_sweep_run(
            tracking.get("uri"),
            tracking.get("experiment", "kdexp"),
            tracking.get("artifact_root"),
            sweep_name(overrides),
            tags,
        )
        folder.mkdir(parents=True, exist_ok=True)
        record = {"sweep_id": identifier, "run_id": run_id, "swept": swept_keys(overrides)}
        (folder / SWEEP_FILE).write_text(json.dumps(record))
        # Hydra calls no callback when a sweep stops before or between its jobs (a job's config
        # that fails to compose, Ctrl-C): this closes the parent run and tidies the folder then.
        self._pending: _Pending | None = (config, tracking.get("uri"), run_id, folder, existed)
        atexit.register(self.abandon)

    def abandon(self) -> None:
        """Clean up after a sweep that stopped without :meth:`on_multirun_end`: a parent run with
        no jobs is deleted with the sweep's folder (when this sweep created it); one with jobs
        gets their table and is closed FAILED. Does nothing after a normal end."""
        pending, self._pending = getattr(self, "_pending", None), None
        if pending is None:
            return
        config, uri, run_id, folder, existed = pending
        from kdexp.sweep import jobs

        if folder.is_dir() and jobs(folder):
            self._end(config, failed=True)
            return
        from kdexp.tracking.extras import delete_run

        delete_run(uri, run_id)
        if not existed:
            shutil.rmtree(folder, ignore_errors=True)
            for empty in (folder.parent, folder.parent.parent):  # <date>/, then multirun/
                try:
                    empty.rmdir()  # only when this sweep was all they held
                except OSError:
                    break

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Write the table of jobs; log it to the parent run and close that run. A sweep stopped
        by SIGINT or SIGTERM exits with 128 + the signal's number."""
        self._pending = None
        stopped = self._end(config, failed=False)
        if stopped is not None:
            print(
                "kdexp: the sweep was stopped; run the same command with resume=auto to finish "
                "what is missing",
                file=sys.stderr,
                flush=True,
            )
            sys.exit(128 + stopped)

    def _end(self, config: DictConfig, failed: bool) -> int | None:
        """Close the sweep: its table, counts and parent run (KILLED when it was stopped,
        FAILED when a job failed). Returns the signal that stopped it, if one did."""
        from kdexp.sweep import jobs, parent_run, stop_requested, write_jobs_table

        folder = Path(config.hydra.sweep.dir)
        if not folder.is_dir():
            return None
        rows = jobs(folder)
        objective = config.get("objective", "objective")
        names = [str(n) for n in objective] if isinstance(objective, ListConfig) else str(objective)
        paths = write_jobs_table(rows, folder, names)
        counts = {
            f"sweep/{status.lower()}": float(sum(r.status == status for r in rows))
            for status in ("FINISHED", "REUSED", "PRUNED", "FAILED", "KILLED")
        }
        stopped = stop_requested(folder)
        counts["sweep/jobs"] = float(len(rows))
        run_id = parent_run(folder)
        tracking = _mlflow_tracking(config)
        if run_id is not None and tracking is not None:
            from kdexp.tracking.extras import close_sweep_run

            failed = failed or counts["sweep/failed"] > 0
            status = "KILLED" if stopped is not None else "FAILED" if failed else "FINISHED"
            close_sweep_run(tracking.get("uri"), run_id, counts, paths, status)
        pruned, killed = int(counts["sweep/pruned"]), int(counts["sweep/killed"])
        print(
            f"kdexp: sweep of {len(rows)} jobs: {int(counts['sweep/finished'])} finished, "
            f"{int(counts['sweep/reused'])} reused, {f'{pruned} pruned, ' if pruned else ''}"
            f"{int(counts['sweep/failed'])} failed{f', {killed} stopped' if killed else ''}; "
            f"jobs listed in {paths[1]}",
            flush=True,
        )
        if run_id is not None and tracking is not None:
            _print_next_steps(tracking, run_id, folder, names)
        return stopped


def _print_next_steps(
    tracking: DictConfig, run_id: str, folder: Path, objective: str | list[str]
) -> None:
    """Where to compare the sweep's runs: the UI's runs page, and the kdexp-report command."""
    from kdexp.sweep import sweep_id
    from kdexp.tracking.extras import publish_view, runs_page
    from kdexp.tracking.store import default_uri

    uri = tracking.get("uri") or default_uri()
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        parent = client.get_run(run_id)
    except Exception:  # the store is away: the table above is what there is
        return
    experiment_id = parent.info.experiment_id
    identifier = sweep_id(folder)
    search = f"tags.sweep_id = '{identifier}'"
    order_by = objective if isinstance(objective, str) else objective[0]
    name = parent.info.run_name or f"sweep {identifier}"
    try:  # the view's chart sections: one per metric prefix the sweep's runs logged
        runs = client.search_runs([experiment_id], search, max_results=5000)
        keys = {key for run in runs for key in run.data.metrics}
    except Exception:
        keys = set()
    view = publish_view(client, experiment_id, f"sweep-{identifier}", name, keys, search, order_by)
    command = ["kdexp-report", "--sweep", identifier]
    if tracking.get("uri"):
        command += ["--tracking-uri", str(uri)]
    if tracking.get("experiment", "kdexp") != "kdexp":
        command += ["--experiment", str(tracking.get("experiment"))]
    print(
        "kdexp: compare the sweep's runs at "
        + runs_page(uri, experiment_id, search=search, order_by=order_by, view=view)
        + "\n"
        f"kdexp: tables and plots: {' '.join(shlex.quote(w) for w in command)}",
        flush=True,
    )
