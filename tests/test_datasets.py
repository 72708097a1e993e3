"""Dataset sources on small files written in the real on-disk formats (no download)."""

from __future__ import annotations

import inspect
import os
import pickle
import struct
from pathlib import Path
from urllib.error import URLError

import hydra.utils
import numpy as np
import pytest
import torch
import torchvision.datasets.cifar
import torchvision.datasets.mnist
from omegaconf import OmegaConf
from PIL import Image

from kdexp.dataset import folder
from kdexp.dataset import torchvision as tv
from kdexp.dataset.base import TensorLoader, normalize, split_indices
from kdexp.errors import ConfigError

CONF = Path(__file__).resolve().parents[1] / "conf" / "dataset"
N_TRAIN, N_TEST = 40, 20

MEAN = {
    "mnist": (0.1307,),
    "fashion_mnist": (0.2860,),
    "cifar10": (0.4914, 0.4822, 0.4465),
    "cifar100": (0.5071, 0.4865, 0.4409),
}
STD = {
    "mnist": (0.3081,),
    "fashion_mnist": (0.3530,),
    "cifar10": (0.2470, 0.2435, 0.2616),
    "cifar100": (0.2673, 0.2564, 0.2762),
}


# --- writing the formats ----------------------------------------------------------------------


def _images(n: int, shape: tuple[int, ...], offset: int, seed: int) -> np.ndarray:
    """Random uint8 images whose first pixel is the image's id, so a loaded image can be traced."""
    x = np.random.default_rng(seed).integers(0, 256, size=(n, *shape), dtype=np.uint8)
    x.reshape(n, -1)[:, 0] = np.arange(offset, offset + n)
    return x


def _write_idx(path: Path, array: np.ndarray) -> None:
    """The IDX format of the MNIST files: big-endian magic and sizes, then the bytes.

    The magic is 0x08 (uint8) << 8 | ndim: 2051 for the image files, 2049 for the label files.
    """
    header = struct.pack(">I", 0x0800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def _write_mnist(root: Path, folder_name: str = "MNIST") -> dict[str, np.ndarray]:
    raw = root / folder_name / "raw"
    raw.mkdir(parents=True)
    data = {
        "train_x": _images(N_TRAIN, (28, 28), 0, 1),
        "train_y": np.arange(N_TRAIN) % 10,
        "test_x": _images(N_TEST, (28, 28), 100, 2),
        "test_y": (np.arange(N_TEST) * 3) % 10,
    }
    _write_idx(raw / "train-images-idx3-ubyte", data["train_x"])
    _write_idx(raw / "train-labels-idx1-ubyte", data["train_y"])
    _write_idx(raw / "t10k-images-idx3-ubyte", data["test_x"])
    _write_idx(raw / "t10k-labels-idx1-ubyte", data["test_y"])
    return data


def _pickle(path: Path, obj: object) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def _write_cifar(root: Path, classes: int) -> dict[str, np.ndarray]:
    """CIFAR python pickles: rows of 3072 bytes, channel-major (R plane, G plane, B plane)."""
    data = {
        "train_x": _images(N_TRAIN, (3, 32, 32), 0, 3),
        "train_y": (np.arange(N_TRAIN) * 7) % classes,
        "test_x": _images(N_TEST, (3, 32, 32), 100, 4),
        "test_y": np.arange(N_TEST) % classes,
    }
    flat = data["train_x"].reshape(N_TRAIN, 3072)
    if classes == 10:
        base = root / "cifar-10-batches-py"
        base.mkdir(parents=True)
        for i, rows in enumerate(np.array_split(np.arange(N_TRAIN), 5)):
            batch = {"data": flat[rows], "labels": data["train_y"][rows].tolist()}
            _pickle(base / f"data_batch_{i + 1}", batch)
        test = {"data": data["test_x"].reshape(N_TEST, 3072), "labels": data["test_y"].tolist()}
        _pickle(base / "test_batch", test)
        _pickle(base / "batches.meta", {"label_names": [f"c{i}" for i in range(10)]})
    else:
        base = root / "cifar-100-python"
        base.mkdir(parents=True)
        _pickle(base / "train", {"data": flat, "fine_labels": data["train_y"].tolist()})
        test = {
            "data": data["test_x"].reshape(N_TEST, 3072),
            "fine_labels": data["test_y"].tolist(),
        }
        _pickle(base / "test", test)
        _pickle(base / "meta", {"fine_label_names": [f"c{i}" for i in range(100)]})
    return data


@pytest.fixture(autouse=True)
def _skip_cifar_md5(monkeypatch: pytest.MonkeyPatch) -> None:
    # torchvision checks the CIFAR files' md5 sums against the published archives, which generated
    # files cannot match. Only that check is replaced (by "the file exists"); the loading itself is
    # torchvision's own code.
    monkeypatch.setattr(
        torchvision.datasets.cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath)
    )


