"""Trained weights for a model config: from a file, from an MLflow run, or trained once and reused.

A teacher (``teacher_checkpoint``) and a starting model (``checkpoint``, for methods that start
from a trained model) name their weights the same way:

- a path to a state_dict or kdexp checkpoint;
- an MLflow run id, or ``runs:/<run id>[/<artifact path>]``: the run's ``checkpoints/final.pt``
  (or ``best.pt``) is downloaded;
- ``auto``: a FINISHED baseline run of the same model config, dataset config and seed, trained
  from scratch. With ``schedule@pretrain_schedule=...`` set, the baseline's whole config must
  match (its lineage, :mod:`kdexp.lineage`), schedule included; without it any schedule will do
  (the ``kdexp.pretrain_key`` tag: model, dataset, seed), so that a sweep over a student's
  schedule shares one teacher. When there is none, kdexp trains that baseline first, as a run of
  its own with ``pretrain_schedule`` (or, when that is not set, this run's schedule). A file lock
  keeps parallel jobs from training it twice. ``reuse=never`` trains it again regardless.

Every source comes with its lineage: the key of the run that trained the weights, or the SHA-256
of the file they were read from.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from kdexp.config import pretrain_key
from kdexp.job import Execute, Job, RunResult
from kdexp.lineage import LINEAGE_TAG, file_key
from kdexp.tracking.base import Tracker

log = logging.getLogger(__name__)

#: The method a baseline runs with: the ``method/baseline`` option of the config group.
BASELINE_OPTION = "method/baseline.yaml"
CHECKPOINT_ARTIFACTS = ("checkpoints/final.pt", "checkpoints/best.pt")


def baseline_config(cfg: DictConfig, model_cfg: DictConfig) -> DictConfig:
    """The config of a plain baseline run of ``model_cfg`` with ``cfg``'s data and seed.

    It trains with ``cfg.pretrain_schedule`` where one is set (``schedule@pretrain_schedule=...``:
    a pruning or quantization run fine-tunes briefly, its dense start needs a full schedule), else
    with ``cfg.schedule``.
    """
    # ``arm`` labels a preset's own runs: a start trained for one of them is not that arm
    dropped = ("teacher", "pretrain_schedule", "pretrain_dataset", "arm")
    sub = OmegaConf.masked_copy(cfg, [str(k) for k in cfg if k not in dropped])
    with open_dict(sub):
        if "pretrain_schedule" in cfg:
            sub.schedule = OmegaConf.to_container(cfg.pretrain_schedule)
        if OmegaConf.select(cfg, "pretrain_dataset") is not None:  # issue 13: a jittered teacher
            sub.dataset = OmegaConf.merge(cfg.dataset, cfg.pretrain_dataset)
        sub.model = OmegaConf.to_container(model_cfg)  # interpolations resolve in the new root
        sub.method = _baseline_method()
        sub.checkpoint = None
        sub.teacher_checkpoint = None
    return sub


def _baseline_method() -> dict:
    """The baseline method's config, as its yaml in the config group gives it."""
    text = (files("kdexp.conf") / BASELINE_OPTION).read_text()
    node = OmegaConf.to_container(OmegaConf.create(text))
    assert isinstance(node, dict)
    return node


@dataclass
class Weights:
    """Trained weights: the local file, their lineage, and the run that trained them (if any)."""

    path: Path
    lineage: str
    run_id: str | None = None


def resolve(
    source: str,
    *,
    key: str,
    model_cfg: DictConfig,
    names: dict[str, str],
    cfg: DictConfig,
    tracker: Tracker,
    out_dir: Path,
    execute: Execute,
) -> Weights:
    """The trained weights for ``model_cfg`` that ``source`` names, as a local file.

    ``names`` (method, model, dataset) name the baseline run when one has to be trained, by
    ``execute`` (:func:`kdexp.run.execute`).
    """
    if source != "auto":
        file = Path(source).expanduser()
        if file.is_file():
            return Weights(file, file_key(file))
        return _from_run(tracker, source, out_dir / "inputs", key)
    sub = baseline_config(cfg, model_cfg)
    job = Job(names, out_dir / key, {"kdexp.trained_for": key})
    reuse = OmegaConf.select(cfg, "reuse", default="auto") == "auto"
    if "pretrain_schedule" in cfg:  # the schedule is given: the whole config must match
        result = _isolated_rng(lambda: execute(sub, job, reuse))
        if result.reused:
            log.info("%s: reusing run %s (lineage %s)", key, result.run_id, result.lineage)
        return _weights(tracker, result, out_dir / "inputs", key)
    digest = pretrain_key(sub)
    with tracker.lock(digest):
        found = tracker.find_finished({"kdexp.pretrain_key": digest}) if reuse else None
        if found is not None:
            log.info("%s: reusing run %s (pretrain key %s)", key, found, digest)
            return _from_run(tracker, found, out_dir / "inputs" / found, key)
        log.info("%s: no finished run has pretrain key %s; training it first", key, digest)
        result = _isolated_rng(lambda: execute(sub, job, False))
        return _weights(tracker, result, out_dir / "inputs", key)


def _from_run(tracker: Tracker, source: str, destination: Path, key: str) -> Weights:
    """The final (or best) checkpoint of run ``source`` (an id or ``runs:/``), with its lineage.

    The run's lineage tag names its final model; any other file is known by its bytes.
    """
    path = tracker.fetch(source, CHECKPOINT_ARTIFACTS, destination, key)
    run_id, _, inner = source.removeprefix("runs:/").partition("/")
    lineage = None
    if path.name == "final.pt" and inner in ("", CHECKPOINT_ARTIFACTS[0]):
        lineage = tracker.run_tag(run_id, LINEAGE_TAG, key)
    return Weights(path, lineage or file_key(path), run_id)


def _weights(tracker: Tracker, result: RunResult, destination: Path, key: str) -> Weights:
    if result.final_checkpoint is not None:
        return Weights(result.final_checkpoint, result.lineage, result.run_id)
    assert result.run_id is not None  # a reused run
    path = tracker.fetch(result.run_id, CHECKPOINT_ARTIFACTS, destination / result.run_id, key)
    return Weights(path, result.lineage, result.run_id)


def _isolated_rng(train: Callable[[], RunResult]) -> RunResult:
    """Train an input in-process without moving the caller's random streams: a run whose teacher
    was trained first and one that reused it draw the same numbers afterwards."""
    with _saved_rng():
        return train()


@contextmanager
def _saved_rng() -> Iterator[None]:
    python, numpy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=range(torch.cuda.device_count())):
        try:
            yield
        finally:
            random.setstate(python)
            np.random.set_state(numpy)
