"""Named choices of a config group: a component given by the name of its yaml.

A pruning schedule, a channel importance or an augmentation is a ``_target_`` node that Hydra's
defaults list puts in place (``method/prune/schedule@method.schedule=linear``). The short form
``method.schedule=linear`` works too: the key then holds a string, and :func:`build` loads
``<group>/<name>.yaml`` from Hydra's search path (kdexp's ``conf/``, then any ``--config-dir`` or
``hydra.searchpath`` entry, so a component added outside kdexp is found by name as well) and
instantiates it. The options a user can name are the yaml files of the group; files starting
with ``_`` are shared pieces, not options.
"""

from __future__ import annotations

import importlib.resources
import logging
from collections.abc import Mapping
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from kdexp.errors import ConfigError

log = logging.getLogger(__name__)
_warned: set[str] = set()


#: Config groups whose options are components of another group's option (a pruning method's
#: schedule, a dataset's augmentation), chosen by a key of theirs, never as that group's option.
COMPONENT_GROUPS = ("method/prune/schedule", "method/prune/importance", "dataset/augment")


def _roots() -> list[Traversable]:
    """The config folders Hydra searches, in its order; kdexp's own conf/ when Hydra is not set."""
    roots: list[Traversable] = []
    if HydraConfig.initialized():
        for source in HydraConfig.get().runtime.config_sources:
            schema, path = str(source.schema), str(source.path)
            if schema == "file":
                roots.append(Path(path))
            elif schema == "pkg" and path.replace("/", ".") != "hydra.conf":
                try:
                    roots.append(importlib.resources.files(path.replace("/", ".")))
                except ModuleNotFoundError:
                    continue
    roots.append(importlib.resources.files("kdexp.conf"))
    return roots


def _files(group: str) -> dict[str, Traversable]:
    """``{option: yaml file}`` of ``group`` over the search path; the first folder wins."""
    found: dict[str, Traversable] = {}
    for root in _roots():
        folder = root.joinpath(*group.split("/"))
        if not folder.is_dir():
            continue
        for entry in folder.iterdir():
            name = entry.name
            if entry.is_file() and name.endswith(".yaml") and not name.startswith("_"):
                found.setdefault(name[: -len(".yaml")], entry)
    return found


def options(group: str) -> list[str]:
    """The names a user can give for ``group`` (its yaml files, ``_``-prefixed ones left out)."""
    return sorted(_files(group))


def node(group: str, name: str, key: str) -> DictConfig:
    """The config of option ``name`` of ``group``; ConfigError naming ``key`` when none exists."""
    files = _files(group)
    if name not in files:
        raise ConfigError(key, name, f"one of {', '.join(sorted(files))} (conf/{group}/*.yaml)")
    config = OmegaConf.create(files[name].read_text())
    assert isinstance(config, DictConfig)
    config.pop("defaults", None)
    return config


def build(value: Any, group: str, key: str) -> Any:
    """The component ``value`` stands for: None stays None, a name is looked up in ``group``
    (:func:`node`) and instantiated, a ``_target_`` mapping is instantiated, anything else (an
    object already built) is returned as is."""
    if value is None:
        return None
    if isinstance(value, str):
        return instantiate(node(group, value, key))
    if isinstance(value, DictConfig | Mapping) and "_target_" in value:
        return instantiate(value)
    return value


def warn_once(old: str, message: str) -> None:
    """Log ``message`` about the old key ``old`` once per process."""
    if old not in _warned:
        _warned.add(old)
        log.warning(message)