WRITERS = {
    "mnist": lambda root: _write_mnist(root, "MNIST"),
    "fashion_mnist": lambda root: _write_mnist(root, "FashionMNIST"),
    "cifar10": lambda root: _write_cifar(root, 10),
    "cifar100": lambda root: _write_cifar(root, 100),
}
SHAPES = {"mnist": (1, 28, 10), "fashion_mnist": (1, 28, 10), "cifar10": (3, 32, 10)}
SHAPES["cifar100"] = (3, 32, 100)


def _load(name: str, root: Path, **overrides):
    channels, size, classes = SHAPES[name]
    kwargs = dict(
        name=name,
        root=str(root),
        download=False,
        batch_size=8,
        seed=0,
        num_classes=classes,
        channels=channels,
        image_size=size,
        val_size=10,
        split_seed=0,
        augment=None,
    )
    return tv.load(**{**kwargs, **overrides})


def _all(loader) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*loader, strict=True)
    return torch.cat(xs), torch.cat(ys)


def _ids(x: torch.Tensor, name: str) -> list[int]:
    """The image ids written into pixel (0, 0, 0), read back from normalised images."""
    raw = (x[:, 0, 0, 0] * STD[name][0] + MEAN[name][0]) * 255
    return raw.round().long().tolist()


def _norm(name: str, x: torch.Tensor) -> torch.Tensor:
    return normalize(x, MEAN[name], STD[name], 255.0)


