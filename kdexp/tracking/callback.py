"""Hydra callback that creates the tracking store and experiment before a multirun's jobs start."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

try:
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover - hydra < 1.1
    Callback = object  # type: ignore[misc,assignment]


class PrepareTrackingStore(Callback):  # type: ignore[misc]
    """Creates the MLflow store and experiment once, in the parent process.

    Without it, parallel jobs (joblib, submitit) on a new SQLite file race on schema creation and
    on creating the experiment, and most of them die.
    """

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Prepare the store named by ``config.tracking`` unless tracking is off."""
        tracking = config.get("tracking")
        if tracking is None or not str(tracking.get("_target_", "")).endswith("MlflowTracker"):
            return
        from kdexp.tracking.mlflow import prepare_store

        prepare_store(
            tracking.get("uri"), tracking.get("experiment", "kdexp"), tracking.get("artifact_root")
        )
