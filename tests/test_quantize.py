"""Quantization: fake quantizers against hand calculations, int8 accuracy and size on digits, packed
low-bit weights (size, reload), the PTQ/QAT methods' bad input, QAT with KD, and one whole run."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from torch import nn

from kdexp.checkpoint import save_checkpoint
from kdexp.dataset.base import Data, TensorLoader
from kdexp.dataset.digits import load as digits
from kdexp.dataset.synthetic import load as synthetic
from kdexp.errors import ConfigError
from kdexp.method.base import Step, needs_of
from kdexp.method.quantize import backend, load_packed
from kdexp.method.quantize.fake import (
    QuantLinear,
    WeightQuantizer,
    dequantize,
    qrange,
    quantize,
)
from kdexp.method.quantize.ptq import DynamicInt8, PTQInt8
from kdexp.method.quantize.qat import QAT
from kdexp.model.mlp import MLP
from kdexp.packed import PackedConv2d, PackedLinear, pack, unpack
from kdexp.run import run
from kdexp.stats import size_bytes
from kdexp.train import evaluate
from tests.conftest import run_cli, tracking_overrides

CE = nn.CrossEntropyLoss()


# -- fake quantization ------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_round_trip_error_is_at_most_half_a_step(bits: int) -> None:
    torch.manual_seed(0)
    qn, qp = qrange(bits)
    scale = torch.tensor([0.05, 0.3, 1.7])[:, None]
    x = (torch.rand(3, 1000) * (qn + qp) - qn) * scale  # inside [-Qn·s, Qp·s]
    error = (dequantize(quantize(x, scale, bits), scale) - x).abs()
    assert bool((error <= scale / 2 + 1e-6).all())
    codes = quantize(x, scale, bits)
    assert codes.min() >= -qn and codes.max() <= qp and bool((codes == codes.round()).all())
    assert float(quantize(torch.zeros(1), torch.tensor(0.3), bits)) == 0.0  # zero is exact


def test_one_bit_weights_take_two_values_per_channel() -> None:
    torch.manual_seed(0)
    w = torch.randn(6, 3, 3, 3)
    w[0, 0] = 0.0  # sign(0) counts as +1
    out = WeightQuantizer(1, 6)(w)
    for row, latent in zip(out, w, strict=True):
        alpha = latent.abs().mean()
        assert sorted(row.unique().tolist()) == pytest.approx([-alpha.item(), alpha.item()])
        assert torch.equal(row > 0, latent >= 0)


def test_ste_passes_the_gradient_inside_the_range() -> None:
    """Min-max steps: every weight is inside the range, so d(Σ c·q(w))/dw = c exactly."""
    torch.manual_seed(0)
    w = torch.randn(4, 10, requires_grad=True)
    c = torch.randn(4, 10)
    (WeightQuantizer(4, 4)(w) * c).sum().backward()
    assert torch.allclose(w.grad, c)


def test_lsq_gradients_match_the_paper_by_hand() -> None:
    """Esser et al. 2020, eq. 3: dq/dw = 1 inside the range, 0 outside; dq/ds = round(w/s) − w/s
    inside, −Qn or Qp at the clip; ds scaled by g = 1/sqrt(N·Qp)."""
    bits, s = 4, 0.1
    qn, qp = qrange(bits)
    values = [-1.0, -0.83, -0.23, 0.0, 0.04, 0.31, 0.66, 0.9]  # -1.0, -0.83, 0.9 are clipped
    w = torch.tensor([values], requires_grad=True)
    quantizer = WeightQuantizer(bits, 1, lsq=True)
    with torch.no_grad():
        quantizer.scale.fill_(s)  # type: ignore[union-attr]
    c = torch.linspace(0.5, 2.0, len(values))[None]
    (quantizer(w) * c).sum().backward()
    g = 1 / math.sqrt(len(values) * qp)
    grad_w, grad_s = [], 0.0
    for v, ci in zip(values, c[0].tolist(), strict=True):
        ratio = v / s
        if ratio <= -qn:
            grad_w.append(0.0)
            grad_s += ci * -qn
        elif ratio >= qp:
            grad_w.append(0.0)
            grad_s += ci * qp
        else:
            grad_w.append(ci)
            grad_s += ci * (round(ratio) - ratio)
    assert w.grad[0].tolist() == pytest.approx(grad_w, abs=1e-6)
    assert quantizer.scale.grad.item() == pytest.approx(grad_s * g, rel=1e-5)  # type: ignore[union-attr]


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("lsq", [False, True])
def test_pruned_zeros_stay_zero_after_quantization_and_packing(bits: int, lsq: bool) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(32, 16)
    with torch.no_grad():
        layer.weight.mul_(torch.rand_like(layer.weight) > 0.5)  # half the weights pruned
    zeros = layer.weight == 0
    data = synthetic(batch_size=8, seed=0)
    method = QAT(data=data, criterion=CE, bits=bits, lsq=lsq, keep_first_last_8bit=False)
    model = method.prepare(nn.Sequential(nn.Flatten(), nn.Linear(64, 32), layer))
    fake = model[2]
    assert isinstance(fake, QuantLinear)
    assert bool((fake.weight_quantizer(fake.weight)[zeros] == 0).all())
    if bits < 8:
        final = method.finalize(model)
        assert isinstance(final[2], PackedLinear)
        assert bool((final[2].unpacked_weight()[zeros] == 0).all())


def test_int8_ptq_keeps_pruned_zeros() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)).eval()
    with torch.no_grad():
        for layer in (model[1], model[3]):
            layer.weight.mul_(torch.rand_like(layer.weight) > 0.5)
    int8 = backend.int8_weights(backend.quantize_static(model, [torch.randn(16, 1, 8, 8)]))
    for name in ("1", "3"):
        zeros = model.get_submodule(name).weight == 0
        assert int8[name].shape == zeros.shape and bool((int8[name][zeros] == 0).all())


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_pack_unpack_round_trip(bits: int) -> None:
    codes = torch.randint(0, 2**bits, (37,))
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(37 * bits / 8)
    assert torch.equal(unpack(packed, bits, 37), codes.to(torch.int32))


# -- int8 and packed models ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained_mlp() -> tuple[Data, nn.Module]:
    """An MLP trained on digits for a second or two (~96% test accuracy)."""
    torch.manual_seed(0)
    data = digits(batch_size=64, seed=0, val_size=0.1, test_size=0.2)
    model = MLP(10, 1, 8, hidden=[384, 384])
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(3):
        for x, y in data.train:
            optimizer.zero_grad()
            CE(model(x), y).backward()
            optimizer.step()
    return data, model.eval()


def test_int8_matches_fp32_on_digits_at_under_a_third_of_the_bytes(trained_mlp) -> None:
    data, model = trained_mlp
    fp32 = evaluate(model, data.test, torch.device("cpu"))["acc1"]
    method = PTQInt8(data=data, criterion=CE, calibration_batches=8)
    quantized = method.finalize(method.prepare(model))
    assert any(
        m.__class__.__module__.startswith("torch.ao.nn.quantized") for m in quantized.modules()
    )
    int8 = evaluate(quantized, data.test, torch.device("cpu"))["acc1"]
    assert fp32 > 90 and abs(int8 - fp32) <= 1.0
    assert size_bytes(quantized) <= 0.3 * size_bytes(model)
    metrics = method.final_metrics()
    assert metrics["test/acc1_fp32"] == pytest.approx(fp32)
    assert metrics["quant/bits"] == 8 and metrics["model/flops"] > 0


@pytest.mark.parametrize("bits", [4, 2, 1])
def test_packed_size_is_bits_times_params_over_eight_plus_scales(trained_mlp, bits: int) -> None:
    data, model = trained_mlp
    shapes = [tuple(m.weight.shape) for m in model.modules() if isinstance(m, nn.Linear)]
    copy = MLP(10, 1, 8, hidden=[384, 384])
    copy.load_state_dict(model.state_dict())
    method = QAT(data=data, criterion=CE, bits=bits, keep_first_last_8bit=False)
    final = method.finalize(method.prepare(copy))
    layers = [m for m in final.modules() if isinstance(m, PackedLinear)]
    weights = sum(rows * cols for rows, cols in shapes)
    scales = sum(rows for rows, _ in shapes)
    stored = sum(m.packed.numel() * m.packed.element_size() for m in layers)
    stored += sum(m.scale.numel() * m.scale.element_size() for m in layers)
    assert stored == bits * weights // 8 + 4 * scales
    biases = sum(rows for rows, _ in shapes) * 4
    assert stored + biases < size_bytes(final) < stored + biases + 4096  # + torch.save's own bytes
    assert "weight" not in " ".join(final.state_dict())  # only packed tensors hold the weights


@pytest.mark.parametrize("bits", [4, 1])
def test_packed_model_reloads_with_the_same_outputs(tmp_path: Path, bits: int) -> None:
    torch.manual_seed(0)

    def build() -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1, bias=False),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(8 * 8 * 8, 10),
        )

    data = synthetic(batch_size=8, seed=0)
    method = QAT(data=data, criterion=CE, bits=bits, lsq=True, quantize_activations=True)
    model = method.prepare(build())
    model.train()
    model(torch.randn(8, 1, 8, 8))  # activation ranges from a first batch
    final = method.finalize(model)
    assert isinstance(final[3], PackedConv2d) and final[3].bits == bits
    assert isinstance(final[0], PackedConv2d) and final[0].bits == 8  # first layer kept at 8
    x = torch.randn(5, 1, 8, 8)
    before = final(x)
    save_checkpoint(tmp_path / "final.pt", final)
    reloaded = load_packed(build(), tmp_path / "final.pt").eval()
    assert torch.equal(reloaded(x), before)


def test_dynamic_int8_quantizes_linear_layers(trained_mlp) -> None:
    data, model = trained_mlp
    method = DynamicInt8(data=data, criterion=CE)
    quantized = method.finalize(method.prepare(model))
    x = next(iter(data.test))[0]
    assert (quantized(x) - model(x)).abs().max() < 0.1 * model(x).abs().max()
    with pytest.raises(ConfigError, match="Linear layers"):
        method.prepare(nn.Sequential(nn.Conv2d(1, 2, 3)))


def test_ptq_declares_that_it_does_not_train(compose_cfg) -> None:
    """Post-training quantization is not sent through the optimizer loop: it needs no dummy
    parameter, its prepared model is the trained one in eval mode, unchanged."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.BatchNorm1d(8), nn.Linear(8, 10))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = synthetic(batch_size=8, seed=0)
    method = PTQInt8(data=data, criterion=CE, calibration_batches=1)
    prepared = method.prepare(model)
    assert prepared is model and not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert list(method.parameters()) == []
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    for name in ("ptq_int8", "dynamic_int8"):
        needs = needs_of(compose_cfg(f"method=quantize/{name}").method)
        assert not needs.trains and needs.trained_start and not needs.distributed


