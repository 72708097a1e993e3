"""A pruning schedule, a channel importance, an augmentation and a dataset source added from
OUTSIDE kdexp: one module in a temporary folder on PYTHONPATH, one yaml each in a ``--config-dir``,
run end to end through the real ``kdexp`` command with no edit to kdexp, read back from MLflow."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import ROOT, tracking_overrides

TOYS = '''
"""Toy components of a user's own package: kdexp knows nothing of them."""
import os
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from kdexp.dataset.augment import Augment
from kdexp.method.prune.importance import ChannelImportance
from kdexp.method.prune.schedule import Schedule


def _log(line):
    with open(os.environ["TOY_LOG"], "a") as f:
        f.write(line + "\\n")


@dataclass
class Steps(Schedule):
    """Prune to fractions[i] of method.sparsity at steps[i]."""

    name: ClassVar[str] = "steps"
    steps: list = field(default_factory=lambda: [0])
    fractions: list = field(default_factory=lambda: [1.0])

    def plan(self, sparsity, *, total_steps, steps_per_epoch, epochs):
        _log(f"plan total_steps={total_steps}")
        return [(int(s), float(f) * sparsity) for s, f in zip(self.steps, self.fractions)]


class ReverseIndex(ChannelImportance):
    """Channel c of n scores -c (the last channels go first); the input layer is never pruned."""

    name: ClassVar[str] = "reverse_index"

    def scorer(self):
        def score(group):
            _log("importance")
            return -torch.arange(len(group[0].idxs), dtype=torch.float32)

        return score

    def unprunable(self, group):
        root = group[0].dep.target.module
        return "the toy keeps the input layer" if root.in_features == 64 else ""


class Negate(Augment):
    """x -> -x, logging the size of each batch it sees."""

    name: ClassVar[str] = "negate"

    def __call__(self, x, generator):
        _log(f"augment {len(x)}")
        return -x


class TinyDigits:
    """scikit-learn's digits as a torchvision-style dataset: 1,500 training images, 297 test."""

    def __init__(self, root, train=True, download=False):
        from sklearn.datasets import load_digits

        _log(f"source train={train} download={download}")
        digits = load_digits()
        images = torch.as_tensor(digits.images * 255 / 16).round().to(torch.uint8)
        part = slice(0, 1500) if train else slice(1500, None)
        self.data, self.targets = images[part], digits.target[part].tolist()
        self.classes = [str(i) for i in range(10)]
'''

YAMLS = {
    "method/prune/schedule/toy_steps.yaml": """
        _target_: kdexp_toys.Steps
        steps: [0, 2]
        fractions: [0.5, 1.0]
        """,
    "method/prune/importance/toy_reverse.yaml": """
        _target_: kdexp_toys.ReverseIndex
        """,
    "dataset/augment/toy_negate.yaml": """
        _target_: kdexp_toys.Negate
        """,
    "dataset/toy_digits.yaml": """
        _target_: kdexp.dataset.torchvision.load
        _partial_: true
        name: toy_digits
        source:
          _target_: kdexp_toys.TinyDigits
          _partial_: true
        mean: [0.3]
        std: [0.4]
        root: data
        download: true
        num_classes: 10
        channels: 1
        image_size: 8
        val_size: 300
        split_seed: 0
        in_memory: true
        augment: toy_negate
        num_workers: 0
        classes: null
        train_limit: null
        """,
}


def _kdexp(tmp_path: Path, *overrides: str) -> list[str]:
    """Run ``python -m kdexp --config-dir <tmp>/conf OVERRIDES`` with the toy module importable;
    the lines the toys logged."""
    ext, conf = tmp_path / "ext", tmp_path / "conf"
    ext.mkdir()
    (ext / "kdexp_toys.py").write_text(TOYS)
    for path, text in YAMLS.items():
        (conf / path).parent.mkdir(parents=True, exist_ok=True)
        (conf / path).write_text(textwrap.dedent(text).lstrip())
    log = tmp_path / "toys.log"
    env = {**os.environ, "PYTHONPATH": f"{ext}{os.pathsep}{ROOT}", "TOY_LOG": str(log)}
    env.pop("HYDRA_FULL_ERROR", None)
    done = subprocess.run(
        [sys.executable, "-m", "kdexp", "--config-dir", str(conf), *overrides,
         "model=mlp", "schedule.epochs=1", "latency_repeats=1", *tracking_overrides(tmp_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return log.read_text().splitlines()


def _runs(tmp_path: Path) -> tuple[MlflowClient, dict[str, object]]:
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("test").experiment_id])
    return client, {r.data.tags["method"]: r for r in runs}


@pytest.mark.slow
def test_toy_schedule_and_importance_from_outside_kdexp_prune_a_run(tmp_path: Path) -> None:
    lines = _kdexp(
        tmp_path,
        "method=prune/channel",
        "method.sparsity=0.5",
        "method.scope=layerwise",
        "method.schedule=toy_steps",  # the short form finds the yaml on the search path too
        "method/prune/importance@method.importance=toy_reverse",
    )
    client, runs = _runs(tmp_path)
    pruned = runs["prune/channel"]
    assert pruned.info.status == "FINISHED"
    history = client.get_metric_history(pruned.info.run_id, "sparsity/target")
    assert [(m.step, m.value) for m in history] == [(0, 0.25), (2, 0.5)]
    reached = client.get_metric_history(pruned.info.run_id, "sparsity/global")
    assert [(m.step, m.value) for m in reached] == [(0, 0.25), (2, 0.5)]  # 64, then 128 of 256
    # One score per prunable group and update: the input layer was refused by the criterion.
    assert lines.count("importance") == 2
    assert [line for line in lines if line.startswith("plan")] == ["plan total_steps=21"]
    local = client.download_artifacts(
        pruned.info.run_id, "method/layer_sparsity.csv", str(tmp_path)
    )
    rows = list(csv.DictReader(open(local)))
    assert [(r["layer"], r["channels"], r["kept"]) for r in rows] == [("layers.3", "256", "128")]


@pytest.mark.slow
def test_toy_dataset_source_and_augmentation_from_outside_kdexp_train_a_run(
    tmp_path: Path,
) -> None:
    lines = _kdexp(tmp_path, "dataset=toy_digits", "method=baseline", "schedule.batch_size=64")
    client, runs = _runs(tmp_path)
    run = runs["baseline"]
    assert run.info.status == "FINISHED"
    assert run.data.params["dataset.name"] == "toy_digits"
    # Trained on negated images only: it learns them (train/acc1, read on the augmented batches)
    # and so scores below chance on the plain test images.
    metrics = run.data.metrics
    assert metrics["train/acc1"] > 50.0 and metrics["test/acc1"] < 10.0, metrics
    assert [line for line in lines if line.startswith("source")] == [
        "source train=True download=True",
        "source train=False download=False",
    ]
    # Every training batch, and only those, went through the augmentation: 1,500 - 300 held out.
    sizes = [int(line.split()[1]) for line in lines if line.startswith("augment")]
    assert sizes == [64] * 18 + [1200 - 18 * 64]
