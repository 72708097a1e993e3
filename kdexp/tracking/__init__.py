"""Experiment tracking: the only package that talks to MLflow.

``conf/tracking/mlflow.yaml`` builds :class:`kdexp.tracking.mlflow.MlflowTracker`;
``tracking=none`` builds the no-op :class:`kdexp.tracking.base.Tracker`. The run opens exactly one
tracked run per Hydra job with ``with tracker.run(...)``, which closes it FINISHED, or FAILED when
the body raises (KILLED on SIGINT/SIGTERM). Every record also goes to an append-only spool in the
run's folder first (:mod:`kdexp.tracking.spool`), so a tracking outage loses nothing.
"""
