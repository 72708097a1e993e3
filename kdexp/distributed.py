"""DistributedDataParallel training under ``torchrun``: every piece of distributed plumbing.

``torchrun --nproc_per_node N -m kdexp ...`` starts N copies of the job and gives each the
environment variables ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``; without them
:func:`session` does nothing and kdexp runs as one process. With them:

- one process group per job (gloo on CPU, nccl on CUDA with device ``cuda:LOCAL_RANK``),
  destroyed when the job ends, also on errors;
- ``schedule.batch_size`` stays the *global* batch. Every rank draws the same shuffled global
  batch (same loader, same seed) and trains on its own contiguous slice of it
  (:func:`shard_rows`). A gradient averaged over the ranks' slices, each weighted by its share of
  the batch (:func:`_weighted_allreduce`), is exactly the gradient of the mean loss over the whole
  global batch, so the data order, the optimizer steps and the metrics are those of one process
  with the same batch, up to floating-point summation order;
- training metrics (loss terms, accuracy) are summed across ranks (:func:`epoch_totals`,
  :func:`batch_metrics`), losses weighted by each slice's share of the batch;
- validation and test sets are not sharded: the model is the same on every rank, so every rank
  evaluates the whole split and gets the single-process numbers bit for bit without a reduction;
  methods that read ``data.val`` or ``data.test`` themselves (agreement with the teacher, the
  teacher's test accuracy) need none either, and every rank takes the same best epoch. The cost:
  evaluation does not get faster with more ranks;
- only rank 0 talks to MLflow, writes checkpoints and artifacts, and logs at INFO level;
  :func:`on_main` runs something (resolving or training a teacher) on rank 0 alone and hands the
  result to the others.

A method that cannot train the same way on every rank sets ``supports_distributed = False``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from kdexp.config import resolve_device
from kdexp.dataset.base import Batch, Data, TensorLoader
from kdexp.errors import ConfigError

log = logging.getLogger(__name__)

T = TypeVar("T")

#: How long ranks wait for rank 0 in :func:`on_main` (it may train a teacher meanwhile).
WAIT_FOR_MAIN = timedelta(days=7)


@dataclass(frozen=True)
class Context:
    """This process's place in a torchrun job."""

    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that logs, writes files and prints."""
        return self.rank == 0


_active: Context | None = None
_wait_group: Any = None  # a gloo group with a long timeout, for on_main


def from_environment() -> Context | None:
    """The context torchrun's environment describes, or None outside torchrun."""
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return None
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return Context(rank, world, int(os.environ.get("LOCAL_RANK", rank)))


def current() -> Context | None:
    """The context of the open :func:`session`; None in a single-process run."""
    return _active


def is_main() -> bool:
    """True on rank 0 and in every single-process run."""
    return _active is None or _active.is_main


@contextmanager
def session(device_name: str) -> Iterator[Context | None]:
    """Join torchrun's process group for the body of the ``with``; a no-op outside torchrun.

    The backend follows ``device``: nccl for CUDA (each rank on ``cuda:LOCAL_RANK``), gloo for
    the CPU. Ranks other than 0 log only warnings. The group is destroyed on the way out.
    """
    global _active, _wait_group
    context = from_environment()
    if context is None:
        yield None
        return
    device = resolve_device(device_name)
    if device.type == "cuda":
        torch.cuda.set_device(context.local_rank)
        backend = "nccl"
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise ConfigError("device", device_name, "cpu, cuda or auto under torchrun")
    dist.init_process_group(backend)
    root, level = logging.getLogger(), logging.getLogger().level
    if not context.is_main:
        root.setLevel(logging.WARNING)
    try:
        _wait_group = dist.new_group(backend="gloo", timeout=WAIT_FOR_MAIN)
        _active = context
        yield context
    finally:
        _active = _wait_group = None
        root.setLevel(level)
        dist.destroy_process_group()


def local_device(device: torch.device) -> torch.device:
    """``cuda`` becomes this rank's ``cuda:LOCAL_RANK``; other devices stay as they are."""
    if _active is not None and device.type == "cuda":
        return torch.device("cuda", _active.local_rank)
    return device


def on_main(work: Callable[[], T]) -> T:
    """Run ``work`` on rank 0 alone, as a single-process job; every rank returns its result.

    The others wait (up to :data:`WAIT_FOR_MAIN`). Rank 0's random states are handed over too,
    so the ranks carry on from where a single-process run would be, whatever ``work`` drew.
    """
    global _active
    context = _active
    if context is None:
        return work()
    box: list[Any] = [None]
    if context.is_main:
        _active = None  # work runs as one process: no sharding, no DDP, its own MLflow run
        try:
            box = [("ok", work(), _rng_state())]
        except BaseException as error:
            box = [("error", f"{type(error).__name__}: {error}", None)]
            dist.broadcast_object_list(box, src=0, group=_wait_group)
            raise
        finally:
            _active = context
    dist.broadcast_object_list(box, src=0, group=_wait_group)
    status, value, rng = box[0]
    if status == "error":
        raise RuntimeError(f"rank 0 failed: {value}")
    _set_rng_state(rng)
    return value