def test_on_cpu_wrapper_runs_the_int8_model() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval()
    quantized = backend.quantize_static(model, [torch.randn(4, 1, 8, 8)])
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(backend.OnCpu(quantized)(x), quantized(x))


# -- bad input ----------------------------------------------------------------------------------
class _DataDependent(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if x.sum() > 0 else -x


def test_bad_quantization_input() -> None:
    data = synthetic(batch_size=8, seed=0)
    with pytest.raises(ConfigError, match=r"method.bits=3: one of 8, 4, 2, 1"):
        QAT(data=data, criterion=CE, bits=3)
    for batches in (0, -1, 1.5):
        with pytest.raises(ConfigError, match="method.calibration_batches"):
            PTQInt8(data=data, criterion=CE, calibration_batches=batches)  # type: ignore[arg-type]
    empty = TensorLoader(torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long), 8)
    no_train = Data(empty, data.val, data.test, data.num_classes, data.input_shape)
    with pytest.raises(ConfigError, match="no batches"):
        PTQInt8(data=no_train, criterion=CE)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), _DataDependent(), nn.Flatten(), nn.Linear(144, 10))
    with pytest.raises(ConfigError, match=r"module '1' \(_DataDependent\) cannot be traced"):
        PTQInt8(data=data, criterion=CE).prepare(model)


