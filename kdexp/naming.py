"""Run names that say what differs, a description that holds the command, and a group tag.

MLflow's run list cuts names at about 20 characters, so a name starts with what tells a sweep's
runs apart: the method's short name, the job's overrides in short form, the seed last
(``kd T=8 seed1``). The full command is the run's description (tag ``mlflow.note.content``), and
``kdexp.group`` holds the configuration without the seed, so that MLflow's *Group by* puts the
seeds of one configuration together. A sweep's parent run is named after what the sweep varies
(``sweep kd T=2,4,8 seed=0,1``).
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig, OmegaConf

from kdexp.config import EXECUTION_KEYS, canonical_text, config_hash

if TYPE_CHECKING:
    from kdexp.job import Job
    from kdexp.tracking.base import Tracker

#: The tag that groups runs differing only by their seed.
GROUP_TAG = "kdexp.group"
#: How a model trained for another run is named, by the config key it fills.
_ROLES = {"teacher_checkpoint": "teacher", "checkpoint": "start"}
#: MLflow's tag for a run's description (the UI's Description field).
NOTE_TAG = "mlflow.note.content"
#: Overrides left out of names: how a run is executed, and paths (they are in the description).
_QUIET = (*EXECUTION_KEYS, "seed", "dataset.root", "pipeline")


@cache
def _groups() -> frozenset[str]:
    """kdexp's config groups: the folders of its conf/ (an option names itself in a run name)."""
    import kdexp.conf

    folder = Path(kdexp.conf.__file__).parent
    return frozenset(p.name for p in folder.iterdir() if p.is_dir() and p.name != "__pycache__")


def _split(overrides: str | Sequence[str]) -> list[str]:
    if isinstance(overrides, str):
        if overrides == "(none)":
            return []
        try:
            return shlex.split(overrides)
        except ValueError:
            return overrides.split()
    return list(overrides)


def _short_value(value: str) -> str:
    return canonical_text(value).replace(", ", ",")


def short_overrides(overrides: str | Sequence[str]) -> list[str]:
    """The overrides of a job in short form, in their order: a key's last part and its value
    (``method.T=8`` -> ``T=8``; the full key where two last parts collide), an option by its name
    (``model=resnet20`` -> ``resnet20``, ``model@teacher=wrn_40_2`` -> ``teacher=wrn_40_2``).

    Left out: the method (a name starts with it), the seed (a name ends with it), execution
    settings (tracking, device, ...), and paths.
    """
    pairs = []
    for word in _split(overrides):
        key, sep, value = word.lstrip("+~").partition("=")
        if not sep or key.split(".")[0].split("/")[0] in _QUIET or key in _QUIET:
            continue
        group, _, package = key.partition("@")
        if group == "method":
            continue
        if "." in key or group not in _groups():
            if "/" not in value:  # a path is left to the description
                pairs.append((key, _short_value(value)))
        elif package:
            pairs.append((package, value.rsplit("/", 1)[-1]))
        else:
            pairs.append(("", value.rsplit("/", 1)[-1]))
    last = [k.rsplit(".", 1)[-1] for k, _ in pairs if k]
    words = []
    for key, value in pairs:
        if not key:
            words.append(value)
            continue
        short = key.rsplit(".", 1)[-1]
        words.append(f"{short if last.count(short) == 1 else key}={value}")
    return words


def run_label(method: str, overrides: str | Sequence[str], stage: str | None = None) -> str:
    """The name of a run without its seed: stage, method's short name, short overrides."""
    short = method.rsplit("/", 1)[-1]
    head = [stage, short] if stage and stage != short else [short]
    return " ".join([*head, *short_overrides(overrides)])


def _job_overrides(job: Job) -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return list(HydraConfig.get().overrides.task)
    return _split(job.tags.get("overrides", ""))


def group_key(cfg: DictConfig) -> str:
    """The config hash of ``cfg`` without its seed: equal for runs that differ only by seed."""
    kept = OmegaConf.masked_copy(cfg, [str(k) for k in cfg if k != "seed"])
    return config_hash(kept)


