"""ONNX export (``export_onnx=true``): runs read back from MLflow, their ONNX files run with
onnxruntime on the whole test set, parameter counts read from the ONNX graphs, the check's
tolerance and its absence without onnxruntime, and the configs it refuses before training."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

import kdexp.export
import kdexp.run
from kdexp.config import config_hash
from kdexp.dataset.digits import load as digits
from kdexp.errors import ConfigError
from kdexp.export import OnnxMismatch, log_onnx
from kdexp.run import run
from kdexp.tracking.base import Tracker
from tests.conftest import tracking_overrides


def _test_set() -> tuple[np.ndarray, np.ndarray]:
    xs, ys = zip(*digits(batch_size=64, seed=0).test, strict=True)
    return torch.cat(xs).numpy(), torch.cat(ys).numpy()


def _onnx_acc1(path: str) -> float:
    """Top-1 accuracy (%) of the ONNX file on the digits test set, in one batch of them all."""
    x, y = _test_set()
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"input": x})
    assert logits.shape == (len(y), 10)  # the batch dimension is dynamic
    return float((logits.argmax(1) == y).mean() * 100)


def _float_initializer_elements(path: str) -> int:
    graph = onnx.load(path).graph
    return sum(
        int(np.prod(t.dims)) for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT
    )


@pytest.mark.slow
def test_dense_channel_pruned_and_int8_exports_compute_what_torch_did(
    compose_cfg, tmp_path: Path
) -> None:
    common = ["export_onnx=true", "latency_repeats=1", *tracking_overrides(tmp_path)]
    run(compose_cfg("method=baseline", "schedule.epochs=3", *common))
    client = MlflowClient(tracking_overrides(tmp_path)[0].split("=", 1)[1])
    experiment = client.get_experiment_by_name("test").experiment_id
    (dense,) = client.search_runs([experiment])
    start = f"checkpoint={dense.info.run_id}"
    run(compose_cfg("method=prune/channel", "schedule.epochs=1", start, *common))
    run(compose_cfg("method=quantize/ptq_int8", start, *common))
    runs = {r.data.tags["method"]: r for r in client.search_runs([experiment])}
    assert set(runs) == {"baseline", "prune/channel", "quantize/ptq_int8"}
    elements = {}
    for method, found in runs.items():
        assert found.info.status == "FINISHED"
        assert [a.path for a in client.list_artifacts(found.info.run_id, "onnx")] == [
            "onnx/model.onnx"
        ]
        path = client.download_artifacts(found.info.run_id, "onnx/model.onnx", str(tmp_path))
        metrics = found.data.metrics
        # onnxruntime on all 359 test images scores what torch's evaluation logged; its int8
        # kernels round a few requantized values differently from fbgemm's: one image may flip
        one_image = 100 / 359
        tolerance = 1e-6 if method != "quantize/ptq_int8" else one_image + 1e-6
        assert _onnx_acc1(path) == pytest.approx(metrics["test/acc1"], abs=tolerance), method
        assert 0 <= metrics["onnx/max_abs_diff"] <= (1e-4 if method != "quantize/ptq_int8" else 0.5)
        elements[method] = _float_initializer_elements(path)
    # the float files hold exactly the model's parameters; the channel-pruned one is smaller
    assert elements["baseline"] == runs["baseline"].data.metrics["model/params"]
    assert elements["prune/channel"] == runs["prune/channel"].data.metrics["model/params"]
    assert elements["prune/channel"] < 0.4 * elements["baseline"]
    assert elements["quantize/ptq_int8"] < 0.01 * elements["baseline"]  # int8 weights, not float


def _no_training(*args, **kwargs):
    raise AssertionError("training started")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["method=quantize/dynamic_int8"], "cannot export dynamic int8 layers"),
        (["method=quantize/qat", "method.bits=4"], "method.bits=4 stores packed weights"),
    ],
)
def test_unexportable_methods_are_refused_before_training(
    compose_cfg, monkeypatch, overrides: list[str], message: str
) -> None:
    cfg = compose_cfg(*overrides, "export_onnx=true", "tracking=none")
    monkeypatch.setattr(kdexp.run, "fit", _no_training)
    with pytest.raises(ConfigError) as error:
        run(cfg)
    assert error.value.key == "export_onnx"
    assert message in str(error.value) and "method=quantize/ptq_int8" in str(error.value)


def test_export_onnx_must_be_a_bool_and_needs_the_exporter_packages(
    compose_cfg, monkeypatch
) -> None:
    monkeypatch.setattr(kdexp.run, "fit", _no_training)
    with pytest.raises(ConfigError, match="export_onnx='yes': true or false"):
        run(compose_cfg("export_onnx=yes", "tracking=none"))
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # find_spec: as if not installed
    wanted = r"install onnxscript first \(pip install 'kdexp\[onnx\]'"
    with pytest.raises(ConfigError, match=wanted):
        run(compose_cfg("export_onnx=true", "method=baseline", "tracking=none"))


def test_export_onnx_leaves_the_config_hash_alone(compose_cfg) -> None:
    def job(*overrides: str) -> DictConfig:  # the config as a job sees it, without hydra
        cfg = compose_cfg(*overrides)
        return OmegaConf.masked_copy(cfg, [str(k) for k in cfg if k != "hydra"])

    on, off, without = job("export_onnx=true"), job(), job()
    with open_dict(without):
        del without["export_onnx"]  # a run from before the option existed
    assert config_hash(on) == config_hash(off) == config_hash(without)
    assert config_hash(job("seed=1")) != config_hash(off)


class _Recorder(Tracker):
    def __init__(self) -> None:
        self.metrics: dict[str, float] = {}
        self.artifacts: list[tuple[Path, str | None]] = []

    def log_metrics(self, metrics, step: int) -> None:
        self.metrics.update(metrics)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.artifacts.append((path, artifact_path))


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))


def test_check_fails_loudly_beyond_the_tolerance(tmp_path: Path, monkeypatch) -> None:
    model, example = _tiny(), np.random.default_rng(0).normal(size=(2, 1, 8, 8))
    example = example.astype(np.float32)
    tracker = _Recorder()
    diff = log_onnx(tracker, model, example, tmp_path, step=7)
    assert diff is not None and diff < 1e-5
    assert tracker.metrics == {"onnx/max_abs_diff": diff}
    assert tracker.artifacts == [(tmp_path / "model.onnx", "onnx")]
    # onnxruntime's answer moved by 1e-3 at one logit: over the float tolerance (1e-4 × max(|y|, 1))
    with torch.no_grad():
        scale = max(float(model(torch.from_numpy(example)).abs().max()), 1.0)
    run_onnx = kdexp.export.run_onnx

    def shifted(path: Path, inputs: np.ndarray) -> np.ndarray:
        out = run_onnx(path, inputs)
        assert out is not None
        out[0, 3] += 1e-3 * scale
        return out

    monkeypatch.setattr(kdexp.export, "run_onnx", shifted)
    with pytest.raises(OnnxMismatch, match="differ from the torch model's by up to"):
        log_onnx(tracker, model, example, tmp_path, step=7)
    assert tracker.metrics["onnx/max_abs_diff"] == pytest.approx(1e-3 * scale, rel=1e-2)


def test_without_onnxruntime_the_file_is_written_and_the_log_says_so_once(
    tmp_path: Path, monkeypatch, caplog
) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime: ImportError
    kdexp.export._say_no_onnxruntime.cache_clear()
    example = np.zeros((2, 1, 8, 8), dtype=np.float32)
    tracker = _Recorder()
    with caplog.at_level(logging.WARNING, logger="kdexp.export"):
        for name in ("a", "b"):
            assert log_onnx(tracker, _tiny(), example, tmp_path / name, step=0) is None
    assert tracker.metrics == {}
    assert (tmp_path / "a" / "model.onnx").is_file() and (tmp_path / "b" / "model.onnx").is_file()
    notes = [r for r in caplog.records if "onnxruntime is not installed" in r.getMessage()]
    assert len(notes) == 1
    kdexp.export._say_no_onnxruntime.cache_clear()
