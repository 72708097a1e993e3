"""Imported only by the forkserver that joblib's workers fork from (the first entry of
:data:`kdexp.workers.WORKER_PRELOAD`).

The forkserver imports the rest of the list with the garbage collector off
(:func:`kdexp.timings.defer_gc`; its passes over torch's, MLflow's and Hydra's objects take 0.7 s
of their bare imports), and the workers it forks
inherit that until their first run is built (:func:`kdexp.timings.resume_gc`), which freezes
everything imported so far out of the collector. Without it, the full collection loky runs in a
worker after its first job (to measure the worker's memory, with psutil installed) went through
every object of torch, MLflow and kdexp and held back each worker's second job by about 0.7 s.

When the sweep's launching process exits, the forkserver exits too; tearing down its torch and
MLflow modules one by one would take about 2 s, holding the sweep's output pipe open all that
time. It ends at once instead: it holds nothing to flush or close. The workers it forks end
through ``os._exit`` and never run this.
"""

import atexit
import os

from kdexp.timings import defer_gc

defer_gc()
atexit.register(os._exit, 0)
