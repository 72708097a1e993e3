"""Pruning: masks against torch.nn.utils.prune, schedules against their formulas, channel
pruning against the masked model, shrunk checkpoints, bad input, runs read back from MLflow."""

from __future__ import annotations

import copy
import csv
import io
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from torch import nn
from torch.nn.utils import prune

import kdexp.run
from kdexp.checkpoint import save_checkpoint
from kdexp.dataset.synthetic import load as synthetic
from kdexp.errors import ConfigError
from kdexp.method.base import Step
from kdexp.method.prune import Channel, Magnitude, Random, Sensitivity, Taylor, load_pruned
from kdexp.model.mlp import MLP
from kdexp.model.resnet_cifar import CifarResNet
from kdexp.run import run
from kdexp.schedule import constant
from kdexp.tracking.base import Tracker
from kdexp.train import LoopOptions, fit
from tests.conftest import run_cli, tracking_overrides

CE = nn.CrossEntropyLoss()


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def _convnet() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 10),
    )


def _randomise_bn(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)


def test_global_magnitude_masks_equal_torch_global_unstructured() -> None:
    data = synthetic(batch_size=16, seed=0)
    model = _convnet()
    reference = copy.deepcopy(model)
    method = Magnitude(data=data, criterion=CE, sparsity=0.7, epochs=1, schedule="oneshot")
    method.prepare(model)
    method.after_step(Step(0, 0))
    layers = [(m, "weight") for m in reference.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    prune.global_unstructured(layers, pruning_method=prune.L1Unstructured, amount=0.7)
    names = ["0", "3", "8"]
    for name, (module, _) in zip(names, layers, strict=True):
        assert torch.equal(method.masks[name], module.weight_mask.bool())
        assert torch.equal(dict(model.named_modules())[name].weight, module.weight)


def test_layerwise_scope_prunes_the_same_ratio_of_every_layer() -> None:
    data = synthetic(batch_size=16, seed=0)
    model = _mlp()
    method = Magnitude(
        data=data, criterion=CE, sparsity=0.6, epochs=1, schedule="oneshot", scope="layerwise"
    )
    method.prepare(model)
    metrics = method.after_step(Step(0, 0))
    assert metrics["sparsity/1"] == round(0.6 * 64 * 32) / (64 * 32)
    assert metrics["sparsity/3"] == round(0.6 * 32 * 10) / (32 * 10)
    # the pruned weights of each layer are its smallest ones
    w = _mlp()[1].weight.abs()
    assert torch.equal(method.masks["1"], w > w.flatten().kthvalue(round(0.6 * w.numel())).values)


@pytest.mark.parametrize("criterion", [Sensitivity, Taylor, Random])
def test_other_criteria_prune_by_their_scores(criterion: type) -> None:
    data = synthetic(batch_size=16, seed=0)
    model = _mlp()
    method = criterion(
        data=data, criterion=CE, sparsity=0.5, epochs=1, schedule="oneshot", calibration_batches=3
    )
    method.prepare(model)
    metrics = method.after_step(Step(0, 0))
    assert metrics["sparsity/global"] == pytest.approx(0.5, abs=1e-3)
    if criterion is Random:
        return
    # independent reference: Σ_b |g_b| (or |w·g_b|) over the first three training batches
    reference = _mlp().eval()
    score = torch.zeros_like(reference[1].weight)
    for i, (x, y) in enumerate(synthetic(batch_size=16, seed=0).train):  # the same batches
        if i == 3:
            break
        reference.zero_grad()
        CE(reference(x), y).backward()
        g = reference[1].weight.grad
        score += (g * reference[1].weight).abs() if criterion is Taylor else g.abs()
    kept = method.masks["1"]
    assert score[kept].min() >= score[~kept].max()


def _train(method, model: nn.Module, data, epochs: int) -> list[tuple[int, dict[str, float]]]:
    """The loop's order: step, then after_step; the metrics of each mask update."""
    method.prepare(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    logged, step = [], 0
    for _ in range(epochs):
        for x, y in data.train:
            optimizer.zero_grad()
            sum(method.loss(x, y, model(x), Step(0, 0)).values()).backward()
            optimizer.step()
            metrics = method.after_step(Step(0, step))
            if "sparsity/global" in metrics:
                logged.append((step, metrics))
            step += 1
    return logged


SCHEDULES = {
    "oneshot": {},
    "iterative": {"rounds": 3, "epochs_per_round": 1},
    "agp": {"initial_sparsity": 0.1, "start_epoch": 1, "frequency": 4, "updates": 5},
    "linear": {"frequency": 6, "updates": 4},
}


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
def test_schedule_reaches_target_and_pruned_weights_stay_zero(schedule: str) -> None:
    data = synthetic(batch_size=32, seed=0)  # 448 training samples: 14 steps per epoch
    model = _mlp()
    method = Magnitude(
        data=data, criterion=CE, sparsity=0.8, epochs=4, schedule=schedule, **SCHEDULES[schedule]
    )
    logged = _train(method, model, data, epochs=4)
    final = logged[-1][1]
    assert final["sparsity/global"] == pytest.approx(0.8, abs=0.005)
    for name, mask in method.masks.items():
        weight = dict(model.named_modules())[name].weight
        assert torch.all(weight[~mask] == 0)  # exactly zero after all the fine-tuning steps
        assert torch.count_nonzero(weight[mask]) == mask.sum()
    targets = [m["sparsity/target"] for _, m in logged]
    assert targets == sorted(targets)  # sparsity only grows
    steps = [s for s, _ in logged]
    if schedule == "oneshot":
        assert steps == [0]
    if schedule == "iterative":
        assert steps == [0, 14, 28]
        assert targets == pytest.approx([1 - 0.2 ** (k / 3) for k in (1, 2, 3)])
        assert [m["prune/round"] for _, m in logged] == [1, 2, 3]
    if schedule == "agp":
        t0, dt, n, s_i, s_f = 14, 4, 5, 0.1, 0.8
        assert steps == [t0 + i * dt for i in range(n + 1)]
        for t, m in logged:
            expected = s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt)) ** 3
            assert m["sparsity/target"] == pytest.approx(expected, abs=1e-12)
            assert m["sparsity/global"] == pytest.approx(expected, abs=1.0 / 2368)
    if schedule == "linear":
        assert steps == [0, 6, 12, 18, 24]
        assert targets == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8])


