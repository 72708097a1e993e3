"""Images in class folders (the ImageNet layout) through ``torchvision.datasets.ImageFolder``.

``root/train/<class>/*.jpg`` is the training set, of which ``val_size`` is held out as validation
set; ``root/val/<class>/*`` (ImageNet's validation set, sorted into class folders) is the test
split. Images are decoded per sample and batched by a :class:`torch.utils.data.DataLoader`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from torchvision import datasets
from torchvision import transforms as T

from kdexp.dataset.augment import build_augment
from kdexp.dataset.base import Data
from kdexp.dataset.torchvision import loader_data, resolve_root, with_transform
from kdexp.errors import ConfigError


def load(
    *,
    root: str | None,
    batch_size: int,
    seed: int,
    num_classes: int,
    channels: int,
    image_size: int,
    val_size: float | int,
    split_seed: int = 0,
    train_dir: str = "train",
    test_dir: str = "val",
    num_workers: int = 0,
    augment: Any = "crop_flip",
    mean: Sequence[float] = (0.485, 0.456, 0.406),
    std: Sequence[float] = (0.229, 0.224, 0.225),
    classes: list[int] | None = None,
    train_limit: int | None = None,
) -> Data:
    """An image-folder dataset such as ImageNet (Deng et al. 2009, https://image-net.org).

    Training images get ``RandomResizedCrop(image_size)`` and a random flip with
    ``augment=crop_flip`` (the ImageNet recipe of Szegedy et al. 2015 / He et al. 2016), a random
    flip after resize and centre crop with ``augment=flip``, and resize and centre crop without
    augmentation. Validation and test images are resized to ``int(image_size * 1.14)`` (256 for
    224) and centre-cropped. ``channels=1`` converts to grayscale; ``mean`` and ``std`` (ImageNet's
    by default) need one value per channel. ``classes`` (ids are positions in the sorted list of
    class folders) and ``train_limit`` select classes and cap training images per class (see
    :func:`~kdexp.dataset.base.tensor_data`).
    """
    path = resolve_root(root)
    augmentation = build_augment(augment)
    if channels not in (1, 3):
        raise ConfigError("dataset.channels", channels, "1 (grayscale) or 3 (RGB)")
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    for key, values in (("dataset.mean", mean), ("dataset.std", std)):
        if len(values) != channels:
            raise ConfigError(key, list(values), f"{channels} value(s), one per channel")

    if not os.path.isdir(path):
        raise ConfigError(
            "dataset.root", path, f"an existing folder holding {train_dir}/<class>/ image folders"
        )
    train_path = os.path.join(path, train_dir)
    if not os.path.isdir(train_path):
        raise ConfigError(
            "dataset.root",
            path,
            f"a folder with a {train_dir}/ subfolder of class folders; {train_path} does not exist",
        )
    test_path = os.path.join(path, test_dir)
    if not os.path.isdir(test_path):
        raise ConfigError(
            "dataset.test_dir",
            test_dir,
            f"a subfolder of {path} holding the test images in class folders; "
            f"{test_path} does not exist",
        )

    gray = [T.Grayscale(1)] if channels == 1 else []
    tail = [T.ToTensor(), T.Normalize(mean, std)]
    eval_tf = T.Compose([*gray, T.Resize(int(image_size * 1.14)), T.CenterCrop(image_size), *tail])
    train_tf = eval_tf
    if augmentation is not None:
        steps = augmentation.folder_transforms(image_size, int(image_size * 1.14))
        train_tf = T.Compose([*gray, *steps, *tail])

    train_set = _image_folder(train_path, "dataset.root", path)
    test_set = _image_folder(test_path, "dataset.test_dir", test_dir)
    found = len(train_set.classes)
    if found != num_classes and classes is None:
        raise ConfigError(
            "dataset.num_classes",
            num_classes,
            f"{found}, the number of class folders found in {train_path}",
        )
    if test_set.classes != train_set.classes:
        missing = sorted(set(train_set.classes) - set(test_set.classes))
        extra = sorted(set(test_set.classes) - set(train_set.classes))
        raise ConfigError(
            "dataset.test_dir",
            test_dir,
            f"a folder with the same class folders as {train_path}; {test_path} lacks "
            f"{_few(missing)} and has extra {_few(extra)}",
        )
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


def _image_folder(path: str, key: str, value: object) -> datasets.ImageFolder:
    try:
        return datasets.ImageFolder(path)
    except FileNotFoundError as err:
        raise ConfigError(key, value, f"class folders holding images: {err}") from err


def _few(names: list[str], limit: int = 5) -> str:
    if not names:
        return "none"
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