def description(job: Job, overrides: Sequence[str]) -> str:
    """The run's description (Markdown): the command that reproduces it, and its sweep."""
    command = " ".join(["kdexp", *(shlex.quote(w) for w in overrides)])
    lines = [f"`{command}`"]
    if "kdexp.trained_for" in job.tags:
        lines.append(f"\nTrained first, as the `{job.tags['kdexp.trained_for']}` of that command.")
    if "kdexp.stage" in job.tags:
        lines.append(f"\nStage `{job.tags['kdexp.stage']}` of a pipeline.")
    if "sweep_id" in job.tags:
        lines.append(
            f"\nJob {job.tags.get('job_num', '?')} of sweep `{job.tags['sweep_id']}` "
            f"({job.tags.get('sweep_dir', '')})."
        )
    return "\n".join(lines)


def name_run(cfg: DictConfig, job: Job, tracker: Tracker) -> str:
    """The run's name (``kd T=8 seed1``); adds the description and group tags to ``job.tags``.

    In a sweep the swept keys come first, then the seed, then the overrides every job of the
    sweep shares (``baseline lr=0.1 seed1 epochs=1``): the UI's run list shows the first
    twenty characters or so. A short config hash is appended (``kd seed0 #1a2b3c``) only when
    another run of the experiment already has the name with a different configuration.
    """
    overrides = _job_overrides(job)
    role = job.tags.get("kdexp.trained_for")
    if role:  # a teacher or starting model trained first: the job's overrides are not its own
        head, varied, shared = [f"{_ROLES.get(role, role)} {job.names['model']}"], [], []
    else:
        swept = _swept_keys(job)
        head = [run_label(job.names["method"], [], job.tags.get("kdexp.stage"))]
        if swept:
            varied = short_overrides([w for w in overrides if _key(w) in swept])
            shared = short_overrides([w for w in overrides if _key(w) not in swept])
        else:
            varied, shared = short_overrides(overrides), []
    name = " ".join([*head, *varied, f"seed{cfg.seed}", *shared])
    own = config_hash(cfg)
    if set(tracker.config_hashes_named(name)) - {own}:
        name += f" #{own[:6]}"
    again = tracker.config_hashes_named(name).count(own)
    if again:  # the same config run again: numbered, so that the runs stay apart
        name += f" ({again + 1})"
    job.tags[NOTE_TAG] = description(job, overrides)
    job.tags[GROUP_TAG] = " ".join([*head, *varied, *shared, f"[{group_key(cfg)[:8]}]"])
    return name


def _key(word: str) -> str:
    return word.lstrip("+~").partition("=")[0]


def _swept_keys(job: Job) -> set[str]:
    """The keys the job's sweep varies, as its parent run recorded them (``sweep_run.json``)."""
    folder = job.tags.get("sweep_dir")
    if not folder:
        return set()
    from kdexp.sweep import SWEEP_FILE

    try:
        record = json.loads((Path(folder) / SWEEP_FILE).read_text())
    except (OSError, ValueError):
        return set()
    return set(record.get("swept", []))


def swept_keys(overrides: Sequence[str]) -> list[str]:
    """The keys a sweep's overrides vary: its sweeps (``a=1,2``, ``range``, ``choice``, ...) and
    the parameters of a sweeper's search space (``hydra.sweeper.params.<key>``)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except Exception:  # Hydra refuses them itself
        return []
    keys = []
    for override in parsed:
        key = override.get_key_element().lstrip("+~")
        if key.startswith("hydra.sweeper.params."):
            keys.append(key.removeprefix("hydra.sweeper.params."))
        elif override.is_sweep_override():
            keys.append(key)
    return keys


def sweep_name(overrides: Sequence[str]) -> str:
    """A sweep's parent-run name: what it varies (``sweep kd T=2,4,8 seed=0,1``).

    The method leads when the command picks one; the swept keys follow in short form, their
    values as typed. A sweep whose search space lies elsewhere (an Optuna sweeper's
    ``hydra.sweeper.params``) is named after those parameters.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except Exception:  # a name is never worth failing a sweep for
        return "sweep " + " ".join(overrides)[:60]
    head = ["sweep"]
    varied = []
    for override in parsed:
        key = override.get_key_element().lstrip("+~")
        value = str(override.input_line).partition("=")[2]
        if key == "method" and not override.is_sweep_override():
            head.append(value.rsplit("/", 1)[-1])
        elif key.startswith("hydra.sweeper.params."):
            varied.append(f"{key.removeprefix('hydra.sweeper.params.').rsplit('.', 1)[-1]}~")
        elif override.is_sweep_override():
            short = key.rsplit(".", 1)[-1].split("@")[-1]
            varied.append(f"{short}={value.replace(', ', ',')}")
    return " ".join([*head, *varied]) if varied else " ".join(head + ["(one job each)"])
