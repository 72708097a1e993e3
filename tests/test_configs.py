"""Every option of every config group composes; every _target_ imports; small ones instantiate."""

from __future__ import annotations

import importlib

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig

from tests.conftest import CONF

GROUPS = ["model", "dataset", "method", "schedule", "tracking"]
OPTIONS = sorted(
    (group, str(path.relative_to(CONF / group).with_suffix("")))
    for group in GROUPS
    for path in (CONF / group).rglob("*.yaml")
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
