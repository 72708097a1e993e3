"""kdexp: config-driven experiments for neural-network compression, tracked in MLflow."""

import os
from importlib.metadata import PackageNotFoundError, version

# MLflow's usage telemetry starts threads that post to the internet and, at exit, waits up to a
# second per thread for them (seconds on an offline cluster node). Off unless the user sets it.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# Against a tracking server MLflow prints "View run ... / View experiment at .../#/experiments/<id>"
# as each run ends: the experiment link opens the GenAI overview. kdexp prints its own link to
# the runs page's saved view instead. Back on with MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT=false.
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")

try:
    __version__ = version("kdexp")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+local"