def test_bad_bits_fail_before_any_run(compose_cfg, tmp_path: Path) -> None:
    cfg = compose_cfg(
        "method=quantize/qat", "method.bits=16", "dataset=synthetic", *tracking_overrides(tmp_path)
    )
    with pytest.raises(ConfigError, match="method.bits=16"):
        run(cfg)
    db = tmp_path / "mlflow.db"
    if db.exists():  # the tracker may have created the store; no run was opened in it
        client = MlflowClient(f"sqlite:///{db}")
        found = client.get_experiment_by_name("test")
        assert found is None or client.search_runs([found.experiment_id]) == []
    assert not list(tmp_path.glob("**/*.pt"))


# -- with distillation, and a whole run -------------------------------------------------------
def test_qat_with_kd_composes_and_distils(compose_cfg) -> None:
    from hydra.utils import instantiate

    cfg = compose_cfg("method=quantize/qat", "+method/distill@method.distill=kd")
    assert cfg.method.distill._target_ == "kdexp.method.distill.kd.KD"
    assert "teacher" in cfg
    data = synthetic(batch_size=8, seed=0)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    method = instantiate(cfg.method)(data=data, criterion=CE, teacher=teacher)
    model = method.begin(nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Linear(16, 10)))
    method.train()
    x, y = next(iter(data.train))
    assert set(method.loss(x, y, model(x), Step(0, 0))) == {"ce", "kd"}
    assert "teacher/test_acc1" in method.summary()