def _nchw(x: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(x)
    return t.unsqueeze(1) if t.ndim == 3 else t


# --- torchvision datasets -----------------------------------------------------------------------


@pytest.mark.parametrize("name", list(WRITERS))
def test_in_memory_values_labels_and_split(tmp_path: Path, name: str) -> None:
    raw = WRITERS[name](tmp_path)
    data = _load(name, tmp_path)
    channels, size, classes = SHAPES[name]
    assert data.num_classes == classes and data.input_shape == (channels, size, size)

    x, y = next(iter(data.train))
    assert x.shape == (8, channels, size, size) and x.dtype == torch.float32
    assert y.shape == (8,) and y.dtype == torch.int64

    # Test set: order kept, a known pixel normalised by hand, labels round-trip.
    test_x, test_y = _all(data.test)
    c, h, w = channels - 1, 5, 17
    pixel = raw["test_x"][3].reshape(channels, size, size)[c, h, w]
    expected = (pixel / 255 - MEAN[name][c]) / STD[name][c]
    assert test_x[3, c, h, w].item() == pytest.approx(expected, abs=1e-5)
    assert torch.equal(test_x, _norm(name, _nchw(raw["test_x"])))
    assert test_y.tolist() == raw["test_y"].tolist()

    # Validation: exactly the held-out indices of split_indices, in that order.
    kept, held = split_indices(N_TRAIN, 10, 0)
    val_x, val_y = _all(data.val)
    assert _ids(val_x, name) == held.tolist()
    assert val_y.tolist() == raw["train_y"][held.numpy()].tolist()
    assert torch.equal(val_x, _norm(name, _nchw(raw["train_x"][held.numpy()])))

    # Training: the other 30 images, each with its own label, disjoint from validation.
    train_x, train_y = _all(data.train)
    ids = _ids(train_x, name)
    assert len(data.train) == 4 and len(ids) == N_TRAIN - 10
    assert sorted(ids) == sorted(kept.tolist()) and not set(ids) & set(held.tolist())
    assert train_y.tolist() == raw["train_y"][ids].tolist()


def test_split_depends_on_split_seed_only(tmp_path: Path) -> None:
    _write_mnist(tmp_path)
    a = _all(_load("mnist", tmp_path, seed=1).val)[0]
    b = _all(_load("mnist", tmp_path, seed=2).val)[0]
    c = _all(_load("mnist", tmp_path, split_seed=1).val)[0]
    assert torch.equal(a, b)
    assert _ids(a, "mnist") != _ids(c, "mnist")
    first = [_ids(x, "mnist") for x, _ in _load("mnist", tmp_path, seed=3).train]
    again = [_ids(x, "mnist") for x, _ in _load("mnist", tmp_path, seed=3).train]
    assert first == again


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_dataloader_path_matches_in_memory(tmp_path: Path, name: str) -> None:
    WRITERS[name](tmp_path)
    memory = _load(name, tmp_path)
    loader = _load(name, tmp_path, in_memory=False, augment="crop_flip")
    assert isinstance(loader.train, torch.utils.data.DataLoader)
    assert loader.input_shape == memory.input_shape
    for split in ("test", "val"):  # val gets no augmentation, like the test set
        mx, my = _all(getattr(memory, split))
        lx, ly = _all(getattr(loader, split))
        torch.testing.assert_close(lx, mx, rtol=0, atol=1e-6)
        assert torch.equal(ly, my)
    batch = next(iter(loader.train))
    assert isinstance(batch, tuple)
    assert batch[0].shape == (8, *memory.input_shape) and batch[1].dtype == torch.int64

    # Without augmentation the DataLoader training split holds the same images as in memory.
    plain = _load(name, tmp_path, in_memory=False)
    px, py = _all(plain.train)
    assert sorted(_ids(px, name)) == sorted(_ids(_all(memory.train)[0], name))


def _candidates(image: torch.Tensor, padding: int, fill: torch.Tensor) -> torch.Tensor:
    """Every crop of the padded image, and its mirror image: the outputs crop_flip can give."""
    c, h, w = image.shape
    padded = fill.view(c, 1, 1).expand(c, h + 2 * padding, w + 2 * padding).clone()
    padded[:, padding : padding + h, padding : padding + w] = image
    crops = [
        padded[:, dy : dy + h, dx : dx + w]
        for dy in range(2 * padding + 1)
        for dx in range(2 * padding + 1)
    ]
    crops = torch.stack(crops)
    return torch.cat([crops, crops.flip(-1)])


def test_crop_flip_in_memory_by_hand() -> None:
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).view(2, 3, 6, 6)
    y = torch.tensor([0, 1])
    out, out_y = next(iter(TensorLoader(x, y, batch_size=2, augment="crop_flip", seed=5)))
    assert out.shape == x.shape and torch.equal(out_y, y)

    # Replay the loader's draws (no shuffle: crop offsets, then flips) and build image 0 by hand.
    g = torch.Generator().manual_seed(5)
    dy = torch.randint(0, 9, (2,), generator=g)
    dx = torch.randint(0, 9, (2,), generator=g)
    flip = torch.rand(2, generator=g) < 0.5
    expected = torch.zeros(3, 6, 6)
    for c in range(3):
        for i in range(6):
            for j in range(6):
                src_i, src_j = int(dy[0]) + i - 4, int(dx[0]) + (5 - j if flip[0] else j) - 4
                if 0 <= src_i < 6 and 0 <= src_j < 6:
                    expected[c, i, j] = x[0, c, src_i, src_j]
    assert torch.equal(out[0], expected)
    for k in range(2):
        assert (_candidates(x[k], 4, torch.zeros(3)) == out[k]).flatten(1).all(1).any()


def test_crop_flip_dataloader_gives_shifted_flipped_copies(tmp_path: Path) -> None:
    raw = _write_cifar(tmp_path, 10)
    data = _load("cifar10", tmp_path, in_memory=False, augment="crop_flip")
    x, _ = next(iter(data.train))
    assert x.shape == (8, 3, 32, 32)
    source = _norm("cifar10", torch.from_numpy(raw["train_x"]))
    # torchvision pads the uint8 image with black (0) before normalising.
    black = _norm("cifar10", torch.zeros(1, 3, 1, 1, dtype=torch.uint8)).flatten()
    hits = torch.zeros(len(source), 3, dtype=torch.bool)
    for i, src in enumerate(source):
        diff = (_candidates(src, 4, black)[:, None] - x[None, :3]).abs().flatten(2).amax(2)
        hits[i] = diff.lt(1e-6).any(0)
    assert hits.sum(0).tolist() == [1, 1, 1]  # each output comes from exactly one source image


