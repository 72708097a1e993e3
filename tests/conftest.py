"""Shared fixtures: composing configs from conf/, shrinking them, and running the real CLI."""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict, read_write

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


def _share_the_cores() -> None:
    """Under pytest-xdist, each worker and the kdexp processes it starts get their share of the
    cores as torch threads. Without it, 2 workers on 2 cores each ran torch on 2 threads, and the
    oversubscription cost more than the threads gained: test_distill.py and test_naming.py took
    245 s with 2 workers, 141 s with 1 thread each (tiny models gain little from threads)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)  # inherited by the CLI runs
        import torch

        torch.set_num_threads(threads)


_share_the_cores()


@pytest.fixture
def compose_cfg(tmp_path: Path) -> Iterator:
    """``compose_cfg(*overrides)``: the composed config with Hydra's node set, as a job sees it."""

    def _compose(*overrides: str) -> DictConfig:
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose("train", overrides=list(overrides), return_hydra_config=True)
        with read_write(cfg.hydra), open_dict(cfg.hydra):
            cfg.hydra.runtime.output_dir = str(tmp_path / "run")
        HydraConfig.instance().set_config(cfg)
        return cfg

    yield _compose
    GlobalHydra.instance().clear()


_EMPTY_STORE: list[Path] = []  # this test process's empty store, made on first use


def _empty_store() -> Path:
    """An empty SQLite store with MLflow's current schema, made once per test process.

    MLflow makes a new SQLite store by running every one of its schema migrations: about 1.2 s of
    CPU, 102 times in a suite run (2 of its 24 CPU-minutes). A copy of this file is a store MLflow
    opens as it opens any up-to-date one. Its artifact root is its own temporary folder (kdexp
    gives each experiment it creates an artifact location beside the store).
    """
    if not _EMPTY_STORE:
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

        folder = Path(tempfile.mkdtemp(prefix="kdexp-empty-store-"))
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        store = SqlAlchemyStore(f"sqlite:///{folder / 'mlflow.db'}", str(folder / "artifacts"))
        store.engine.dispose()
        _EMPTY_STORE.append(folder / "mlflow.db")
    return _EMPTY_STORE[0]


def tracking_overrides(tmp_path: Path, *, created: bool = True) -> list[str]:
    """Point tracking at a new SQLite store under ``tmp_path``.

    ``created``: the store's file is there already, empty, as a store is after its first use (a
    copy of :func:`_empty_store`); ``False`` leaves it to the run, for the tests of a new store's
    creation and of input refused before any store is touched.
    """
    db = tmp_path / "mlflow.db"
    if created and not db.exists():
        shutil.copyfile(_empty_store(), db)
    return [f"tracking.uri=sqlite:///{db}", "tracking.experiment=test"]


def run_cli(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``python -m kdexp ARGS`` in ``cwd`` as a user would, capturing its output."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(
        [sys.executable, "-m", "kdexp", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_mlflow_server(tmp_path: Path, port: int) -> subprocess.Popen:
    """A real ``mlflow server`` on 127.0.0.1:``port``: SQLite store and proxied artifacts under
    ``tmp_path``. Returns once it answers /health; stop it with :func:`stop_mlflow_server`."""
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "artifacts"), "--workers", "1"],
        # MLflow 3's server also starts a job runner with seven huey consumers, each importing
        # MLflow (about 10 s of CPU per server on this machine), for GenAI jobs no test uses.
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its workers share its process group: stopped together
    )  # fmt: skip
    deadline = time.monotonic() + 90
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return server
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                stop_mlflow_server(server)
                raise AssertionError("mlflow server did not start") from None
            time.sleep(0.2)


def stop_mlflow_server(server: subprocess.Popen) -> None:
    """Stop the server and its workers (SIGTERM, then SIGKILL after 20 s)."""
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


@pytest.fixture
def mlflow_server(tmp_path: Path) -> Iterator[str]:
    """The URI of a real ``mlflow server`` on a free loopback port, always stopped afterwards."""
    server = start_mlflow_server(tmp_path, port := free_port())
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_mlflow_server(server)
