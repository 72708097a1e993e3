"""The method contract (kdexp.method.base): declared needs, the step context across a resume, the
distill component's keys, and methods added from outside kdexp with no edit to it."""

from __future__ import annotations

import os
import signal
import textwrap
from pathlib import Path

import pytest
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from mlflow.tracking import MlflowClient
from omegaconf import open_dict, read_write
from torch import nn

from kdexp.dataset.digits import load as digits
from kdexp.errors import ConfigError
from kdexp.method.base import Method, Needs, needs_of
from kdexp.resume import Interrupted
from kdexp.run import run
from tests.conftest import run_cli, tracking_overrides


# -- declared needs ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["method=baseline"], Needs(is_baseline=True)),
        (["method=baseline", "+method/distill@method.distill=kd"], Needs(teacher=True)),
        (["method=distill/kd"], Needs(teacher=True)),
        (["method=finetune"], Needs(trained_start=True)),
        (["method=prune/magnitude"], Needs(trained_start=True)),
        (
            ["method=prune/magnitude", "+method/distill@method.distill=kd"],
            Needs(teacher=True, trained_start=True),
        ),
        (["method=prune/sensitivity"], Needs(trained_start=True, distributed=False)),
        (["method=prune/channel"], Needs(trained_start=True, distributed=False)),
        (["method=quantize/qat", "method.bits=8"], Needs(trained_start=True)),
    ],
)
def test_each_method_declares_what_it_needs(compose_cfg, overrides, expected: Needs) -> None:
    assert needs_of(compose_cfg(*overrides).method) == expected


def test_needs_of_refuses_a_target_that_is_not_a_method(compose_cfg) -> None:
    cfg = compose_cfg("method=baseline")
    with read_write(cfg), open_dict(cfg):
        cfg.method._target_ = "torch.nn.Linear"
    with pytest.raises(ConfigError, match="method._target_='torch.nn.Linear'"):
        needs_of(cfg.method)


# -- the distill component ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("holder", "setting", "key"),
    [
        ("prune/magnitude", "method.distill.alpha=1.5", "method.distill.alpha"),
        ("prune/magnitude", "method.distill.T=0", "method.distill.T"),
        ("quantize/qat", "method.distill.alpha=-1", "method.distill.alpha"),
        ("finetune", "method.distill.T=-2", "method.distill.T"),
    ],
)
def test_errors_name_the_key_where_the_component_sits(
    compose_cfg, holder: str, setting: str, key: str
) -> None:
    cfg = compose_cfg(f"method={holder}", "+method/distill@method.distill=kd", setting)
    teacher = instantiate(cfg.teacher)
    with pytest.raises(ConfigError) as error:
        instantiate(cfg.method)(
            data=digits(batch_size=32, seed=0), criterion=nn.CrossEntropyLoss(), teacher=teacher
        )
    assert error.value.key == key


def test_a_distillation_method_alone_names_its_own_keys(compose_cfg) -> None:
    cfg = compose_cfg("method=distill/kd", "method.alpha=1.5")
    with pytest.raises(ConfigError) as error:
        instantiate(cfg.method)(
            data=digits(batch_size=32, seed=0),
            criterion=nn.CrossEntropyLoss(),
            teacher=instantiate(cfg.teacher),
        )
    assert error.value.key == "method.alpha"


def test_every_method_holds_the_component_through_one_code_path(compose_cfg) -> None:
    """Whatever holds it, the component's terms, epoch metrics and final metrics arrive."""
    from kdexp.method.base import Step

    data = digits(batch_size=32, seed=0)
    for holder in ("baseline", "finetune", "prune/magnitude", "quantize/qat"):
        cfg = compose_cfg(f"method={holder}", "+method/distill@method.distill=kd")
        model, teacher = instantiate(cfg.model), instantiate(cfg.teacher)
        method = instantiate(cfg.method)(
            data=data, criterion=nn.CrossEntropyLoss(), teacher=teacher
        )
        model = method.begin(model)
        x, y, rows = next(data.train.indexed())
        terms = method.loss(x, y, model(x), Step(0, 0, rows=rows))
        assert {"ce", "kd"} <= set(terms), holder
        assert {"val/agreement", "val/kl"} <= set(method.epoch_done(Step(0, 1))), holder
        assert "teacher/test_acc1" in method.summary(), holder


