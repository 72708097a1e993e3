"""The compressed format (kdexp.compress) and weight sharing: exact round trips of pruned, QAT
(8/4/2 bits), weight-shared and channel-pruned models; sizes worked by hand; damaged files
refused; the centroid gradients of weight sharing against an independent sum; the run's metrics
read back from MLflow."""

from __future__ import annotations

import csv
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from mlflow.tracking import MlflowClient
from torch import nn

from kdexp.checkpoint import read_state_dict
from kdexp.compress import (
    CompressedFileError,
    compress,
    compressed_size,
    decompress,
    entropy,
    layout_report,
    load_compressed,
    save_compressed,
)
from kdexp.dataset.synthetic import load as synthetic
from kdexp.errors import ConfigError
from kdexp.method.base import Step
from kdexp.method.prune import Channel, Magnitude
from kdexp.method.quantize import backend
from kdexp.method.quantize.qat import QAT
from kdexp.method.quantize.weight_sharing import (
    SharedLinear,
    WeightSharing,
    kmeans_1d,
    load_shared,
)
from kdexp.method.restore import restore
from kdexp.packed import PackedConv2d, PackedLinear
from kdexp.report import main as report_main
from kdexp.run import FINAL_METRICS, run
from kdexp.stats import compression_metrics
from kdexp.tracking.mlflow import MlflowTracker
from tests.conftest import tracking_overrides

CE = nn.CrossEntropyLoss()
X = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def _convnet() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 8 * 8, 32),
        nn.ReLU(),
        nn.Linear(32, 10),
    )


def _pruned(sparsity: float = 0.8) -> nn.Module:
    """The convnet pruned by magnitude (one shot), its BatchNorm statistics not the defaults."""
    model = _convnet()
    with torch.no_grad():
        bn = model[1]
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    method = Magnitude(data=synthetic(batch_size=8, seed=0), criterion=CE, sparsity=sparsity,
                       epochs=1, schedule="oneshot")  # fmt: skip
    method.prepare(model)
    method.after_step(Step(0, 0))
    return method.finalize(model).eval()


def _through_file(tmp_path: Path, model: nn.Module) -> dict:
    path = tmp_path / "model.kdxc"
    written = save_compressed(path, model)
    assert written == path.stat().st_size == compressed_size(model)
    return load_compressed(path)


# -- round trips: the reloaded model gives exactly the same outputs -------------------------------
def test_pruned_model_round_trip_is_exact_and_small(tmp_path: Path) -> None:
    model = _pruned(0.8)
    state = _through_file(tmp_path, model)
    for key, value in model.state_dict().items():  # bit for bit, dtype included
        assert state[key].dtype == value.dtype and torch.equal(state[key], value), key
    reloaded = restore(_convnet(), state).eval()
    assert torch.equal(reloaded(X), model(X))
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear))
    rows = {r["entry"]: r for r in layout_report(model)[1]}
    assert rows["6.weight"]["layout"] in ("bitmask", "relative")
    # 20% of the fp32 weights kept, plus where they are: well under half the dense bytes.
    assert compressed_size(model) < 0.45 * 4 * weights


@pytest.mark.parametrize("bits", [pytest.param(8, marks=pytest.mark.slow), 4, 2])
def test_qat_model_round_trip_is_exact(tmp_path: Path, bits: int) -> None:
    data = synthetic(batch_size=8, seed=0)
    method = QAT(data=data, criterion=CE, bits=bits, calibration_batches=2)
    model = method.prepare(_pruned(0.5))
    final = method.finalize(model).eval()
    state = _through_file(tmp_path, final)
    if bits == 8:  # a torch.ao int8 model: loaded into an int8 model of the same architecture
        fresh = backend.quantize_static(_convnet().eval(), [torch.randn(4, 1, 8, 8)])
        fresh.load_state_dict(state)
        assert any(v.is_quantized for v in state.values() if isinstance(v, torch.Tensor))
    else:
        fresh = restore(_convnet(), state).eval()
        assert isinstance(fresh[3], PackedConv2d) and isinstance(fresh[6], PackedLinear)
        rows = {r["entry"]: r for r in layout_report(final)[1]}
        row = rows["6.packed"]  # 16,384 weights, about half of them pruned
        assert row["value_bits"] <= bits and row["layout"] != "dense"  # codes at their width
        assert row["position_bytes"] + row["value_bytes"] < 0.8 * 16384 * bits / 8
        assert torch.equal(state["3.packed"], final.state_dict()["3.packed"])
    assert torch.equal(fresh(X), final(X))


