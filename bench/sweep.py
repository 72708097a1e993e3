"""Wall time of an 8-job sweep run one job after another vs two at a time with joblib.

Usage: ``python bench/sweep.py [--repeats N] [--oversubscribed] [extra overrides...]``. In one
invocation the same sweep of 8 tiny jobs (digits, the default 256-256 MLP, method=baseline,
2 epochs, seed=1..8) runs through ``python -m kdexp -m`` with Hydra's basic launcher (every job in
the one process) and with ``hydra/launcher=joblib hydra.launcher.n_jobs=2`` (two worker
processes), alternately, each time in a fresh folder with its own SQLite store (created before
the clock starts). It prints each wall time, the torch thread count the jobs ran with and the
ratio to the basic launcher; each sweep's 8 MLflow runs are checked FINISHED.
``--oversubscribed`` also times joblib with as many torch threads per job as cores.
Extra overrides apply to every sweep and win over the defaults above (``schedule.epochs=30``
gives each job more to do). Targets (issue 15): joblib/basic at most 0.75 on 2 cores for
2-epoch jobs, 0.6 for 20-epoch ones.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

from kdexp.tracking.store import prepare_store

JOBS = 8
SWEEP = [
    "-m",
    f"seed={','.join(str(seed) for seed in range(1, JOBS + 1))}",
    "method=baseline",
    "schedule.epochs=2",
    "latency_repeats=5",
    "tracking.experiment=bench",
]
BASIC = "basic (sequential)"
PARALLEL = "joblib n_jobs=2"
JOBLIB = ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]
#: name: (launcher overrides, environment). joblib's loky workers get OMP_NUM_THREADS and
#: MKL_NUM_THREADS = cores // n_jobs unless the parent sets them (torch reads both): the last
#: variant sets them to every core, as a process per job gets by default.
_THREADS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
VARIANTS = {
    BASIC: ([], {}),
    PARALLEL: (JOBLIB, {}),
    "joblib n_jobs=2, oversubscribed": (JOBLIB, {var: str(os.cpu_count()) for var in _THREADS}),
}


def _sweep(launcher: list[str], extra: list[str], env: dict[str, str]) -> tuple[float, set[str]]:
    """Run the sweep in a fresh folder; return its wall time, after checking its 8 runs, and the
    torch thread counts its jobs ran with."""
    with tempfile.TemporaryDirectory(prefix="kdexp-bench-") as folder:
        db = Path(folder) / "mlflow.db"
        # Creating a new SQLite store (MLflow's schema migrations) takes seconds and is the same
        # for every launcher: done before the clock starts, as for any store already in use.
        prepare_store(f"sqlite:///{db}", "bench")
        args = [*SWEEP, *launcher, f"tracking.uri=sqlite:///{db}", *extra]
        start = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "kdexp", *args],
            cwd=folder,
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **env},
        )
        wall = time.perf_counter() - start
        if done.returncode != 0:
            raise SystemExit(f"sweep failed ({' '.join(args)}):\n{done.stderr[-3000:]}")
        client = MlflowClient(tracking_uri=f"sqlite:///{db}")
        experiment = client.get_experiment_by_name("bench")
        assert experiment is not None
        runs = client.search_runs([experiment.experiment_id])
        runs = [r for r in runs if r.data.tags.get("kdexp.role") != "sweep"]  # its parent run
        if [r.info.status for r in runs] != ["FINISHED"] * JOBS:
            raise SystemExit(f"expected {JOBS} FINISHED runs, got {[r.info.status for r in runs]}")
        return wall, {r.data.tags["torch_threads"] for r in runs}


def main() -> None:
    """Alternate the launchers ``--repeats`` times; print the times and the best-of ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--oversubscribed",
        action="store_true",
        help="also time joblib with as many torch threads per job as cores",
    )
    parser.add_argument("overrides", nargs="*", help="extra overrides for every sweep")
    options = parser.parse_args()
    logging.getLogger("mlflow").setLevel(logging.WARNING)  # the store's set-up messages
    names = list(VARIANTS) if options.oversubscribed else [BASIC, PARALLEL]
    print(f"{JOBS} jobs: {' '.join(SWEEP[1:] + options.overrides)}; {os.cpu_count()} CPUs")
    times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(options.repeats):
        for name in names:
            launcher, env = VARIANTS[name]
            wall, threads = _sweep(launcher, options.overrides, env)
            times[name].append(wall)
            print(f"  {name:32s} {wall:6.1f} s  (torch threads per job: {', '.join(threads)})")
    basic = min(times[BASIC])
    print(f"best of {options.repeats}:")
    for name in names:
        pairs = ", ".join(f"{t / b:.2f}" for t, b in zip(times[name], times[BASIC], strict=True))
        print(
            f"  {name:32s} {min(times[name]):6.1f} s  ratio {min(times[name]) / basic:.2f} "
            f"(per round: {pairs})"
        )
    print("targets: joblib n_jobs=2 / basic <= 0.75 (2-epoch jobs), <= 0.6 (20-epoch jobs)")


if __name__ == "__main__":
    main()
