"""The CIFAR-style ResNets of the knowledge-distillation literature (resnet8 ... resnet110, x4)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from kdexp.errors import ConfigError


class BasicBlock(nn.Module):
    """Two 3×3 conv-BN layers plus a shortcut, then ReLU (He et al. 2016, Fig. 2 left).

    The shortcut is the identity, or a 1×1 conv + BN (option B) where the block changes the
    stride or the width.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: Tensor) -> Tensor:
        """The block's output; spatial size divided by the stride."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """The CIFAR ResNet of He et al. 2016 ("Deep Residual Learning for Image Recognition", §4.2).

    A 3×3 stem conv, three stages of n = (depth - 2) / 6 BasicBlocks (stride 2 at stages 2 and 3),
    global average pooling and a linear classifier. ``widths`` gives the stem width and the three
    stage widths: (16, 16, 32, 64) for resnet20/56/110, and (32, 64, 128, 256) for the ×4 variants
    of Tian et al. 2020 ("Contrastive Representation Distillation"). ``width_multiplier`` scales
    every one of those widths (rounded, at least 1), so that a search can sample depth and width
    as two numbers: ``depth=20, width_multiplier=0.5`` has widths (8, 8, 16, 32). Shortcuts that
    change shape are 1×1 conv + BN (option B), as in CRD's code. ``image_size`` is accepted and
    ignored: the average pool adapts to any input size.
    """

    def __init__(
        self,
        depth: int,
        num_classes: int,
        in_channels: int = 3,
        widths: Sequence[int] = (16, 16, 32, 64),
        image_size: int | None = None,
        width_multiplier: float = 1.0,
    ) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ConfigError("model.depth", depth, "6n+2 with n >= 1, e.g. 8, 14, 20, 32, 56, 110")
        widths = [int(width) for width in widths]
        if len(widths) != 4 or any(width < 1 for width in widths):
            raise ConfigError(
                "model.widths", widths, "four positive widths: stem, stage 1, stage 2, stage 3"
            )
        multiplier = width_multiplier
        if (
            isinstance(multiplier, bool)
            or not isinstance(multiplier, int | float)
            or multiplier <= 0
        ):
            raise ConfigError("model.width_multiplier", width_multiplier, "a positive number")
        widths = [max(1, round(width * multiplier)) for width in widths]
        blocks_per_stage = (depth - 2) // 6
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
        )
        stages: list[nn.Module] = []
        for index, width in enumerate(widths[1:]):
            blocks = []
            for block in range(blocks_per_stage):
                stride = 2 if index > 0 and block == 0 else 1
                blocks.append(BasicBlock(widths[index] if block == 0 else width, width, stride))
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(widths[3], num_classes)
        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        """Class logits of shape (N, num_classes) for images of shape (N, C, H, W)."""
        return self.fc(self.pool(self.stages(self.stem(x))))


def _init_weights(model: nn.Module) -> None:
    """He-normal convolutions (fan-out, as in He et al. 2015), BN at weight 1 and bias 0."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