def from_main(value: T) -> T:
    """Rank 0's ``value`` on every rank (``value`` itself in a single-process run)."""
    return on_main(lambda: value)


def _rng_state() -> dict[str, Any]:
    from kdexp.resume import rng_state

    state = rng_state()
    state["cuda"] = []  # each rank keeps its own device's generator
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    from kdexp.resume import set_rng_state

    set_rng_state(state)


def local_batch_size(batch_size: int, world_size: int) -> int:
    """Each rank's share of the global ``schedule.batch_size``; it must divide evenly."""
    if batch_size % world_size:
        raise ConfigError(
            "schedule.batch_size",
            batch_size,
            f"a multiple of the number of processes ({world_size}): it is the global batch, "
            "split evenly across the ranks",
        )
    return batch_size // world_size


def shard_rows(n: int, rank: int, world_size: int) -> slice:
    """Rank ``rank``'s contiguous rows of a batch of ``n``: sizes differ by at most one.

    A full batch splits evenly; in a shorter last batch the first ``n % world_size`` ranks take
    one row more.
    """
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


class ShardedTensorLoader(TensorLoader):
    """This rank's slice of every global batch of an in-memory :class:`TensorLoader`.

    The loader draws the global batch exactly as in one process (shuffle and augmentation on the
    whole batch, from the shared seed), then keeps rows :func:`shard_rows`, yielded with their
    indices by :meth:`indexed`; :attr:`share` is their fraction of the batch. A last batch with
    fewer rows than ranks is dropped, since a rank without rows has no loss to average.
    """

    def __init__(self, loader: TensorLoader, rank: int, world_size: int) -> None:
        self.__dict__.update(loader.__dict__)  # same tensors, settings and generator
        self.rank, self.world_size = rank, world_size
        self.share = 1.0 / world_size

    def __len__(self) -> int:
        batches = super().__len__()
        tail = len(self.targets) % self.batch_size
        return batches - 1 if 0 < tail < self.world_size and not self.drop_last else batches

    def indexed(self) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """This rank's slice of each global batch, with the slice's row indices."""
        batches = len(self)
        for i, (x, y, index) in enumerate(super().indexed()):
            if i == batches:
                return
            rows = shard_rows(len(y), self.rank, self.world_size)
            self.share = len(index[rows]) / len(y)
            yield x[rows], y[rows], index[rows]


class _SliceSampler:
    """A batch sampler that yields this rank's slice of each global batch of ``batches``."""

    def __init__(self, batches: Any, rank: int, world_size: int) -> None:
        self.batches, self.rank, self.world_size = batches, rank, world_size

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[int]]:
        for indices in self.batches:
            if len(indices) < self.world_size:
                return
            yield list(indices)[shard_rows(len(indices), self.rank, self.world_size)]


class ShardedDataLoader:
    """This rank's slice of every global batch of a :class:`~torch.utils.data.DataLoader`.

    The original batch sampler (and its seeded shuffle) draws the global batches, so the order
    is the single-process one; each rank loads only its own samples. :attr:`share` is the
    fraction of the current global batch this rank holds, tracked as batches are consumed (the
    loader's workers may have fetched further ahead).
    """

    def __init__(self, loader: DataLoader, rank: int, world_size: int) -> None:
        batches = loader.batch_sampler
        if batches is None:
            raise ConfigError("dataset", "a DataLoader without batches", "batched training data")
        self.batch_size = int(batches.batch_size)  # type: ignore[attr-defined]
        self.samples = len(batches.sampler)  # type: ignore[attr-defined]
        self.drop_last = bool(batches.drop_last)  # type: ignore[attr-defined]
        self.world_size, self.share = world_size, 1.0 / world_size
        self.loader = DataLoader(
            loader.dataset,
            batch_sampler=_SliceSampler(batches, rank, world_size),
            num_workers=loader.num_workers,
            collate_fn=loader.collate_fn,
            pin_memory=loader.pin_memory,
            persistent_workers=loader.persistent_workers,
            generator=loader.generator,
        )

    def __len__(self) -> int:
        tail = 0 if self.drop_last else self.samples % self.batch_size
        full = self.samples // self.batch_size
        return full + (1 if tail >= self.world_size else 0)

    def __iter__(self) -> Iterator[Batch]:
        for i, batch in enumerate(self.loader):
            whole = min(self.batch_size, self.samples - i * self.batch_size)
            self.share = len(batch[1]) / whole
            yield batch