def test_weight_shared_model_round_trip_is_exact(tmp_path: Path) -> None:
    method = WeightSharing(data=synthetic(batch_size=8, seed=0), criterion=CE, bits=5)
    final = method.finalize(method.prepare(_pruned(0.7))).eval()
    state = _through_file(tmp_path, final)
    reloaded = load_shared(_convnet(), state).eval()
    assert torch.equal(reloaded(X), final(X))
    rows = {r["entry"]: r for r in layout_report(final)[1]}
    assert rows["6.indices"]["value_bits"] <= 5 and rows["6.indices"]["layout"] != "dense"
    assert rows["6.codebook"]["numel"] == 32


def test_channel_pruned_model_round_trip_is_exact(tmp_path: Path) -> None:
    model = _convnet()
    method = Channel(data=synthetic(batch_size=8, seed=0), criterion=CE, sparsity=0.5, epochs=1,
                     scope="layerwise")  # fmt: skip
    method.prepare(model)
    method.after_step(Step(0, 0))
    small = method.finalize(model).eval()
    state = _through_file(tmp_path, small)
    reloaded = restore(_convnet(), state, input_shape=(1, 8, 8)).eval()
    assert reloaded[0].out_channels == 4
    assert torch.equal(reloaded(X), small(X))


# -- sizes worked by hand -------------------------------------------------------------------------
def test_size_of_a_sparse_layer_by_hand() -> None:
    # 6,400 fp32 weights, every 10th non-zero: 640 values, 9 zeros before each.
    weight = torch.zeros(64, 100)
    weight.view(-1)[::10] = torch.arange(1, 641, dtype=torch.float32)
    size, rows = layout_report({"w": weight}, codec="raw")
    (row,) = rows
    # Bitmask: 6,400 bits = 800 bytes. Relative indices: a gap of 9 needs 4 bits (escape 15):
    # 640 × 4 bits = 320 bytes; at 3 bits (escape 7) it takes an escape and a 2: 480 bytes.
    assert (row["layout"], row["index_bits"], row["position_bytes"]) == ("relative", 4, 320)
    assert row["value_bytes"] == 640 * 4  # fp32 values
    # The same layer of 4-bit codes (1..15, zero left out): the values take 640 × 4 bits.
    codes = torch.zeros(64, 100, dtype=torch.int64)
    codes.view(-1)[::10] = torch.arange(640) % 15 + 1
    (row,) = layout_report({"w": codes}, codec="raw")[1]
    assert (row["value_bits"], row["value_bytes"], row["position_bytes"]) == (4, 320, 320)
    # The file: 17 header bytes, 9 for the metadata's coder and lengths, the metadata, the streams.
    data = compress({"w": weight}, codec="raw")
    (meta_length,) = struct.unpack_from("<I", data, 18)
    assert size == len(data) == 17 + 9 + meta_length + 320 + 2560


def test_huffman_size_by_hand() -> None:
    # Counts 512, 256, 128, 128 → code lengths 1, 2, 3, 3: 1,792 bits = 224 bytes of codes,
    # plus the table: a flag, a count (4 bytes) and (symbol, length) for 4 symbols = 13 bytes.
    symbols = np.repeat(np.array([5, 9, 33, 60], np.uint64), [512, 256, 128, 128])
    symbols = np.random.default_rng(0).permutation(symbols)
    assert entropy.code_lengths({5: 512, 9: 256, 33: 128, 60: 128}) == {5: 1, 9: 2, 33: 3, 60: 3}
    codec, data = entropy.encode(symbols, 6, "huffman")
    assert codec == entropy.HUFFMAN and len(data) == 13 + 224
    assert np.array_equal(entropy.decode(codec, data, 6, symbols.size), symbols)
    raw_codec, raw = entropy.encode(symbols, 6, "raw")
    assert len(raw) == 1024 * 6 // 8
    best_codec, best = entropy.encode(symbols, 6)
    assert len(best) <= 237 and np.array_equal(entropy.decode(best_codec, best, 6, 1024), symbols)