def test_root_is_resolved_against_cwd_and_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write_mnist(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    assert len(_load("mnist", Path("data")).test) == 1
    monkeypatch.setenv("HOME", str(tmp_path))
    assert len(_load("mnist", "~/data").test) == 1


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_missing_data_without_download(tmp_path: Path, name: str) -> None:
    with pytest.raises(ConfigError) as err:
        _load(name, tmp_path / "nowhere")
    assert err.value.key == "dataset.root"
    assert str(tmp_path / "nowhere") in str(err.value) and "dataset.download" in str(err.value)


def test_download_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args, **kwargs):
        raise URLError("no route to host")

    monkeypatch.setattr(torchvision.datasets.mnist, "download_and_extract_archive", offline)
    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", offline)
    for name in ("mnist", "cifar10"):
        with pytest.raises(ConfigError) as err:
            _load(name, tmp_path, download=True)
        assert err.value.key == "dataset.download"
        assert "failed" in str(err.value) and "no route to host" in str(err.value)


@pytest.mark.parametrize(
    ("key", "value", "found"),
    [("num_classes", 5, "10"), ("channels", 3, "1"), ("image_size", 32, "28")],
)
def test_shape_and_class_mismatch(tmp_path: Path, key: str, value: int, found: str) -> None:
    _write_mnist(tmp_path)
    with pytest.raises(ConfigError) as err:
        _load("mnist", tmp_path, **{key: value})
    assert err.value.key == f"dataset.{key}" and str(err.value).split(": ", 1)[1].startswith(found)


def test_bad_name_and_augment(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="dataset.name"):
        tv.load(
            name="svhn",
            root=str(tmp_path),
            download=False,
            batch_size=8,
            seed=0,
            num_classes=10,
            channels=3,
            image_size=32,
            val_size=10,
            augment=None,
        )
    with pytest.raises(ConfigError, match="dataset.augment"):
        _load("mnist", tmp_path, augment="cutout")


# --- image folders ------------------------------------------------------------------------------

COLOURS = {"ant": (200, 10, 30), "bee": (0, 128, 255), "cat": (77, 77, 77)}


def _write_tree(root: Path, split: str, per_class: int, classes=COLOURS) -> None:
    for name, colour in classes.items():
        (root / split / name).mkdir(parents=True)
        for i in range(per_class):
            size = (12 + i, 10)  # not square, not the target size
            Image.new("RGB", size, colour).save(root / split / name / f"{i}.png")


def _folder(root, **overrides):
    kwargs = dict(
        root=str(root),
        batch_size=4,
        seed=0,
        num_classes=3,
        channels=3,
        image_size=8,
        val_size=3,
        split_seed=0,
    )
    return folder.load(**{**kwargs, **overrides})


