"""Who a run is and what it leaves: the records that the run, pipelines and trained inputs share.

:mod:`kdexp.run` executes a config; :mod:`kdexp.pipeline` and :mod:`kdexp.pretrained` are handed
its ``execute`` (an :data:`Execute`) instead of importing it, so that no module imports back the
one that uses it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig


@dataclass
class Job:
    """Who a run is: group names (run name and tags), its output folder, and extra tags."""

    names: dict[str, str]
    out_dir: Path
    tags: dict[str, str] = field(default_factory=dict)


@dataclass
class RunResult:
    """What a run leaves: the final metrics, the final model's checkpoint and lineage.

    ``final_checkpoint`` is None for a reused run (its ``checkpoints/final.pt`` artifact holds it).
    """

    metrics: dict[str, float]
    final_checkpoint: Path | None
    run_id: str | None
    lineage: str
    reused: bool = False
    pruned: bool = False  # a search trial that its pruner stopped early (kdexp.search)


#: ``execute(cfg, job, reuse_finished)``: train (or, with ``reuse_finished``, reuse) one run.
Execute = Callable[[DictConfig, Job, bool], RunResult]
