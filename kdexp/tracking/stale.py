"""``kdexp-stale``: mark RUNNING runs whose process is dead FAILED (:mod:`kdexp.tracking.liveness`).

A run killed without a clean stop (kill -9, out of memory, a lost node) stays RUNNING in MLflow.
This finds such runs, all of an experiment's or one sweep's, and closes them FAILED with a
``kdexp.stale`` tag saying why; ``resume=auto`` can still carry them on from their checkpoint.
"""

from __future__ import annotations

import argparse
import sys
import time

from kdexp.tracking.liveness import HEARTBEAT_TAG, STALE_AFTER_S, is_dead
from kdexp.tracking.mlflow import check_reachable, default_uri, limit_http_retries


def mark_stale(
    uri: str,
    experiment: str,
    sweep: str | None = None,
    stale_after_s: float = STALE_AFTER_S,
    dry_run: bool = False,
) -> list[str]:
    """Close every dead RUNNING run (of ``sweep`` only, when given) FAILED; return their ids."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    query = "attributes.status = 'RUNNING'"
    if sweep is not None:
        query += f" and tags.sweep_id = '{sweep}'"
    marked = []
    for run in client.search_runs([found.experiment_id], query, max_results=50_000):
        beat = run.data.tags.get(HEARTBEAT_TAG)
        if not is_dead(beat, stale_after_s):
            continue
        marked.append(run.info.run_id)
        if not dry_run:
            why = f"process dead or heartbeat stale (last: {beat}); marked by kdexp-stale"
            client.set_tag(run.info.run_id, "kdexp.stale", why)
            client.set_terminated(
                run.info.run_id, status="FAILED", end_time=int(time.time() * 1000)
            )
    return marked


def main(argv: list[str] | None = None) -> int:
    """``kdexp-stale [--sweep ID]``: mark dead RUNNING runs FAILED."""
    parser = argparse.ArgumentParser(
        prog="kdexp-stale",
        description="Mark FAILED the RUNNING runs whose process is dead: on this host, its pid is "
        "gone; anywhere, its kdexp.heartbeat tag is older than --stale-after seconds.",
    )
    parser.add_argument("--uri", help="tracking URI (default: sqlite:///outputs/mlflow.db here)")
    parser.add_argument("--experiment", default="kdexp")
    parser.add_argument("--sweep", help="only the runs of this sweep_id (and its parent run)")
    parser.add_argument("--stale-after", type=float, default=STALE_AFTER_S, metavar="SECONDS")
    parser.add_argument("--dry-run", action="store_true", help="list them, change nothing")
    args = parser.parse_args(argv)
    uri = args.uri or default_uri()
    limit_http_retries(uri)
    try:
        check_reachable(uri)
    except ValueError as error:
        print(f"kdexp-stale: error: {error}", file=sys.stderr)
        return 2
    marked = mark_stale(uri, args.experiment, args.sweep, args.stale_after, args.dry_run)
    verb = "would mark" if args.dry_run else "marked"
    print(
        f"kdexp-stale: {verb} {len(marked)} dead RUNNING run(s) FAILED"
        + "".join(f"\n  {run_id}" for run_id in marked)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
