"""Training-set augmentations: each a class here and a yaml in ``conf/dataset/augment/``.

Chosen with ``dataset.augment=<name>`` (the name of its yaml) or, in a dataset's defaults,
``- augment@augment: <name>``. An augmentation is called on whole in-memory batches,
``augment(x, generator) -> x`` with the loader's seeded generator (so a resumed run draws the
same), and says how it reads as per-sample torchvision transforms for the ``DataLoader`` paths
(:meth:`Augment.transforms` for small images, :meth:`Augment.folder_transforms` for image
folders); one that has no per-sample form works with in-memory data only.

A new augmentation is one class (or a function wrapped in one) and one yaml, as :class:`Jitter`
and ``conf/dataset/augment/jitter.yaml`` are.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from kdexp import choices
from kdexp.errors import ConfigError

GROUP = "dataset/augment"
KEY = "dataset.augment"


def random_flip(x: Tensor, generator: torch.Generator) -> Tensor:
    """Mirror each image of a batch left-right with probability 1/2."""
    flip = torch.rand(len(x), generator=generator) < 0.5
    if flip.any():
        x = x.clone()
        x[flip] = x[flip].flip(-1)
    return x


def crop_flip(x: Tensor, padding: int, generator: torch.Generator) -> Tensor:
    """The standard CIFAR augmentation on a whole batch: zero-pad, random crop, random flip."""
    n, _, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, None, :]
    batch = torch.arange(n)[:, None, None, None]
    chan = torch.arange(x.shape[1])[None, :, None, None]
    return random_flip(padded[batch, chan, rows, cols], generator)


def jitter(x: Tensor, max_shift: int, generator: torch.Generator) -> Tensor:
    """Translate each image of a batch by a random whole number of pixels in
    ``[-max_shift, max_shift]`` on each axis, independently per image (Hinton et al. 2015 jitter
    MNIST digits by up to 2 pixels). The border is replicated, so a normalised background stays
    background (zero padding would be grey there).
    """
    n, _, h, w = x.shape
    p = max_shift
    padded = F.pad(x, (p, p, p, p), mode="replicate")
    dy = torch.randint(0, 2 * p + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * p + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, None, :]
    batch = torch.arange(n)[:, None, None, None]
    chan = torch.arange(x.shape[1])[None, :, None, None]
    return padded[batch, chan, rows, cols]


class Augment:
    """Base of the augmentations: a batch transform with a seeded generator."""

    name: ClassVar[str] = "augment"

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """The augmented NCHW batch ``x``; random draws come from ``generator`` only."""
        raise NotImplementedError

    def transforms(self, image_size: int) -> list[Any]:
        """The same augmentation as torchvision transforms on one PIL image (before ToTensor)."""
        raise ConfigError(
            "dataset.in_memory", False, f"true: augment={self.name} works on in-memory batches"
        )

    def folder_transforms(self, image_size: int, resize: int) -> list[Any]:
        """The transforms for an image folder (large images resized to ``resize`` for eval)."""
        raise ConfigError(
            KEY, self.name, "an augmentation with an image-folder form (crop_flip, flip or null)"
        )


class CropFlip(Augment):
    """The standard CIFAR augmentation (He et al. 2016): zero-pad ``padding`` pixels, random crop
    back to size, random horizontal flip. On image folders: the ImageNet recipe,
    ``RandomResizedCrop`` and a flip (Szegedy et al. 2015)."""

    name: ClassVar[str] = "crop_flip"

    def __init__(self, padding: int = 4) -> None:
        if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
            raise ConfigError(f"{KEY}.padding", padding, "a non-negative integer")
        self.padding = padding

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        return crop_flip(x, padding=self.padding, generator=generator)

    def transforms(self, image_size: int) -> list[Any]:
        from torchvision import transforms as T

        return [T.RandomCrop(image_size, padding=self.padding), T.RandomHorizontalFlip()]

    def folder_transforms(self, image_size: int, resize: int) -> list[Any]:
        from torchvision import transforms as T

        return [T.RandomResizedCrop(image_size), T.RandomHorizontalFlip()]


class Flip(Augment):
    """Mirror each image left-right with probability 1/2."""

    name: ClassVar[str] = "flip"

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        return random_flip(x, generator=generator)

    def transforms(self, image_size: int) -> list[Any]:
        from torchvision import transforms as T

        return [T.RandomHorizontalFlip()]

    def folder_transforms(self, image_size: int, resize: int) -> list[Any]:
        from torchvision import transforms as T

        return [T.Resize(resize), T.CenterCrop(image_size), T.RandomHorizontalFlip()]


class Jitter(Augment):
    """Shift each image by up to ``pixels`` pixels on each axis, the border replicated: the input
    jitter of Hinton, Vinyals & Dean 2015 on MNIST (up to 2 pixels)."""

    name: ClassVar[str] = "jitter"

    def __init__(self, pixels: int = 2) -> None:
        if isinstance(pixels, bool) or not isinstance(pixels, int) or pixels < 0:
            raise ConfigError(f"{KEY}.pixels", pixels, "a non-negative integer")
        self.pixels = pixels

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        return jitter(x, max_shift=self.pixels, generator=generator)

    def transforms(self, image_size: int) -> list[Any]:
        from torchvision import transforms as T

        return [T.RandomCrop(image_size, padding=self.pixels, padding_mode="edge")]


def build_augment(augment: Any) -> Augment | None:
    """The augmentation ``dataset.augment`` gives: null, a name, a ``_target_`` node or an
    :class:`Augment`; ConfigError naming the key otherwise."""
    built = choices.build(augment, GROUP, KEY)
    if built is not None and not isinstance(built, Augment):
        raise ConfigError(
            KEY,
            augment,
            f"null, one of {', '.join(choices.options(GROUP))}, or a node whose _target_ is a "
            "kdexp.dataset.augment.Augment",
        )
    return built