def test_channel_pruning_shrinks_to_the_masked_model_and_reloads(tmp_path: Path) -> None:
    data = synthetic(batch_size=16, seed=0)
    model = _convnet()
    _randomise_bn(model)
    method = Channel(data=data, criterion=CE, sparsity=0.5, epochs=1, scope="layerwise")
    method.prepare(model)
    metrics = method.after_step(Step(0, 0))
    assert metrics["sparsity/0"] == 0.5 and metrics["sparsity/3"] == 0.5  # 4 of 8, 3 of 6
    # l1 importance: the filters of smallest L1 norm (the group's norms, normalised: same order
    # here except for the BN and the next layer's inputs, so check the pruned count and zeros)
    model.eval()
    x = torch.randn(5, 1, 8, 8)
    masked = model(x)
    dense_params = sum(p.numel() for p in model.parameters())
    small = method.finalize(model)
    assert torch.allclose(small(x), masked, atol=1e-5)
    assert small[0].out_channels == 4 and small[3].out_channels == 3 and small[8].in_features == 3
    removed = (4 * 9 + 4) + 2 * 4 + (6 * 4 * 9) + (3 * 4 * 9 + 3) + 2 * 3 + 10 * 3
    assert sum(p.numel() for p in small.parameters()) == dense_params - removed
    save_checkpoint(tmp_path / "final.pt", small)
    reloaded = load_pruned(_convnet(), tmp_path / "final.pt", (1, 8, 8)).eval()
    assert torch.equal(reloaded(x), small(x))


