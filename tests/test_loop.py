"""The training loop, evaluation, schedules and model statistics against hand calculations."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from kdexp.dataset.base import TensorLoader
from kdexp.dataset.synthetic import load as synthetic
from kdexp.method.baseline import Baseline
from kdexp.schedule import constant, cosine, multistep
from kdexp.stats import count_params, flops, model_stats, size_bytes
from kdexp.tracking.base import Tracker
from kdexp.train import LoopOptions, evaluate, fit


class _FixedLogits(nn.Module):
    """Returns the logits stored for each input index (inputs are row indices)."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits[x.long().flatten()]


def test_evaluate_matches_hand_counts() -> None:
    logits = torch.tensor(
        [
            [9.0, 1, 2, 3, 4, 5, 0],  # top-1 = 0
            [0.0, 9, 8, 7, 6, 5, 4],  # top-1 = 1, top-5 = {1,2,3,4,5}
            [0.0, 1, 2, 3, 4, 5, 9],  # top-1 = 6, top-5 = {6,5,4,3,2}
            [6.0, 5, 4, 3, 2, 1, 0],  # top-1 = 0, top-5 = {0..4}
        ]
    )
    targets = torch.tensor([0, 5, 1, 4])
    loader = TensorLoader(torch.arange(4.0), targets, batch_size=3)  # two batches: 3 + 1
    result = evaluate(_FixedLogits(logits), loader, torch.device("cpu"), nn.CrossEntropyLoss())
    assert result["acc1"] == pytest.approx(25.0)  # only row 0
    assert result["acc5"] == pytest.approx(75.0)  # rows 0, 1 and 3
    assert result["loss"] == pytest.approx(nn.functional.cross_entropy(logits, targets).item())


def test_schedules_follow_their_formulas() -> None:
    def lrs(make, steps: int) -> list[float]:
        opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
        sched = make(opt)
        out = []
        for _ in range(steps):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    cos = lrs(lambda o: cosine(o, epochs=2, steps_per_epoch=5), 10)
    assert cos[0] == 1.0 and cos[5] == pytest.approx(0.5)
    assert cos[3] == pytest.approx(0.5 * (1 + math.cos(math.pi * 3 / 10)))
    step = lrs(lambda o: multistep(o, epochs=4, steps_per_epoch=2, milestones=[1, 3]), 8)
    assert step == pytest.approx([1, 1, 0.1, 0.1, 0.1, 0.1, 0.01, 0.01])
    warm = lrs(lambda o: constant(o, 3, 4, warmup_epochs=1, warmup_start=0.2), 6)
    assert warm == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0, 1.0])


class _Recorder(Tracker):
    def __init__(self) -> None:
        self.logged: list[tuple[int, dict[str, float]]] = []

    def log_metrics(self, metrics, step):  # type: ignore[no-untyped-def]
        self.logged.append((step, dict(metrics)))


def test_fit_logs_terms_and_learns(tmp_path) -> None:
    torch.manual_seed(0)
    data = synthetic(batch_size=32, seed=0, noise=0.5)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    method = Baseline(data=data, criterion=nn.CrossEntropyLoss())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = _Recorder()
    options = LoopOptions(
        epochs=3, device=torch.device("cpu"), log_every=4, checkpoint_dir=tmp_path
    )
    result = fit(model, method, data, opt, constant(opt, 3, len(data.train)), tracker, options)
    steps_per_epoch = len(data.train)  # 448 training samples / 32
    assert steps_per_epoch == 14 and result.steps == 42
    step_logs = [(s, m) for s, m in tracker.logged if "train/loss" in m]
    assert [s for s, _ in step_logs] == list(range(0, 42, 4))
    for _, m in step_logs:
        assert m["train/loss"] == pytest.approx(m["train/loss_ce"])
    epoch_logs = [(s, m) for s, m in tracker.logged if "val/acc1" in m]
    assert [s for s, _ in epoch_logs] == [14, 28, 42]
    for _, m in epoch_logs:
        assert m["train/epoch_loss"] == pytest.approx(m["train/epoch_loss_ce"])
    assert epoch_logs[-1][1]["val/acc1"] > 90.0  # well-separated blobs
    assert result.best_val_acc1 == max(m["val/acc1"] for _, m in epoch_logs)
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    assert best["epoch"] == result.best_epoch and best["val_acc1"] == result.best_val_acc1


def test_fit_stops_on_non_finite_loss(tmp_path) -> None:
    data = synthetic(batch_size=32, seed=0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    with torch.no_grad():
        model[1].weight.fill_(3e38)  # logits overflow to inf
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    options = LoopOptions(epochs=2, device=torch.device("cpu"), log_every=1)
    with pytest.raises(FloatingPointError, match=r"train/loss is (nan|inf) at step \d+"):
        fit(
            model,
            Baseline(data=data, criterion=nn.CrossEntropyLoss()),
            data,
            opt,
            constant(opt, 2, len(data.train)),
            _Recorder(),
            options,
        )


def test_model_statistics_against_hand_counts() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    with torch.no_grad():
        model[1].weight[:, :32] = 0
    assert count_params(model) == (650, 650 - 320)
    assert flops(model, torch.randn(1, 1, 8, 8)) == 2 * 64 * 10
    assert 650 * 4 < size_bytes(model) < 650 * 4 + 2000  # float32 payload plus the zip container
    stats = model_stats(model, (1, 8, 8), batch_size=16, repeats=3)
    assert stats["model/params"] == 650 and stats["model/flops"] == 1280
    assert stats["model/latency_ms"] > 0 and stats["model/latency_ms_batch"] > 0


def test_epoch_loss_is_the_mean_of_the_step_losses() -> None:
    torch.manual_seed(0)
    data = synthetic(batch_size=32, seed=0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = _Recorder()
    options = LoopOptions(epochs=2, device=torch.device("cpu"), log_every=1)
    method = Baseline(data=data, criterion=nn.CrossEntropyLoss())
    fit(model, method, data, opt, constant(opt, 2, len(data.train)), tracker, options)
    steps = [m["train/loss"] for _, m in tracker.logged if "train/loss" in m]
    epochs = [m["train/epoch_loss"] for _, m in tracker.logged if "train/epoch_loss" in m]
    assert epochs == pytest.approx([sum(steps[:14]) / 14, sum(steps[14:]) / 14], rel=1e-6)
