"""Telling a live run from a dead one, from MLflow alone, and logging each step once.

While a run is open a daemon thread refreshes its ``kdexp.heartbeat`` tag (host, pid, time, how
often) every ``KDEXP_HEARTBEAT_S`` seconds (default 30). A RUNNING run is dead when its process is
gone (same host, pid not alive) or its heartbeat is older than ``stale_after_s``. ``resume=auto``
takes up dead runs like KILLED ones, and ``kdexp-stale`` marks them FAILED.

A run resumed after a crash carries on from a checkpoint that may be older than the last step it
logged; :func:`logged_steps` reads, per metric, the last step the store holds, and the tracker
drops any value at or before it, so each step's metrics are logged exactly once.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)

HEARTBEAT_TAG = "kdexp.heartbeat"
#: A heartbeat older than this (seconds) marks a run on another host dead.
STALE_AFTER_S = 600.0


def heartbeat_every_s() -> float:
    """Seconds between two heartbeats (``KDEXP_HEARTBEAT_S``, default 30)."""
    return float(os.environ.get("KDEXP_HEARTBEAT_S", "30"))


def heartbeat(every_s: float | None = None) -> str:
    """The heartbeat tag's value for this process, now: JSON with host, pid, time, every_s.

    ``every_s`` 0 means the tag is written once and never refreshed (a sweep's launching
    process): only the pid tells whether it lives.
    """
    every = heartbeat_every_s() if every_s is None else every_s
    return json.dumps(
        {"host": socket.gethostname(), "pid": os.getpid(), "time": time.time(), "every_s": every}
    )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def is_dead(
    value: str | None, stale_after_s: float = STALE_AFTER_S, now: float | None = None
) -> bool:
    """Whether the process behind a heartbeat tag's ``value`` is gone.

    On this host, when its pid is not alive; anywhere, when a refreshed heartbeat is older than
    ``stale_after_s``. No heartbeat (a run from before heartbeats, or from another tool): False.
    """
    if not value:
        return False
    try:
        beat = json.loads(value)
        host, pid, at, every = beat["host"], int(beat["pid"]), float(beat["time"]), beat["every_s"]
    except (ValueError, KeyError, TypeError):
        return False
    if host == socket.gethostname() and not _pid_alive(pid):
        return True
    age = (time.time() if now is None else now) - at
    return bool(every) and age > max(stale_after_s, 3 * float(every))


class Heartbeat:
    """A daemon thread that refreshes a run's heartbeat tag until :meth:`stop`."""

    def __init__(self, uri: str, run_id: str, every_s: float | None = None) -> None:
        self.uri, self.run_id = uri, run_id
        self.every_s = heartbeat_every_s() if every_s is None else every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="kdexp-heartbeat", daemon=True)

    def start(self) -> Heartbeat:
        """Write the first beat now (in the caller's thread), then one every ``every_s``."""
        self._send()
        if self.every_s > 0:
            self._thread.start()
        return self

    def _send(self) -> None:
        from mlflow.tracking import MlflowClient

        try:
            MlflowClient(tracking_uri=self.uri).set_tag(
                self.run_id, HEARTBEAT_TAG, heartbeat(self.every_s)
            )
        except Exception as error:  # the store is away: the spool covers records, not beats
            log.debug("heartbeat not sent: %s", error)

    def _beat(self) -> None:
        while not self._stop.wait(self.every_s):
            self._send()

    def stop(self) -> None:
        """Stop beating (the run is closing)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)


def logged_steps(client: MlflowClient, run_id: str) -> dict[str, int]:
    """The last step of each metric that run ``run_id`` holds."""
    run = client.get_run(run_id)
    last: dict[str, int] = {}
    for key in run.data.metrics:
        history = client.get_metric_history(run_id, key)
        if history:
            last[key] = max(m.step for m in history)
    return last