@pytest.mark.parametrize("importance", ["l1", "l2", "bn_scale", "taylor"])
def test_channel_pruning_of_resnet20_handles_residuals(importance: str, tmp_path: Path) -> None:
    data = synthetic(batch_size=8, seed=0, channels=3, image_size=32, train_samples=32)
    model = CifarResNet(20, 10, 3)
    _randomise_bn(model)
    method = Channel(
        data=data, criterion=CE, sparsity=0.5, epochs=1, importance=importance, scope="global"
    )
    method.prepare(model)
    assert method.after_step(Step(0, 0))["sparsity/global"] == pytest.approx(0.5, abs=0.005)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    masked = model(x)
    small = method.finalize(model)
    assert torch.allclose(small(x), masked, atol=1e-4)
    assert small.fc.out_features == 10
    assert sum(p.numel() for p in small.parameters()) < 0.4 * 272474
    save_checkpoint(tmp_path / "final.pt", small)
    reloaded = load_pruned(CifarResNet(20, 10, 3), tmp_path / "final.pt", (3, 32, 32)).eval()
    assert torch.equal(reloaded(x), small(x))


# -- bad input: ConfigError before any training ---------------------------------------------------
BAD = {
    "sparsity_one": (["method=prune/magnitude", "method.sparsity=1.0"], "method.sparsity=1.0"),
    "sparsity_negative": (["method=prune/magnitude", "method.sparsity=-0.1"], "[0, 1)"),
    "unknown_layer": (
        ["method=prune/magnitude", "method.layers=[nope]"],
        "method.layers='nope': a module path of MLP: layers, layers.0",
    ),
    "updates_do_not_fit": (
        ["method=prune/magnitude", "method.updates=50", "method.frequency=10"],
        "method.updates=50: updates that fit the run",
    ),
    "iterative_rounds": (
        ["method=prune/magnitude", "method.schedule=iterative", "method.rounds=11"],
        "method.rounds=11",
    ),
    "unprunable_channel": (
        ["method=prune/channel", "model=resnet8", "method.layers=[fc]"],
        "method.layers='fc': a layer whose output channels can be removed",
    ),
    "bad_schedule": (
        ["method=prune/magnitude", "method.schedule=cubic"],
        "method.schedule='cubic': one of agp, iterative, linear, oneshot",
    ),
    "bad_schedule_knob": (
        ["method=prune/magnitude", "method.schedule.frequency=0"],
        "method.schedule.frequency=0: a positive integer",
    ),
    "bad_importance": (
        ["method=prune/channel", "method.importance=l3"],
        "method.importance='l3': one of bn_scale, l1, l2, taylor",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_pruning_input_fails_before_training(
    compose_cfg, tmp_path: Path, monkeypatch, case: str
) -> None:
    overrides, message = BAD[case]
    cfg = compose_cfg(*overrides, "schedule.epochs=10", "tracking=none")
    weights = tmp_path / "dense.pt"
    from hydra.utils import instantiate

    torch.save(instantiate(cfg.model).state_dict(), weights)
    cfg.checkpoint = str(weights)

    def no_training(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(kdexp.run, "fit", no_training)
    with pytest.raises(ConfigError) as error:
        run(cfg)
    assert message in str(error.value)


def test_prune_and_distill_compose_and_run(compose_cfg, tmp_path: Path) -> None:
    cfg = compose_cfg(
        "method=prune/magnitude",
        "+method/distill@method.distill=kd",
        "schedule.epochs=1",
        "method.updates=2",
        "method.frequency=3",
        "latency_repeats=1",
        "objective=test/acc1",
        "tracking=none",
    )
    assert cfg.teacher.hidden == [1200, 1200]  # kd's default teacher came along
    for key, model_cfg in (("checkpoint", cfg.model), ("teacher_checkpoint", cfg.teacher)):
        from hydra.utils import instantiate

        torch.save(instantiate(model_cfg).state_dict(), tmp_path / f"{key}.pt")
        cfg[key] = str(tmp_path / f"{key}.pt")
    terms: list[set[str]] = []
    original = Magnitude.loss

    def spy(self, inputs, targets, logits, ctx):
        out = original(self, inputs, targets, logits, ctx)
        terms.append(set(out))
        return out

    Magnitude.loss = spy  # type: ignore[method-assign]
    try:
        run(cfg)
    finally:
        Magnitude.loss = original  # type: ignore[method-assign]
    assert terms[0] == {"ce", "kd"}
    final = torch.load(tmp_path / "run" / "checkpoints" / "final.pt", weights_only=True)["model"]
    weights = [v for k, v in final.items() if k.endswith("weight")]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert zeros == pytest.approx(0.8, abs=0.005)


# -- end to end ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_cli_run_logs_sparsity_stats_and_artifacts(tmp_path: Path) -> None:
    done = run_cli(
        [
            "method=prune/magnitude",
            "schedule.epochs=2",
            "method.updates=3",
            "method.frequency=5",
            "latency_repeats=1",
            *tracking_overrides(tmp_path),
        ],
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("test").experiment_id])
    (pruned,) = [r for r in runs if r.data.tags["method"] == "prune/magnitude"]
    # The terminal: epochs count from 0 as in MLflow, losses are labelled, sparsity is printed,
    # and the run's link comes before its first epoch.
    out = done.stdout + done.stderr
    last = client.get_metric_history(pruned.info.run_id, "sparsity/global")[-1].value
    assert "epoch 1 (0-1)  train/epoch_loss " in out and " val/loss " in out
    assert f"sparsity {last:.4f}" in out
    started = out.index("started; logging to")
    assert started < out.index("epoch 0 (0-1)") and "#/experiments/" in out[started:]
    (dense,) = [r for r in runs if r.data.tags["method"] == "baseline"]
    history = client.get_metric_history(pruned.info.run_id, "sparsity/global")
    assert [m.step for m in history] == [0, 5, 10, 15]
    targets = client.get_metric_history(pruned.info.run_id, "sparsity/target")
    assert [m.value for m in targets] == pytest.approx(
        [0.8 * (1 - (1 - i / 3) ** 3) for i in range(4)]
    )
    linears = [n for n, m in MLP(10, 1, 8, [256, 256]).named_modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 3
    for layer in linears:
        assert len(client.get_metric_history(pruned.info.run_id, f"sparsity/{layer}")) == 4
    metrics = pruned.data.metrics
    assert metrics["sparsity/global"] == pytest.approx(0.8, abs=0.005)
    assert (
        metrics["model/dense_params"]
        == metrics["model/params"]
        == dense.data.metrics["model/params"]
    )
    assert metrics["model/dense_flops"] == dense.data.metrics["model/flops"]
    assert metrics["model/dense_latency_ms"] > 0
    assert metrics["model/nonzero_params"] < 0.3 * metrics["model/params"]
    files = {a.path for a in client.list_artifacts(pruned.info.run_id, "method")}
    assert {"method/sparsity_curve.png", "method/layer_sparsity.png"} <= files
    assert "method/layer_sparsity.csv" in files
    local = client.download_artifacts(
        pruned.info.run_id, "method/layer_sparsity.csv", str(tmp_path)
    )
    rows = list(csv.DictReader(open(local)))
    assert [r["layer"] for r in rows] == linears


@pytest.mark.slow
def test_agp_80_percent_magnitude_loses_at_most_a_point_on_digits(
    compose_cfg, tmp_path: Path
) -> None:
    cfg = compose_cfg(
        "method=prune/magnitude",
        "method.sparsity=0.8",
        "method.schedule=agp",
        "method.updates=20",
        "method.frequency=10",
        "test_on=last",
        "objective=test/acc1",
        "latency_repeats=1",
        *tracking_overrides(tmp_path),
    )
    pruned = run(cfg)
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("test").experiment_id])
    (dense,) = [r for r in runs if r.data.tags["method"] == "baseline"]
    assert pruned >= dense.data.metrics["test/acc1"] - 1.0, (pruned, dense.data.metrics)


PRESETS = {
    "han2015_lenet300_100": ("LeNet300_100", "magnitude", 0.92, "agp"),
    "agp_resnet20_cifar10": ("CifarResNet", "magnitude", 0.8, "agp"),
    "seed_resnet18_sensitivity": ("build", "sensitivity", 0.7, "iterative"),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_pruning_preset_composes_and_runs_on_synthetic_data_of_its_shape(
    compose_cfg, name: str
) -> None:
    model, method, sparsity, schedule = PRESETS[name]
    real = compose_cfg(f"experiment={name}")
    assert real.model._target_.endswith(model)
    assert real.method._target_.lower().endswith(method.replace("_", ""))
    assert real.method.sparsity == sparsity
    assert real.method.schedule._target_.lower().endswith(f".{schedule}")
    cfg = compose_cfg(
        f"experiment={name}",
        "hydra.mode=RUN",  # a preset that sweeps its arms runs here as one job
        "dataset=synthetic",
        f"dataset.num_classes={real.dataset.num_classes}",
        f"dataset.channels={real.dataset.channels}",
        f"dataset.image_size={real.dataset.image_size}",
        "dataset.train_samples=48",
        "dataset.test_samples=16",
        "dataset.val_size=16",
        "schedule.epochs=1",
        "schedule.batch_size=16",
        "pretrain_schedule.epochs=1",  # the dense start the preset trains first
        "pretrain_schedule.batch_size=16",
        "method.schedule=oneshot",  # the preset's schedule needs its full length
        "tracking=none",
        "latency_repeats=1",
    )
    assert 0.0 <= run(cfg) <= 100.0


def test_dense_copy_is_not_a_trained_part_of_the_method() -> None:
    data = synthetic(batch_size=16, seed=0)
    method = Magnitude(data=data, criterion=CE, sparsity=0.5, epochs=1)
    method.prepare(_mlp())
    assert list(method.parameters()) == []
    assert set(method.final_metrics()) >= {"model/dense_params", "model/dense_flops"}


def test_best_checkpoint_waits_for_the_final_masks(tmp_path) -> None:

    torch.manual_seed(0)
    data = synthetic(batch_size=32, seed=0, noise=0.3)  # 14 steps an epoch
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    method = Magnitude(
        data=data,
        criterion=nn.CrossEntropyLoss(),
        sparsity=0.9,
        schedule="linear",
        epochs=3,
        frequency=5,
        updates=4,
    )  # masks change until step 20, in epoch 2
    method.prepare(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    options = LoopOptions(epochs=3, device=torch.device("cpu"), checkpoint_dir=tmp_path)
    result = fit(model, method, data, opt, constant(opt, 3, len(data.train)), Tracker(), options)
    assert result.best_epoch >= 1  # epoch 0 (fewer zeros) never counts as best
    best = torch.load(tmp_path / "best.pt", weights_only=True)["model"]
    assert (best["1.weight"] == 0).float().mean().item() == pytest.approx(0.9, abs=0.005)


@pytest.mark.parametrize("kind", ["magnitude", "channel"])
def test_masks_and_schedule_position_survive_a_state_dict_round_trip(kind: str) -> None:
    data = synthetic(batch_size=16, seed=0, channels=3, image_size=8)
    pruner = {"magnitude": Magnitude, "channel": Channel}[kind]

    def make() -> Magnitude | Channel:
        return pruner(
            data=data,
            criterion=nn.CrossEntropyLoss(),
            sparsity=0.5,
            schedule="linear",
            epochs=2,
            frequency=2,
            updates=3,
        )

    torch.manual_seed(0)
    model = CifarResNet(8, 10, 3)
    trained = make()
    trained.prepare(model)
    for step in range(5):  # two mask updates (steps 0, 2, 4 of 0..6)
        trained.after_step(Step(0, step))
    state = trained.state_dict()
    buffer = io.BytesIO()
    torch.save(state, buffer)  # the way a resume checkpoint stores it
    buffer.seek(0)
    restored = make()
    restored.prepare(copy.deepcopy(model))
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert restored.rounds_done == trained.rounds_done == 3
    assert restored.curve == trained.curve
    assert restored.mask_state().keys() == trained.mask_state().keys()
    for name, value in trained.mask_state().items():
        other = restored.mask_state()[name]
        assert torch.equal(other, value) if isinstance(value, torch.Tensor) else other == value


# -- schedules and importances as components ------------------------------------------------------
def test_schedule_object_flat_knobs_and_short_name_give_one_plan(compose_cfg, caplog) -> None:
    from hydra.utils import instantiate

    from kdexp import choices
    from kdexp.method.prune.schedule import AGP

    data = synthetic(batch_size=32, seed=0)  # 14 steps per epoch
    # The object, a node picked through the defaults list, the short name with flat knobs.
    by_object = Magnitude(
        data=data, criterion=CE, sparsity=0.8, epochs=4, schedule=AGP(frequency=4, updates=5)
    )
    group = compose_cfg(
        "method=prune/magnitude",
        "method/prune/schedule@method.schedule=agp",
        "method.schedule.frequency=4",
        "method.schedule.updates=5",
        "schedule.epochs=4",
    )
    choices._warned.clear()
    with caplog.at_level("WARNING"):
        legacy = compose_cfg(
            "method=prune/magnitude",
            "method.schedule=agp",
            "method.frequency=4",
            "method.updates=5",
            "schedule.epochs=4",
        )
        flat = instantiate(legacy.method)(data=data, criterion=CE)
        instantiate(legacy.method)(data=data, criterion=CE)  # a second build warns no more
    nested = instantiate(group.method)(data=data, criterion=CE)
    expected = [(i * 4, 0.8 * (1 - (1 - i / 5) ** 3)) for i in range(6)]
    for method in (by_object, nested, flat):
        assert [s for s, _ in method.plan] == [s for s, _ in expected]
        assert [t for _, t in method.plan] == pytest.approx([t for _, t in expected], abs=1e-12)
    warnings = [r.getMessage() for r in caplog.records if "deprecated" in r.getMessage()]
    assert warnings == [
        "method.frequency is deprecated: use method.schedule.frequency=4",
        "method.updates is deprecated: use method.schedule.updates=5",
    ]
    # A flat knob the schedule has not: said once, not applied.
    choices._warned.clear()
    with caplog.at_level("WARNING"):
        Magnitude(data=data, criterion=CE, sparsity=0.8, epochs=4, schedule="oneshot", rounds=2)
    assert "method.rounds=2 has no effect with the oneshot schedule" in caplog.text


def test_channel_importance_by_name_or_node_and_bn_scale_refuses_groups_without_bn() -> None:
    from kdexp.method.prune.importance import L2, BNScale

    data = synthetic(batch_size=16, seed=0)
    by_name = Channel(data=data, criterion=CE, sparsity=0.5, epochs=1, importance="l2")
    by_object = Channel(data=data, criterion=CE, sparsity=0.5, epochs=1, importance=L2())
    assert type(by_name.importance) is type(by_object.importance) is L2
    model = _convnet()
    by_name.prepare(model)
    by_object.prepare(copy.deepcopy(model))
    assert by_name.after_step(Step(0, 0)) == by_object.after_step(Step(0, 0))
    # bn_scale scores only groups with a BatchNorm: none in an MLP, so nothing to prune.
    bn = Channel(data=data, criterion=CE, sparsity=0.5, epochs=1, importance=BNScale())
    with pytest.raises(ConfigError, match="at least one prunable channel group"):
        bn.prepare(_mlp())
