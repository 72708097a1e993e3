"""Contrastive representation distillation: an NCE critic over a memory bank of embeddings."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdexp.dataset.base import TensorLoader
from kdexp.errors import ConfigError
from kdexp.method.base import Step
from kdexp.method.distill.base import Distiller


def nce_contrast_loss(pos: Tensor, neg: Tensor, n_samples: int, eps: float = 1e-7) -> Tensor:
    """NCE loss for one positive and ``K`` noise samples per anchor, noise distribution ``1/N``.

    ``pos`` (``b``) and ``neg`` (``b×K``) are normalised critic scores ``h = exp(vᵀv'/τ)/Z``.
    With ``m = K/N``, ``P(D=1 | h) = h/(h + m)``, and the loss is
    ``−mean_b[log P(D=1 | pos) + Σ_K log(1 − P(D=1 | neg))]``; ``eps`` guards the denominators.
    """
    m = neg.shape[1] / n_samples
    log_d1 = torch.log(pos / (pos + m + eps))
    log_d0 = torch.log(m / (neg + m + eps)).sum(1)
    return -(log_d1 + log_d0).mean()


class Embed(nn.Module):
    """Embedding head: flatten, linear map to ``dim``, L2-normalise the rows."""

    def __init__(self, in_features: int, dim: int = 128) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, dim)

    def forward(self, x: Tensor) -> Tensor:
        """``b×…`` features to ``b×dim`` unit vectors."""
        return F.normalize(self.linear(x.flatten(1)), dim=1)


class ContrastiveMemory(nn.Module):
    """Memory banks of student and teacher embeddings and the two-way NCE loss of CRD.

    Tian et al., "Contrastive Representation Distillation", ICLR 2020. For a student anchor
    ``s_i`` the positive is the teacher embedding ``t_i`` of the same sample and the ``K``
    negatives are teacher-memory rows drawn uniformly among the other ``N − 1`` samples;
    the critic is ``h = exp(sᵀt/τ)/Z``, with ``Z = N · mean exp(·/τ)`` fixed from the first batch.
    The loss is :func:`nce_contrast_loss` for the student anchors plus the same with the roles
    swapped (teacher anchors against the student memory, its own ``Z``). After each call the
    rows of both banks are moved to ``normalise(momentum · old + (1 − momentum) · new)``.
    The positive uses the current embeddings of both networks (the memory supplies negatives
    only). Buffers ``z_s``/``z_t`` hold ``Z`` for student/teacher anchors (−1 until estimated).

    ``generator`` (a CPU generator) makes the initial memory and the negatives reproducible.
    """

    memory_s: Tensor
    memory_t: Tensor
    z_s: Tensor
    z_t: Tensor

    def __init__(
        self,
        n_samples: int,
        dim: int = 128,
        k: int = 16384,
        tau: float = 0.07,
        momentum: float = 0.5,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if n_samples < 2:
            raise ValueError(f"ContrastiveMemory needs at least 2 samples, got {n_samples}")
        self.n_samples, self.dim, self.k = n_samples, dim, k
        self.tau, self.momentum = tau, momentum
        self.generator = generator
        for name in ("memory_s", "memory_t"):
            init = torch.randn(n_samples, dim, generator=generator)
            self.register_buffer(name, F.normalize(init, dim=1))
        self.register_buffer("z_s", torch.tensor(-1.0))
        self.register_buffer("z_t", torch.tensor(-1.0))
        self._z_known = False  # spares a device sync per step once Z is known

    def sample_negatives(self, rows: Tensor) -> Tensor:
        """``b×K`` indices drawn uniformly from ``[0, N)`` without the anchor's own row."""
        shape = (len(rows), self.k)
        if self.generator is None:
            neg = torch.randint(0, self.n_samples - 1, shape, device=rows.device)
        else:
            neg = torch.randint(0, self.n_samples - 1, shape, generator=self.generator)
            neg = neg.to(rows.device)
        return neg + (neg >= rows[:, None]).long()

    def forward(self, s_emb: Tensor, t_emb: Tensor, rows: Tensor) -> Tensor:
        """The CRD loss for unit-norm embeddings ``b×dim`` of dataset samples ``rows``."""
        if s_emb.shape != t_emb.shape or s_emb.shape != (len(rows), self.dim):
            raise ValueError(
                f"ContrastiveMemory: embeddings {tuple(s_emb.shape)}, {tuple(t_emb.shape)} and "
                f"rows {tuple(rows.shape)} do not match dim={self.dim}"
            )
        if int(rows.min()) < 0 or int(rows.max()) >= self.n_samples:
            raise ValueError(
                f"ContrastiveMemory: sample indices must lie in [0, {self.n_samples}), "
                f"got [{int(rows.min())}, {int(rows.max())}]"
            )
        rows = rows.long()
        neg = self.sample_negatives(rows)
        pos = torch.exp((s_emb * t_emb).sum(1) / self.tau)
        neg_t = torch.exp(torch.bmm(self.memory_t[neg], s_emb[:, :, None]).squeeze(2) / self.tau)
        neg_s = torch.exp(torch.bmm(self.memory_s[neg], t_emb[:, :, None]).squeeze(2) / self.tau)
        if not self._z_known:
            with torch.no_grad():
                for z, scores in ((self.z_s, neg_t), (self.z_t, neg_s)):
                    if z < 0:
                        z.fill_(torch.cat([pos[:, None], scores], 1).mean() * self.n_samples)
            self._z_known = True
        loss = nce_contrast_loss(pos / self.z_s, neg_t / self.z_s, self.n_samples)
        loss = loss + nce_contrast_loss(pos / self.z_t, neg_s / self.z_t, self.n_samples)
        self._update(rows, s_emb, t_emb)
        return loss

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        """Load as usual, then look at the loaded ``Z`` again on the next call."""
        super()._load_from_state_dict(*args, **kwargs)
        self._z_known = False

    @torch.no_grad()
    def _update(self, rows: Tensor, s_emb: Tensor, t_emb: Tensor) -> None:
        """Momentum update of the banks' rows ``rows``, renormalised to unit length."""
        for memory, emb in ((self.memory_s, s_emb), (self.memory_t, t_emb)):
            mixed = self.momentum * memory[rows] + (1 - self.momentum) * emb.detach()
            memory[rows] = F.normalize(mixed, dim=1)


class CRD(Distiller):
    """Tian, Krishnan & Isola 2020, "Contrastive Representation Distillation".

    loss = CE + β · (NCE(s → t-memory) + NCE(t → s-memory)), critic exp(g_s(s)ᵀg_t(t)/τ)/Z with
    linear, L2-normalised heads g and K uniform negatives from a momentum memory of all N samples.

    Needs a training split held in memory (its batches carry their sample indices); ``nce_k`` is
    capped at N − 1. Embeddings, memory and loss are computed in float32 even under autocast.
    """

    def __init__(
        self,
        *,
        beta: float = 0.8,
        feat_dim: int = 128,
        nce_k: int = 16384,
        nce_t: float = 0.07,
        nce_momentum: float = 0.5,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if beta < 0:
            raise ConfigError(self.key_of("beta"), beta, "a non-negative weight")
        for name, value in (("feat_dim", feat_dim), ("nce_k", nce_k)):
            if value < 1:
                raise ConfigError(self.key_of(name), value, "a positive integer")
        if not nce_t > 0:
            raise ConfigError(self.key_of("nce_t"), nce_t, "a positive temperature")
        if not 0 <= nce_momentum < 1:
            raise ConfigError(self.key_of("nce_momentum"), nce_momentum, "a momentum in [0, 1)")
        if len(self.student_layers) != 1:
            raise ConfigError(
                self.key_of("student_layers"),
                self.student_layers,
                "exactly one layer (the embedding to contrast, usually penultimate)",
            )
        train = self.data.train
        if not isinstance(train, TensorLoader):
            raise ConfigError(
                "dataset",
                type(train).__name__,
                "an in-memory dataset whose batches carry their sample indices: CRD keeps a "
                "memory bank with one row per training sample",
            )
        self.n_samples = len(train.targets)  # type: ignore[attr-defined]
        self.beta, self.feat_dim = beta, feat_dim
        self.nce_k, self.nce_t, self.nce_momentum = nce_k, nce_t, nce_momentum
        self.embed_s: Embed | None = None
        self.embed_t: Embed | None = None
        self.memory: ContrastiveMemory | None = None

    def build_connectors(self, s_shapes: list[torch.Size], t_shapes: list[torch.Size]) -> None:
        """The two embedding heads and the memory bank, on the teacher's device."""
        device = next(self.teacher.parameters()).device
        self.embed_s = Embed(math.prod(s_shapes[0][1:]), self.feat_dim).to(device)
        self.embed_t = Embed(math.prod(t_shapes[0][1:]), self.feat_dim).to(device)
        k = min(self.nce_k, self.n_samples - 1)
        memory = ContrastiveMemory(self.n_samples, self.feat_dim, k, self.nce_t, self.nce_momentum)
        self.memory = memory.to(device)

    def distill_terms(
        self,
        s_logits: Tensor,
        t_logits: Tensor,
        s_feats: list[Tensor],
        t_feats: list[Tensor],
        targets: Tensor,
        ctx: Step,
    ) -> dict[str, Tensor]:
        """``crd``: β times the two-way NCE loss; updates the memory bank."""
        assert self.embed_s is not None and self.embed_t is not None and self.memory is not None
        rows = ctx.rows
        if rows is None or len(rows) != len(targets):
            raise RuntimeError("CRD: the training batch's sample indices are not available")
        fs, ft = s_feats[0], t_feats[0]
        with torch.autocast(fs.device.type, enabled=False):
            s_emb = self.embed_s(fs.float())
            t_emb = self.embed_t(ft.float())
            loss = self.memory(s_emb, t_emb, rows.to(fs.device))
        return {"crd": self.beta * loss}
