"""Reports and lineage lookups on a store of thousands of runs, against a near-empty store.

Usage: ``python bench/store_scale.py [--runs 10000] [--repeats 3]``.

Two fresh SQLite stores (schema made by MLflow itself) get runs shaped like kdexp's: the params of
the default config flattened as kdexp logs them (about 60), kdexp's tags (method, model, dataset,
seed, versions, config hash, lineage, ...), the final metrics, and three 20-point histories
(``val/acc1``, ``val/loss``, ``train/loss``); every run has its own configuration (its own
``schedule.lr``, ``method.temperature`` and ``seed``), as in a search. Both stores hold one sweep
of 8 runs under a parent run, one of them with a known lineage; the large one holds ``--runs`` in
all. The rows go in with direct SQL inserts into MLflow's tables (runs, params, tags, metrics,
latest_metrics), one transaction per store: ``MlflowClient`` needs four requests per run, which
takes the better part of an hour for 10,000 runs on a loaded 2-core machine.

It then times, alternating between the stores, as whole processes: ``kdexp-report`` over the
whole experiment (target <= 30 s at 10,000 runs), ``kdexp-report --sweep`` of the 8-run sweep,
and a lineage lookup (``MlflowTracker.find_finished``, timed inside its process once the store
is open). Targets: the sweep's report and the lookup within 1.5x of the empty store. It also
times, inside a process, the part of the whole report that is MLflow's: ``search_runs`` paging
through every run (``kdexp.tracking.query.load_runs``), in one process as before and with the
pages split over one reading process per core (what the report does from 2,000 runs on).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

EXPERIMENT = "kdexp"
SWEEP = "bench-sweep"
LINEAGE = "bench-lineage-target"
HISTORIES = ("val/acc1", "val/loss", "train/loss")
SEARCH = """
import sys, time
from kdexp.tracking import query
from kdexp.tracking.store import mlflow_client
mlflow_client(sys.argv[1])  # the store opened, as the report has it
if sys.argv[2] == "one":
    query.PARALLEL_FROM = 10**12  # every page read in this process
start = time.perf_counter()
found = query.load_runs(sys.argv[1], "kdexp", "", statuses=("FINISHED", "FAILED"))
print(time.perf_counter() - start, len(found))
"""
LOOKUP = """
import sys, time
from kdexp.tracking.mlflow import MlflowTracker, prepare_store
tracker = MlflowTracker(sys.argv[1], "kdexp")
prepare_store(tracker.uri, "kdexp")  # the store opened, as a job has it before its lookup
start = time.perf_counter()
found = tracker.find_finished({"kdexp.lineage": sys.argv[2]})
print(time.perf_counter() - start, found)
"""


def _params() -> dict[str, str]:
    """The default config's params, flattened as kdexp logs them."""
    from hydra import compose, initialize_config_module

    from kdexp.config import flatten

    with initialize_config_module("kdexp.conf", version_base="1.3"):
        cfg = compose("train", overrides=["method=baseline"])
    return {k: str(v)[:6000] for k, v in flatten(cfg)}