@pytest.mark.slow
def test_qat_4bit_run_logs_to_mlflow(tmp_path: Path) -> None:
    args = ["method=quantize/qat", "method.bits=4", "schedule.epochs=1", "latency_repeats=1"]
    done = run_cli(args + tracking_overrides(tmp_path), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("test")
    runs = client.search_runs([experiment.experiment_id], "tags.method = 'quantize/qat'")
    assert len(runs) == 1
    metrics, run_id = runs[0].data.metrics, runs[0].info.run_id
    assert metrics["quant/bits"] == 4
    assert metrics["test/acc1_fp32"] > 50 and metrics["test/acc1"] > 50
    baseline = client.search_runs([experiment.experiment_id], "tags.method = 'baseline'")[0]
    assert metrics["model/size_bytes"] < 0.3 * baseline.data.metrics["model/size_bytes"]
    assert [a.path for a in client.list_artifacts(run_id, "method")] == ["method/quant_error.csv"]
    table = Path(client.download_artifacts(run_id, "method/quant_error.csv", str(tmp_path)))
    lines = table.read_text().splitlines()
    assert lines[0].startswith("layer,bits,numel,mse") and len(lines) == 1 + 3  # MLP: 3 layers


@pytest.mark.slow
def test_an_int8_run_prints_no_library_warning_and_its_mlflow_model_reproduces_test_acc(
    tmp_path: Path,
) -> None:
    import mlflow.pytorch

    args = ["method=quantize/ptq_int8", "schedule.epochs=2", "latency_repeats=1"]
    done = run_cli(args + tracking_overrides(tmp_path), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    output = done.stdout + done.stderr
    for noise in ("Warning", "WARNING", "pt2:", "Traceback"):
        assert noise not in output, output[-3000:]
    assert "model logged with pickle (torch.export cannot trace torch.ao int8 modules)" in output
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("test")
    (found,) = client.search_runs([experiment.experiment_id], "tags.method = 'quantize/ptq_int8'")
    mlflow.set_tracking_uri(uri)
    model = mlflow.pytorch.load_model(f"runs:/{found.info.run_id}/model")
    # kdexp's own top-1 (topk): int8 logits tie often, and argmax breaks ties differently.
    test = evaluate(model, digits(batch_size=64, seed=0).test, torch.device("cpu"))
    assert test["acc1"] == pytest.approx(found.data.metrics["test/acc1"], abs=1e-4)


def test_qat_keeps_pruned_zeros_while_training() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    with torch.no_grad():
        model[1].weight[:, ::2] = 0.0  # half the first layer pruned
    zeros = model[1].weight == 0
    data = digits(batch_size=32, seed=0)
    method = QAT(data=data, criterion=CE, bits=4, keep_first_last_8bit=False)
    prepared = method.prepare(model)
    optimizer = torch.optim.SGD(prepared.parameters(), lr=0.5)
    for step, (x, y) in zip(range(3), data.train, strict=False):
        optimizer.zero_grad()
        sum(method.loss(x, y, prepared(x), Step(0, 0)).values()).backward()
        optimizer.step()
        method.after_step(Step(0, step))
    weight = prepared[1].weight
    assert bool((weight[zeros] == 0).all()) and bool((weight[~zeros] != 0).all())
    assert not hasattr(prepared[3], "sparsity_mask")  # the dense classifier is left alone
    off = QAT(data=data, criterion=CE, bits=4, keep_sparsity=False)
    fresh = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    fresh[1].weight.data[:, ::2] = 0.0
    assert not any(hasattr(m, "sparsity_mask") for m in off.prepare(fresh).modules())
