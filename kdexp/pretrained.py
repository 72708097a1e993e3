"""Trained weights for a model config: from a file, from an MLflow run, or trained once and reused.

A teacher (``teacher_checkpoint``) and a starting model (``checkpoint``, for methods that start
from a trained model) name their weights the same way:

- a path to a state_dict or kdexp checkpoint;
- an MLflow run id, or ``runs:/<run id>[/<artifact path>]``: the run's ``checkpoints/final.pt``
  (or ``best.pt``) is downloaded;
- ``auto``: the newest FINISHED baseline run trained from scratch with the same model config,
  dataset config and seed (its ``kdexp.pretrain_key`` tag). When there is none, kdexp trains that
  baseline first, as a run of its own with ``pretrain_schedule`` (or, when that is not set, this
  run's schedule), and every later run with the same
  key reuses it: a sweep over ten students trains its teacher once. A file lock keeps parallel
  jobs from training it twice.
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from kdexp.config import pretrain_key
from kdexp.tracking.base import Tracker

log = logging.getLogger(__name__)

BASELINE_METHOD = {"_target_": "kdexp.method.baseline.Baseline", "_partial_": True}
CHECKPOINT_ARTIFACTS = ("checkpoints/final.pt", "checkpoints/best.pt")


def baseline_config(cfg: DictConfig, model_cfg: DictConfig) -> DictConfig:
    """The config of a plain baseline run of ``model_cfg`` with ``cfg``'s data and seed.

    It trains with ``cfg.pretrain_schedule`` where one is set (``schedule@pretrain_schedule=...``:
    a pruning or quantization run fine-tunes briefly, its dense start needs a full schedule), else
    with ``cfg.schedule``.
    """
    dropped = ("teacher", "pretrain_schedule")
    sub = OmegaConf.masked_copy(cfg, [str(k) for k in cfg if k not in dropped])
    with open_dict(sub):
        if "pretrain_schedule" in cfg:
            sub.schedule = OmegaConf.to_container(cfg.pretrain_schedule)
        sub.model = OmegaConf.to_container(model_cfg)  # interpolations resolve in the new root
        sub.method = dict(BASELINE_METHOD)
        sub.checkpoint = None
        sub.teacher_checkpoint = None
    return sub


def resolve(
    source: str,
    *,
    key: str,
    model_cfg: DictConfig,
    names: dict[str, str],
    cfg: DictConfig,
    tracker: Tracker,
    out_dir: Path,
) -> Path:
    """A local checkpoint file holding trained weights for ``model_cfg``, named by ``source``.

    ``names`` (method, model, dataset) name the baseline run when one has to be trained.
    """
    if source != "auto":
        if Path(source).expanduser().is_file():
            return Path(source).expanduser()
        return tracker.fetch(source, CHECKPOINT_ARTIFACTS, out_dir / "inputs", key)
    sub = baseline_config(cfg, model_cfg)
    digest = pretrain_key(sub)
    with tracker.lock(digest):
        found = tracker.find_finished({"kdexp.pretrain_key": digest})
        if found is not None:
            log.info("%s: reusing run %s (pretrain key %s)", key, found, digest)
            return tracker.fetch(found, CHECKPOINT_ARTIFACTS, out_dir / "inputs" / found, key)
        log.info("%s: no finished run has pretrain key %s; training it first", key, digest)
        from kdexp.run import Job, execute  # run.py imports this module

        result = execute(sub, Job(names, out_dir / key, {"kdexp.trained_for": key}))
        return result.final_checkpoint
