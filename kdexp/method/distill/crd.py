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


POSITIVES = ("memory", "current")
NEGATIVES = ("other_class", "uniform")


class ContrastiveMemory(nn.Module):
    """Memory banks of student and teacher embeddings and the two-way NCE loss of CRD.

    Tian et al., "Contrastive Representation Distillation", ICLR 2020, as computed by their code
    (RepDistiller ``crd/``). A student anchor ``s_i`` is scored against ``K + 1`` rows of the
    teacher memory: its positive and ``K`` negatives; a teacher anchor ``t_i`` likewise against the
    student memory. The critic is ``h = exp(vᵀm/τ)/Z`` with ``Z = N · mean exp(·/τ)`` over the
    first batch's ``b(K+1)`` scores, fixed from then on, one ``Z`` per direction (buffers
    ``z_s``/``z_t``, −1 until estimated). The loss is :func:`nce_contrast_loss` summed over the
    two directions. After each call the rows of both banks are moved to
    ``normalise(momentum · old + (1 − momentum) · new)``.

    ``positive``: ``memory`` (the default, the reference's) reads the positive from the other
    network's memory row of the same sample, detached and before this step's update; ``current``
    scores it from the two networks' current embeddings, ``exp(s_iᵀt_i/τ)``, in both directions.
    ``labels`` (the class of every sample): when given, each anchor's negatives are drawn among
    the samples of other classes, without replacement unless ``K`` exceeds their number (the
    reference's default ``mode='exact'``); when ``None``, uniformly among the other ``N − 1``.
    The banks start uniform in ``±√(3/dim)``, as the reference's do. ``generator`` (a CPU
    generator) makes the initial memory and the negatives reproducible.
    """

    memory_s: Tensor
    memory_t: Tensor
    z_s: Tensor
    z_t: Tensor
    labels: Tensor | None
    class_order: Tensor | None
    class_start: Tensor | None
    class_count: Tensor | None

    def __init__(
        self,
        n_samples: int,
        dim: int = 128,
        k: int = 16384,
        tau: float = 0.07,
        momentum: float = 0.5,
        generator: torch.Generator | None = None,
        *,
        positive: str = "memory",
        labels: Tensor | None = None,
    ) -> None:
        super().__init__()
        if n_samples < 2:
            raise ValueError(f"ContrastiveMemory needs at least 2 samples, got {n_samples}")
        if positive not in POSITIVES:
            raise ValueError(f"positive must be one of {POSITIVES}, got {positive!r}")
        if labels is not None:
            if labels.shape != (n_samples,):
                raise ValueError(
                    f"labels must have shape ({n_samples},), got {tuple(labels.shape)}"
                )
            if len(labels.unique()) < 2:
                raise ValueError("negatives from other classes need at least two classes")
            labels = labels.long()
        # samples sorted by class: class c's negatives are all positions outside its block
        order = torch.argsort(labels, stable=True) if labels is not None else None
        count = torch.bincount(labels) if labels is not None else None
        start = torch.cumsum(count, 0) - count if count is not None else None
        self.n_samples, self.dim, self.k = n_samples, dim, k
        self.tau, self.momentum, self.positive = tau, momentum, positive
        self.generator = generator
        bound = math.sqrt(3 / dim)  # unit expected norm, as the reference's initial banks
        for name in ("memory_s", "memory_t"):
            init = torch.rand(n_samples, dim, generator=generator) * (2 * bound) - bound
            self.register_buffer(name, init)
        self.register_buffer("z_s", torch.tensor(-1.0))
        self.register_buffer("z_t", torch.tensor(-1.0))
        self.register_buffer("labels", labels, persistent=False)
        self.register_buffer("class_order", order, persistent=False)
        self.register_buffer("class_start", start, persistent=False)
        self.register_buffer("class_count", count, persistent=False)
        self._z_known = False  # spares a device sync per step once Z is known

    def sample_negatives(self, rows: Tensor) -> Tensor:
        """``b×K`` negative indices for the anchors ``rows`` (see the class docstring)."""
        device = rows.device
        if self.generator is not None:
            rows = rows.cpu()
        if self.labels is None:
            shape = (len(rows), self.k)
            neg = torch.randint(
                0, self.n_samples - 1, shape, generator=self.generator, device=rows.device
            )
            return (neg + (neg >= rows[:, None]).long()).to(device)
        return self._other_class_negatives(rows).to(device)

    def _other_class_negatives(self, rows: Tensor) -> Tensor:
        """``K`` samples of other classes per anchor: a uniform random subset, or uniform draws
        with replacement where the anchor's class has fewer than ``K`` negatives."""
        assert self.labels is not None and self.class_order is not None
        assert self.class_start is not None and self.class_count is not None
        device = rows.device
        cls = self.labels.to(device)[rows]
        start, count = self.class_start.to(device)[cls], self.class_count.to(device)[cls]
        g = self.generator
        picks = []
        for n in (self.n_samples - count).tolist():  # how many negatives each anchor has
            if self.k <= n:
                picks.append(torch.randperm(n, generator=g, device=device)[: self.k])
            else:
                picks.append(torch.randint(0, n, (self.k,), generator=g, device=device))
        # position among the negatives -> position in the class-sorted order, skipping the block
        pos = torch.stack(picks)
        pos = pos + (pos >= start[:, None]).long() * count[:, None]
        return self.class_order.to(device)[pos]

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
        if self.positive == "memory":
            idx = torch.cat([rows[:, None], neg], 1)  # column 0: the positive
            scores_s = self._scores(self.memory_t, idx, s_emb)  # student anchors, teacher memory
            scores_t = self._scores(self.memory_s, idx, t_emb)
        else:
            pos = torch.exp((s_emb * t_emb).sum(1, keepdim=True) / self.tau)
            scores_s = torch.cat([pos, self._scores(self.memory_t, neg, s_emb)], 1)
            scores_t = torch.cat([pos, self._scores(self.memory_s, neg, t_emb)], 1)
        if not self._z_known:
            with torch.no_grad():
                for z, scores in ((self.z_s, scores_s), (self.z_t, scores_t)):
                    if z < 0:
                        z.fill_(scores.mean() * self.n_samples)
            self._z_known = True
        h_s, h_t = scores_s / self.z_s, scores_t / self.z_t
        loss = nce_contrast_loss(h_s[:, 0], h_s[:, 1:], self.n_samples)
        loss = loss + nce_contrast_loss(h_t[:, 0], h_t[:, 1:], self.n_samples)
        self._update(rows, s_emb, t_emb)
        return loss

    def _scores(self, memory: Tensor, idx: Tensor, anchors: Tensor) -> Tensor:
        """``exp(memory[idx]ᵀ anchor / τ)``: ``b×n`` scores for ``b×n`` indices."""
        return torch.exp(torch.bmm(memory[idx], anchors[:, :, None]).squeeze(2) / self.tau)

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

    loss = CE + β · (NCE(s → t-memory) + NCE(t → s-memory)), critic exp(vᵀm/τ)/Z between an
    anchor v (a linear, L2-normalised head on either network's embedding) and rows m of the other
    network's momentum memory of all N samples (:class:`ContrastiveMemory`).

    By default it computes what the authors' code (RepDistiller, ``mode='exact'``) computes: the
    positive is read from the memory (``positive: memory``) and the K negatives come from other
    classes (``negatives: other_class``). ``positive: current`` scores the positive from the
    current embeddings; ``negatives: uniform`` draws among all other samples.

    Needs a training split held in memory (its batches carry their sample indices); ``nce_k`` is
    capped at N − 1 (the reference draws with replacement past that, which only matters for
    training sets smaller than 16385). Embeddings, memory and loss are computed in float32 even
    under autocast.
    """

    def __init__(
        self,
        *,
        beta: float = 0.8,
        feat_dim: int = 128,
        nce_k: int = 16384,
        nce_t: float = 0.07,
        nce_momentum: float = 0.5,
        positive: str = "memory",
        negatives: str = "other_class",
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
        if positive not in POSITIVES:
            raise ConfigError(
                self.key_of("positive"),
                positive,
                "memory (RepDistiller: the other network's memory row) or current (the current "
                "embeddings)",
            )
        if negatives not in NEGATIVES:
            raise ConfigError(
                self.key_of("negatives"),
                negatives,
                "other_class (RepDistiller's exact mode) or uniform (any other sample)",
            )
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
        targets = torch.as_tensor(train.targets)  # type: ignore[attr-defined]
        self.n_samples = len(targets)
        self.labels: Tensor | None = None
        if negatives == "other_class":
            if len(targets.unique()) < 2:
                raise ConfigError(
                    self.key_of("negatives"), negatives, "uniform: the training set has one class"
                )
            self.labels = targets.long()
        self.positive, self.negatives = positive, negatives
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
        memory = ContrastiveMemory(
            self.n_samples,
            self.feat_dim,
            k,
            self.nce_t,
            self.nce_momentum,
            positive=self.positive,
            labels=self.labels,
        )
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