@pytest.mark.parametrize("codec", ["raw", "huffman", "zlib", "lzma"])
@pytest.mark.parametrize("width", [1, 3, 8, 12, 16, 33])
def test_every_coder_round_trips(codec: str, width: int) -> None:
    symbols = np.random.default_rng(width).integers(0, 2**width, 777, dtype=np.uint64)
    found, data = entropy.encode(symbols, width, codec)
    assert np.array_equal(entropy.decode(found, data, width, symbols.size), symbols)


@pytest.mark.parametrize("width", [1, 4, 8, 13, 16])
def test_huffman_size_without_coding_equals_the_coded_length(width: int) -> None:
    rng = np.random.default_rng(width)
    skewed = np.minimum(rng.geometric(0.3, 5000) - 1, 2**width - 1).astype(np.uint64)
    assert entropy.huffman_size(skewed, width) == len(entropy.huffman_encode(skewed, width))


def test_a_long_stream_takes_the_smallest_of_raw_huffman_and_fast_zlib() -> None:
    # Over FAST_ABOVE bytes lzma is skipped and zlib runs at level 1: the choice is the smallest
    # of raw, Huffman and that zlib, and it decodes.
    count = entropy.FAST_ABOVE + 1000
    rng = np.random.default_rng(0)
    repetitive = np.tile(rng.integers(0, 256, 64, dtype=np.uint64), count // 64 + 1)[:count]
    codec, data = entropy.encode(repetitive, 8)
    fast = zlib.compressobj(1, zlib.DEFLATED, -15)
    zlib_size = len(fast.compress(entropy.pack_bits(repetitive, 8)) + fast.flush())
    assert codec == entropy.ZLIB and len(data) == zlib_size
    assert len(data) < entropy.huffman_size(repetitive, 8) < count
    assert np.array_equal(entropy.decode(codec, data, 8, count), repetitive)
    noise = rng.integers(0, 256, count, dtype=np.uint64)
    codec, data = entropy.encode(noise, 8)
    assert codec in (entropy.RAW, entropy.HUFFMAN) and len(data) <= count
    assert np.array_equal(entropy.decode(codec, data, 8, count), noise)


def test_odd_values_survive_bit_for_bit() -> None:
    state = {
        "signed_zero": torch.tensor([-0.0, 0.0, 1.0]),
        "half": torch.randn(5, 7).half(),
        "bf16": torch.randn(9).bfloat16(),
        "steps": torch.tensor(123456789),
        "flags": torch.tensor([True, False, True]),
        "pair": (torch.ones(2), None),
        "dtype": torch.qint8,
    }
    out = decompress(compress(state))
    for key in ("signed_zero", "half", "bf16"):
        assert out[key].dtype == state[key].dtype
        assert torch.equal(out[key].view(torch.uint8), state[key].view(torch.uint8)), key
    assert torch.equal(out["steps"], state["steps"]) and torch.equal(out["flags"], state["flags"])
    assert torch.equal(out["pair"][0], torch.ones(2)) and out["pair"][1] is None
    assert out["dtype"] is torch.qint8


# -- damaged files --------------------------------------------------------------------------------
def test_truncated_altered_and_foreign_files_are_refused_by_name(tmp_path: Path) -> None:
    path = tmp_path / "model.kdxc"
    save_compressed(path, _pruned(0.5))
    data = path.read_bytes()
    truncated = tmp_path / "truncated.kdxc"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CompressedFileError, match=r"truncated\.kdxc: truncated"):
        load_compressed(truncated)
    altered = tmp_path / "altered.kdxc"
    altered.write_bytes(data[:-10] + bytes([data[-10] ^ 1]) + data[-9:])
    with pytest.raises(CompressedFileError, match=r"altered\.kdxc: checksum mismatch"):
        load_compressed(altered)
    foreign = tmp_path / "final.pt"
    torch.save({"w": torch.ones(3)}, foreign)
    with pytest.raises(CompressedFileError, match=r"final\.pt: not a kdexp compressed model"):
        load_compressed(foreign)
    newer = tmp_path / "newer.kdxc"
    newer.write_bytes(data[:4] + bytes([2]) + data[5:])
    with pytest.raises(CompressedFileError, match="version 2"):
        load_compressed(newer)
    with pytest.raises(ConfigError, match=r"checkpoint=.*altered\.kdxc.*checksum mismatch"):
        load_compressed(altered, key="checkpoint")
    with pytest.raises(ConfigError, match="no such file"):
        load_compressed(tmp_path / "absent.kdxc", key="checkpoint")
    assert issubclass(CompressedFileError, ValueError)


