"""LeNet-5 and LeNet-300-100, the classic small networks of LeCun et al. 1998."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from kdexp.errors import ConfigError


class LeNet5(nn.Module):
    """LeNet-5 (LeCun et al. 1998, "Gradient-based learning applied to document recognition").

    conv5x5(6) → pool → conv5x5(16) → pool → fc120 → fc84 → fc, with ReLU and max pooling in place
    of the original scaled tanh and subsampling. conv1 is padded by 2 (the paper's 32×32 input is
    28×28 MNIST padded by 2); conv2 is padded by 2 as well when the image would otherwise shrink
    to nothing (8×8 digits). The flatten size comes from a dummy forward, so 8×8, 28×28 and 32×32
    inputs all work.
    """

    def __init__(self, num_classes: int, in_channels: int, image_size: int) -> None:
        super().__init__()
        if image_size < 4:
            raise ConfigError("model.image_size", image_size, "at least 4 pixels for LeNet-5")
        # After pool1 the side is image_size // 2; unpadded conv2 and pool2 leave (side - 4) // 2.
        conv2_padding = 0 if (image_size // 2 - 4) // 2 >= 1 else 2
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, kernel_size=5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, kernel_size=5, padding=conv2_padding),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        with torch.no_grad():
            flat = self.features(torch.zeros(1, in_channels, image_size, image_size)).shape[1]
        self.classifier = nn.Sequential(
            nn.Linear(flat, 120),
            nn.ReLU(inplace=True),
            nn.Linear(120, 84),
            nn.ReLU(inplace=True),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        """Class logits of shape (N, num_classes) for images of shape (N, C, H, W)."""
        return self.classifier(self.features(x))


class LeNet300_100(nn.Module):
    """LeNet-300-100: a fully connected 300-100 network on flattened images, with ReLU.

    From LeCun et al. 1998; the standard pruning baseline of Han et al. 2015 ("Learning both
    Weights and Connections for Efficient Neural Networks"), 266K parameters on MNIST.
    """

    def __init__(self, num_classes: int, in_channels: int, image_size: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_channels * image_size * image_size, 300),
            nn.ReLU(inplace=True),
            nn.Linear(300, 100),
            nn.ReLU(inplace=True),
            nn.Linear(100, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        """Class logits of shape (N, num_classes) for images of shape (N, C, H, W)."""
        return self.layers(x)
