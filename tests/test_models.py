"""The model zoo: every config in conf/model builds and runs, and the architectures match papers."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torchvision
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from kdexp.errors import ConfigError
from kdexp.model.lenet import LeNet5
from kdexp.model.mlp import MLP
from kdexp.model.resnet_cifar import CifarResNet
from kdexp.model.torchvision import build
from kdexp.model.wrn import WideResNet

MODEL_CONFIGS = sorted((Path(__file__).parents[1] / "conf" / "model").glob("*.yaml"))
# (num_classes, channels, image_size) of sklearn digits, MNIST and CIFAR-100.
SHAPES = {"digits": (10, 1, 8), "mnist": (10, 1, 28), "cifar100": (100, 3, 32)}
BIG = {"resnet50", "resnet32x4", "resnet110", "wrn_40_2", "mobilenet_v2"}


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Run single-threaded: these tensors are small, and on a busy 2-core machine extra intra-op
    threads make a step many times slower rather than faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _from_config(name: str, num_classes: int, channels: int, image_size: int) -> nn.Module:
    """Instantiate conf/model/<name>.yaml against a dataset node, as a Hydra run would."""
    dataset = {"num_classes": num_classes, "channels": channels, "image_size": image_size}
    path = Path(__file__).parents[1] / "conf" / "model" / f"{name}.yaml"
    cfg = OmegaConf.merge({"dataset": dataset}, {"model": OmegaConf.load(path)})
    return instantiate(cfg.model)


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_the_zoo_has_every_preset() -> None:
    names = {path.stem for path in MODEL_CONFIGS}
    expected = {"mlp", "mlp_1200", "mlp_800", "lenet5", "lenet_300_100", "resnet8x4", "resnet32x4"}
    expected |= {f"resnet{depth}" for depth in (8, 14, 20, 32, 44, 56, 110)}
    expected |= {"wrn_16_2", "wrn_40_2", "torchvision", "resnet18", "resnet50", "mobilenet_v2"}
    assert expected <= names


@pytest.mark.parametrize("path", MODEL_CONFIGS, ids=lambda path: path.stem)
def test_config_reads_the_dataset_by_interpolation(path: Path) -> None:
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    assert raw["num_classes"] == "${dataset.num_classes}"
    assert raw["in_channels"] == "${dataset.channels}"
    assert raw["image_size"] == "${dataset.image_size}"


@pytest.mark.parametrize("dataset", SHAPES)
@pytest.mark.parametrize("path", MODEL_CONFIGS, ids=lambda path: path.stem)
def test_config_builds_and_gives_logits(path: Path, dataset: str) -> None:
    num_classes, channels, size = SHAPES[dataset]
    batch = 1 if path.stem in BIG else 2
    model = _from_config(path.stem, num_classes, channels, size).eval()
    with torch.no_grad():
        out = model(torch.randn(batch, channels, size, size))
    assert out.shape == (batch, num_classes)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(
    ("name", "num_classes", "published"),
    [
        ("resnet20", 10, 0.27e6),  # He et al. 2016, Table 6
        ("resnet56", 10, 0.85e6),  # He et al. 2016, Table 6
        ("resnet110", 10, 1.7e6),  # He et al. 2016, Table 6
        ("resnet8x4", 100, 1.23e6),  # Tian et al. 2020 (CRD)
        ("resnet32x4", 100, 7.43e6),  # Tian et al. 2020 (CRD)
        ("wrn_16_2", 100, 0.70e6),  # Tian et al. 2020 (CRD)
        ("wrn_40_2", 10, 2.2e6),  # Zagoruyko & Komodakis 2016, Table 1 (CIFAR-10)
        ("lenet_300_100", 10, 267e3),  # Han et al. 2015, Table 1 (MNIST)
    ],
)
def test_parameter_count_matches_the_paper(name: str, num_classes: int, published: float) -> None:
    channels, size = (1, 28) if name.startswith("lenet") else (3, 32)
    model = _from_config(name, num_classes, channels, size)
    assert _count(model) == pytest.approx(published, rel=0.02)


def test_lenet5_on_mnist_is_the_classic_61706_parameter_network() -> None:
    # conv 1*6*25+6, conv 6*16*25+16, fc 400*120+120, 120*84+84, 84*10+10.
    assert _count(LeNet5(10, 1, 28)) == 156 + 2416 + 48120 + 10164 + 850


@pytest.mark.parametrize(
    ("size", "conv2_padding", "flat"), [(8, 2, 64), (28, 0, 400), (32, 0, 576)]
)
def test_lenet5_pads_conv2_only_for_tiny_images(size: int, conv2_padding: int, flat: int) -> None:
    model = LeNet5(10, 1, size)
    assert model.features[3].padding == (conv2_padding, conv2_padding)
    assert model.classifier[0].in_features == flat


def test_hinton_mlps_have_the_published_layers() -> None:
    teacher = _from_config("mlp_1200", 10, 1, 28)
    student = _from_config("mlp_800", 10, 1, 28)
    assert _count(teacher) == 784 * 1200 + 1200 + 1200 * 1200 + 1200 + 1200 * 10 + 10
    assert _count(student) == 784 * 800 + 800 + 800 * 800 + 800 + 800 * 10 + 10
    assert [m.p for m in teacher.modules() if isinstance(m, nn.Dropout)] == [0.5, 0.5]
    assert not any(isinstance(m, nn.Dropout) for m in student.modules())


def test_cifar_resnet_has_6n_plus_2_layers_and_option_b_shortcuts() -> None:
    model = CifarResNet(20, 10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(convs) + 1 == 20  # 19 convolutions and the fc layer
    shortcuts = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)]
    assert [(m.in_channels, m.out_channels, m.stride) for m in shortcuts] == [
        (16, 32, (2, 2)),
        (32, 64, (2, 2)),
    ]


def test_mlp_reaches_95_percent_on_digits_in_20_epochs() -> None:
    from sklearn.datasets import load_digits

    torch.manual_seed(0)
    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(bunch.target)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    train, test = order[:1437], order[1437:]
    mean, std = images[train].mean(), images[train].std()
    images = (images - mean) / std
    model = _from_config("mlp", 10, 1, 8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(20):
        model.train()
        for batch in train[torch.randperm(len(train))].split(64):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(images[batch]), labels[batch]).backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(images[test]).argmax(1) == labels[test]).float().mean().item()
    assert accuracy >= 0.95


@pytest.mark.parametrize("depth", [2, 7, 21, 0])
def test_cifar_resnet_rejects_a_depth_not_6n_plus_2(depth: int) -> None:
    with pytest.raises(ConfigError) as error:
        CifarResNet(depth, 10)
    assert error.value.key == "model.depth"
    assert error.value.value == depth


@pytest.mark.parametrize("depth", [4, 15, 41])
def test_wide_resnet_rejects_a_depth_not_6n_plus_4(depth: int) -> None:
    with pytest.raises(ConfigError) as error:
        WideResNet(depth, 2, 10)
    assert error.value.key == "model.depth"


def test_bad_widths_and_dropout_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="model.widths"):
        CifarResNet(20, 10, widths=[16, 32, 64])
    with pytest.raises(ConfigError, match="model.dropout"):
        MLP(10, 1, 8, hidden=[32], dropout=1.0)


def test_unknown_torchvision_name_lists_real_ones() -> None:
    with pytest.raises(ConfigError) as error:
        build("resnet99", 10)
    assert (error.value.key, error.value.value) == ("model.name", "resnet99")
    assert "list_models" in error.value.accepted
    assert "alexnet" in error.value.accepted


def test_missing_weights_file_is_named(tmp_path: Path) -> None:
    path = str(tmp_path / "nowhere.pt")
    with pytest.raises(ConfigError) as error:
        build("squeezenet1_1", 10, weights=path)
    assert (error.value.key, error.value.value) == ("model.weights", path)
    assert path in str(error.value)


def test_weights_of_another_model_are_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "squeezenet.pt"
    torch.save(torchvision.models.squeezenet1_1().state_dict(), path)
    with pytest.raises(ConfigError) as error:
        build("resnet18", 10, weights=str(path))
    assert error.value.key == "model.weights"
    assert "torchvision resnet18" in error.value.accepted
    assert "features.0.weight" in error.value.accepted  # the first offending keys are named


def test_truncated_or_foreign_files_are_config_errors(tmp_path: Path) -> None:
    state = torchvision.models.squeezenet1_1(num_classes=10).state_dict()
    truncated, not_a_dict, garbage = (tmp_path / n for n in ("t.pt", "l.pt", "g.pt"))
    torch.save({k: v for k, v in state.items() if not k.startswith("features.3.")}, truncated)
    torch.save([1, 2, 3], not_a_dict)
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="missing keys: features.3"):
        build("squeezenet1_1", 10, weights=str(truncated))
    for path in (not_a_dict, garbage):
        with pytest.raises(ConfigError, match="model.weights"):
            build("squeezenet1_1", 10, weights=str(path))


@pytest.mark.parametrize(("name", "head"), [("resnet18", "fc"), ("squeezenet1_1", "classifier.1")])
def test_imagenet_head_is_dropped_and_body_is_loaded(
    name: str, head: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    torch.manual_seed(0)
    saved = torchvision.models.get_model(name, num_classes=1000).state_dict()
    path = tmp_path / f"{name}.pt"
    torch.save(saved, path)
    with caplog.at_level(logging.WARNING, logger="kdexp.model.torchvision"):
        model = build(name, 10, weights=str(path))
    loaded = model.state_dict()
    assert loaded[f"{head}.weight"].shape[0] == 10
    body = [key for key in saved if not key.startswith(f"{head}.")]
    assert body and all(torch.equal(loaded[key], saved[key]) for key in body)
    assert f"{head}.weight" in caplog.text and f"{head}.bias" in caplog.text


def test_resnet18_takes_one_channel_input() -> None:
    model = build("resnet18", 10, in_channels=1).eval()
    assert model.conv1.in_channels == 1
    assert model.conv1.weight.shape == (64, 1, 7, 7)
    with torch.no_grad():
        assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_rgb_weights_load_into_a_one_channel_resnet18(tmp_path: Path) -> None:
    rgb = torchvision.models.resnet18().state_dict()
    path = tmp_path / "rgb.pt"
    torch.save(rgb, path)
    model = build("resnet18", 10, in_channels=1, weights=str(path))
    assert torch.allclose(model.conv1.weight, rgb["conv1.weight"].sum(dim=1, keepdim=True))
    assert torch.equal(model.layer4[1].conv2.weight, rgb["layer4.1.conv2.weight"])
    # A file saved from the one-channel model loads back exactly.
    grey = tmp_path / "grey.pt"
    torch.save(model.state_dict(), grey)
    again = build("resnet18", 10, in_channels=1, weights=str(grey))
    assert torch.equal(again.conv1.weight, model.conv1.weight)


def _mlp_params(inputs: int, widths: list[int], classes: int) -> int:
    """Weights and biases of Linear layers inputs -> widths... -> classes, counted by hand."""
    sizes = [inputs, *widths, classes]
    return sum(a * b + b for a, b in zip(sizes, sizes[1:], strict=False))


@pytest.mark.parametrize(("width", "depth"), [(48, 3), (7, 1), (16, 0)])
def test_mlp_width_and_depth_build_the_listed_layers(width: int, depth: int) -> None:
    searched = MLP(10, 1, 8, width=width, depth=depth)
    listed = MLP(10, 1, 8, hidden=[width] * depth)
    shapes = {k: v.shape for k, v in searched.state_dict().items()}
    assert shapes == {k: v.shape for k, v in listed.state_dict().items()}
    assert _count(searched) == _mlp_params(64, [width] * depth, 10)


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"hidden": [32], "width": 32, "depth": 1}, "model.hidden"),
        ({"width": 32}, "model.hidden"),
        ({}, "model.hidden"),
        ({"width": 0, "depth": 2}, "model.width"),
        ({"width": 2.5, "depth": 2}, "model.width"),
        ({"width": 32, "depth": -1}, "model.depth"),
    ],
)
def test_mlp_shape_given_twice_or_not_at_all_is_a_config_error(kwargs: dict, key: str) -> None:
    with pytest.raises(ConfigError) as error:
        MLP(10, 1, 8, **kwargs)
    assert error.value.key == key


def _cifar_resnet_params(depth: int, widths: list[int], classes: int, channels: int = 3) -> int:
    """Parameters of He et al.'s CIFAR ResNet counted by hand: 3x3 convs without bias, BN
    (weight and bias), option-B 1x1 shortcuts where the shape changes, and the linear head."""
    total = 9 * channels * widths[0] + 2 * widths[0]
    blocks = (depth - 2) // 6
    for stage, width in enumerate(widths[1:]):
        for block in range(blocks):
            inputs = widths[stage] if block == 0 else width
            total += 9 * inputs * width + 2 * width + 9 * width * width + 2 * width
            if block == 0 and (stage > 0 or inputs != width):
                total += inputs * width + 2 * width
    return total + widths[3] * classes + classes


@pytest.mark.parametrize(
    ("depth", "multiplier", "widths"),
    [(20, 1.0, [16, 16, 32, 64]), (20, 0.5, [8, 8, 16, 32]), (8, 4, [64, 64, 128, 256])],
)
def test_cifar_resnet_width_multiplier_scales_every_width(
    depth: int, multiplier: float, widths: list[int]
) -> None:
    model = CifarResNet(depth, 100, width_multiplier=multiplier)
    assert model.stem[0].out_channels == widths[0]
    assert [stage[0].conv1.out_channels for stage in model.stages] == widths[1:]
    assert _count(model) == _cifar_resnet_params(depth, widths, 100)


@pytest.mark.parametrize("multiplier", [0, -1.0, "2", True])
def test_cifar_resnet_rejects_a_bad_width_multiplier(multiplier: object) -> None:
    with pytest.raises(ConfigError) as error:
        CifarResNet(20, 10, width_multiplier=multiplier)  # type: ignore[arg-type]
    assert error.value.key == "model.width_multiplier"
