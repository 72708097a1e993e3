"""Where a run's wall time goes: phase timings behind ``KDEXP_TIMINGS=1``, the garbage collector
kept out of the start, and the fast exit.

With ``KDEXP_TIMINGS=1`` in the environment, the phases of a run (imports, store, build, train,
final evaluation, statistics, model logging, artifacts) are timed, and at exit one line
``kdexp-timings: {json}`` goes to stderr with seconds per phase; ``bench/fixed_cost.py`` reads
it. Without the variable :func:`phase` costs one dictionary lookup.

:func:`exit_now` ends the ``kdexp`` process without tearing the interpreter down: with torch,
MLflow and SQLAlchemy loaded, Python's module-by-module finalization takes longer than a small
run's training (see the README's fixed-cost section). :func:`defer_gc` and :func:`resume_gc` keep
Python's cyclic collector off while the process imports torch, MLflow and Hydra.
"""

from __future__ import annotations

import atexit
import gc
import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

ENV = "KDEXP_TIMINGS"
_gc_deferred = False
_enabled = os.environ.get(ENV, "") not in ("", "0")
_seconds: dict[str, float] = {}


def _process_start() -> float | None:
    """The process's start as ``time.time()``, from /proc (Linux); None elsewhere."""
    try:
        fields = open("/proc/self/stat").read().rsplit(")", 1)[1].split()
        uptime = float(open("/proc/uptime").read().split()[0])
    except (OSError, IndexError, ValueError):
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    return time.time() - uptime + int(fields[19]) / ticks  # field 22 of stat: starttime


def mark_started() -> None:
    """Record the imports phase: from the process's start until now (the job begins)."""
    if _enabled and "imports" not in _seconds:
        start = _process_start()
        if start is not None:
            _seconds["imports"] = time.time() - start


@contextmanager
def phase(name: str) -> Iterator[None]:
    """Add the wall time of the ``with`` body to phase ``name`` (when timings are on)."""
    if not _enabled:
        yield
        return
    start = time.perf_counter()
    try:
        yield
    finally:
        _seconds[name] = _seconds.get(name, 0.0) + time.perf_counter() - start


def report() -> dict[str, float]:
    """Seconds per phase so far (empty when timings are off)."""
    return dict(_seconds)


def _print_report() -> None:
    if _enabled:
        stamp = {"exit_at": time.time()}  # the bench measures the exit from here
        print(f"kdexp-timings: {json.dumps({**_seconds, **stamp})}", file=sys.stderr, flush=True)


atexit.register(_print_report)


def defer_gc() -> None:
    """Turn Python's cyclic garbage collector off while the process starts.

    Importing torch, MLflow, SQLAlchemy and Hydra builds some 600,000 objects, and the collector
    goes through them again and again as they appear: about 1.4 s of a small run (0.7 s of the
    bare imports). :func:`resume_gc` turns it back on once the run is built. Called by the
    ``kdexp`` command and joblib's forkserver only: importing kdexp as a library changes nothing.
    """
    global _gc_deferred
    if gc.isenabled():
        gc.disable()
        _gc_deferred = True


def freeze_imports() -> None:
    """While the collector is deferred (:func:`defer_gc`): move every object made so far out of
    its reach (:func:`gc.freeze`) without a collection. Called after the largest imports (torch,
    Hydra and kdexp; MLflow's SQLAlchemy store), whose objects live as long as the process, so
    that :func:`resume_gc`'s one collection goes only through what came after them: 0.21 s and
    0.18 s less of it. The imports' own garbage stays (about 12,000 objects, 8 MB, measured).
    Otherwise nothing.
    """
    if _gc_deferred:
        gc.freeze()


def resume_gc() -> None:
    """After :func:`defer_gc`: collect once, freeze what is left out of the collector (the
    modules, classes and functions live as long as the process; :func:`gc.freeze`) and turn it
    back on, so that it goes through what the run makes from now on. Otherwise nothing.

    The one collection (about 0.3 s) frees the garbage made meanwhile: frozen, it would never be
    freed, nor what it holds (an MLflow artifact repository's thread pool kept the process from
    its quick exit, and the default job's peak memory rose by 140 MB).
    """
    global _gc_deferred
    if _gc_deferred:
        gc.collect()
        gc.freeze()
        gc.enable()
        _gc_deferred = False


def exit_now(code: int) -> None:
    """Run the exit handlers, flush, and end the process at once with status ``code``.

    Interpreter finalization (tearing down thousands of torch, MLflow and SQLAlchemy modules one
    by one) is skipped; nothing of kdexp's is pending by then: the run closed FINISHED, every
    record was sent, files are closed. A collection first frees what only the collector frees:
    an idle thread pool left behind (MLflow's artifact uploads) then lets its workers end, and
    they are given a second to. Falls back to a normal exit when a non-daemon thread is still
    alive (it would be killed), and when ``KDEXP_FAST_EXIT=0``.
    """
    if os.environ.get("KDEXP_FAST_EXIT", "1") == "0":
        sys.exit(code)
    gc.collect()
    deadline = time.monotonic() + 1.0
    others = [t for t in threading.enumerate() if t is not threading.main_thread()]
    for thread in others:
        if not thread.daemon:
            thread.join(max(0.0, deadline - time.monotonic()))
    if any(t.is_alive() and not t.daemon for t in others):
        sys.exit(code)
    atexit._run_exitfuncs()  # logging.shutdown, the report above, any library's handlers
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)
