"""DistributedDataParallel under torchrun: the batch slicing, the reductions and the weighted
gradient against hand calculations, and a 2-process gloo job against a single-process run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from kdexp import distributed
from kdexp.dataset.base import Data, TensorLoader
from kdexp.errors import ConfigError


def test_shard_rows_split_a_batch_into_contiguous_near_equal_slices() -> None:
    assert [distributed.shard_rows(64, r, 2) for r in range(2)] == [slice(0, 32), slice(32, 64)]
    # 13 rows over 2 ranks: 7 + 6; 5 rows over 4 ranks: 2 + 1 + 1 + 1
    assert [distributed.shard_rows(13, r, 2) for r in range(2)] == [slice(0, 7), slice(7, 13)]
    sizes = [distributed.shard_rows(5, r, 4) for r in range(4)]
    assert sizes == [slice(0, 2), slice(2, 3), slice(3, 4), slice(4, 5)]


def _tensor_loader(n: int, batch_size: int) -> TensorLoader:
    inputs = torch.arange(n, dtype=torch.float32)[:, None]
    return TensorLoader(inputs, torch.arange(n), batch_size, shuffle=True, seed=3)


def test_sharded_tensor_loader_slices_the_single_process_batches() -> None:
    single = [y for _, y in _tensor_loader(11, 4)]  # batches of 4, 4, 3
    ranks = [distributed.ShardedTensorLoader(_tensor_loader(11, 4), r, 2) for r in range(2)]
    slices, shares, rows = [], [], []
    for loader in ranks:
        assert len(loader) == 3
        got = []
        for x, y, index in loader.indexed():
            got.append(y)
            shares.append(loader.share)
            rows.append(index)
            assert torch.equal(x[:, 0].long(), y)  # inputs and targets stay paired
        slices.append(got)
    for batch, part0, part1 in zip(single, *slices, strict=True):
        assert torch.equal(torch.cat([part0, part1]), batch)
    assert shares == [0.5, 0.5, 2 / 3, 0.5, 0.5, 1 / 3]
    assert torch.equal(rows[2], slices[0][2])  # targets are row numbers here
    # 9 rows in batches of 4 leave 1 row: fewer than the ranks, so that batch is dropped
    short = distributed.ShardedTensorLoader(_tensor_loader(9, 4), 1, 2)
    assert len(short) == 2 and len(list(short)) == 2


def test_sharded_data_loader_slices_the_single_process_batches() -> None:
    def loader() -> DataLoader:
        data = TensorDataset(torch.arange(11, dtype=torch.float32)[:, None], torch.arange(11))
        return DataLoader(
            data, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(5)
        )

    single = [y for _, y in loader()]
    ranks = [distributed.ShardedDataLoader(loader(), r, 2) for r in range(2)]
    parts, shares = [], []
    for sharded in ranks:
        assert len(sharded) == 3
        got = []
        for _, y in sharded:
            got.append(y)
            shares.append(sharded.share)
        parts.append(got)
    for batch, part0, part1 in zip(single, *parts, strict=True):
        assert torch.equal(torch.cat([part0, part1]), batch)
    assert shares == [0.5, 0.5, 2 / 3, 0.5, 0.5, 1 / 3]


def test_indivisible_global_batch_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    assert distributed.local_batch_size(64, 4) == 16
    monkeypatch.setattr(distributed, "_active", distributed.Context(0, 2, 0))
    data = Data(_tensor_loader(10, 5), [], [], 10, (1, 1, 1))
    with pytest.raises(ConfigError, match=r"schedule.batch_size=65: a multiple of .*\(2\)"):
        distributed.shard(data, 65)
    assert isinstance(distributed.shard(data, 64).train, distributed.ShardedTensorLoader)


def test_single_process_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    assert distributed.from_environment() is None
    with distributed.session("cpu") as context:
        assert context is None and distributed.is_main()
        data = Data(_tensor_loader(10, 5), [], [], 10, (1, 1, 1))
        assert distributed.shard(data, 5) is data
        cpu = torch.device("cpu")
        assert distributed.batch_metrics({"a": 2.0}, _Share(), cpu) == {"a": 2.0}
        terms = {"ce": torch.tensor(2.0)}
        assert distributed.batch_terms(terms, _Share()) is terms
        assert distributed.all_ranks(False, torch.device("cpu")) is False
    assert not dist.is_initialized()


class _Share:
    share = 0.5


def _worker(rank: int, init: str, out: str) -> None:
    """One of two gloo ranks: reductions and one DDP backward over an uneven 13-row batch."""
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    distributed._active = distributed.Context(rank, 2, rank)
    cpu = torch.device("cpu")
    try:
        rows = distributed.shard_rows(13, rank, 2)  # 7 and 6 rows of a 13-row batch
        share = _Share()
        share.share = (rows.stop - rows.start) / 13
        terms = distributed.batch_terms({"ce": torch.tensor(1.0 + rank)}, share)
        totals = distributed.epoch_totals(torch.tensor(3 + rank), 10 * (rank + 1), terms)
        means = distributed.batch_metrics({"loss": 2.0 * rank + 1, "lr": 0.1}, share, cpu)
        agree = (distributed.all_ranks(rank == 0, cpu), distributed.all_ranks(True, cpu))
        torch.manual_seed(0)
        model = nn.Linear(3, 4)
        x, y = torch.randn(13, 3), torch.randint(0, 4, (13,))
        ddp = distributed.wrap(model, nn.Module(), share, cpu)
        nn.functional.cross_entropy(ddp(x[rows]), y[rows]).backward()
        torch.save(
            {
                "totals": totals,
                "means": means,
                "agree": agree,
                "grad": model.weight.grad,
                "x": x,
                "y": y,
                "start": model.state_dict() if rank == 0 else None,
            },
            f"{out}/rank{rank}.pt",
        )
    finally:
        distributed._active = None
        dist.destroy_process_group()


@pytest.mark.slow
def test_reductions_and_weighted_gradient_on_two_gloo_ranks(tmp_path: Path) -> None:
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(_worker, args=(init, str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for got in results:
        # correct 3 + 4, seen 10 + 20; the slices' means 1 (7 rows) and 2 (6 rows) weighted
        correct, seen, sums = got["totals"]
        assert (correct, seen) == (7.0, 30)
        assert sums == pytest.approx({"ce": (7 * 1.0 + 6 * 2.0) / 13})
        assert got["means"] == pytest.approx({"loss": (7 * 1.0 + 6 * 3.0) / 13, "lr": 0.1})
        assert got["agree"] == (False, True)
    # the gradient of the mean loss over all 13 rows, computed in one process
    model = nn.Linear(3, 4)
    model.load_state_dict(results[0]["start"])
    nn.functional.cross_entropy(model(results[0]["x"]), results[0]["y"]).backward()
    assert model.weight.grad is not None
    for got in results:
        torch.testing.assert_close(got["grad"], model.weight.grad, rtol=1e-5, atol=1e-7)


def _torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    return subprocess.run(
        [*launcher, "--nproc_per_node", "2", "-m", "kdexp", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        stdin=subprocess.DEVNULL,
    )


def _history(client, run_id: str, key: str) -> list[float]:  # type: ignore[no-untyped-def]
    return [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


@pytest.mark.slow
def test_torchrun_two_ranks_match_one_process_and_log_once(tmp_path: Path) -> None:
    """KD with an auto-trained teacher, 2 gloo ranks, then one process on the same store.

    1,293 training digits (``val_size=145``) in global batches of 64 leave a last batch of 13
    rows, split 7 + 6: the weighted gradient keeps the ranks equal to the one process there too.
    """
    # imported here: the spawned ranks of the test above re-import this module; keep it light
    from conftest import run_cli, tracking_overrides
    from mlflow.tracking import MlflowClient

    common = [
        *tracking_overrides(tmp_path),
        "device=cpu",
        "model.hidden=[32]",
        "model@teacher=mlp",
        "teacher.hidden=[64]",
        "dataset.val_size=145",
        "schedule.epochs=2",
        "schedule.batch_size=64",
        "log_every=5",
    ]
    ddp = _torchrun(common, tmp_path)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    # only rank 0 prints its result lines and keeps an output folder
    # rank 0 alone prints the end-of-run lines: the teacher trained first, then the student
    assert ddp.stdout.count(": test/acc1 ") == 2
    assert len(list((tmp_path / "outputs" / "runs").glob("*/*"))) == 1
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("test")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    # the teacher was trained once (by rank 0) and the student logged once
    assert sorted(r.data.tags["method"] for r in runs) == ["baseline", "distill/kd"]
    assert all(r.info.status == "FINISHED" for r in runs)
    teacher = next(r for r in runs if r.data.tags["method"] == "baseline")
    assert teacher.data.tags["kdexp.trained_for"] == "teacher_checkpoint"

    single = run_cli(common, tmp_path)  # reuses that teacher
    assert single.returncode == 0, single.stderr[-3000:]
    students = [
        r
        for r in client.search_runs([experiment.experiment_id])
        if r.data.tags["method"] == "distill/kd"
    ]
    assert len(students) == 2
    one, two = sorted(students, key=lambda r: r.info.start_time)
    for key in ("val/acc1", "train/acc1", "val/loss", "train/epoch_loss", "train/loss"):
        a, b = _history(client, one.info.run_id, key), _history(client, two.info.run_id, key)
        assert len(a) == len(b) > 0, key
        assert a == pytest.approx(b, rel=1e-4, abs=1e-4), key
    for key in ("test/acc1", "best/val_acc1", "test/loss"):
        assert one.data.metrics[key] == pytest.approx(two.data.metrics[key], rel=1e-4), key
    # it learnt something: far above the 10% of chance after two epochs
    assert one.data.metrics["test/acc1"] > 20
    assert len(_history(client, one.info.run_id, "train/loss")) == 2 * 21 // 5 + 1


def test_method_that_cannot_train_alike_on_every_rank_is_refused(
    compose_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from conftest import tracking_overrides

    from kdexp.run import Job, execute

    cfg = compose_cfg("method=prune/sensitivity", *tracking_overrides(tmp_path, created=False))
    monkeypatch.setattr(distributed, "_active", distributed.Context(1, 2, 1))
    with pytest.raises(ConfigError, match=r"method='prune/sensitivity': .*torchrun"):
        execute(cfg, Job({"method": "prune/sensitivity"}, tmp_path / "run"))
    assert not (tmp_path / "mlflow.db").exists()
