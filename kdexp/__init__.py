"""kdexp: config-driven experiments for neural-network compression, tracked in MLflow."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("kdexp")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+local"
