"""The fixed-cost and store-scale changes of issue 15: each against an independent reference."""

from __future__ import annotations

import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from kdexp.comparison import Row, pareto_front
from kdexp.labels import MOST, named
from kdexp.stats import latency_ms


def test_digits_read_directly_match_scikit_learn() -> None:
    """The CSV read without importing scikit-learn gives load_digits' images and labels."""
    from sklearn.datasets import load_digits

    from kdexp.dataset.digits import _read_digits

    pixels, labels = _read_digits()
    reference = load_digits()
    np.testing.assert_array_equal(pixels, reference.data.astype(np.float32))
    np.testing.assert_array_equal(labels, reference.target)
    assert pixels.dtype == np.float32 and labels.dtype == np.int64


def _dominated_reference(points: list[tuple[float, float]]) -> list[int]:
    """The definition, checked pair by pair (quadratic)."""
    return [
        i
        for i, (x, y) in enumerate(points)
        if not any(a <= x and b >= y and (a, b) != (x, y) for a, b in points)
    ]


@pytest.mark.parametrize("seed", range(5))
def test_pareto_front_matches_the_pairwise_definition(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(200):
        points = [(rng.randint(0, 5), rng.randint(0, 5)) for _ in range(rng.randint(0, 15))]
        front = pareto_front(points)
        assert sorted(front) == _dominated_reference(points)
        assert [points[i][0] for i in front] == sorted(points[i][0] for i in front)


def test_pareto_front_of_a_worked_example() -> None:
    # (1, 50) cheapest; (2, 70) better; (2, 60) dominated by (2, 70); (3, 70) dominated by
    # (2, 70); (4, 90) best; two equal (5, 95) both stay.
    points = [(2, 60), (4, 90), (1, 50), (3, 70), (2, 70), (5, 95), (5, 95)]
    assert pareto_front(points) == [2, 4, 1, 5, 6]


def test_label_policy_names_the_best_and_the_front_and_no_more() -> None:
    rows = [Row(f"c{i}", [], {"test/acc1": float(i)}, {}) for i in range(1000)]
    front = [rows[i] for i in (3, 10, 500, 998)]
    shown = named(rows, front, "test/acc1")
    assert len(shown) <= MOST
    assert {"c999", "c998", "c997", "c996", "c995"} <= shown  # the five best
    assert {"c500", "c10", "c3"} <= shown  # the front
    few = rows[:MOST]
    assert named(few, [], "test/acc1") == {r.label for r in few}  # a few rows: all named


class _Slow(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        time.sleep(0.02)  # 20 ms a call
        return x


def test_latency_stops_at_its_budget_after_the_minimum_calls() -> None:
    model = _Slow()
    latency_ms(model, torch.zeros(1), repeats=20, warmup=1, budget_s=0.01, min_repeats=4)
    assert model.calls == 1 + 4  # warm-up, then the minimum: the budget was spent at once
    fast = _Slow()
    latency_ms(fast, torch.zeros(1), repeats=6, warmup=1, budget_s=100.0)
    assert fast.calls == 1 + 6  # within budget: every repeat


def test_exit_now_runs_the_handlers_and_keeps_the_status(tmp_path: Path) -> None:
    code = (
        "import atexit\n"
        "from kdexp.timings import exit_now, phase\n"
        "atexit.register(lambda: print('handler ran', flush=True))\n"
        "with phase('work'):\n"
        "    print('body', flush=True)\n"
        "exit_now(3)\n"
        "print('never')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={"KDEXP_TIMINGS": "1", "PATH": "/usr/bin:/bin"},
        cwd=tmp_path,
    )
    assert done.returncode == 3
    assert done.stdout.split() == ["body", "handler", "ran"]
    assert '"work":' in done.stderr and "kdexp-timings:" in done.stderr


def _store_of(tmp_path: Path, count: int) -> tuple[str, dict[str, int]]:
    """A store with ``count`` runs (the last one FAILED), each with a param, a tag and a metric."""
    from mlflow.entities import Metric, Param

    from kdexp.tracking.mlflow import mlflow_client, prepare_store

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment = prepare_store(uri, "paged")
    client = mlflow_client(uri)
    ids = {}
    for i in range(count):
        run = client.create_run(experiment, tags={"n": str(i)}, start_time=1_000 + i)
        client.log_batch(
            run.info.run_id, metrics=[Metric("test/acc1", i, 0, 0)], params=[Param("p", str(i))]
        )
        client.set_terminated(run.info.run_id, "FAILED" if i == count - 1 else "FINISHED")
        ids[run.info.run_id] = i
    return uri, ids


def test_load_runs_pages_through_the_store(tmp_path: Path, monkeypatch) -> None:
    """Seven runs read three to a page: every run comes back once, with its params and tags;
    a single status is filtered by the store."""
    from kdexp.tracking import query

    uri, ids = _store_of(tmp_path, 7)
    monkeypatch.setattr(query, "PAGE_SIZE", 3)
    found = query.load_runs(uri, "paged")
    assert sorted(ids[r.run_id] for r in found) == list(range(6))  # FAILED left out
    assert all(r.params["p"] == r.tags["n"] == str(ids[r.run_id]) for r in found)
    both = query.load_runs(uri, "paged", statuses=("FINISHED", "FAILED"))
    assert len(both) == 7 and not any(r.histories for r in both)


def test_a_large_store_is_read_by_several_processes_with_the_same_result(
    tmp_path: Path, monkeypatch
) -> None:
    """Eleven runs, two to a page, over three readers: this process reads pages 0, 3, ... and
    two `python -c` readers the others; the result is the one-process read, run for run, in
    MLflow's order (newest first), for one status and for two."""
    from kdexp.tracking import query

    uri, ids = _store_of(tmp_path, 11)
    monkeypatch.setattr(query, "PARALLEL_FROM", 10**9)
    alone = {
        s: query.load_runs(uri, "paged", statuses=s)
        for s in (("FINISHED",), ("FINISHED", "FAILED"))
    }
    assert [ids[r.run_id] for r in alone[("FINISHED", "FAILED")]] == list(range(10, -1, -1))

    shares = []
    read_share = query._read_share

    def spy(*args):
        shares.append(args[4:])
        return read_share(*args)

    monkeypatch.setattr(query, "PARALLEL_FROM", 3)
    monkeypatch.setattr(query, "PARALLEL_PAGE", 2)
    monkeypatch.setattr(query, "_readers", lambda uri: 3)
    monkeypatch.setattr(query, "_read_share", spy)
    for statuses, expected in alone.items():
        found = query.load_runs(uri, "paged", statuses=statuses)
        assert [(r.run_id, r.status, r.params, r.tags, r.metrics) for r in found] == [
            (r.run_id, r.status, r.params, r.tags, r.metrics) for r in expected
        ]
    assert shares == [(0, 3, 2), (0, 3, 2)]  # this process read only its own share


def test_a_failed_reader_leaves_the_whole_read_to_this_process(
    tmp_path: Path, monkeypatch, caplog
) -> None:
    from kdexp.tracking import query

    uri, ids = _store_of(tmp_path, 5)
    monkeypatch.setattr(query, "PARALLEL_FROM", 1)
    monkeypatch.setattr(query, "PARALLEL_PAGE", 1)
    monkeypatch.setattr(query, "_readers", lambda uri: 2)
    monkeypatch.setattr(query, "_READER", "import sys; sys.exit('no kdexp here')")
    with caplog.at_level("WARNING", logger="kdexp.tracking.query"):
        found = query.load_runs(uri, "paged", statuses=("FINISHED", "FAILED"))
    assert [ids[r.run_id] for r in found] == [4, 3, 2, 1, 0]
    assert "no kdexp here" in caplog.text


def test_readers_one_per_core_for_a_database_one_for_a_server(monkeypatch) -> None:
    from kdexp.tracking import query

    monkeypatch.setattr(query.os, "sched_getaffinity", lambda pid: set(range(32)), raising=False)
    assert query._readers("sqlite:////tmp/x.db") == query.MAX_READERS
    assert query._readers("postgresql+psycopg2://u@h/db") == query.MAX_READERS
    monkeypatch.setattr(query.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert query._readers("mysql://u@h/db") == 2
    assert query._readers("http://127.0.0.1:5000") == 1
    assert query._readers("https://mlflow.example.org") == 1


def test_a_sqlite_store_indexes_tags_by_value_and_lookups_use_it(tmp_path: Path) -> None:
    """prepare_store adds the (key, value) index once; SQLite plans MLflow's tag filter with it;
    the lineage lookup finds the newest FINISHED run with the tag."""
    import sqlite3

    from kdexp.tracking.mlflow import MlflowTracker, mlflow_client
    from kdexp.tracking.store import TAG_INDEX, index_tags, prepare_store

    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    experiment = prepare_store(uri, "indexed")
    client = mlflow_client(uri)
    made = {}
    for i, (lineage, status) in enumerate([("a", "FINISHED"), ("b", "FINISHED"), ("a", "FAILED")]):
        run = client.create_run(experiment, tags={"kdexp.lineage": lineage}, start_time=1_000 + i)
        client.set_terminated(run.info.run_id, status)
        made[(lineage, status)] = run.info.run_id
    with sqlite3.connect(db) as conn:
        names = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='index'")]
        plan = " ".join(
            str(row[-1])
            for row in conn.execute(
                "EXPLAIN QUERY PLAN SELECT run_uuid FROM tags WHERE key = ? AND value = ?",
                ("kdexp.lineage", "a"),
            )
        )
    assert names.count(TAG_INDEX) == 1 and TAG_INDEX in plan
    tracker = MlflowTracker(uri, "indexed")
    assert tracker.find_finished({"kdexp.lineage": "a"}) == made[("a", "FINISHED")]
    assert tracker.find_finished({"kdexp.lineage": "c"}) is None
    index_tags(str(tmp_path))  # not a database (a folder): left alone, no error


GC_PROBE = """
import gc, sys, weakref
import kdexp.run, kdexp.cli  # importing kdexp as a library leaves the collector alone
from kdexp import timings
print(gc.isenabled())
timings.freeze_imports()  # no defer_gc before: nothing happens
timings.resume_gc()
print(gc.isenabled(), gc.get_freeze_count() == 0)
timings.defer_gc()
print(gc.isenabled())

class Node:
    pass

def cycle():
    made = Node()
    made.self = made  # a cycle: only the collector frees it
    return weakref.ref(made)

before = cycle()  # garbage made before the imports are frozen stays
timings.freeze_imports()
frozen = gc.get_freeze_count()
after = cycle()  # garbage made after them is freed by resume_gc's collection
timings.resume_gc()
print(gc.isenabled(), frozen > 100_000, before() is not None, after() is None)
print(gc.get_freeze_count() > frozen)
"""


def test_the_collector_is_deferred_only_when_asked_and_garbage_is_freed_before_freezing() -> None:
    done = subprocess.run([sys.executable, "-c", GC_PROBE], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True"] * 3 + ["False"] + ["True"] * 5


def test_exit_now_lets_an_idle_thread_pool_in_a_cycle_end_and_exits_at_once() -> None:
    """A thread pool reachable only through a cycle keeps a non-daemon worker thread alive until
    the collector frees it; exit_now collects, the worker ends, and the process still skips the
    interpreter's teardown (a module-level object's __del__ never runs)."""
    code = (
        "from concurrent.futures import ThreadPoolExecutor\n"
        "from kdexp.timings import exit_now\n"
        "class Holder:\n"
        "    pass\n"
        "class Teardown:\n"
        "    def __del__(self):\n"
        "        print('teardown', flush=True)\n"
        "marker = Teardown()\n"
        "holder = Holder()\n"
        "holder.pool = ThreadPoolExecutor(1)\n"
        "holder.self = holder\n"
        "print(holder.pool.submit(lambda: 'work done').result(), flush=True)\n"
        "del holder\n"
        "exit_now(4)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 4, done.stderr
    assert done.stdout.split() == ["work", "done"]  # no "teardown": the quick exit was taken


ASIDE_PROBE = """
import os, sys
from functools import partial
from pathlib import Path
from kdexp.plots import draw_aside, learning_curves

history = [{"epoch": e, "val/acc1": 50.0 + e, "val/loss": 1.0 / (e + 1)} for e in range(3)]
path = Path(sys.argv[1])
path.write_text("a stale file")
(path.parent / f".4242.{path.name}").write_text("half drawn by a child of a stopped run")
(path.parent / f".notes.{path.name}").write_text("not a child's")
wait = draw_aside(partial(learning_curves, history), path)
print(wait() == path, path.read_bytes()[:4] == b"\\x89PNG")
print("matplotlib" in sys.modules, sorted(p.name for p in path.parent.iterdir()))
"""


@pytest.mark.skipif(sys.platform != "linux", reason="drawn aside on Linux only")
def test_learning_curves_are_drawn_in_a_child_and_the_file_appears_whole(tmp_path: Path) -> None:
    """The curves are drawn in a forked child: this process never imports matplotlib, the stale
    file is replaced, a temporary file left by the child of a stopped run is removed, and only the
    finished PNG is left (no temporary file; another hidden file is kept)."""
    done = subprocess.run(
        [sys.executable, "-c", ASIDE_PROBE, str(tmp_path / "curves.png")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["True True", "False ['.notes.curves.png', 'curves.png']"]


def test_drawing_aside_falls_back_to_this_process(tmp_path: Path, monkeypatch) -> None:
    """A child that fails, no fork (not Linux), a child that hangs: the drawing is done when
    waited for, here, and an error in it is raised here."""
    import os

    from kdexp.plots import draw_aside

    here = os.getpid()
    drawn_in: list[int] = []

    def only_here(path: Path) -> Path:
        if os.getpid() != here:
            raise RuntimeError("not in the child")  # the child ends without the file
        drawn_in.append(os.getpid())
        path.write_bytes(b"drawn")
        return path

    path = tmp_path / "p.png"
    assert draw_aside(only_here, path)() == path and drawn_in == [here]
    monkeypatch.setattr(sys, "platform", "darwin")  # not forked at all
    path.unlink()
    assert draw_aside(only_here, path)() == path and drawn_in == [here, here]
    assert path.read_bytes() == b"drawn"
    monkeypatch.undo()

    def stuck(path: Path) -> Path:
        if os.getpid() != here:
            path.write_bytes(b"half")
            time.sleep(30)  # a child that hangs is killed at the deadline
        return only_here(path)

    monkeypatch.setattr("kdexp.plots.ASIDE_TIMEOUT_S", 0.5)
    start = time.monotonic()
    assert draw_aside(stuck, path)() == path and drawn_in == [here] * 3
    assert time.monotonic() - start < 10
    assert [p.name for p in tmp_path.iterdir()] == ["p.png"]  # its half-drawn file removed
    assert path.read_bytes() == b"drawn"

    def broken(path: Path) -> Path:
        raise ValueError("cannot draw")

    with pytest.raises(ValueError, match="cannot draw"):
        draw_aside(broken, path)()