# -- the step context across a resume -----------------------------------------------------------
_RESUMED = [
    ["method=distill/dkd", "method.warmup=3"],  # its warm-up factor comes from ctx.epoch
    ["method=distill/crd", "method.nce_k=64"],  # its memory rows come from ctx.rows
    [  # the component's warm-up, the schedule's masks
        "method=prune/magnitude",
        "+method/distill@method.distill=dkd",
        "method.distill.warmup=3",
        "method.updates=3",
        "method.frequency=10",
    ],
    ["method=quantize/qat", "method.bits=4"],
]


def _configure(compose_cfg, tmp_path: Path, name: str, *overrides: str):  # type: ignore[no-untyped-def]
    cfg = compose_cfg(*overrides)
    with read_write(cfg.hydra), open_dict(cfg.hydra):
        cfg.hydra.runtime.output_dir = str(tmp_path / name)
    HydraConfig.instance().set_config(cfg)
    return cfg


def _history(client: MlflowClient, run_id: str) -> dict[str, list[tuple[int, float]]]:
    keys = [k for k in client.get_run(run_id).data.metrics if k.startswith("train/loss")]
    return {
        k: sorted((m.step, m.value) for m in client.get_metric_history(run_id, k)) for k in keys
    }


@pytest.mark.slow
@pytest.mark.parametrize("method", _RESUMED, ids=lambda o: " ".join(o))
def test_a_resumed_run_computes_every_loss_as_an_uninterrupted_one(
    compose_cfg, tmp_path: Path, monkeypatch, method: list[str]
) -> None:
    """Stopped by SIGTERM in its second (last) epoch and resumed, a run logs the same loss terms at
    every step as a run that was never stopped (DKD's warm-up, CRD's memory, the masks...)."""
    teacher = ["model@teacher=mlp"] if "distill" in " ".join(method) else []
    common = [
        *method,
        *teacher,
        "schedule.epochs=2",
        "log_every=1",
        "latency_repeats=1",
        "deterministic=true",
        *tracking_overrides(tmp_path),
    ]
    run(_configure(compose_cfg, tmp_path, "whole", *common))  # also trains the inputs once
    stop_at = 30  # digits: 21 steps an epoch, so in the second one
    original = Method.step_done

    def stop_once(self: Method, ctx):  # type: ignore[no-untyped-def]
        metrics = original(self, ctx)
        if ctx.step == stop_at:
            os.kill(os.getpid(), signal.SIGTERM)
        return metrics

    monkeypatch.setattr(Method, "step_done", stop_once)
    with pytest.raises(Interrupted):
        run(_configure(compose_cfg, tmp_path, "stopped", *common))
    monkeypatch.setattr(Method, "step_done", original)
    run(_configure(compose_cfg, tmp_path, "resumed", *common, "resume=auto"))

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("test").experiment_id
    method_tag = method[0].removeprefix("method=")
    runs = client.search_runs(
        [experiment], f"tags.method = '{method_tag}'", order_by=["attributes.start_time ASC"]
    )
    assert [r.info.status for r in runs] == ["FINISHED", "FINISHED"]  # stopped one carried on
    whole, resumed = (_history(client, r.info.run_id) for r in runs)
    assert set(whole) == set(resumed) and len(whole) >= 2
    for key, points in whole.items():
        assert [s for s, _ in resumed[key]] == [s for s, _ in points], key
        for (step, a), (_, b) in zip(points, resumed[key], strict=True):
            assert b == pytest.approx(a, rel=1e-5, abs=1e-7), f"{key} at step {step}"
    for key in ("test/acc1", "best/val_acc1"):
        assert runs[1].data.metrics[key] == pytest.approx(runs[0].data.metrics[key], abs=1e-9)


