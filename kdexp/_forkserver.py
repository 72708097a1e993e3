"""Imported only by the forkserver that joblib's workers fork from (the last entry of
:data:`kdexp.workers.WORKER_PRELOAD`).

When the sweep's launching process exits, the forkserver exits too; tearing down its torch and
MLflow modules one by one would take about 2 s, holding the sweep's output pipe open all that
time. It ends at once instead: it holds nothing to flush or close. The workers it forks end
through ``os._exit`` and never run this.
"""

import atexit
import os

atexit.register(os._exit, 0)
