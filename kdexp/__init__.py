"""kdexp: config-driven experiments for neural-network compression, tracked in MLflow."""

import os
from importlib.metadata import PackageNotFoundError, version

# MLflow's usage telemetry starts threads that post to the internet and, at exit, waits up to a
# second per thread for them (seconds on an offline cluster node). Off unless the user sets it.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

try:
    __version__ = version("kdexp")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+local"