def shard(data: Data, batch_size: int) -> Data:
    """``data`` with its training split cut into this rank's slices (the rest is unchanged).

    ``batch_size`` is the global ``schedule.batch_size``; it must divide by the number of ranks.
    """
    if _active is None:
        return data
    rank, world = _active.rank, _active.world_size
    local_batch_size(batch_size, world)
    train = data.train
    sharded: ShardedTensorLoader | ShardedDataLoader
    if isinstance(train, TensorLoader):
        sharded = ShardedTensorLoader(train, rank, world)
    elif isinstance(train, DataLoader):
        sharded = ShardedDataLoader(train, rank, world)
    else:
        raise ConfigError(
            "dataset",
            type(train).__name__,
            "a dataset whose training split is a TensorLoader or a DataLoader, under torchrun",
        )
    return replace(data, train=sharded)


class _Trainable(nn.Module):
    """The model and the method's own parameters (connectors, regressors) as one module, so that
    DDP averages the gradients of both; its forward is the model's."""

    def __init__(self, model: nn.Module, method: nn.Module) -> None:
        super().__init__()
        self.model, self.method = model, method

    def forward(self, inputs: Tensor) -> Tensor:
        return self.model(inputs)


# No annotations on the hook's bucket and result: DDP compares them with the real classes, and
# this module's annotations are strings (``from __future__ import annotations``).
def _weighted_allreduce(loader: Any, bucket):  # type: ignore[no-untyped-def]
    """DDP communication hook: sum the ranks' gradients weighted by their share of the batch.

    Each rank's loss is a mean over its ``n_r`` rows; Σ_r (n_r / n) · ∇mean_r = ∇ of the mean over
    all ``n`` rows. With equal slices this is DDP's usual average; it stays exact for a shorter
    last batch whose slices differ by a row.
    """
    grads = bucket.buffer().mul_(loader.share)
    work = dist.all_reduce(grads, async_op=True)
    assert work is not None
    return work.get_future().then(lambda done: done.value()[0])


def wrap(model: nn.Module, method: nn.Module, loader: Any, device: torch.device) -> nn.Module:
    """``model`` (with ``method``'s parameters) in DistributedDataParallel, for training only.

    ``loader`` is the sharded training split whose ``share`` weighs each rank's gradients. The
    loop keeps the plain ``model`` for evaluation and checkpoints; methods keep seeing it too.
    """
    ddp = DistributedDataParallel(
        _Trainable(model, method), device_ids=[device.index] if device.type == "cuda" else None
    )
    ddp.register_comm_hook(loader, _weighted_allreduce)  # type: ignore[arg-type]
    return ddp


def all_ranks(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` holds on every rank (so that all ranks take the same branch)."""
    if _active is None:
        return flag
    value = torch.tensor([0.0 if flag else 1.0], device=device)
    dist.all_reduce(value)
    return bool(value.item() == 0)


def _share(loader: Any) -> float:
    assert _active is not None
    return float(getattr(loader, "share", 1.0 / _active.world_size))


def batch_metrics(metrics: dict[str, float], loader: Any, device: torch.device) -> dict[str, float]:
    """Per-step metrics of the global batch: Σ_r share_r · value_r over the ranks.

    ``loader`` is the sharded training split (its ``share`` is this rank's fraction of the
    batch). A loss that is a mean over each slice becomes the mean over the whole batch; a value
    equal on every rank (the learning rate) stays as it is.
    """
    if _active is None or not metrics:
        return metrics
    values = torch.tensor(list(metrics.values()), dtype=torch.float64, device=device)
    values *= _share(loader)
    dist.all_reduce(values)
    return dict(zip(metrics, values.tolist(), strict=True))


def batch_terms(terms: dict[str, Tensor], loader: Any) -> dict[str, Tensor]:
    """Loss terms to add to the epoch's sums, scaled by ``world_size × share``.

    Averaged over the ranks by :func:`epoch_totals`, the scaled means of the slices are the means
    over each whole global batch, also for a last batch split unevenly.
    """
    if _active is None:
        return terms
    weight = _share(loader) * _active.world_size
    return terms if weight == 1.0 else {k: v * weight for k, v in terms.items()}


def epoch_totals(
    correct: int | Tensor, seen: int, term_sums: dict[str, Tensor]
) -> tuple[float, int, dict[str, float]]:
    """An epoch's right predictions and samples summed over ranks; loss sums averaged.

    ``term_sums`` holds, per loss term, the sum of the rank's per-batch means (weighted by
    :func:`batch_terms`); averaged over the ranks it is the sum of the global batches' means.
    """
    terms = {k: float(v) for k, v in term_sums.items()}
    if _active is None:
        return float(correct), seen, terms
    device = correct.device if isinstance(correct, Tensor) else torch.device("cpu")
    if term_sums:
        device = next(iter(term_sums.values())).device
    values = torch.tensor([float(correct), float(seen), *terms.values()], dtype=torch.float64)
    values = values.to(device)
    dist.all_reduce(values)
    totals = values.tolist()
    averaged = [v / _active.world_size for v in totals[2:]]
    return totals[0], int(totals[1]), dict(zip(terms, averaged, strict=True))
