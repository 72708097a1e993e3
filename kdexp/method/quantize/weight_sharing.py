"""Trained quantization by weight sharing (Han, Mao & Dally 2016, "Deep Compression", ICLR, §3).

Each Conv2d/Linear layer's non-zero weights are clustered by k-means into ``k = 2^bits`` shared
values (centroids), initialised linearly between the smallest and the largest weight (the paper's
best initialisation: it keeps the rare large weights represented). A weight becomes
``W[i] = C[I[i]]``: its index ``I[i]`` is fixed, and fine-tuning trains the centroids, each with
the sum of the gradients of the weights that share it, ``∂L/∂C_k = Σ_{i: I[i]=k} ∂L/∂W[i]``
(indexing the centroid Parameter gives exactly this through autograd). Weights that are exactly
zero at the start (a pruned model) are not clustered and stay zero: index 0 stands for zero,
index ``k + 1`` for centroid ``k``.

The final model holds, per layer, ``indices`` (uint8; int16 at 8 bits) and ``codebook`` (the
``2^bits`` fp32 centroids) instead of ``weight``: the compressed format
(:mod:`kdexp.compress`) stores the indices of the non-zeros at ``bits`` bits, and
:func:`load_shared` turns such a state_dict back into a runnable model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdexp.dataset.base import Data
from kdexp.errors import ConfigError
from kdexp.method.quantize.common import QuantMethod
from kdexp.method.quantize.fake import quantizable_layers, set_module

BITS = range(1, 9)


def kmeans_1d(values: Tensor, clusters: int, iterations: int = 100) -> tuple[Tensor, Tensor]:
    """(centroids, index of each value's centroid): Lloyd's k-means of 1-D ``values`` from
    centroids spaced linearly between ``min`` and ``max``. A centroid left without values keeps
    its place; the loop stops when no value changes cluster."""
    values = values.detach().flatten().float()
    centroids = torch.linspace(float(values.min()), float(values.max()), clusters)
    centroids = centroids.to(values.device)
    assignment = torch.full_like(values, -1, dtype=torch.long)
    for _ in range(iterations):
        # Centroids stay sorted in 1-D, so the nearest one is found between the midpoints.
        new = torch.bucketize(values, (centroids[1:] + centroids[:-1]) / 2)
        if torch.equal(new, assignment):
            break
        assignment = new
        sums = torch.zeros_like(centroids).index_add_(0, assignment, values)
        counts = torch.bincount(assignment, minlength=clusters).to(values.dtype)
        centroids = torch.where(counts > 0, sums / counts.clamp_min(1), centroids)
    return centroids, assignment


class _Shared:
    """What both weight-shared layers hold: fixed centroid indices and the trained codebook."""

    indices: Tensor
    codebook: nn.Parameter

    def shared_weight(self) -> Tensor:
        """``[0, C_0, C_1, ...][indices]``: the weight, differentiable in the centroids."""
        table = torch.cat([self.codebook.new_zeros(1), self.codebook])
        # index_select's backward adds each weight's gradient into its centroid's. The int32 copy
        # of the indices is kept between calls (converting uint8 on every call dominated the
        # stored model's CPU latency) and redone when the indices change (load_state_dict).
        key = (self.indices.data_ptr(), self.indices._version, self.indices.device)
        cached = self.__dict__.get("_flat_indices")
        if cached is None or cached[0] != key:
            cached = (key, self.indices.reshape(-1).to(torch.int32))
            self.__dict__["_flat_indices"] = cached
        return table.index_select(0, cached[1]).view(self.indices.shape)


class SharedConv2d(nn.Conv2d, _Shared):
    """A Conv2d whose weights are shared centroids (Han et al. 2016)."""

    def forward(self, x: Tensor) -> Tensor:
        """The convolution with the shared weights."""
        return self._conv_forward(x, self.shared_weight(), self.bias)


class SharedLinear(nn.Linear, _Shared):
    """A Linear whose weights are shared centroids (Han et al. 2016)."""

    def forward(self, x: Tensor) -> Tensor:
        """The linear map with the shared weights."""
        return F.linear(x, self.shared_weight(), self.bias)


def shared_from(module: nn.Module, indices: Tensor, codebook: Tensor) -> nn.Module:
    """A shared layer with ``module``'s settings and bias, its weight replaced by ``indices``
    (0: zero, k + 1: centroid k) into ``codebook``."""
    cls: type[nn.Module]
    if isinstance(module, nn.Conv2d):
        cls = SharedConv2d
    elif isinstance(module, nn.Linear):
        cls = SharedLinear
    else:
        raise TypeError(f"cannot share the weights of {type(module).__name__}")
    layer = cls.__new__(cls)
    layer.__dict__.update(module.__dict__)
    layer._parameters = {k: v for k, v in module._parameters.items() if k != "weight"}
    layer._buffers, layer._modules = {}, {}
    layer.register_buffer("indices", indices)
    layer.register_parameter("codebook", nn.Parameter(codebook))
    return layer


def _plain(module: nn.Module) -> nn.Module:
    """A plain Conv2d/Linear holding the shared layer's current weights (and its bias)."""
    plain = (nn.Conv2d if isinstance(module, nn.Conv2d) else nn.Linear).__new__(
        nn.Conv2d if isinstance(module, nn.Conv2d) else nn.Linear
    )
    plain.__dict__.update(module.__dict__)
    plain._buffers, plain._modules = {}, {}
    plain._parameters = {k: v for k, v in module._parameters.items() if k != "codebook"}
    weight = cast(_Shared, module).shared_weight().detach().clone()
    plain._parameters["weight"] = nn.Parameter(weight, requires_grad=False)
    return plain


class WeightSharing(QuantMethod):
    """Deep Compression's trained quantization: ``2^bits`` shared weights per layer, k-means
    clustered (linear initialisation), indices fixed, centroids fine-tuned with the summed
    gradients of their weights (Han, Mao & Dally 2016). Pruned zeros stay zero."""

    def __init__(
        self,
        *,
        data: Data,
        criterion: nn.Module,
        bits: int = 5,
        iterations: int = 100,
        **kwargs: Any,
    ) -> None:
        super().__init__(data=data, criterion=criterion, **kwargs)
        if isinstance(bits, bool) or bits not in BITS:
            raise ConfigError("method.bits", bits, "an integer from 1 to 8")
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
            raise ConfigError("method.iterations", iterations, "a positive number of iterations")
        self.bits, self.iterations = int(bits), iterations
        self.layer_bits: dict[str, int] = {}
        self._latent: dict[str, Tensor] = {}  # each layer's weights before clustering (CPU)

    def prepare(self, model: nn.Module) -> nn.Module:
        """Cluster each Conv2d/Linear layer's non-zero weights; replace it by its shared form."""
        layers = quantizable_layers(model)
        if not layers:
            raise ConfigError(
                "method", "quantize/weight_sharing", f"a model with Conv2d or Linear layers "
                f"({type(model).__name__})"
            )  # fmt: skip
        for name, module in layers:
            weight = cast(Tensor, module.weight).detach()
            nonzero = weight != 0
            indices = torch.zeros_like(weight, dtype=torch.long)
            codebook = torch.zeros(2**self.bits, device=weight.device)
            if bool(nonzero.any()):
                codebook, assignment = kmeans_1d(weight[nonzero], 2**self.bits, self.iterations)
                indices[nonzero] = assignment + 1
            self._latent[name] = weight.cpu().clone()
            self.layer_bits[name] = self.bits
            set_module(model, name, shared_from(module, indices, codebook.to(weight.dtype)))
        return model

    def finalize(self, model: nn.Module) -> nn.Module:
        """The model with its shared layers in stored form: small-integer indices, codebook."""
        shared = {n: cast(nn.Module, m) for n, m in model.named_modules() if isinstance(m, _Shared)}
        with torch.no_grad():
            weights = {n: cast(_Shared, m).shared_weight().detach() for n, m in shared.items()}
        for name, module in shared.items():  # the fp32 model with the shared weights
            set_module(model, name, _plain(module))
        self.record_fp32(model)
        self.record_errors(self._latent, weights, self.layer_bits)
        self.set_nonzero(model, weights)
        dtype = torch.uint8 if self.bits < 8 else torch.int16
        for name, module in shared.items():
            layer = cast(_Shared, module)
            codebook = layer.codebook.detach().clone()
            stored = shared_from(module, layer.indices.to(dtype), codebook)
            cast(_Shared, stored).codebook.requires_grad_(False)
            set_module(model, name, stored)
        return model.eval()


def load_shared(model: nn.Module, state: Mapping[str, Tensor]) -> nn.Module:
    """``model`` (a freshly built fp32 model) with the layers that ``state`` holds in shared
    form (``<layer>.indices`` and ``<layer>.codebook``) replaced, and all weights loaded."""
    for name, module in list(model.named_modules()):
        if f"{name}.codebook" not in state:
            continue
        if not isinstance(module, (nn.Conv2d, nn.Linear)):
            raise ConfigError(
                "checkpoint", name, f"a Conv2d or Linear layer there, not {type(module).__name__}"
            )
        indices = torch.empty_like(state[f"{name}.indices"])
        codebook = torch.empty_like(state[f"{name}.codebook"])
        set_module(model, name, shared_from(module, indices, codebook))
    try:
        model.load_state_dict(dict(state))
    except RuntimeError as error:
        raise ConfigError(
            "checkpoint", type(model).__name__, f"weights of this model ({error})"
        ) from None
    return model