# -- weight sharing -------------------------------------------------------------------------------
def test_kmeans_starts_linear_and_converges_by_hand() -> None:
    values = torch.tensor([0.0, 1.0, 2.0, 10.0, 11.0, 12.0])
    # Linear start [0, 12], boundary 6: clusters {0, 1, 2} and {10, 11, 12}, means 1 and 11.
    centroids, assignment = kmeans_1d(values, 2)
    assert centroids.tolist() == [1.0, 11.0] and assignment.tolist() == [0, 0, 0, 1, 1, 1]
    # Four linear centroids 0, 4, 8, 12, boundaries 2, 6, 10 (a value on one goes to the lower
    # centroid): {0, 1, 2}, {}, {10}, {11, 12} → 1, 4 (empty: stays), 10, 11.5; then stable.
    centroids, assignment = kmeans_1d(values, 4)
    assert centroids.tolist() == [1.0, 4.0, 10.0, 11.5]
    assert assignment.tolist() == [0, 0, 0, 2, 3, 3]


def test_centroid_gradient_is_the_sum_of_its_weights_gradients() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(20, 7)
    with torch.no_grad():
        layer.weight.mul_(torch.rand_like(layer.weight) > 0.3)
    method = WeightSharing(data=synthetic(batch_size=8, seed=0), criterion=CE, bits=3)
    model = method.prepare(nn.Sequential(layer))
    shared = model[0]
    assert isinstance(shared, SharedLinear)
    x, y = torch.randn(5, 20), torch.randint(0, 7, (5,))
    CE(model(x), y).backward()
    # Independently: the weight as a plain tensor, its gradient summed per centroid by a loop.
    weight = shared.shared_weight().detach().clone().requires_grad_(True)
    CE(F.linear(x, weight, shared.bias.detach()), y).backward()
    expected = torch.zeros(8)
    for (row, col), index in np.ndenumerate(shared.indices.numpy()):
        if index > 0:
            expected[index - 1] += weight.grad[row, col]
    assert torch.allclose(shared.codebook.grad, expected, atol=1e-6)


def test_pruned_zeros_stay_zero_and_at_most_2_to_the_bits_values() -> None:
    model = _pruned(0.6)
    zeros = {n: m.weight == 0 for n, m in model.named_modules() if hasattr(m, "weight")
             and isinstance(m, nn.Conv2d | nn.Linear)}  # fmt: skip
    data = synthetic(batch_size=8, seed=0)
    method = WeightSharing(data=data, criterion=CE, bits=4)
    shared = method.prepare(model).train()
    optimizer = torch.optim.SGD(shared.parameters(), lr=0.01)
    for x, y in list(data.train)[:3]:  # centroids move; zeros must not
        optimizer.zero_grad()
        CE(shared(x), y).backward()
        optimizer.step()
    final = method.finalize(shared)
    for name, zero in zeros.items():
        weight = final.get_submodule(name).shared_weight()
        assert bool((weight[zero] == 0).all()), name
        assert len(torch.unique(weight[~zero])) <= 2**4, name
    assert method.final_metrics()["model/params"] == sum(p.numel() for p in _convnet().parameters())


