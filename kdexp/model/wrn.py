"""Wide residual networks (WRN-d-k) for small images."""

from __future__ import annotations

from torch import Tensor, nn

from kdexp.errors import ConfigError


class WideBlock(nn.Module):
    """A pre-activation block: BN-ReLU-conv3×3, BN-ReLU-dropout-conv3×3, plus a shortcut.

    Where the width changes the shortcut is a 1×1 conv applied to the pre-activated input, as in
    Zagoruyko & Komodakis' reference code; otherwise it is the identity on the raw input.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, padding=1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """The block's output; spatial size divided by the stride."""
        activated = self.relu(self.bn1(x))
        out = self.conv1(activated)
        out = self.conv2(self.dropout(self.relu(self.bn2(out))))
        return out + (x if self.shortcut is None else self.shortcut(activated))


class WideResNet(nn.Module):
    """WRN-depth-k of Zagoruyko & Komodakis 2016 ("Wide Residual Networks").

    A 3×3 stem conv of 16 channels, three stages of (depth - 4) / 6 pre-activation blocks of widths
    16k, 32k and 64k (stride 2 at stages 2 and 3), a final BN-ReLU, global average pooling and a
    linear classifier. ``image_size`` is accepted and ignored: the average pool adapts to any
    input size.
    """

    def __init__(
        self,
        depth: int,
        widen_factor: int,
        num_classes: int,
        in_channels: int = 3,
        dropout: float = 0.0,
        image_size: int | None = None,
    ) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ConfigError("model.depth", depth, "6n+4 with n >= 1, e.g. 10, 16, 28, 40")
        if widen_factor < 1:
            raise ConfigError("model.widen_factor", widen_factor, "a positive integer")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError("model.dropout", dropout, "a probability in [0, 1)")
        blocks_per_stage = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.stem = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        stages: list[nn.Module] = []
        for index, width in enumerate(widths[1:]):
            blocks = []
            for block in range(blocks_per_stage):
                stride = 2 if index > 0 and block == 0 else 1
                in_width = widths[index] if block == 0 else width
                blocks.append(WideBlock(in_width, width, stride, dropout))
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.head = nn.Sequential(
            nn.BatchNorm2d(widths[3]),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.fc = nn.Linear(widths[3], num_classes)
        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        """Class logits of shape (N, num_classes) for images of shape (N, C, H, W)."""
        return self.fc(self.head(self.stages(self.stem(x))))


def _init_weights(model: nn.Module) -> None:
    """He-normal convolutions (fan-out), BN at weight 1 and bias 0, zero linear bias."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.zeros_(module.bias)
