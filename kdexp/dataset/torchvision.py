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
from typing import Any

import torch
from hydra.utils import instantiate
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset, default_collate
from torchvision import transforms as T
from torchvision.datasets.vision import StandardTransform, VisionDataset

from kdexp import choices
from kdexp.dataset.augment import build_augment
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
    source: Callable[..., VisionDataset] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Data:
    """A torchvision classification dataset, with a seeded validation split.

    ``source`` builds it: ``source(root, train=..., download=...)`` gives an object with ``data``
    (uint8 images, NHW or NHWC), ``targets`` and ``classes``, as ``torchvision.datasets.MNIST``,
    ``FashionMNIST``, ``CIFAR10`` and ``CIFAR100`` do; ``mean`` and ``std`` are the training
    images' per-channel statistics (pixels scaled to [0, 1]). Each dataset's yaml in
    ``conf/dataset/`` sets the three (``mnist``: LeCun et al. 1998, ``fashion_mnist``: Xiao et al.
    2017, ``cifar10``, ``cifar100``: Krizhevsky 2009), so a new torchvision dataset is one yaml;
    ``name`` labels it in messages, and when ``source`` is not given the three are taken from
    ``conf/dataset/<name>.yaml``. ``root`` is expanded (``~``) and resolved against the current
    directory; torchvision looks for its own subfolder there (``MNIST/raw``,
    ``cifar-10-batches-py``, ...). ``val_size`` images of the official training set are held out
    as validation set; the official test set is the test split. ``augment`` (a name in
    ``conf/dataset/augment/``, such as ``crop_flip`` or ``flip``, an
    :class:`~kdexp.dataset.augment.Augment`, or none) applies to the training split only.
    ``in_memory=false`` serves samples through torchvision transforms and a ``DataLoader`` with
    ``num_workers`` workers instead of the in-memory tensors; both give the same data.
    ``classes`` and ``train_limit`` select classes and cap training images per class (see
    :func:`~kdexp.dataset.base.tensor_data`).
    """
    if source is None or mean is None or std is None:
        source, mean, std = _from_yaml(name, source, mean, std)
    augmentation = build_augment(augment)
    path = resolve_root(root)
    train_set = _open(source, name, path, train=True, download=download)
    test_set = _open(source, name, path, train=False, download=False)
    _check_found(
        name,
        train_set,
        num_classes=num_classes if classes is None else len(train_set.classes),
        channels=channels,
        image_size=image_size,
    )
    for key, values in (("dataset.mean", mean), ("dataset.std", std)):
        if len(values) != channels:
            raise ConfigError(key, list(values), f"{channels} value(s), one per channel")
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)

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
            mean=mean,
            std=std,
            augment=augmentation,
            classes=classes,
            train_limit=train_limit,
        )

    normalize = T.Normalize(mean, std)
    eval_tf = T.Compose([T.ToTensor(), normalize])
    train_tf = eval_tf
    if augmentation is not None:
        train_tf = T.Compose([*augmentation.transforms(image_size), T.ToTensor(), normalize])
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


def _from_yaml(
    name: str,
    source: Callable[..., VisionDataset] | None,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
) -> tuple[Callable[..., VisionDataset], Sequence[float], Sequence[float]]:
    """What ``conf/dataset/<name>.yaml`` says of a torchvision source, where not given."""
    known = [n for n in choices.options("dataset") if "source" in choices.node("dataset", n, "")]
    if name not in known:
        raise ConfigError("dataset.name", name, f"one of {', '.join(known)}, or a dataset.source")
    config = choices.node("dataset", name, "dataset.name")
    built = source if source is not None else instantiate(config.source)
    return built, mean if mean is not None else config.mean, std if std is not None else config.std


def _open(
    source: Callable[..., VisionDataset], name: str, path: str, *, train: bool, download: bool
) -> VisionDataset:
    try:
        return source(path, train=train, download=download)
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