def test_image_folder(tmp_path: Path) -> None:
    _write_tree(tmp_path, "train", 6)
    _write_tree(tmp_path, "val", 2)
    data = _folder(tmp_path)
    assert data.num_classes == 3 and data.input_shape == (3, 8, 8)
    x, y = next(iter(data.train))
    assert x.shape == (4, 3, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64

    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    by_class = [(torch.tensor(c, dtype=torch.float32) / 255 - mean) / std for c in COLOURS.values()]
    test_x, test_y = _all(data.test)
    assert test_y.tolist() == [0, 0, 1, 1, 2, 2]
    for img, label in zip(test_x, test_y, strict=True):  # plain-colour images stay plain
        torch.testing.assert_close(img[:, 4, 4], by_class[label], rtol=0, atol=1e-5)
        assert torch.allclose(img, img[:, :1, :1], atol=1e-5)

    val_x, val_y = _all(data.val)
    _, held = split_indices(18, 3, 0)
    assert val_y.tolist() == [int(i) // 6 for i in held]
    train_y = _all(data.train)[1]
    assert len(train_y) == 15
    assert sorted(train_y.tolist() + val_y.tolist()) == [0] * 6 + [1] * 6 + [2] * 6

    gray = _folder(tmp_path, channels=1, mean=[0.5], std=[0.25], augment=None)
    gx, _ = _all(gray.test)
    assert gx.shape == (6, 1, 8, 8) and gray.input_shape == (1, 8, 8)
    luma = (0.299 * 200 + 0.587 * 10 + 0.114 * 30) / 255
    assert gx[0, 0, 4, 4].item() == pytest.approx((luma - 0.5) / 0.25, abs=0.02)


def test_image_folder_errors(tmp_path: Path) -> None:
    for root in (None, tmp_path / "missing"):
        with pytest.raises(ConfigError) as err:
            _folder(root)
        assert err.value.key == "dataset.root"
    with pytest.raises(ConfigError) as err:
        _folder(tmp_path)
    assert err.value.key == "dataset.root" and str(tmp_path / "train") in str(err.value)

    _write_tree(tmp_path, "train", 2)
    _write_tree(tmp_path, "val", 1, {"ant": (1, 2, 3), "bee": (4, 5, 6), "dog": (7, 8, 9)})
    with pytest.raises(ConfigError) as err:
        _folder(tmp_path, num_classes=1000)
    assert err.value.key == "dataset.num_classes" and "3, the number" in str(err.value)
    with pytest.raises(ConfigError) as err:
        _folder(tmp_path)
    assert err.value.key == "dataset.test_dir" and "cat" in str(err.value)
    with pytest.raises(ConfigError, match="dataset.mean"):
        _folder(tmp_path, channels=1)


# --- configs ------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(CONF.glob("*.yaml")), ids=lambda p: p.stem)
def test_config_keys_are_kwargs(path: Path) -> None:
    cfg = OmegaConf.load(path)
    module, _, func = cfg._target_.rpartition(".")
    params = inspect.signature(getattr(__import__(module, fromlist=[func]), func)).parameters
    # Keys of the file itself, and those its defaults list fills (augment@augment: crop_flip).
    filled = [
        str(next(iter(d))).rpartition("@")[2] for d in cfg.get("defaults", []) if d != "_self_"
    ]
    keys = {k for k in cfg if not k.startswith("_") and k != "defaults"} | set(filled)
    assert keys <= set(params) and "batch_size" not in keys and "seed" not in keys
    required = {k for k, p in params.items() if p.default is inspect.Parameter.empty}
    assert required - keys <= {"batch_size", "seed"}


def test_digits_config() -> None:
    data = hydra.utils.instantiate(OmegaConf.load(CONF / "digits.yaml"))(batch_size=32, seed=0)
    x, y = next(iter(data.train))
    assert x.shape == (32, 1, 8, 8) and data.num_classes == 10 and data.input_shape == (1, 8, 8)
    sizes = {s: sum(len(b[1]) for b in getattr(data, s)) for s in ("train", "val", "test")}
    train_part = 1797 - round(0.2 * 1797)
    assert sizes == {"train": train_part - round(0.1 * train_part), "val": 144, "test": 359}
    assert set(torch.cat([b[1] for b in data.train]).tolist()) == set(range(10))


def test_synthetic_config() -> None:
    data = hydra.utils.instantiate(OmegaConf.load(CONF / "synthetic.yaml"))(batch_size=32, seed=0)
    x, y = next(iter(data.train))
    assert x.shape == (32, 1, 8, 8) and data.num_classes == 10
    sizes = {s: sum(len(b[1]) for b in getattr(data, s)) for s in ("train", "val", "test")}
    assert sizes == {"train": 448, "val": 64, "test": 128}


def test_torchvision_config(compose_cfg, tmp_path: Path) -> None:
    _write_cifar(tmp_path, 10)
    cfg = compose_cfg("dataset=cifar10", f"dataset.root={tmp_path}", "dataset.val_size=10")
    data = hydra.utils.instantiate(cfg.dataset)(batch_size=16, seed=0)
    x, _ = next(iter(data.train))
    assert x.shape == (16, 3, 32, 32) and data.num_classes == 10
    assert type(data.train.augment).__name__ == "CropFlip" and data.train.augment.padding == 4


def test_imagefolder_config_requires_root(compose_cfg) -> None:
    cfg = compose_cfg("dataset=imagefolder")
    with pytest.raises(ConfigError) as err:
        hydra.utils.instantiate(cfg.dataset)(batch_size=4, seed=0)
    assert err.value.key == "dataset.root" and "set dataset.root" in str(err.value)


def test_augment_by_name_node_or_object_draws_the_same(compose_cfg) -> None:
    from kdexp.dataset.augment import CropFlip

    x = torch.arange(4 * 3 * 6 * 6, dtype=torch.float32).view(4, 3, 6, 6)
    y = torch.arange(4)
    node = compose_cfg("dataset=cifar10", "dataset.augment.padding=2").dataset.augment
    batches = [
        next(iter(TensorLoader(x, y, batch_size=4, augment=augment, seed=5)))[0]
        for augment in ("crop_flip", CropFlip(padding=4), hydra.utils.instantiate(node))
    ]
    assert torch.equal(batches[0], batches[1]) and batches[0].shape == x.shape
    assert not torch.equal(batches[0], batches[2])  # padding 2 draws offsets in 0..4, not 0..8
    assert compose_cfg("dataset=cifar10", "dataset.augment=null").dataset.augment is None
    with pytest.raises(ConfigError, match="dataset.augment='cutout': one of crop_flip, flip"):
        TensorLoader(x, y, batch_size=4, augment="cutout")
