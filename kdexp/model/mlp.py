"""A fully connected classifier on flattened images."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from kdexp.errors import ConfigError


class MLP(nn.Module):
    """A multilayer perceptron: flatten C×H×W, then Linear→ReLU→Dropout per hidden layer, Linear.

    The hidden layers are either listed (``hidden=[1200, 1200]``) or given as ``width`` and
    ``depth`` (``depth`` layers of ``width`` units each), two integers a search can sample;
    ``hidden`` must then be null. With ``hidden=[]`` or ``depth=0`` it is multinomial logistic
    regression. Hinton et al. 2015 ("Distilling the Knowledge in a Neural Network") use 1200-1200
    with dropout as the MNIST teacher and 800-800 without regularisation as the student.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        image_size: int,
        hidden: Sequence[int] | None = None,
        dropout: float = 0.0,
        width: int | None = None,
        depth: int | None = None,
    ) -> None:
        super().__init__()
        widths = _hidden_widths(hidden, width, depth)
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


def _hidden_widths(hidden: Sequence[int] | None, width: int | None, depth: int | None) -> list[int]:
    """The hidden layer widths from either ``hidden`` or ``width`` × ``depth``."""
    if hidden is not None:
        if width is not None or depth is not None:
            raise ConfigError(
                "model.hidden",
                list(hidden),
                "null when model.width and model.depth are set (give the layers one way)",
            )
        widths = [int(w) for w in hidden]
        if any(w < 1 for w in widths):
            raise ConfigError("model.hidden", widths, "a list of positive layer widths")
        return widths
    if width is None or depth is None:
        raise ConfigError(
            "model.hidden", None, "a list of layer widths, or model.width and model.depth both set"
        )
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ConfigError("model.width", width, "a positive integer (units per hidden layer)")
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 0:
        raise ConfigError("model.depth", depth, "an integer >= 0 (the number of hidden layers)")
    return [width] * depth