# -- methods added from outside kdexp ----------------------------------------------------------
_TOY_MODULE = '''
"""Toy methods of a package that is not kdexp."""
import torch
from torch import Tensor

from kdexp.errors import ConfigError
from kdexp.method.distill.base import Distiller
from kdexp.method.prune.unstructured import Unstructured


class L1Logits(Distiller):
    """A toy distillation loss: beta * mean |s - t| over the logits."""

    def __init__(self, *, beta: float = 1.0, **kwargs) -> None:
        super().__init__(**kwargs)
        if beta < 0:
            raise ConfigError(self.key_of("beta"), beta, "a non-negative weight")
        self.beta = beta

    def distill_terms(self, s_logits, t_logits, s_feats, t_feats, targets, ctx):
        return {"toy_l1": self.beta * (s_logits - t_logits).abs().mean()}


class Largest(Unstructured):
    """A toy pruning criterion: prune the weights of LARGEST magnitude."""

    def scores(self) -> dict[str, Tensor]:
        return {n: -m.weight.detach().abs() for n, m in self.targets.items()}
'''

_TOY_YAML = {
    "method/distill/toy_l1.yaml": """
        defaults:
          - /method/distill/_teacher
        _target_: toykd.methods.L1Logits
        _partial_: true
        beta: 0.5
    """,
    "method/prune/toy_largest.yaml": """
        defaults:
          - /method/prune/_base@_here_
          - _self_
        _target_: toykd.methods.Largest
        _partial_: true
        schedule: oneshot
        sparsity: 0.5
    """,
}


@pytest.fixture
def toy_package(tmp_path: Path) -> tuple[Path, Path]:
    """A package ``toykd`` and a config dir with one yaml per toy method, both outside kdexp."""
    package = tmp_path / "site" / "toykd"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "methods.py").write_text(_TOY_MODULE)
    conf = tmp_path / "toyconf"
    for name, text in _TOY_YAML.items():
        (conf / name).parent.mkdir(parents=True, exist_ok=True)
        (conf / name).write_text(textwrap.dedent(text))
    return tmp_path / "site", conf


def _run_toy(tmp_path: Path, site: Path, conf: Path, *args: str):  # type: ignore[no-untyped-def]
    env_path = os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])])
    os.environ["PYTHONPATH"] = env_path
    try:
        return run_cli(["--config-dir", str(conf), *args, *tracking_overrides(tmp_path)], tmp_path)
    finally:
        rest = env_path.split(os.pathsep)[1:]
        if rest:
            os.environ["PYTHONPATH"] = os.pathsep.join(rest)
        else:
            os.environ.pop("PYTHONPATH")


@pytest.mark.slow
def test_a_distillation_loss_from_outside_kdexp_runs_end_to_end(
    tmp_path: Path, toy_package: tuple[Path, Path]
) -> None:
    site, conf = toy_package
    common = ["schedule.epochs=2", "latency_repeats=1", "model@teacher=mlp"]
    done = _run_toy(tmp_path, site, conf, "method=distill/toy_l1", *common)
    assert done.returncode == 0, done.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("test").experiment_id
    [toy] = client.search_runs([experiment], "tags.method = 'distill/toy_l1'")
    metrics = toy.data.metrics
    assert metrics["train/loss_toy_l1"] > 0 and "train/loss_ce" in metrics
    assert toy.data.params["method.beta"] == "0.5"
    assert metrics["test/acc1"] > 80 and metrics["teacher/test_acc1"] > 80
    # a bad value of the new method's own key is a ConfigError naming it, exit 2
    bad = _run_toy(tmp_path, site, conf, "method=distill/toy_l1", "method.beta=-1", *common)
    assert bad.returncode == 2 and "method.beta=-1" in bad.stderr, bad.stderr[-2000:]


@pytest.mark.slow
def test_a_pruning_criterion_from_outside_kdexp_runs_end_to_end(
    tmp_path: Path, toy_package: tuple[Path, Path]
) -> None:
    site, conf = toy_package
    args = ["method=prune/toy_largest", "schedule.epochs=1", "latency_repeats=1"]
    done = _run_toy(tmp_path, site, conf, *args)
    assert done.returncode == 0, done.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("test").experiment_id
    [toy] = client.search_runs([experiment], "tags.method = 'prune/toy_largest'")
    [dense] = client.search_runs([experiment], "tags.method = 'baseline'")
    assert toy.data.metrics["sparsity/global"] == pytest.approx(0.5, abs=0.01)
    # pruning the largest half of the weights costs far more than magnitude pruning would
    assert toy.data.metrics["test/acc1"] < dense.data.metrics["test/acc1"]
    assert toy.data.metrics["model/dense_params"] == dense.data.metrics["model/params"]
