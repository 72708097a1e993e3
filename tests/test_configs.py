"""Every option of every config group composes; every _target_ imports; small ones instantiate."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

from tests.conftest import CONF

GROUPS = ["model", "dataset", "method", "schedule", "tracking"]
# Groups of components that a method or dataset holds (not options of the group above them), and
# the class each of their entries must build.
COMPONENTS = {
    "method/prune/schedule": "kdexp.method.prune.schedule.Schedule",
    "method/prune/importance": "kdexp.method.prune.importance.ChannelImportance",
    "dataset/augment": "kdexp.dataset.augment.Augment",
}


def _is_option(path: Path) -> bool:
    """A user option: not a shared ``_`` piece, not in a component group."""
    relative = path.relative_to(CONF).as_posix()
    return not path.name.startswith("_") and not any(
        relative.startswith(f"{group}/") for group in COMPONENTS
    )


OPTIONS = sorted(
    (group, str(path.relative_to(CONF / group).with_suffix("")))
    for group in GROUPS
    for path in (CONF / group).rglob("*.yaml")
    if _is_option(path)
)
COMPONENT_OPTIONS = sorted(
    (group, path.stem) for group in COMPONENTS for path in (CONF / group).glob("*.yaml")
)
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
# Sources that need files on disk are built in tests/test_datasets.py instead.
NEEDS_FILES = {"mnist", "fashion_mnist", "cifar10", "cifar100", "imagefolder"}


def _targets(node: object) -> list[str]:
    if isinstance(node, DictConfig):
        found = [str(node["_target_"])] if "_target_" in node else []
        return found + [t for v in node.values() for t in _targets(v)]
    if isinstance(node, ListConfig):
        return [t for v in node for t in _targets(v)]
    return []


def _import(target: str) -> object:
    module, _, name = target.rpartition(".")
    return getattr(importlib.import_module(module), name)


def test_every_group_has_options() -> None:
    for group in [*GROUPS, "experiment"]:
        assert list((CONF / group).rglob("*.yaml")), f"conf/{group} is empty"


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_option_composes_and_targets_import(compose_cfg, group: str, option: str) -> None:
    cfg = compose_cfg(f"{group}={option}")
    node = cfg[group]
    for target in _targets(node):
        assert callable(_import(target)), target
    if group == "dataset" and option not in NEEDS_FILES:
        data = instantiate(node)(batch_size=8, seed=0)
        x, y = next(iter(data.train))
        assert x.shape == (8, node.channels, node.image_size, node.image_size)
        assert int(y.max()) < node.num_classes
    if group == "model":
        model = instantiate(node)
        x = torch.randn(2, cfg.dataset.channels, cfg.dataset.image_size, cfg.dataset.image_size)
        assert model(x).shape == (2, cfg.dataset.num_classes)
    if group == "schedule":
        model = torch.nn.Linear(2, 2)
        optimizer = instantiate(node.optimizer)(params=model.parameters())
        assert optimizer.param_groups[0]["lr"] == pytest.approx(node.lr)
        instantiate(node.scheduler)(optimizer, epochs=node.epochs, steps_per_epoch=3)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes(compose_cfg, name: str) -> None:
    cfg = compose_cfg(f"experiment={name}")
    assert (CONF / "experiment" / f"{name}.yaml").read_text().startswith("# @package _global_")
    for target in [t for key in cfg if key != "hydra" for t in _targets(cfg[key])]:
        assert callable(_import(target)), target


def test_model_follows_dataset_without_edits(compose_cfg) -> None:
    cfg = compose_cfg("dataset=cifar100", "model=resnet8")
    assert (cfg.model.num_classes, cfg.model.in_channels) == (100, 3)


@pytest.mark.parametrize(
    ("group", "option"), COMPONENT_OPTIONS, ids=[f"{g}={o}" for g, o in COMPONENT_OPTIONS]
)
def test_component_builds_its_class_and_is_found_by_name(group: str, option: str) -> None:
    from kdexp import choices

    expected = _import(COMPONENTS[group])
    built = instantiate(OmegaConf.load(CONF / group / f"{option}.yaml"))
    assert isinstance(built, expected), (group, option, built)  # type: ignore[arg-type]
    assert option in choices.options(group)
    assert type(choices.build(option, group, "key")) is type(built)


def test_shared_pieces_are_not_options() -> None:
    from kdexp import choices

    shared = sorted(p.relative_to(CONF).as_posix() for p in CONF.rglob("_*.yaml"))
    assert shared == ["method/distill/_teacher.yaml", "method/prune/_base.yaml"]
    assert "_base" not in choices.options("method/prune")
    assert ("method", "prune/_base") not in OPTIONS
    assert ("method", "prune/schedule/agp") not in OPTIONS
    assert ("method", "prune/magnitude") in OPTIONS
