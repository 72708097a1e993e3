"""A fully connected classifier on flattened images."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from kdexp.errors import ConfigError


class MLP(nn.Module):
    """A multilayer perceptron: flatten C×H×W, then Linear→ReLU→Dropout per hidden layer, Linear.

    With ``hidden=[]`` it is multinomial logistic regression. Hinton et al. 2015 ("Distilling the
    Knowledge in a Neural Network") use 1200-1200 with dropout as the MNIST teacher and 800-800
    without regularisation as the student.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        image_size: int,
        hidden: Sequence[int],
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        widths = [int(width) for width in hidden]
        if any(width < 1 for width in widths):
            raise ConfigError("model.hidden", widths, "a list of positive layer widths")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError("model.dropout", dropout, "a probability in [0, 1)")
        layers: list[nn.Module] = [nn.Flatten()]
        features = in_channels * image_size * image_size
        for width in widths:
            layers += [nn.Linear(features, width), nn.ReLU(inplace=True)]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            features = width
        layers.append(nn.Linear(features, num_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """Class logits of shape (N, num_classes) for images of shape (N, C, H, W)."""
        return self.layers(x)
