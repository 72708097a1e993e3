"""Compressed final models as the start of a later run: a channel-pruned checkpoint shrinks the
start model to fit (quantization and fine-tuning from a pruned run, read back from MLflow), a
checkpoint of another model is still refused, and a quantized one is refused as such."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from torch import nn

import kdexp.run
from kdexp.checkpoint import save_checkpoint
from kdexp.dataset.digits import load as digits
from kdexp.errors import ConfigError
from kdexp.method.base import Method, Step
from kdexp.method.baseline import Baseline
from kdexp.method.finetune import Finetune
from kdexp.method.prune import Channel
from kdexp.method.quantize import backend
from kdexp.model.mlp import MLP
from kdexp.run import run
from kdexp.train import evaluate
from tests.conftest import tracking_overrides

CE = nn.CrossEntropyLoss()


def _pruned_mlp(hidden: list[int]) -> nn.Module:
    """A random MLP with half the channels of each hidden layer removed (shrunk)."""
    data = digits(batch_size=32, seed=0, train_limit=5)
    torch.manual_seed(0)
    model = MLP(10, 1, 8, hidden)
    method = Channel(data=data, criterion=CE, sparsity=0.5, epochs=1, scope="layerwise")
    method.prepare(model)
    method.after_step(Step(0, 0))
    return method.finalize(model).eval()


def test_a_channel_pruned_checkpoint_shrinks_the_start_model(tmp_path: Path) -> None:
    small = _pruned_mlp([32, 32])
    save_checkpoint(tmp_path / "final.pt", small)
    data = digits(batch_size=32, seed=0, train_limit=5)
    start = MLP(10, 1, 8, [32, 32])
    Baseline(data=data, criterion=CE).load_start(start, tmp_path / "final.pt", "checkpoint")
    assert [m.out_features for m in start.modules() if isinstance(m, nn.Linear)] == [16, 16, 10]
    x = torch.randn(7, 1, 8, 8)
    assert torch.equal(start.eval()(x), small(x))
    # fine-tuning from it: the backbone loads, the head keeps its fresh weights but narrows
    target = MLP(10, 1, 8, [32, 32])
    fresh = target.layers[-1].weight.detach().clone()
    Finetune(data=data, criterion=CE).load_start(target, tmp_path / "final.pt", "checkpoint")
    assert torch.equal(target.layers[1].weight, small.layers[1].weight)
    assert torch.equal(target.layers[3].weight, small.layers[3].weight)
    # the shrink drops the first 16 of 32 channels (which ones is irrelevant, all are loaded)
    assert torch.equal(target.layers[-1].weight, fresh[:, 16:])


@pytest.mark.parametrize(
    ("saved", "problem"),
    [
        (MLP(10, 1, 8, [64, 64]), "wrong shape: layers.1.weight (64, 64) vs (32, 64)"),  # wider
        (MLP(10, 1, 8, [16]), "missing: layers.5.weight"),  # fewer layers: other entries
        (nn.Linear(64, 10), "missing: layers.1.weight"),
    ],
)
def test_a_checkpoint_of_another_model_is_still_refused(
    tmp_path: Path, saved: nn.Module, problem: str
) -> None:
    save_checkpoint(tmp_path / "other.pt", saved)
    method = Baseline(data=digits(batch_size=32, seed=0, train_limit=5), criterion=CE)
    start = MLP(10, 1, 8, [32, 32])
    with pytest.raises(ConfigError, match="does not fit it") as error:
        method.load_start(start, tmp_path / "other.pt", "checkpoint")
    assert problem in str(error.value)
    assert [m.out_features for m in start.modules() if isinstance(m, nn.Linear)] == [32, 32, 10]


@pytest.mark.slow
def test_quantization_and_fine_tuning_start_from_a_channel_pruned_run(
    compose_cfg, tmp_path: Path, monkeypatch
) -> None:
    common = ["latency_repeats=1", *tracking_overrides(tmp_path)]
    client = MlflowClient(tracking_overrides(tmp_path)[0].split("=", 1)[1])
    # the channel-pruned run (its dense start, a baseline, is trained first: checkpoint=auto)
    run(compose_cfg("method=prune/channel", "schedule.epochs=2", *common))
    experiment = client.get_experiment_by_name("test").experiment_id
    runs = {r.data.tags["method"]: r for r in client.search_runs([experiment])}
    pruned, dense = runs["prune/channel"], runs["baseline"]
    assert pruned.data.metrics["model/params"] < 0.4 * dense.data.metrics["model/params"]
    start = f"checkpoint={pruned.info.run_id}"

    # the accuracy of each start model, evaluated right after it is loaded
    start_acc1: list[float] = []
    original = Method.load_start

    def evaluated(self, model, path, key):
        original(self, model, path, key)
        test = evaluate(model, self.data.test, torch.device("cpu"), CE)
        start_acc1.append(test["acc1"])

    monkeypatch.setattr(Method, "load_start", evaluated)
    run(compose_cfg("method=quantize/ptq_int8", start, *common))
    run(compose_cfg("method=quantize/qat", "method.bits=8", "schedule.epochs=1", start, *common))
    monkeypatch.undo()
    run(compose_cfg("method=finetune", "schedule.epochs=1", start, *common))

    runs = {r.data.tags["method"]: r for r in client.search_runs([experiment])}
    assert {r.info.status for r in runs.values()} == {"FINISHED"}
    expected = pruned.data.metrics["test/acc1"]
    assert start_acc1 == pytest.approx([expected, expected], abs=1e-9)
    ptq, qat, finetune = (runs[m] for m in ("quantize/ptq_int8", "quantize/qat", "finetune"))
    # PTQ trains nothing: its fp32 model is the pruned run's final model
    assert ptq.data.metrics["test/acc1_fp32"] == pytest.approx(expected, abs=1e-9)
    assert ptq.data.metrics["test/acc1"] >= expected - 2
    for later in (ptq, qat, finetune):  # counted on the (fp32) model: as small as the pruned one
        assert later.data.metrics["model/params"] == pruned.data.metrics["model/params"]
    assert qat.data.metrics["test/acc1"] >= expected - 3


def _int8_mlp() -> nn.Module:
    model = MLP(10, 1, 8, [32, 32]).eval()
    return backend.quantize_static(model, [torch.randn(8, 1, 8, 8)])


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["method=finetune"], "checkpoint"),
        (["method=quantize/qat", "method.bits=8"], "checkpoint"),
        (["method=distill/kd", "model@teacher=mlp"], "teacher_checkpoint"),
    ],
)
def test_a_quantized_final_model_is_refused_as_a_start_or_a_teacher(
    compose_cfg, tmp_path: Path, monkeypatch, overrides: list[str], key: str
) -> None:
    save_checkpoint(tmp_path / "int8.pt", _int8_mlp())
    cfg = compose_cfg(*overrides, "tracking=none")
    cfg[key] = str(tmp_path / "int8.pt")
    if key == "teacher_checkpoint":  # the student starts from scratch; only the teacher is read
        cfg.checkpoint = None

    def no_training(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(kdexp.run, "fit", no_training)
    with pytest.raises(ConfigError) as error:
        run(cfg)
    assert error.value.key == key
    message = str(error.value)
    assert "this file holds an int8 model" in message
    assert "can be neither trained further nor used as a teacher" in message
    assert "the checkpoint of the run before quantization" in message


def test_packed_low_bit_weights_are_refused_but_load_packed_reads_them(tmp_path: Path) -> None:
    from kdexp.checkpoint import read_state_dict
    from kdexp.method.quantize import load_packed
    from kdexp.packed import packed_from

    model = MLP(10, 1, 8, [32, 32])
    packed = packed_from(model.layers[1])
    codes = torch.randint(0, 16, model.layers[1].weight.shape, dtype=torch.int32)
    packed.set_packed(codes, torch.ones(32), 4)  # type: ignore[operator]
    model.layers[1] = packed
    save_checkpoint(tmp_path / "packed.pt", model)
    with pytest.raises(ConfigError, match="holds a model with packed low-bit weights"):
        read_state_dict(tmp_path / "packed.pt", "checkpoint")
    reloaded = load_packed(MLP(10, 1, 8, [32, 32]), tmp_path / "packed.pt")
    x = torch.randn(3, 1, 8, 8)
    assert torch.equal(reloaded(x), model(x))
