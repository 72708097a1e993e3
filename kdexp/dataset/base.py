"""What every dataset source returns, and the in-memory batch path they share.

A source (digits, synthetic, torchvision, image folder) is a function that takes its config
keys plus ``batch_size`` and ``seed`` and returns a :class:`Data`. Sources whose images fit in
memory hand uint8 or float tensors to :func:`tensor_data`, which normalises once, splits off a
seeded validation set and batches straight from tensors (:class:`TensorLoader`), with augmentation
done on whole batches. That avoids a PIL decode and a collate per sample.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from kdexp.dataset.augment import Augment, build_augment
from kdexp.dataset.augment import crop_flip as crop_flip  # moved there; still importable here
from kdexp.dataset.augment import random_flip as random_flip
from kdexp.errors import ConfigError

Batch = tuple[Tensor, Tensor]


@dataclass
class Data:
    """Train, validation and test batches of one dataset, ready for the training loop.

    Each split is re-iterable and yields ``(inputs, targets)`` batches; ``len(split)`` is the
    number of batches in one pass. The training split reshuffles on every pass.
    """

    train: Iterable[Batch]
    val: Iterable[Batch]
    test: Iterable[Batch]
    num_classes: int
    input_shape: tuple[int, int, int]


class TensorLoader:
    """Batches from in-memory tensors: seeded shuffling and batch-wise augmentation.

    :meth:`indexed` yields each batch with its row indices, which the training loop hands the
    method in its step context (cached teacher outputs, a contrastive memory bank key on them).
    """

    def __init__(
        self,
        inputs: Tensor,
        targets: Tensor,
        batch_size: int,
        shuffle: bool = False,
        augment: Any = None,  # None, a name in conf/dataset/augment/ or an Augment
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        self.inputs, self.targets = inputs, targets
        self.batch_size, self.shuffle, self.augment = batch_size, shuffle, augment
        self.drop_last = drop_last
        self._generator = torch.Generator().manual_seed(seed)

    @property
    def augment(self) -> Augment | None:
        """The batch augmentation of this split (a name given is looked up when set)."""
        return self._augment

    @augment.setter
    def augment(self, value: Any) -> None:
        self._augment = build_augment(value)

    def __len__(self) -> int:
        n = len(self.targets)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def state_dict(self) -> dict[str, Tensor]:
        """The shuffling and augmentation generator's state, for a training checkpoint."""
        return {"generator": self._generator.get_state()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self._generator.set_state(state["generator"])

    def __iter__(self) -> Iterator[Batch]:
        for x, y, _ in self.indexed():
            yield x, y

    def indexed(self) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """The batches with the indices of their rows in :attr:`inputs`."""
        n = len(self.targets)
        order = torch.randperm(n, generator=self._generator) if self.shuffle else None
        for i in range(len(self)):
            start = i * self.batch_size
            if order is None:
                rows = torch.arange(start, min(start + self.batch_size, n))
                x, y = self.inputs[start : start + self.batch_size], self.targets[rows]
            else:
                rows = order[start : start + self.batch_size]
                x, y = self.inputs[rows], self.targets[rows]
            if self.augment is not None:
                x = self.augment(x, self._generator)
            yield x, y, rows


def indexed(loader: Iterable[Batch]) -> Iterator[tuple[Tensor, Tensor, Tensor | None]]:
    """``loader``'s batches with the indices of their samples in the split, or None where the
    loader does not know them (a DataLoader over files)."""
    if isinstance(loader, TensorLoader):
        yield from loader.indexed()
        return
    for x, y in loader:
        yield x, y, None


def normalize(images: Tensor, mean: Sequence[float], std: Sequence[float], scale: float) -> Tensor:
    """``(images / scale - mean) / std`` per channel, as float32, for an NCHW tensor."""
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (images.float() / scale - m) / s


def split_indices(
    n: int, val_size: float | int, split_seed: int, key: str = "dataset.val_size"
) -> tuple[Tensor, Tensor]:
    """Seeded (kept, held-out) indices; ``val_size`` is a fraction in (0, 1) or a count below ``n``.

    ``key`` names the config key in the error message.
    """
    count = round(val_size * n) if isinstance(val_size, float) and val_size < 1 else int(val_size)
    if count < 1 or count >= n:
        raise ConfigError(
            key,
            val_size,
            f"a fraction in (0, 1) or a count in [1, {n}): "
            f"the set it is taken from holds {n} samples",
        )
    order = torch.randperm(n, generator=torch.Generator().manual_seed(split_seed))
    return order[count:], order[:count]


def check_classes(num_classes: int, targets: Tensor, where: str) -> None:
    """Fail when the labels found on disk do not fit ``dataset.num_classes``."""
    found = int(targets.max()) + 1 if len(targets) else 0
    if found > num_classes:
        raise ConfigError(
            "dataset.num_classes",
            num_classes,
            f"the labels in {where} go up to {found - 1}, so at least {found} classes are needed",
        )


def select_classes(
    classes: Sequence[int] | None, num_classes: int, found: Tensor, where: str
) -> dict[int, int] | None:
    """The label map ``{original id: new id}`` for ``dataset.classes``; None keeps every class.

    ``found`` holds every label of the dataset (or its class ids), ``where`` names it for errors.
    The listed ids become 0..k-1 in the listed order, so ``num_classes`` must equal ``k``.
    """
    if classes is None:
        return None
    ids = list(classes)
    if not ids or any(isinstance(c, bool) or not isinstance(c, int) for c in ids):
        raise ConfigError("dataset.classes", ids, "null or a non-empty list of class ids (ints)")
    if len(set(ids)) != len(ids):
        raise ConfigError("dataset.classes", ids, "a list of distinct class ids")
    present = {int(c) for c in found.unique().tolist()}
    unknown = [c for c in ids if c not in present]
    if unknown:
        raise ConfigError(
            "dataset.classes",
            ids,
            f"ids of classes in {where} ({min(present)}..{max(present)}); "
            f"{', '.join(map(str, unknown))} not found",
        )
    if num_classes != len(ids):
        raise ConfigError(
            "dataset.num_classes",
            num_classes,
            f"{len(ids)}, the number of classes listed in dataset.classes",
        )
    return {original: new for new, original in enumerate(ids)}


def subset_rows(targets: Tensor, mapping: dict[int, int] | None) -> tuple[Tensor, Tensor]:
    """The rows of ``targets`` whose class is kept by ``mapping``, and their new labels."""
    targets = torch.as_tensor(targets, dtype=torch.long)
    if mapping is None:
        return torch.arange(len(targets)), targets
    lookup = torch.full((int(targets.max()) + 1,), -1, dtype=torch.long)
    for original, new in mapping.items():
        if original < len(lookup):
            lookup[original] = new
    labels = lookup[targets]
    rows = (labels >= 0).nonzero().flatten()
    return rows, labels[rows]


def limit_per_class(targets: Tensor, limit: int | None, split_seed: int) -> Tensor:
    """Positions of at most ``limit`` samples of each class in ``targets``, seeded, in order.

    Which samples of a class are kept depends only on ``split_seed`` and the class's samples.
    """
    if limit is None:
        return torch.arange(len(targets))
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ConfigError("dataset.train_limit", limit, "null or a positive number per class")
    g = torch.Generator().manual_seed(split_seed)
    kept = []
    for label in targets.unique().tolist():
        rows = (targets == label).nonzero().flatten()
        kept.append(rows[torch.randperm(len(rows), generator=g)[:limit]])
    return torch.cat(kept).sort().values


def tensor_data(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    *,
    num_classes: int,
    batch_size: int,
    seed: int,
    val_size: float | int,
    split_seed: int,
    mean: Sequence[float],
    std: Sequence[float],
    scale: float = 255.0,
    augment: Any = None,
    eval_batch_size: int | None = None,
    classes: Sequence[int] | None = None,
    train_limit: int | None = None,
) -> Data:
    """In-memory :class:`Data` from NCHW image tensors and integer labels.

    ``classes`` keeps only those class ids (train, validation and test), relabelled 0..k-1 in the
    listed order; ``train_limit`` then keeps at most that many training images per class (drawn
    with ``split_seed`` after the validation split, which it leaves whole).
    """
    labels = torch.cat([train_y, test_y])
    mapping = select_classes(classes, num_classes, labels, "the data")
    if mapping is None:
        check_classes(num_classes, labels, "the data")
    else:
        train_rows, train_y = subset_rows(train_y, mapping)
        test_rows, test_y = subset_rows(test_y, mapping)
        train_x, test_x = train_x[train_rows], test_x[test_rows]
    train_x = normalize(train_x, mean, std, scale)
    test_x = normalize(test_x, mean, std, scale)
    train_idx, val_idx = split_indices(len(train_y), val_size, split_seed)
    train_idx = train_idx[limit_per_class(train_y[train_idx], train_limit, split_seed)]
    eval_bs = eval_batch_size or max(batch_size, 256)
    train_y, test_y = train_y.long(), test_y.long()
    return Data(
        train=TensorLoader(
            train_x[train_idx],
            train_y[train_idx],
            batch_size,
            shuffle=True,
            augment=augment,
            seed=seed,
        ),
        val=TensorLoader(train_x[val_idx], train_y[val_idx], eval_bs),
        test=TensorLoader(test_x, test_y, eval_bs),
        num_classes=num_classes,
        input_shape=tuple(train_x.shape[1:]),  # type: ignore[arg-type]
    )
