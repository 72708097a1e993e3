"""Transfer learning: class subsets and label budgets, fine-tuning from a source model, the
transfer_digits preset end to end, and final models logged to MLflow and loaded back."""

from __future__ import annotations

import copy
from collections import Counter
from pathlib import Path

import mlflow
import mlflow.pytorch
import numpy as np
import pytest
import torch
import torchvision
from mlflow.tracking import MlflowClient
from sklearn.datasets import load_digits
from torch import nn

from kdexp.checkpoint import save_checkpoint
from kdexp.dataset.base import Data
from kdexp.dataset.digits import load as digits
from kdexp.dataset.synthetic import load as synthetic
from kdexp.errors import ConfigError
from kdexp.method.base import Step
from kdexp.method.finetune import Finetune
from kdexp.run import run
from tests.conftest import run_cli, tracking_overrides

MEAN, STD = 0.3053, 0.3750  # kdexp.dataset.digits normalises with these


def _all(split) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*split, strict=True)
    return torch.cat(xs), torch.cat(ys)


def _original_labels(x: torch.Tensor) -> list[int]:
    """Each normalised image's label in sklearn's digits, found by matching the raw pixels."""
    bunch = load_digits()
    by_image: dict[bytes, set[int]] = {}
    for image, label in zip(bunch.images.astype(np.int64), bunch.target, strict=True):
        by_image.setdefault(image.tobytes(), set()).add(int(label))
    raw = ((x.squeeze(1) * STD + MEAN) * 16).round().long().numpy()
    labels = []
    for image in raw:
        found = by_image[image.tobytes()]
        assert len(found) == 1
        labels.append(found.pop())
    return labels


# ---------------------------------------------------------------- classes and train_limit


def test_classes_keep_only_the_listed_ones_remapped_in_order() -> None:
    classes = [7, 2, 9]
    data = digits(batch_size=64, seed=0, classes=classes, num_classes=3)
    totals: Counter[int] = Counter()
    for split in (data.train, data.val, data.test):
        x, y = _all(split)
        original = _original_labels(x)
        assert [classes[i] for i in y.tolist()] == original  # 0 -> 7, 1 -> 2, 2 -> 9
        totals.update(original)
    reference = Counter(int(t) for t in load_digits().target if t in classes)
    assert totals == reference
    assert data.num_classes == 3


