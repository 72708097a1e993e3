"""joblib's workers start with torch, MLflow and kdexp already imported (:class:`WarmWorkers`).

joblib (loky) starts each worker as a new interpreter, which imports torch, MLflow and kdexp again
before its first job: about 4 s of one core, as long as several small jobs. With Hydra's joblib
launcher, :class:`WarmWorkers` has loky fork its workers from Python's forkserver instead
(:func:`multiprocessing.set_forkserver_preload`), started as the sweep starts with
:data:`WORKER_PRELOAD` imported once, while the launching process prepares the store.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from omegaconf import DictConfig

try:
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover - hydra < 1.1
    Callback = object  # type: ignore[misc,assignment]

log = logging.getLogger(__name__)

#: What a job imports first that the launching process does not, after :mod:`kdexp._forkserver`
#: (the collector off while the rest is imported; the forkserver's own exit quick). What a job
#: imports later (torch.export and mlflow.pyfunc for the logged model, about 1.5 s) is left to the
#: workers, which import it side by side: preloading it too made the first jobs start 1.5 s later
#: and the sweep no faster.
WORKER_PRELOAD = [
    "kdexp._forkserver",
    "kdexp.cli",
    "kdexp.run",
    "kdexp.resume",
    "kdexp.tracking.mlflow",
    "mlflow.tracking",
    "mlflow.store.tracking.sqlalchemy_store",
    "mlflow.pytorch",
    "matplotlib.figure",
    "torch._dynamo",
    "torch.utils.flop_counter",
]
#: torch reads them once, at import: the forkserver gets joblib's share of the cores per worker.
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def worker_threads(n_jobs: int, cores: int) -> int:
    """The threads joblib gives each of ``n_jobs`` workers on ``cores`` cores (its own rule:
    negative ``n_jobs`` counts back from the number of cores)."""
    workers = n_jobs if n_jobs > 0 else max(cores + 1 + n_jobs, 1)
    return max(cores // workers, 1)


class WarmWorkers(Callback):  # type: ignore[misc]
    """Under Hydra's joblib launcher, loky forks its workers from a forkserver that has imported
    :data:`WORKER_PRELOAD` (see the module).

    The forkserver imports torch with the threads joblib would give each worker
    (``OMP_NUM_THREADS`` = cores // n_jobs) unless the environment sets them. A start method
    chosen for loky before the sweep (its ``set_start_method``) is left alone, and where there is
    no forkserver (Windows) loky starts its workers as before. At the sweep's end the idle workers
    are stopped at once.
    """

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Choose the forkserver for loky and start it, when the launcher is joblib's."""
        launcher = config.hydra.launcher
        if not str(launcher.get("_target_", "")).endswith("JoblibLauncher"):
            return
        import multiprocessing
        from multiprocessing import forkserver

        from joblib import cpu_count
        from joblib.externals.loky.backend.context import get_start_method, set_start_method

        if (
            get_start_method() is not None
            or "forkserver" not in multiprocessing.get_all_start_methods()
        ):
            return  # chosen by the user, or Windows: loky's own start method
        threads = str(worker_threads(int(launcher.get("n_jobs") or 1), cpu_count()))
        missing = [var for var in THREAD_VARS if var not in os.environ]  # set ones are kept
        set_start_method("forkserver")
        multiprocessing.set_forkserver_preload(WORKER_PRELOAD)
        os.environ.update(dict.fromkeys(missing, threads))  # for the forkserver only
        try:
            forkserver.ensure_running()  # it imports WORKER_PRELOAD while the sweep starts
        except OSError as error:  # no forkserver here: loky starts its workers as before
            set_start_method(None, force=True)
            log.warning("joblib: workers start without preloaded modules (%s)", error)
        finally:
            for var in missing:
                del os.environ[var]

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Stop joblib's idle workers: otherwise loky keeps the launching process alive until
        each worker has torn its interpreter down."""
        from joblib.externals.loky import reusable_executor

        executor = getattr(reusable_executor, "_executor", None)
        if executor is not None:
            executor.shutdown(wait=True, kill_workers=True)