def test_bad_weight_sharing_settings() -> None:
    data = synthetic(batch_size=8, seed=0)
    with pytest.raises(ConfigError, match="method.bits=9"):
        WeightSharing(data=data, criterion=CE, bits=9)
    with pytest.raises(ConfigError, match="method.iterations=0"):
        WeightSharing(data=data, criterion=CE, iterations=0)


# -- the metrics of a run -------------------------------------------------------------------------
@pytest.mark.slow
def test_run_logs_compressed_bytes_and_ratio(compose_cfg, tmp_path: Path) -> None:
    cfg = compose_cfg(
        "method=quantize/weight_sharing",
        "method.bits=4",
        "schedule.epochs=1",
        "schedule@pretrain_schedule=default",
        "pretrain_schedule.epochs=1",
        "latency_repeats=1",
        *tracking_overrides(tmp_path),
    )
    run(cfg)
    client = MlflowClient(tracking_uri=cfg.tracking.uri)
    experiment = client.get_experiment_by_name("test")
    runs = client.search_runs([experiment.experiment_id], "tags.method = 'quantize/weight_sharing'")
    (shared,) = runs
    metrics = shared.data.metrics
    final = read_state_dict(Path(tmp_path / "run/checkpoints/final.pt"), "f", quantized=True)
    assert metrics["model/compressed_bytes"] == compressed_size(final)
    assert metrics["model/compression_ratio"] == pytest.approx(
        4 * metrics["model/params"] / metrics["model/compressed_bytes"]
    )
    assert metrics["model/compression_ratio"] > 5  # 4-bit indices against fp32
    assert {"model/compressed_bytes", "model/compression_ratio"} <= set(FINAL_METRICS)


@pytest.mark.slow
def test_report_puts_size_on_the_chosen_basis(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    # (method, test/acc1, torch.save bytes, compressed bytes): the pruned model is as big as the
    # dense one stored dense, and 10x smaller compressed.
    for method, acc, dense, small in (("dense", 90.0, 1000, 900), ("pruned", 89.0, 1000, 100)):
        tracker = MlflowTracker(uri=uri, experiment="rep")
        tags = {"method": method, "model": "mlp", "dataset": "digits"}
        with tracker.run(method, {"seed": 0, "method._target_": method}, tags):
            tracker.log_metrics(
                {
                    "test/acc1": acc,
                    "model/size_bytes": dense,
                    "model/compressed_bytes": small,
                    "model/compression_ratio": 1000 / small,
                },
                1,
            )
    fronts = {}
    for size in ("dense", "compressed"):
        out = tmp_path / size
        assert report_main(["--experiment", "rep", "--tracking-uri", uri, "--out", str(out),
                            "--size", size]) == 0  # fmt: skip
        rows = list(csv.DictReader((out / "pareto.csv").open()))
        fronts[size] = {(r["cost"], r["configuration"].split(" / ")[0]) for r in rows}
    # Dense basis: same size, the dense model is more accurate: it alone is on the front.
    assert {m for c, m in fronts["dense"] if c == "size_bytes"} == {"dense"}
    # Compressed basis: the pruned model is 9x smaller: both are on the front.
    assert {m for c, m in fronts["compressed"] if c == "compressed_bytes"} == {"dense", "pruned"}
    table = (tmp_path / "dense" / "comparison.md").read_text()
    assert "compressed (bytes)" in table and "10.0 ± 0.0×" in table


def test_compression_metrics_use_the_dense_start_and_survive_odd_state() -> None:
    model = _pruned(0.8)
    size = compressed_size(model)
    quantized_counts = {"model/params": 1000}
    assert compression_metrics(model, quantized_counts) == {
        "model/compressed_bytes": size,
        "model/compression_ratio": 4000 / size,
    }
    pruned_counts = {"model/params": 1000, "model/dense_params": 3000}  # channel pruning
    assert compression_metrics(model, pruned_counts)["model/compression_ratio"] == 12000 / size

    class WithExtraState(nn.Linear):
        def get_extra_state(self) -> dict:
            return {"note": "a dict the format does not store"}

    odd = compression_metrics(WithExtraState(2, 2), {"model/params": 6})
    assert all(np.isnan(v) for v in odd.values())  # logged as NaN; the run still ends
