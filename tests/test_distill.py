"""Distillation: the KD loss, the teacher's handling, feature taps, cached teacher outputs, teacher
reuse through MLflow, and the bad-input cases."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from torch import nn

from kdexp.dataset.synthetic import load as synthetic
from kdexp.errors import ConfigError
from kdexp.features import FeatureTap
from kdexp.method.base import Step
from kdexp.method.distill.base import kd_loss
from kdexp.method.distill.kd import KD
from kdexp.run import run
from tests.conftest import CONF, run_cli, tracking_overrides


def _kd_by_hand(s: torch.Tensor, t: torch.Tensor, T: float) -> float:
    """Σ_i Σ_c p_t log(p_t / p_s) / batch · T², with softmax written out."""
    total = 0.0
    for s_row, t_row in zip(s.tolist(), t.tolist(), strict=True):
        zs = sum(torch.tensor(s_row).div(T).exp().tolist())
        zt = sum(torch.tensor(t_row).div(T).exp().tolist())
        for a, b in zip(s_row, t_row, strict=True):
            p_s = torch.tensor(a / T).exp().item() / zs
            p_t = torch.tensor(b / T).exp().item() / zt
            total += p_t * (torch.tensor(p_t / p_s).log().item())
    return total / len(s) * T * T


def test_kd_loss_matches_hand_calculation() -> None:
    s = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    t = torch.tensor([[2.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    for T in (1.0, 4.0):
        assert kd_loss(s, t, T).item() == pytest.approx(_kd_by_hand(s, t, T), rel=1e-5)


@pytest.mark.parametrize("T", [0.5, 1.0, 4.0, 20.0])
def test_kd_loss_is_zero_for_equal_logits(T: float) -> None:
    logits = torch.randn(5, 7)
    assert kd_loss(logits, logits.clone(), T).item() == pytest.approx(0.0, abs=1e-6)


def _pair() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    student = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    return student, teacher


def test_kd_method_terms_and_no_gradient_to_teacher() -> None:
    data = synthetic(batch_size=16, seed=0)
    student, teacher = _pair()
    method = KD(data=data, criterion=nn.CrossEntropyLoss(), teacher=teacher, alpha=0.9, T=4.0)
    method.prepare(student)
    method.train()
    x, y = next(iter(data.train))
    logits = student(x)
    terms = method.loss(x, y, logits, Step(0, 0))
    assert set(terms) == {"ce", "kd"}
    t_logits = teacher(x)
    expected_kd = 0.9 * _kd_by_hand(logits.detach(), t_logits.detach(), 4.0)
    assert terms["kd"].item() == pytest.approx(expected_kd, rel=1e-4)
    assert terms["ce"].item() == pytest.approx(0.1 * nn.functional.cross_entropy(logits, y).item())
    sum(terms.values()).backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert not any(key.startswith("teacher.") for key in method.state_dict())
    assert not set(map(id, teacher.parameters())) & set(map(id, method.parameters()))
    assert all(p.grad is not None for p in student.parameters())
    assert not teacher.training


def test_cached_teacher_outputs_equal_live_ones() -> None:
    data = synthetic(batch_size=16, seed=0)
    student, teacher = _pair()
    calls = []
    teacher.register_forward_hook(lambda *_: calls.append(1))
    live = KD(data=data, criterion=nn.CrossEntropyLoss(), teacher=teacher, cache_teacher=False)
    cached = KD(data=data, criterion=nn.CrossEntropyLoss(), teacher=teacher, cache_teacher=True)
    for method in (live, cached):
        method.prepare(student)
        method.train()
    for _ in range(2):
        for x, y, rows in data.train.indexed():
            logits, ctx = student(x), Step(0, 0, rows=rows)
            a, b = live.loss(x, y, logits, ctx), cached.loss(x, y, logits, ctx)
            assert torch.allclose(a["kd"], b["kd"], atol=1e-6)
    live_calls = 2 * len(data.train)  # the live method runs the teacher on every batch
    fill_calls = -(-len(data.train.inputs) // 512)  # the cache is filled once, 512 rows a call
    assert len(calls) == 2 + live_calls + fill_calls  # + one dry pass per method in prepare


def test_cache_refused_with_augmentation() -> None:
    data = synthetic(batch_size=16, seed=0)
    data.train.augment = "flip"
    student, teacher = _pair()
    method = KD(data=data, criterion=nn.CrossEntropyLoss(), teacher=teacher, cache_teacher=True)
    method.prepare(student)
    method.train()
    x, y, rows = next(data.train.indexed())
    with pytest.raises(ConfigError, match="method.cache_teacher=True"):
        method.loss(x, y, student(x), Step(0, 0, rows=rows))


def test_feature_tap_by_path_and_penultimate() -> None:
    student, _ = _pair()
    tap = FeatureTap(student, ["2", "penultimate"], "method.student_layers")
    x = torch.randn(3, 1, 8, 8)
    student(x)
    hidden = torch.relu(student[1](x.flatten(1)))
    assert torch.allclose(tap.features[0], hidden) and torch.allclose(tap.features[1], hidden)
    with pytest.raises(
        ConfigError, match=r"method.student_layers='nope': .*0, 1, 2, 3, penultimate"
    ):
        FeatureTap(student, ["nope"], "method.student_layers")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"T": 0.0}, "method.T=0.0"), ({"alpha": 1.5}, "method.alpha=1.5")],
)
def test_bad_kd_settings(kwargs: dict, message: str) -> None:
    data = synthetic(batch_size=16, seed=0)
    _, teacher = _pair()
    with pytest.raises(ConfigError, match=message):
        KD(data=data, criterion=nn.CrossEntropyLoss(), teacher=teacher, **kwargs)


def _runs(db: Path) -> list:
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    return client.search_runs([client.get_experiment_by_name("kdexp").experiment_id])


@pytest.mark.slow
def test_default_job_distils_and_reuses_its_teacher(tmp_path: Path) -> None:
    first = run_cli(["schedule.epochs=3", "latency_repeats=1"], cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    second = run_cli(["schedule.epochs=3", "latency_repeats=1", "seed=0"], cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert "teacher_checkpoint: reusing run" in second.stdout
    runs = _runs(tmp_path / "outputs" / "mlflow.db")
    teachers = [r for r in runs if r.data.tags["method"] == "baseline"]
    students = [r for r in runs if r.data.tags["method"] == "distill/kd"]
    assert len(teachers) == 1 and len(students) == 2
    (teacher,) = teachers
    assert teacher.data.tags["model"] == "mlp_1200"
    assert teacher.data.tags["kdexp.trained_for"] == "teacher_checkpoint"
    for student in students:
        assert student.info.status == "FINISHED"
        assert student.data.tags["teacher"] == "mlp_1200"
        metrics = student.data.metrics
        assert {"train/loss_kd", "train/loss_ce", "val/agreement", "val/kl"} <= metrics.keys()
        assert metrics["teacher/test_acc1"] == pytest.approx(teacher.data.metrics["test/acc1"])
        assert metrics["train/loss"] == pytest.approx(
            metrics["train/loss_kd"] + metrics["train/loss_ce"], rel=1e-5
        )
    # Reusing the teacher changes nothing the student computes.
    a, b = (s.data.metrics for s in students)
    assert a["test/acc1"] == b["test/acc1"] and a["val/kl"] == b["val/kl"]


@pytest.mark.slow
def test_kd_student_beats_student_alone_on_digits(compose_cfg, tmp_path: Path) -> None:
    store = tracking_overrides(tmp_path)
    scores: dict[str, list[float]] = {"baseline": [], "distill/kd": []}
    for seed in (0, 1, 2):
        for method in scores:
            cfg = compose_cfg(
                f"method={method}",
                f"seed={seed}",
                "objective=test/acc1",
                "latency_repeats=1",
                *store,
            )
            scores[method].append(run(cfg))
    mean = {k: sum(v) / len(v) for k, v in scores.items()}
    assert mean["distill/kd"] >= mean["baseline"], scores


BAD_DISTILL = {
    "teacher_classes": (["teacher.num_classes=5"], "teacher.num_classes=5: the student's"),
    "temperature": (["method.T=0"], "method.T=0: a positive number"),
    "alpha": (["method.alpha=1.5"], "method.alpha=1.5: a number in [0, 1]"),
    "layer": (
        ["method=distill/fitnet", "method.student_layers=[nope]"],
        "method.student_layers='nope': a module path of MLP: layers, layers.0",
    ),
    "baseline_with_teacher": (["method=baseline", "model@teacher=mlp_800"], "teacher='mlp_800'"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(BAD_DISTILL))
def test_bad_distillation_input(tmp_path: Path, case: str) -> None:
    overrides, message = BAD_DISTILL[case]
    done = run_cli(overrides + tracking_overrides(tmp_path), cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert "Traceback" not in done.stderr
    db = tmp_path / "mlflow.db"
    if db.exists():  # nothing was trained, and no run is left RUNNING
        client = MlflowClient(tracking_uri=f"sqlite:///{db}")
        found = client.get_experiment_by_name("test")
        assert found is None or client.search_runs([found.experiment_id]) == []


@pytest.mark.slow
def test_teacher_checkpoint_of_another_model_lists_mismatched_keys(tmp_path: Path) -> None:
    wrong = tmp_path / "teacher.pt"
    torch.save(nn.Linear(64, 10).state_dict(), wrong)
    done = run_cli([f"teacher_checkpoint={wrong}", *tracking_overrides(tmp_path)], cwd=tmp_path)
    assert done.returncode == 2
    assert f"teacher_checkpoint='{wrong}': weights of this model (MLP)" in done.stderr
    assert "missing: layers.1.weight" in done.stderr and "unexpected: weight, bias" in done.stderr


DISTILL_METHODS = sorted(
    p.stem for p in (CONF / "method" / "distill").glob("*.yaml") if not p.stem.startswith("_")
)
CONV_ONLY = {"at", "nst"}  # attention maps and neuron selectivity need feature maps


@pytest.mark.slow
@pytest.mark.parametrize("name", DISTILL_METHODS)
def test_every_method_runs_end_to_end_on_digits(compose_cfg, tmp_path: Path, name: str) -> None:
    extra = ["model=resnet8", "model@teacher=resnet14"] if name in CONV_ONLY else []
    cfg = compose_cfg(
        f"method=distill/{name}",
        "schedule.epochs=2",
        "latency_repeats=1",
        "objective=test/acc1",
        *extra,
        *tracking_overrides(tmp_path),
    )
    assert run(cfg) > 10.0  # better than chance on 10 classes after two epochs
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("test").experiment_id])
    (student,) = [r for r in runs if r.data.tags["method"] == f"distill/{name}"]
    terms = {k for k in student.data.metrics if k.startswith("train/loss_")}
    assert "train/loss_ce" in terms and len(terms) >= 2, terms  # CE plus the method's own term
    assert student.data.metrics["train/loss"] == pytest.approx(
        sum(student.data.metrics[t] for t in terms), rel=1e-4
    )


PAPER_PRESETS = [
    "hinton_mnist",
    "seed_resnet50_mobilenetv2",
    "cifar100_resnet32x4_resnet8x4",
    "cifar100_wrn_40_2_wrn_16_2",
    "cifar100_resnet56_resnet20",
]


@pytest.mark.slow
@pytest.mark.parametrize("name", PAPER_PRESETS)
def test_paper_preset_runs_one_epoch_on_synthetic_data_of_its_shape(compose_cfg, name: str) -> None:
    real = compose_cfg(f"experiment={name}").dataset
    cfg = compose_cfg(
        f"experiment={name}",
        "hydra.mode=RUN",  # a preset that sweeps its arms runs here as one job
        "dataset=synthetic",
        *(["~pretrain_dataset"] if name == "hinton_mnist" else []),  # its jittered teacher
        f"dataset.num_classes={real.num_classes}",
        f"dataset.channels={real.channels}",
        f"dataset.image_size={real.image_size}",
        "dataset.train_samples=48",
        "dataset.test_samples=16",
        "dataset.val_size=16",
        "schedule.epochs=1",
        "schedule.batch_size=16",
        "tracking=none",
        "latency_repeats=1",
    )
    assert 0.0 <= run(cfg) <= 100.0


@pytest.mark.slow
def test_teacher_from_a_run_id_a_runs_uri_or_reused_across_schedules(compose_cfg, tmp_path) -> None:
    store = [*tracking_overrides(tmp_path), "latency_repeats=1"]
    run(compose_cfg("method=baseline", "model=mlp_800", "schedule.epochs=2", *store))
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("test").experiment_id
    (teacher,) = client.search_runs([experiment])
    students = [
        ["model@teacher=mlp_800", f"teacher_checkpoint={teacher.info.run_id}"],
        ["model@teacher=mlp_800", f"teacher_checkpoint=runs:/{teacher.info.run_id}"],
        ["model@teacher=mlp_800", "schedule.lr=0.01"],  # auto: same model, data and seed
    ]
    for overrides in students:
        run(compose_cfg(*overrides, "schedule.epochs=1", *store))
    runs = client.search_runs([experiment])
    assert len(runs) == 4  # no second teacher was trained
    for student in (r for r in runs if r.info.run_id != teacher.info.run_id):
        assert student.data.tags["method"] == "distill/kd"
        assert student.data.metrics["teacher/test_acc1"] == teacher.data.metrics["test/acc1"]


@pytest.mark.slow
def test_auto_trained_teacher_uses_the_pretrain_schedule(compose_cfg, tmp_path: Path) -> None:
    store = [*tracking_overrides(tmp_path), "latency_repeats=1"]
    cfg = compose_cfg(
        "model@teacher=mlp_800",
        "schedule@pretrain_schedule=default",
        "pretrain_schedule.epochs=3",
        "schedule.epochs=1",
        *store,
    )
    run(cfg)
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("test").experiment_id])
    by_method = {r.data.tags["method"]: r for r in runs}
    assert by_method["baseline"].data.params["schedule.epochs"] == "3"
    assert by_method["distill/kd"].data.params["schedule.epochs"] == "1"
    assert by_method["distill/kd"].data.params["pretrain_schedule.epochs"] == "3"