def test_train_limit_caps_training_images_per_class() -> None:
    data = digits(batch_size=64, seed=0, classes=[5, 6, 7, 8, 9], num_classes=5, train_limit=4)
    _, y = _all(data.train)
    assert Counter(y.tolist()) == {c: 4 for c in range(5)}
    full = digits(batch_size=64, seed=0, classes=[5, 6, 7, 8, 9], num_classes=5)
    for split in ("val", "test"):  # the budget is on training labels only
        assert torch.equal(_all(getattr(data, split))[1], _all(getattr(full, split))[1])
    again = digits(batch_size=64, seed=1, classes=[5, 6, 7, 8, 9], num_classes=5, train_limit=4)
    assert torch.allclose(_all(data.train)[0].sum(0), _all(again.train)[0].sum(0))  # split_seed


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"classes": [0, 1], "num_classes": 10}, "dataset.num_classes"),
        ({"classes": [3, 12], "num_classes": 2}, "dataset.classes"),
        ({"classes": [3, 3], "num_classes": 2}, "dataset.classes"),
        ({"classes": [], "num_classes": 0}, "dataset.classes"),
        ({"train_limit": 0}, "dataset.train_limit"),
    ],
)
def test_subset_mistakes_are_config_errors(kwargs: dict, key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        digits(batch_size=8, seed=0, **kwargs)
    assert caught.value.key == key


def test_loader_path_selects_the_same_classes() -> None:
    from torch.utils.data import Dataset

    from kdexp.dataset.torchvision import loader_data

    class Labelled(Dataset):
        def __init__(self, y: list[int]) -> None:
            self.targets = y

        def __len__(self) -> int:
            return len(self.targets)

        def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
            return torch.full((1, 2, 2), float(i)), self.targets[i]

    train = Labelled([i % 4 for i in range(40)])
    test = Labelled([i % 4 for i in range(12)])
    data = loader_data(
        train,
        train,
        test,
        num_classes=2,
        input_shape=(1, 2, 2),
        batch_size=8,
        seed=0,
        val_size=4,
        split_seed=0,
        classes=[3, 1],
        train_limit=5,
    )
    x, y = _all(data.train)
    assert Counter(y.tolist()) == {0: 5, 1: 5}
    assert all(
        train.targets[int(i)] == [3, 1][label] for i, label in zip(x[:, 0, 0, 0], y, strict=True)
    )
    _, test_y = _all(data.test)
    assert Counter(test_y.tolist()) == {0: 3, 1: 3}
    with pytest.raises(ConfigError, match="dataset.num_classes"):
        loader_data(train, train, test, num_classes=4, input_shape=(1, 2, 2), batch_size=8,
                    seed=0, val_size=4, split_seed=0, classes=[3, 1])  # fmt: skip


# ---------------------------------------------------------------- finetune


class Net(nn.Module):
    """A small backbone with BatchNorm and a Linear head."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU())
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))


def _source(tmp_path: Path) -> tuple[Net, Path]:
    torch.manual_seed(1)
    source = Net(10)
    with torch.no_grad():
        source.body[2].running_mean.uniform_(-1, 1)  # statistics that differ from a new model's
    path = tmp_path / "source.pt"
    save_checkpoint(path, source)
    return source, path


def _data() -> Data:
    return digits(batch_size=16, seed=0, classes=[5, 6, 7, 8, 9], num_classes=5)


def _finetuned(tmp_path: Path, **options) -> tuple[Finetune, Net, Net]:
    source, path = _source(tmp_path)
    torch.manual_seed(2)
    model = Net(5)
    method = Finetune(data=_data(), criterion=nn.CrossEntropyLoss(), **options)
    method.load_start(model, path, "checkpoint")
    return method, method.prepare(model), source  # type: ignore[return-value]


def _step(method: Finetune, model: nn.Module, lr: float = 0.1) -> None:
    groups = method.param_groups(model, lr)
    optimizer = torch.optim.SGD(groups, lr=lr)
    model.train()
    x, y = next(iter(method.data.train))
    loss = sum(method.loss(x, y, model(x), Step(0, 0)).values())
    optimizer.zero_grad()
    loss.backward()  # type: ignore[union-attr]
    optimizer.step()


def test_finetune_loads_backbone_and_replaces_head(tmp_path: Path) -> None:
    _, model, source = _finetuned(tmp_path)
    assert model.fc.weight.shape == (5, 16) and source.fc.weight.shape == (10, 16)
    own, theirs = model.state_dict(), source.state_dict()
    for key in theirs:
        if not key.startswith("fc."):
            assert torch.equal(own[key], theirs[key]), key
    torch.manual_seed(2)
    assert torch.equal(model.fc.weight, Net(5).fc.weight)  # the new head's own initialisation


def test_finetune_refuses_other_mismatches(tmp_path: Path) -> None:
    _, path = _source(tmp_path)
    other = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 5))
    method = Finetune(data=_data(), criterion=nn.CrossEntropyLoss())
    with pytest.raises(ConfigError) as caught:
        method.load_start(other, path, "checkpoint")
    assert caught.value.key == "checkpoint"


def test_linear_probe_trains_only_the_head(tmp_path: Path) -> None:
    method, model, _ = _finetuned(tmp_path, mode="linear_probe")
    before = copy.deepcopy(model.state_dict())
    _step(method, model)
    after = model.state_dict()
    for key in before:
        changed = not torch.equal(before[key], after[key])
        assert changed == key.startswith("fc."), key  # BN statistics stay too
    assert len(method.param_groups(model, 0.1)) == 1  # type: ignore[arg-type]


def test_freeze_bn_keeps_running_statistics(tmp_path: Path) -> None:
    method, model, _ = _finetuned(tmp_path, freeze_bn=True)
    bn = model.body[2]
    stats = (bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone())
    w = model.body[1].weight.clone()
    _step(method, model)
    assert torch.equal(bn.running_mean, stats[0]) and torch.equal(bn.running_var, stats[1])
    assert torch.equal(bn.num_batches_tracked, stats[2])
    assert not torch.equal(model.body[1].weight, w)  # the backbone still trains
    method.finalize(model)
    model.train()
    model(torch.randn(4, 1, 8, 8))
    assert not torch.equal(bn.running_mean, stats[0])  # finalize leaves a plain model


def test_backbone_lr_scale_gives_two_groups(tmp_path: Path) -> None:
    method, model, _ = _finetuned(tmp_path, backbone_lr_scale=0.1)
    groups = method.param_groups(model, 0.05)
    assert groups is not None
    assert [g["lr"] for g in groups] == pytest.approx([0.005, 0.05])
    head = {id(p) for p in model.fc.parameters()}
    assert {id(p) for p in groups[1]["params"]} == head
    assert {id(p) for p in groups[0]["params"]} == {
        id(p) for p in model.parameters() if id(p) not in head
    }


def test_transfer_takes_only_the_named_modules_and_the_rest_trains_at_lr(tmp_path: Path) -> None:
    method, model, source = _finetuned(tmp_path, transfer=["body.1"], backbone_lr_scale=0.1)
    assert torch.equal(model.body[1].weight, source.body[1].weight)
    assert torch.equal(model.body[1].bias, source.body[1].bias)
    bn = model.body[2]  # not transferred: a new layer's statistics, not the source's
    assert torch.equal(bn.running_mean, torch.zeros(16))
    assert not torch.equal(bn.running_mean, source.body[2].running_mean)
    groups = method.param_groups(model, 0.05)
    assert groups is not None
    assert [g["lr"] for g in groups] == pytest.approx([0.005, 0.05])
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in model.body[1].parameters()}
    fresh = [*model.body[2].parameters(), *model.fc.parameters()]
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in fresh}


def test_a_linear_probe_with_transfer_freezes_only_what_was_transferred(tmp_path: Path) -> None:
    method, model, _ = _finetuned(tmp_path, transfer=["body.1"], mode="linear_probe")
    before = copy.deepcopy(model.state_dict())
    _step(method, model)
    after = model.state_dict()
    assert torch.equal(before["body.1.weight"], after["body.1.weight"])
    assert not torch.equal(before["body.2.weight"], after["body.2.weight"])  # fresh BN trains
    assert not torch.equal(before["fc.weight"], after["fc.weight"])


def test_transfer_of_a_module_the_model_lacks_names_the_key_and_the_modules(
    tmp_path: Path,
) -> None:
    _, path = _source(tmp_path)
    method = Finetune(data=_data(), criterion=nn.CrossEntropyLoss(), transfer=["features"])
    with pytest.raises(ConfigError) as caught:
        method.load_start(Net(5), path, "checkpoint")
    assert caught.value.key == "method.transfer"
    assert "body.1, body.2, fc" in str(caught.value)
    with pytest.raises(ConfigError) as caught:
        Finetune(data=_data(), criterion=nn.CrossEntropyLoss(), transfer=[])
    assert caught.value.key == "method.transfer"


def test_finetune_option_errors() -> None:
    for options, key in (
        ({"mode": "partial"}, "method.mode"),
        ({"backbone_lr_scale": -1}, "method.backbone_lr_scale"),
        ({"source": {"model": {}}}, "method.source"),
    ):
        with pytest.raises(ConfigError) as caught:
            Finetune(data=_data(), criterion=nn.CrossEntropyLoss(), **options)
        assert caught.value.key == key


def test_finetune_without_source_is_a_config_error(compose_cfg, tmp_path: Path) -> None:
    cfg = compose_cfg(
        "method=finetune", "dataset=synthetic", "schedule.epochs=1", *tracking_overrides(tmp_path)
    )
    with pytest.raises(ConfigError) as caught:
        run(cfg)
    assert caught.value.key == "checkpoint" and "source" in str(caught.value)


# ---------------------------------------------------------------- torchvision weights files


def _tiny_rgb(tmp_path: Path, weights: Path, *extra: str) -> list[str]:
    """Overrides: fine-tune torchvision resnet18 from ``weights`` on 4 classes of 16x16 RGB."""
    return [
        "method=finetune",
        "model=torchvision",
        "model.name=resnet18",
        "dataset=synthetic",
        "dataset.channels=3",
        "dataset.image_size=16",
        "dataset.num_classes=4",
        "dataset.train_samples=48",
        "dataset.test_samples=16",
        "schedule.epochs=1",
        "schedule.batch_size=16",
        "latency_repeats=1",
        "tracking.log_model=false",
        f"checkpoint={weights}",
        *extra,
        *tracking_overrides(tmp_path),
    ]


def test_torchvision_state_dict_is_a_finetune_source(compose_cfg, tmp_path: Path) -> None:
    torch.manual_seed(0)
    saved = torchvision.models.resnet18(num_classes=1000).state_dict()  # random, not downloaded
    path = tmp_path / "resnet18.pth"
    torch.save(saved, path)
    # A linear probe keeps the whole backbone (BatchNorm statistics too) as the file had it.
    run(compose_cfg(*_tiny_rgb(tmp_path, path, "method.mode=linear_probe")))
    client = MlflowClient(tracking_overrides(tmp_path)[0].split("=", 1)[1])
    (found,) = client.search_runs([client.get_experiment_by_name("test").experiment_id])
    assert found.info.status == "FINISHED"
    assert found.data.params["checkpoint"] == str(path)
    final = client.download_artifacts(found.info.run_id, "checkpoints/final.pt", str(tmp_path))
    trained = torch.load(final, weights_only=True)["model"]
    assert trained["fc.weight"].shape == (4, 512) and trained["fc.bias"].shape == (4,)
    backbone = [key for key in saved if not key.startswith("fc.")]
    assert set(trained) == set(saved)
    assert all(torch.equal(trained[key], saved[key]) for key in backbone)
    assert not torch.equal(trained["fc.weight"], saved["fc.weight"][:4])


def test_torchvision_state_dict_full_finetune_starts_from_the_file(tmp_path: Path) -> None:
    from kdexp.model.torchvision import build

    saved = torchvision.models.resnet18(num_classes=1000).state_dict()
    path = tmp_path / "resnet18.pth"
    torch.save(saved, path)
    torch.manual_seed(3)
    model = build("resnet18", 7)
    fresh_head = model.fc.weight.detach().clone()
    data = synthetic(batch_size=8, seed=0, num_classes=7, channels=3, image_size=32)
    method = Finetune(data=data, criterion=nn.CrossEntropyLoss())
    method.load_start(model, path, "checkpoint")
    loaded = model.state_dict()
    assert method.param_groups(method.prepare(model), 0.1) is not None
    assert torch.equal(loaded["layer4.1.conv2.weight"], saved["layer4.1.conv2.weight"])
    assert torch.equal(loaded["bn1.running_var"], saved["bn1.running_var"])
    assert torch.equal(model.fc.weight, fresh_head)  # 7 classes, freshly initialised


@pytest.mark.parametrize(
    ("name", "missing", "unexpected"),
    [
        ("mobilenet_v2", "conv1.weight", "features.0.0.weight"),
        ("resnet34", None, "layer1.2.conv1.weight"),
    ],
)
def test_torchvision_state_dict_of_another_architecture_is_a_config_error(
    compose_cfg, tmp_path: Path, name: str, missing: str | None, unexpected: str
) -> None:
    path = tmp_path / f"{name}.pth"
    torch.save(torchvision.models.get_model(name, num_classes=1000).state_dict(), path)
    with pytest.raises(ConfigError) as caught:
        run(compose_cfg(*_tiny_rgb(tmp_path, path)))
    assert (caught.value.key, caught.value.value) == ("checkpoint", str(path))
    message = str(caught.value)
    assert f"unexpected: {unexpected}" in message
    assert (f"missing: {missing}" in message) == (missing is not None)
    client = MlflowClient(tracking_overrides(tmp_path)[0].split("=", 1)[1])
    experiment = client.get_experiment_by_name("test")
    assert experiment is None or not client.search_runs([experiment.experiment_id])


# ---------------------------------------------------------------- MLflow models


def test_logged_model_loads_back_and_scores_the_logged_accuracy(
    compose_cfg, tmp_path: Path
) -> None:
    overrides = tracking_overrides(tmp_path)
    cfg = compose_cfg(
        "method=baseline", "dataset=digits", "schedule.epochs=2", "latency_repeats=1", *overrides
    )
    run(cfg)
    uri = overrides[0].split("=", 1)[1]
    client = MlflowClient(uri)
    (found,) = client.search_runs([client.get_experiment_by_name("test").experiment_id])
    assert found.info.status == "FINISHED"
    mlflow.set_tracking_uri(uri)
    model = mlflow.pytorch.load_model(f"runs:/{found.info.run_id}/model")
    x, y = _all(digits(batch_size=64, seed=0).test)
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item() * 100
    assert acc == pytest.approx(found.data.metrics["test/acc1"], abs=1e-4)


# ---------------------------------------------------------------- transfer_digits end to end


@pytest.mark.slow
def test_transfer_digits_compares_finetune_and_scratch_fairly(tmp_path: Path) -> None:
    done = run_cli(
        [
            "experiment=transfer_digits",
            "seed=0",  # the preset sweeps seeds 0-4; the command line narrows the sweep
            *tracking_overrides(tmp_path),
            "latency_repeats=1",
            "tracking.log_model=false",
        ],
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    client = MlflowClient(tracking_overrides(tmp_path)[0].split("=", 1)[1])
    runs = client.search_runs([client.get_experiment_by_name("test").experiment_id])
    runs = [r for r in runs if r.data.tags.get("kdexp.role") != "sweep"]  # the sweep's parent
    assert all(r.info.status == "FINISHED" for r in runs)
    by_role = {
        (r.data.tags["method"], r.data.tags["dataset"], r.data.tags["seed"]): r for r in runs
    }  # the source baselines are named digits-source
    roles = [("finetune", "digits"), ("baseline", "digits"), ("baseline", "digits-source")]
    assert sorted(by_role) == sorted((*role, "0") for role in roles)

    def steps(run) -> int:
        return client.get_metric_history(run.info.run_id, "val/acc1")[-1].step  # the last epoch

    source = by_role["baseline", "digits-source", "0"]
    finetuned = by_role["finetune", "digits", "0"]
    scratch = by_role["baseline", "digits", "0"]
    assert source.data.tags["kdexp.trained_for"] == "checkpoint"
    assert source.data.params["dataset.classes"] == "[0, 1, 2, 3, 4]"
    assert source.data.metrics["test/acc1"] > 95  # it knows digits 0-4
    # The same model, labelled images, schedule and number of optimizer steps in both arms:
    # 5 images of each of 5 classes at batch 16 is 2 steps per epoch, for 30 epochs.
    for key in finetuned.data.params:
        if key.startswith(("dataset.", "model.", "schedule.")) or key == "seed":
            assert finetuned.data.params[key] == scratch.data.params[key], key
    assert finetuned.data.params["dataset.train_limit"] == "5"
    assert steps(finetuned) == steps(scratch) == 60
    # Both learn digits 5-9 from 25 labels (chance is 20%). Fine-tuning does not beat scratch
    # on this pairing (measured 90.2 +- 1.5% vs 91.5 +- 0.3% over seeds 0-4, see
    # conf/experiment/transfer_digits.yaml), so that comparison is not asserted.
    for arm in (finetuned, scratch):
        assert arm.data.metrics["test/acc1"] > 80
