"""joblib's workers fork from a forkserver that has imported what a job needs (kdexp.workers),
a sweep's launching process does not import torch, and parallel jobs' lines stay whole."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest

from kdexp.workers import WORKER_PRELOAD, worker_threads

# Run in a fresh interpreter: the forkserver and loky's start method are process-wide.
PROBE = """
import json, sys
from hydra import compose, initialize_config_module
from hydra.utils import instantiate
from joblib import Parallel, cpu_count, delayed

def probe(names):
    import gc, sys
    preloaded = [name for name in names if name in sys.modules]
    import torch
    return preloaded, torch.get_num_threads(), gc.isenabled()

# the sweep's config as the kdexp command composes it, and the callback it names
with initialize_config_module(config_module="kdexp.conf", version_base="1.3"):
    overrides = ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]
    config = compose("train", overrides=overrides, return_hydra_config=True)
callback = instantiate(config.hydra.callbacks.warm_workers)
callback.on_multirun_start(config)
found = Parallel(n_jobs=2)(delayed(probe)(sys.argv[1:]) for _ in range(4))
callback.on_multirun_end(config)
print(json.dumps({"found": found, "cores": cpu_count(), "torch_here": "torch" in sys.modules}))
"""


def test_joblib_workers_start_with_the_jobs_modules_and_joblibs_share_of_threads() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    names = [name for name in WORKER_PRELOAD if not name.startswith("kdexp._")]
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *names], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    for preloaded, threads, collecting in result["found"]:
        assert preloaded == names  # imported before the job's function ran
        assert threads == worker_threads(2, result["cores"])
        assert collecting is False  # off, as in the forkserver, until a run is built
    assert result["torch_here"] is False  # only the forkserver and its workers imported torch


@pytest.mark.parametrize(
    ("n_jobs", "cores", "threads"),
    [(2, 2, 1), (2, 8, 4), (3, 8, 2), (16, 8, 1), (-1, 8, 1), (-2, 8, 1), (-5, 8, 2)],
)
def test_worker_threads_follow_joblibs_rule(n_jobs: int, cores: int, threads: int) -> None:
    assert worker_threads(n_jobs, cores) == threads


def test_a_sweeps_launching_process_does_not_import_torch() -> None:
    # What the callbacks of conf/hydra/default.yaml import before and after the jobs.
    modules = [
        "kdexp.cli",
        "kdexp.search",
        "kdexp.stopping",
        "kdexp.sweep",
        "kdexp.naming",
        "kdexp.workers",
        "kdexp.tracking.callback",
        "kdexp.tracking.extras",
        "kdexp.tracking.liveness",
        "kdexp.tracking.store",
    ]
    code = f"import sys\nfor m in {modules!r}: __import__(m)\nprint('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_without_a_forkserver_loky_starts_its_workers_as_before(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from multiprocessing import forkserver

    from joblib.externals.loky.backend.context import get_start_method
    from omegaconf import OmegaConf

    from kdexp.workers import WarmWorkers

    def refuse() -> None:
        raise OSError("no forkserver here")

    monkeypatch.setattr(forkserver, "ensure_running", refuse)
    # restored after the test: the preload list is process-wide
    monkeypatch.setattr(forkserver._forkserver, "_preload_modules", ["__main__"])
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    launcher = "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"
    config = OmegaConf.create({"hydra": {"launcher": {"_target_": launcher, "n_jobs": 2}}})
    WarmWorkers().on_multirun_start(config)
    assert get_start_method() is None  # loky's default again
    assert "OMP_NUM_THREADS" not in os.environ  # set for the forkserver only, then restored
    assert "workers start without preloaded modules (no forkserver here)" in caplog.text


class _Writes(io.RawIOBase):
    """A file that records each write it receives."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:  # type: ignore[no-untyped-def,override]
        self.writes.append(bytes(data))
        return len(data)


def test_each_printed_line_is_one_write_even_when_python_runs_unbuffered() -> None:
    from kdexp.cli import whole_lines

    raw = _Writes()
    stream = io.TextIOWrapper(raw, encoding="utf-8", write_through=True)  # as under python -u
    print("kdexp: error: one", file=stream, flush=True)
    assert raw.writes == [b"kdexp: error: one", b"\n"]  # two writes: another job's can fall between
    raw.writes.clear()
    whole_lines(stream)
    print("kdexp: error: two", file=stream, flush=True)
    print("kdexp: error: three", file=stream)  # no flush asked: the newline flushes it
    assert raw.writes == [b"kdexp: error: two\n", b"kdexp: error: three\n"]