def fill(db: Path, runs: int, params: dict[str, str], seed: int = 0) -> None:
    """Create the store with MLflow, then insert ``runs`` finished runs (8 of them a sweep)."""
    from kdexp.tracking.mlflow import prepare_store

    uri = f"sqlite:///{db}"
    experiment_id = int(prepare_store(uri, EXPERIMENT))
    rng = random.Random(seed)
    now = int(time.time() * 1000)
    rows: dict[str, list[tuple]] = {
        "runs": [],
        "params": [],
        "tags": [],
        "metrics": [],
        "latest": [],
    }
    parent = uuid.uuid4().hex
    _run(rows, parent, f"sweep-{SWEEP}", experiment_id, now, db)
    rows["tags"] += [(k, v, parent) for k, v in {"sweep_id": SWEEP, "kdexp.role": "sweep"}.items()]
    methods = ["baseline", "distill/kd", "distill/dkd", "prune/magnitude"]
    models = ["mlp", "lenet5", "resnet8", "resnet20"]
    for i in range(runs):
        run_id = uuid.uuid4().hex
        _run(rows, run_id, f"run-{i}", experiment_id, now - 1000 * (runs - i), db)
        config = dict(params)
        config["seed"] = str(rng.randrange(1000))
        config["schedule.lr"] = f"{rng.uniform(0.001, 0.3):.6f}"
        config["method.temperature"] = f"{rng.uniform(1, 8):.4f}"
        rows["params"] += [(k, v, run_id) for k, v in config.items()]
        tags = {
            "method": methods[i % 4],
            "model": models[(i // 4) % 4],
            "dataset": "digits",
            "seed": config["seed"],
            "device": "cpu",
            "torch_threads": "2",
            "kdexp_version": "0.1.0",
            "torch_version": "2.x",
            "git_commit": "0" * 40,
            "git_dirty": "false",
            "kdexp.config_hash": uuid.uuid4().hex,
            "kdexp.lineage": LINEAGE if i == 3 else uuid.uuid4().hex,
            "kdexp.checkpoint": f"/tmp/run-{i}/checkpoints/last.pt",
            "overrides": f"schedule.lr={config['schedule.lr']}",
            "mlflow.runName": f"run-{i}",
            "mlflow.user": "bench",
        }
        if i < 8:
            tags.update(sweep_id=SWEEP, sweep_dir="/tmp/bench-sweep", job_num=str(i))
            tags["mlflow.parentRunId"] = parent
        rows["tags"] += [(k, v, run_id) for k, v in tags.items()]
        acc = rng.uniform(60, 99)
        size = rng.choice([10_000, 60_000, 300_000, 1_200_000]) * rng.uniform(0.5, 1.5)
        final = {
            "best/val_acc1": acc + 1,
            "best/epoch": 19,
            "last/val_acc1": acc + 0.5,
            "test/loss": 0.3,
            "test/acc1": acc,
            "test/acc5": 99.0,
            "model/params": size,
            "model/nonzero_params": size * rng.uniform(0.1, 1),
            "model/size_bytes": 4 * size,
            "model/flops": 2 * size,
            "model/latency_ms": size / 1e5,
            "model/latency_ms_batch": size / 1e4,
        }
        for key, value in final.items():
            rows["metrics"].append((key, value, now, run_id, 19, 0))
            rows["latest"].append((key, value, now, 19, 0, run_id))
        for key in HISTORIES:
            for step in range(20):
                value = acc * step / 19 if key == "val/acc1" else 2.0 / (step + 1)
                rows["metrics"].append((key, value, now + step, run_id, step, 0))
            rows["latest"].append((key, value, now + 19, 19, 0, run_id))
    connection = sqlite3.connect(db)
    with connection:
        connection.executemany(
            "INSERT INTO runs (run_uuid, name, source_type, source_name, entry_point_name, "
            "user_id, status, start_time, end_time, source_version, lifecycle_stage, "
            "artifact_uri, experiment_id) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
            rows["runs"],
        )
        connection.executemany("INSERT INTO params VALUES (?,?,?)", rows["params"])
        connection.executemany(
            'INSERT INTO tags ("key", value, run_uuid) VALUES (?,?,?)', rows["tags"]
        )
        connection.executemany(
            'INSERT INTO metrics ("key", value, timestamp, run_uuid, step, is_nan) '
            "VALUES (?,?,?,?,?,?)",
            rows["metrics"],
        )
        connection.executemany(
            'INSERT INTO latest_metrics ("key", value, timestamp, step, is_nan, run_uuid) '
            "VALUES (?,?,?,?,?,?)",
            rows["latest"],
        )
    connection.close()


def _run(
    rows: dict[str, list[tuple]], run_id: str, name: str, experiment: int, start: int, db: Path
) -> None:
    artifacts = (db.parent / "mlartifacts" / str(experiment) / run_id / "artifacts").as_uri()
    rows["runs"].append(
        (
            run_id,
            name,
            "LOCAL",
            "kdexp",
            "",
            "bench",
            "FINISHED",
            start,
            start + 500,
            "",
            "active",
            artifacts,
            experiment,
        )
    )


def _timed(command: list[str], cwd: Path) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return wall, done.stdout


def main() -> None:
    """Fill both stores, then time the reports and the lookup on each, alternating."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3)
    options = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kdexp-store-"))
    try:
        params = _params()
        stores = {
            "empty (8 runs)": work / "empty" / "mlflow.db",
            f"{options.runs} runs": work / "full" / "mlflow.db",
        }
        for (name, db), count in zip(stores.items(), (8, options.runs), strict=True):
            db.parent.mkdir(parents=True)
            start = time.perf_counter()
            fill(db, count, params)
            print(
                f"filled {name}: {count} runs x {len(params)} params in "
                f"{time.perf_counter() - start:.1f} s (direct SQL inserts)",
                flush=True,
            )
        python = sys.executable
        times: dict[tuple[str, str], list[float]] = {}
        for round_ in range(options.repeats):
            for name, db in stores.items():
                uri = f"sqlite:///{db}"
                report = [
                    python,
                    "-m",
                    "kdexp.report",
                    "--tracking-uri",
                    uri,
                    "--experiment",
                    EXPERIMENT,
                ]
                tasks = {
                    "report, whole experiment": report + ["--out", str(work / "r-all")],
                    "report, one sweep": report
                    + ["--sweep", SWEEP, "--out", str(work / "r-sweep")],
                }
                for task, command in tasks.items():
                    wall, _ = _timed(command, work)
                    times.setdefault((task, name), []).append(wall)
                    print(f"round {round_ + 1}: {name:16s} {task:26s} {wall:7.2f} s", flush=True)
                for readers in ("one", "per core"):
                    _, out = _timed([python, "-c", SEARCH, uri, readers], work)
                    seconds, count = out.split()
                    task = f"MLflow search_runs, {readers}"
                    times.setdefault((task + " (in process)", name), []).append(float(seconds))
                    print(
                        f"round {round_ + 1}: {name:16s} {task:26s} {float(seconds):7.2f} s "
                        f"({count} runs)",
                        flush=True,
                    )
                _, out = _timed([python, "-c", LOOKUP, uri, LINEAGE], work)
                seconds, found = out.split()
                assert found != "None", "the lineage lookup found nothing"
                times.setdefault(("lineage lookup (in process)", name), []).append(float(seconds))
                print(
                    f"round {round_ + 1}: {name:16s} {'lineage lookup':26s} "
                    f"{float(seconds):7.3f} s",
                    flush=True,
                )
        names = list(stores)
        print(f"\nmedians of {options.repeats} rounds ({os.cpu_count()} CPUs):")
        for task in dict.fromkeys(t for t, _ in times):
            small, large = (statistics.median(times[(task, n)]) for n in names)
            print(
                f"  {task:30s} {names[0]}: {small:7.3f} s   {names[1]}: {large:7.3f} s   "
                f"ratio {large / small:.2f}"
            )
        print("targets: whole-experiment report <= 30 s; sweep report and lookup ratio <= 1.5")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
