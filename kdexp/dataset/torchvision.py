"""MNIST, Fashion-MNIST, CIFAR-10 and CIFAR-100 through ``torchvision.datasets``.

By default the whole dataset is taken from the torchvision object as one uint8 tensor and served by
the in-memory path of :mod:`kdexp.dataset.base` (normalised once, batch-wise augmentation). With
``in_memory=false`` it goes the usual way instead: a PIL image per sample, torchvision transforms
and a :class:`torch.utils.data.DataLoader`, which :func:`loader_data` builds and
:mod:`kdexp.dataset.folder` reuses.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset, default_collate
from torchvision import datasets
from torchvision import transforms as T
from torchvision.datasets.vision import StandardTransform, VisionDataset

from kdexp.dataset.base import (
    Batch,
    Data,
    limit_per_class,
    select_classes,
    split_indices,
    subset_rows,
    tensor_data,
)
from kdexp.errors import ConfigError

AUGMENTS = (None, "crop_flip", "flip")


@dataclass(frozen=True)
class _Spec:
    cls: type[VisionDataset]
    channels: int
    image_size: int
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


# Mean and std of the training images, pixel values scaled to [0, 1].
_SPECS = {
    # LeCun et al. 1998, http://yann.lecun.com/exdb/mnist/
    "mnist": _Spec(datasets.MNIST, 1, 28, 10, (0.1307,), (0.3081,)),
    # Xiao et al. 2017, https://github.com/zalandoresearch/fashion-mnist
    "fashion_mnist": _Spec(datasets.FashionMNIST, 1, 28, 10, (0.2860,), (0.3530,)),
    # Krizhevsky 2009, https://www.cs.toronto.edu/~kriz/cifar.html
    "cifar10": _Spec(
        datasets.CIFAR10, 3, 32, 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    ),
    "cifar100": _Spec(
        datasets.CIFAR100, 3, 32, 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
    ),
}


def load(
    *,
    name: str,
    root: str,
    download: bool,
    batch_size: int,
    seed: int,
    num_classes: int,
    channels: int,
    image_size: int,
    val_size: float | int,
    split_seed: int = 0,
    in_memory: bool = True,
    augment: str | None = None,
    num_workers: int = 0,
    classes: list[int] | None = None,
    train_limit: int | None = None,
) -> Data:
    """One of the torchvision classification datasets, with a seeded validation split.

    ``name`` is ``mnist`` (LeCun et al. 1998), ``fashion_mnist`` (Xiao et al. 2017), ``cifar10`` or
    ``cifar100`` (Krizhevsky 2009). ``root`` is expanded (``~``) and resolved against the current
    directory; torchvision looks for its own subfolder there (``MNIST/raw``,
    ``cifar-10-batches-py``, ...). ``val_size`` images of the official training set are held out
    as validation set; the official test set is the test split. ``augment`` (``crop_flip``:
    4-pixel pad, random crop and flip; ``flip``; ``jitter``: shifts of up to 2 pixels; or none)
    applies to the training split only.
    ``in_memory=false`` serves samples through torchvision transforms and a ``DataLoader`` with
    ``num_workers`` workers instead of the in-memory tensors; both give the same data.
    ``classes`` and ``train_limit`` select classes and cap training images per class (see
    :func:`~kdexp.dataset.base.tensor_data`).
    """
    if name not in _SPECS:
        raise ConfigError("dataset.name", name, f"one of {', '.join(_SPECS)}")
    _check_augment(augment)
    spec = _SPECS[name]
    path = resolve_root(root)
    train_set = _open(spec, name, path, train=True, download=download)
    test_set = _open(spec, name, path, train=False, download=False)
    _check_found(
        name,
        train_set,
        num_classes=num_classes if classes is None else len(train_set.classes),
        channels=channels,
        image_size=image_size,
    )

    if in_memory:
        return tensor_data(
            _nchw(train_set.data),
            torch.as_tensor(train_set.targets, dtype=torch.long),
            _nchw(test_set.data),
            torch.as_tensor(test_set.targets, dtype=torch.long),
            num_classes=num_classes,
            batch_size=batch_size,
            seed=seed,
            val_size=val_size,
            split_seed=split_seed,
            mean=spec.mean,
            std=spec.std,
            augment=augment,
            classes=classes,
            train_limit=train_limit,
        )

    normalize = T.Normalize(spec.mean, spec.std)
    eval_tf = T.Compose([T.ToTensor(), normalize])
    if augment == "crop_flip":
        train_tf = T.Compose(
            [T.RandomCrop(image_size, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), normalize]
        )
    elif augment == "flip":
        train_tf = T.Compose([T.RandomHorizontalFlip(), T.ToTensor(), normalize])
    elif augment == "jitter":  # shifts of up to 2 pixels, the border replicated
        train_tf = T.Compose(
            [T.RandomCrop(image_size, padding=2, padding_mode="edge"), T.ToTensor(), normalize]
        )
    else:
        train_tf = eval_tf
    return loader_data(
        with_transform(train_set, train_tf),
        with_transform(train_set, eval_tf),
        with_transform(test_set, eval_tf),
        num_classes=num_classes,
        input_shape=(channels, image_size, image_size),
        batch_size=batch_size,
        seed=seed,
        val_size=val_size,
        split_seed=split_seed,
        num_workers=num_workers,
        classes=classes,
        train_limit=train_limit,
    )


def resolve_root(root: str | os.PathLike[str] | None) -> str:
    """``dataset.root`` as an absolute path: ``~`` expanded, relative to the current directory.

    Hydra does not change directory, so a relative root means relative to where the run started.
    """
    if root is None or str(root) == "":
        raise ConfigError("dataset.root", root, "a folder path; set dataset.root=<folder>")
    return os.path.abspath(os.path.expanduser(os.fspath(root)))


def with_transform(dataset: VisionDataset, transform: Callable[[Any], Any]) -> VisionDataset:
    """A shallow copy of a torchvision dataset that applies ``transform`` to each image.

    The copy shares the loaded data (arrays, file lists), so one split can be served with training
    augmentation and another with the plain evaluation transform without reading the files twice.
    """
    out = copy.copy(dataset)
    out.transform = transform
    out.transforms = StandardTransform(transform, dataset.target_transform)
    return out


def loader_data(
    train_set: Dataset[Any],
    val_set: Dataset[Any],
    test_set: Dataset[Any],
    *,
    num_classes: int,
    input_shape: tuple[int, int, int],
    batch_size: int,
    seed: int,
    val_size: float | int,
    split_seed: int,
    num_workers: int = 0,
    classes: Sequence[int] | None = None,
    train_limit: int | None = None,
) -> Data:
    """:class:`Data` from per-sample datasets through :class:`~torch.utils.data.DataLoader`.

    ``train_set`` and ``val_set`` hold the same samples (the official training set) with the
    training and the evaluation transform; :func:`~kdexp.dataset.base.split_indices` picks which
    samples go to which split, exactly as the in-memory path does. The training loader shuffles
    with a generator seeded by ``seed``; evaluation batches hold ``max(batch_size, 256)`` samples.

    ``classes`` and ``train_limit`` select exactly as :func:`~kdexp.dataset.base.tensor_data`
    does; they read the datasets' ``targets`` (torchvision datasets and ``ImageFolder`` have them).
    """
    if len(train_set) != len(val_set):  # type: ignore[arg-type]
        raise ValueError("train_set and val_set must hold the same samples")
    train_y = _targets(train_set) if classes is not None or train_limit is not None else None
    if classes is not None and train_y is not None:
        test_y = _targets(test_set)
        mapping = select_classes(classes, num_classes, torch.cat([train_y, test_y]), "the data")
        train_rows, train_y = subset_rows(train_y, mapping)
        test_rows, _ = subset_rows(test_y, mapping)
        assert mapping is not None
        train_set = Relabeled(train_set, train_rows, mapping)
        val_set = Relabeled(val_set, train_rows, mapping)
        test_set = Relabeled(test_set, test_rows, mapping)
    train_idx, val_idx = split_indices(len(train_set), val_size, split_seed)  # type: ignore[arg-type]
    if train_y is not None:
        train_idx = train_idx[limit_per_class(train_y[train_idx], train_limit, split_seed)]
    eval_bs = max(batch_size, 256)
    common: dict[str, Any] = {
        "num_workers": num_workers,
        "collate_fn": _collate,
        "persistent_workers": num_workers > 0,
    }
    return Data(
        train=DataLoader(
            Subset(train_set, train_idx.tolist()),
            batch_size=batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(seed),
            **common,
        ),
        val=DataLoader(Subset(val_set, val_idx.tolist()), batch_size=eval_bs, **common),
        test=DataLoader(test_set, batch_size=eval_bs, **common),
        num_classes=num_classes,
        input_shape=input_shape,
    )


class Relabeled(Dataset[tuple[Any, int]]):
    """The samples ``rows`` of ``dataset``, their labels mapped through ``mapping``."""

    def __init__(self, dataset: Dataset[Any], rows: Tensor, mapping: dict[int, int]) -> None:
        self.dataset, self.rows, self.mapping = dataset, rows.tolist(), mapping

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        x, y = self.dataset[self.rows[index]]
        return x, self.mapping[int(y)]


def _targets(dataset: Dataset[Any]) -> Tensor:
    """The integer labels of every sample of a torchvision-style dataset (its ``targets``)."""
    targets = getattr(dataset, "targets", None)
    if targets is None:
        raise ValueError(f"{type(dataset).__name__} has no targets; cannot select classes")
    return torch.as_tensor(targets, dtype=torch.long)


def _collate(samples: list[tuple[Tensor, int]]) -> Batch:
    x, y = default_collate(samples)
    return x, y


def _check_augment(augment: str | None) -> None:
    if augment not in (*AUGMENTS, "jitter"):  # jitter: MNIST-likes (Hinton et al. 2015)
        raise ConfigError("dataset.augment", augment, "crop_flip, flip, jitter or null")


def _open(spec: _Spec, name: str, path: str, *, train: bool, download: bool) -> VisionDataset:
    try:
        return spec.cls(path, train=train, download=download)
    except (RuntimeError, OSError) as err:
        reason = " ".join(str(err).split()) or type(err).__name__
        if download:
            raise ConfigError(
                "dataset.download",
                download,
                f"downloading {name} into {path} failed ({reason}); check the network, or fetch "
                "the files by hand, put them under dataset.root and set dataset.download=false",
            ) from err
        if isinstance(err, RuntimeError) and "not found" in reason:
            raise ConfigError(
                "dataset.root",
                path,
                f"a folder holding {name} (set dataset.download=true to fetch it, or point "
                f"dataset.root at it); torchvision said: {reason}",
            ) from err
        raise


def _nchw(images: Any) -> Tensor:
    """uint8 images as NCHW: MNIST-likes are NHW tensors, CIFAR NHWC numpy arrays."""
    x = torch.as_tensor(images)
    return x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)


def _check_found(
    name: str, dataset: VisionDataset, *, num_classes: int, channels: int, image_size: int
) -> None:
    shape = tuple(_nchw(dataset.data[:1]).shape[1:])
    found: Sequence[tuple[str, int, int, str]] = (
        ("dataset.num_classes", num_classes, len(dataset.classes), "classes"),
        ("dataset.channels", channels, shape[0], "channels"),
        ("dataset.image_size", image_size, shape[1], "pixels a side"),
    )
    for key, value, actual, what in found:
        if value != actual:
            raise ConfigError(key, value, f"{actual}, as the {name} data found has {actual} {what}")
