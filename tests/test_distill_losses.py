"""Distillation losses against independent calculations (Python loops, hand-worked values), and
the method classes on a tiny teacher/student pair.

Each reference below is written from the paper's formula with loops over samples, pairs,
triplets or channels, so a vectorisation mistake in ``kdexp.method.distill`` cannot be repeated
here. Tensors are float64 so that tolerances can be tight.
"""

from __future__ import annotations

import math

import pytest
import torch
from hydra.utils import instantiate
from torch import nn

from kdexp.dataset.base import Data, TensorLoader
from kdexp.errors import ConfigError
from kdexp.method.base import Step
from kdexp.method.distill.at import AT, at_loss, attention_map
from kdexp.method.distill.base import pool_to_common_size
from kdexp.method.distill.crd import CRD, ContrastiveMemory, Embed, nce_contrast_loss
from kdexp.method.distill.dkd import DKD, dkd_loss
from kdexp.method.distill.fitnet import FitNet, _regressor, hint_loss
from kdexp.method.distill.nst import NST, nst_loss
from kdexp.method.distill.pkt import PKT, pkt_loss
from kdexp.method.distill.rkd import RKD, rkd_angle_loss, rkd_distance_loss
from kdexp.method.distill.sp import SP, sp_loss

D = torch.float64


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=D)


def _vec(t: torch.Tensor) -> list[float]:
    return [float(v) for v in t.flatten()]


def _dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


def _unit(a: list[float]) -> list[float]:
    n = math.sqrt(_dot(a, a))
    return [x / n for x in a] if n > 0 else [0.0] * len(a)


def _huber(x: float) -> float:
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


def _block_mean(f: torch.Tensor, k: int) -> torch.Tensor:
    """Average non-overlapping k×k blocks with loops (the reference for adaptive pooling)."""
    b, c, h, w = f.shape
    out = torch.zeros(b, c, h // k, w // k, dtype=f.dtype)
    for n in range(b):
        for ch in range(c):
            for i in range(h // k):
                for j in range(w // k):
                    total = 0.0
                    for di in range(k):
                        for dj in range(k):
                            total += float(f[n, ch, i * k + di, j * k + dj])
                    out[n, ch, i, j] = total / (k * k)
    return out


def _grad_reaches(loss_fn, student: torch.Tensor, *rest: torch.Tensor) -> None:
    student = student.clone().requires_grad_(True)
    loss_fn(student, *rest).backward()
    assert student.grad is not None
    assert torch.isfinite(student.grad).all()
    assert student.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- FitNets


def test_hint_loss_by_hand() -> None:
    s = torch.tensor([[1.0, 2.0], [3.0, -1.0]], dtype=D)
    t = torch.tensor([[0.0, 0.0], [1.0, 1.0]], dtype=D)
    # squared errors 1, 4, 4, 4 -> mean 13/4
    assert hint_loss(s, t).item() == pytest.approx(13 / 4)


def test_hint_loss_loop_zero_grad_and_shapes() -> None:
    s, t = _randn(3, 4, 2, 2, seed=1), _randn(3, 4, 2, 2, seed=2)
    ref = sum((a - b) ** 2 for a, b in zip(_vec(s), _vec(t), strict=True)) / s.numel()
    assert hint_loss(s, t).item() == pytest.approx(ref, rel=1e-12)
    assert hint_loss(t, t).item() == 0
    _grad_reaches(hint_loss, s, t)
    with pytest.raises(ValueError, match="does not match"):
        hint_loss(s, t[:, :2])


def _naive_conv(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor, stride: int, pad: int):
    """A 2-d convolution with loops: out[o,i,j] = bias[o] + Σ w[o,c,u,v]·x[c, i·s−p+u, j·s−p+v]."""
    n_b, c_in, h, wd = x.shape
    c_out, _, kh, kw = w.shape
    oh, ow = (h + 2 * pad - kh) // stride + 1, (wd + 2 * pad - kw) // stride + 1
    out = []
    for n in range(n_b):
        for o in range(c_out):
            for i in range(oh):
                for j in range(ow):
                    acc = bias[o]
                    for c in range(c_in):
                        for u in range(kh):
                            for v in range(kw):
                                y, z = i * stride - pad + u, j * stride - pad + v
                                if 0 <= y < h and 0 <= z < wd:
                                    acc = acc + w[o, c, u, v] * x[n, c, y, z]
                    out.append(acc)
    return torch.stack(out).view(n_b, c_out, oh, ow)


def _naive_conv_transpose(
    x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor, stride: int, pad: int
):
    """A transposed convolution with loops: input x[c,i,j] adds w[c,o,u,v]·x[c,i,j] to output
    position (i·s − p + u, j·s − p + v)."""
    n_b, c_in, h, wd = x.shape
    _, c_out, kh, kw = w.shape
    oh, ow = (h - 1) * stride - 2 * pad + kh, (wd - 1) * stride - 2 * pad + kw
    acc: dict[tuple[int, ...], list[torch.Tensor]] = {}
    for n in range(n_b):
        for c in range(c_in):
            for i in range(h):
                for j in range(wd):
                    for o in range(c_out):
                        for u in range(kh):
                            for v in range(kw):
                                y, z = i * stride - pad + u, j * stride - pad + v
                                if 0 <= y < oh and 0 <= z < ow:
                                    acc.setdefault((n, o, y, z), []).append(
                                        w[c, o, u, v] * x[n, c, i, j]
                                    )
    out = [
        bias[o] + sum(acc.get((n, o, y, z), []))
        for n in range(n_b)
        for o in range(c_out)
        for y in range(oh)
        for z in range(ow)
    ]
    return torch.stack(out).view(n_b, c_out, oh, ow)


def _naive_bn_relu(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float = 1e-5):
    """Training-mode batch norm (batch statistics, biased variance) per channel, then ReLU."""
    channels = []
    for o in range(x.shape[1]):
        v = x[:, o]
        mean = v.sum() / v.numel()
        var = ((v - mean) ** 2).sum() / v.numel()
        y = (v - mean) / torch.sqrt(var + eps) * gamma[o] + beta[o]
        channels.append(torch.where(y > 0, y, torch.zeros_like(y)))
    return torch.stack(channels, 1)


# (student map, teacher map, the reference's conv: kind, kernel, stride, padding)
CONV_REG_CASES = [
    ((2, 3, 4, 4), (2, 5, 2, 2), ("conv", 3, 2, 1)),  # student twice the teacher's size
    ((2, 3, 2, 2), (2, 5, 4, 4), ("transpose", 4, 2, 1)),  # half of it
    ((2, 3, 4, 4), (2, 5, 3, 3), ("conv", 2, 1, 0)),  # larger: valid conv, kernel 1 + Δ
    ((2, 3, 3, 3), (2, 5, 3, 3), ("conv", 1, 1, 0)),  # equal: 1×1 conv
]


@pytest.mark.parametrize(("s_shape", "t_shape", "conv"), CONV_REG_CASES)
def test_fitnet_reference_regressor_value_and_gradient(s_shape, t_shape, conv) -> None:
    kind, kernel, stride, pad = conv
    regressor = _regressor(torch.Size(s_shape), torch.Size(t_shape), ("s", "t"), "reference")
    regressor = regressor.double().train()
    layer, bn, _ = regressor
    assert isinstance(layer, nn.ConvTranspose2d if kind == "transpose" else nn.Conv2d)
    assert (layer.kernel_size, layer.stride, layer.padding) == (
        (kernel, kernel),
        (stride, stride),
        (pad, pad),
    )
    with torch.no_grad():  # a non-trivial affine BN
        bn.weight.copy_(1 + _randn(t_shape[1], seed=40))
        bn.bias.copy_(_randn(t_shape[1], seed=41))
    fs = _randn(*s_shape, seed=42).requires_grad_(True)
    ft = _randn(*t_shape, seed=43)
    got = hint_loss(regressor(fs), ft)
    naive = _naive_conv_transpose if kind == "transpose" else _naive_conv
    proj = _naive_bn_relu(naive(fs, layer.weight, layer.bias, stride, pad), bn.weight, bn.bias)
    diff = [(a - b) ** 2 for a, b in zip(proj.flatten(), ft.flatten(), strict=True)]
    ref = sum(diff) / len(diff)
    assert got.item() == pytest.approx(ref.item(), rel=1e-10)
    params = [fs, layer.weight, layer.bias, bn.weight, bn.bias]
    grads = torch.autograd.grad(got, params)
    ref_grads = torch.autograd.grad(ref, params)
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(grad, ref_grad, rtol=1e-6, atol=1e-12)


def test_fitnet_regressor_forms_and_sizes_without_a_reference_conv() -> None:
    pool = _regressor(torch.Size((2, 3, 8, 8)), torch.Size((2, 5, 2, 2)), ("s", "t"), "pool")
    assert len(pool) == 2 and pool[0].kernel_size == (1, 1) and pool[0].bias is None
    for s, t in [((2, 3, 2, 2), (2, 5, 3, 3)), ((2, 3, 8, 6), (2, 5, 4, 4))]:
        with pytest.raises(ConfigError, match="pool") as error:
            _regressor(torch.Size(s), torch.Size(t), ("s", "t"), "reference")
        assert error.value.key == "method.regressor"


# ----------------------------------------------------------------------------- attention transfer


def _naive_attention(f: torch.Tensor, p: float = 2) -> list[list[float]]:
    b, c, h, w = f.shape
    maps = []
    for n in range(b):
        a = []
        for i in range(h):
            for j in range(w):
                a.append(sum(abs(float(f[n, ch, i, j])) ** p for ch in range(c)) / c)
        maps.append(_unit(a))
    return maps


def _naive_at(fs: torch.Tensor, ft: torch.Tensor, p: float = 2) -> float:
    a_s, a_t = _naive_attention(fs, p), _naive_attention(ft, p)
    sq = [
        (x - y) ** 2 for rs, rt in zip(a_s, a_t, strict=True) for x, y in zip(rs, rt, strict=True)
    ]
    return sum(sq) / len(sq)


def test_attention_map_by_hand() -> None:
    # one sample, two channels, 1×2 positions: channel means of f² are (1+9)/2=5 and (4+0)/2=2
    f = torch.tensor([[[[1.0, 2.0]], [[-3.0, 0.0]]]], dtype=D)
    expected = torch.tensor([[5.0, 2.0]], dtype=D) / math.sqrt(29)
    torch.testing.assert_close(attention_map(f), expected)


@pytest.mark.parametrize("p", [1, 2, 4])
def test_at_loss_matches_loops(p: float) -> None:
    fs, ft = _randn(3, 4, 3, 3, seed=3), _randn(3, 6, 3, 3, seed=4)
    assert at_loss(fs, ft, p).item() == pytest.approx(_naive_at(fs, ft, p), rel=1e-10)
    assert torch.tensor(_naive_attention(fs, p), dtype=D).allclose(attention_map(fs, p))


def test_at_loss_pools_the_larger_map() -> None:
    fs, ft = _randn(2, 3, 8, 8, seed=5), _randn(2, 5, 4, 4, seed=6)
    expected = _naive_at(_block_mean(fs, 2), ft)
    assert at_loss(fs, ft).item() == pytest.approx(expected, rel=1e-10)
    # either side may be the larger one
    assert at_loss(ft, fs).item() == pytest.approx(_naive_at(ft, _block_mean(fs, 2)), rel=1e-10)
    ps, pt = pool_to_common_size(_randn(2, 3, 8, 4), _randn(2, 3, 4, 8))
    assert ps.shape[2:] == pt.shape[2:] == (4, 4)


def test_at_loss_zero_grad_errors() -> None:
    f = _randn(2, 3, 4, 4, seed=7)
    assert at_loss(f, f).item() == 0
    # attention ignores the channel count and a positive scale
    assert at_loss(torch.cat([f, f], 1), 3 * f).item() == pytest.approx(0, abs=1e-15)
    _grad_reaches(at_loss, f, _randn(2, 8, 2, 2, seed=8))
    with pytest.raises(ValueError, match="batch sizes"):
        at_loss(f, f[:1])
    with pytest.raises(ValueError, match="b×c×h×w"):
        at_loss(f.flatten(1), f.flatten(1))


# ---------------------------------------------------------------------------- similarity preserving


def _naive_sp(fs: torch.Tensor, ft: torch.Tensor) -> float:
    b = fs.shape[0]

    def gram(f: torch.Tensor) -> list[list[float]]:
        rows = [_vec(f[i]) for i in range(b)]
        return [_unit([_dot(rows[i], rows[j]) for j in range(b)]) for i in range(b)]

    gs, gt = gram(fs), gram(ft)
    return sum((gs[i][j] - gt[i][j]) ** 2 for i in range(b) for j in range(b)) / b**2


def test_sp_loss_by_hand() -> None:
    # student rows e1, e2: G = I; teacher rows e1, e1: G rows (1,1)/√2 -> ‖·‖² = 2(2 − √2), / b²
    fs = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=D)
    ft = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=D)
    assert sp_loss(fs, ft).item() == pytest.approx(2 * (2 - math.sqrt(2)) / 4)


def test_sp_loss_loops_zero_grad_shapes() -> None:
    fs, ft = _randn(5, 3, 2, 2, seed=9), _randn(5, 7, seed=10)
    assert sp_loss(fs, ft).item() == pytest.approx(_naive_sp(fs, ft), rel=1e-10)
    assert sp_loss(fs, fs).item() == 0
    _grad_reaches(sp_loss, fs, ft)
    with pytest.raises(ValueError, match="batch sizes"):
        sp_loss(fs, ft[:4])


# ----------------------------------------------------------------------------- RKD


def _naive_rkd_distance(es: torch.Tensor, et: torch.Tensor, reduction: str) -> float:
    """Python floats; ``reference`` sums over the b² ordered pairs (diagonal 0), divides by b²."""
    b = es.shape[0]

    def normalised(e: torch.Tensor) -> dict[tuple[int, int], float]:
        rows = [_vec(e[i]) for i in range(b)]
        d = {(i, j): math.dist(rows[i], rows[j]) for i in range(b) for j in range(b) if i != j}
        # the reference's pdist clamps squared distances at 1e-12, so every off-diagonal entry is
        # positive and counts in the mean (coincident rows too); distinct leaves those out
        counted = list(d.values()) if reduction == "reference" else [v for v in d.values() if v > 0]
        mu = sum(counted) / len(counted)
        return {key: v / mu for key, v in d.items()}

    ds, dt = normalised(es), normalised(et)
    total = sum(_huber(ds[key] - dt[key]) for key in ds)
    return total / (b * b if reduction == "reference" else len(ds))


def _naive_rkd_angle(es: torch.Tensor, et: torch.Tensor, reduction: str) -> float:
    """Python floats; ``reference`` divides the distinct triplets' sum by b³ (the degenerate
    triplets of distinct rows agree exactly: 0 with a zero edge, 1 for i = k)."""
    b = es.shape[0]

    def cosines(e: torch.Tensor) -> dict[tuple[int, int, int], float]:
        rows = [_vec(e[i]) for i in range(b)]
        out = {}
        for i in range(b):
            for j in range(b):
                for k in range(b):
                    if len({i, j, k}) == 3:
                        u = _unit([x - y for x, y in zip(rows[i], rows[j], strict=True)])
                        v = _unit([x - y for x, y in zip(rows[k], rows[j], strict=True)])
                        out[i, j, k] = _dot(u, v)
        return out

    cs, ct = cosines(es), cosines(et)
    total = sum(_huber(cs[key] - ct[key]) for key in cs)
    return total / (b**3 if reduction == "reference" else len(cs))


def _torch_huber(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x.abs() < 1, 0.5 * x * x, x.abs() - 0.5)


def _reference_rkd(es: torch.Tensor, et: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RepDistiller's RKD terms, written from its formula with loops (differentiable).

    Distances: the b×b matrix with a zero diagonal, each divided by the mean of its positive
    entries, smooth-L1 averaged over all b² entries. Angles: cos at vertex j of (e_i − e_j,
    e_k − e_j) for all b³ index triplets, 0 where an edge is zero, smooth-L1 averaged over b³.
    """
    b = es.shape[0]
    zero = es.new_zeros(())

    def distances(e: torch.Tensor) -> list[list[torch.Tensor]]:
        e = e.flatten(1)
        d = [
            [zero if i == j else (e[i] - e[j]).pow(2).sum().sqrt() for j in range(b)]
            for i in range(b)
        ]
        positive = [d[i][j] for i in range(b) for j in range(b) if i != j]
        mu = sum(positive) / len(positive)
        return [[v / mu for v in row] for row in d]

    def cosines(e: torch.Tensor) -> dict[tuple[int, int, int], torch.Tensor]:
        e = e.flatten(1)
        out = {}
        for j in range(b):
            for i in range(b):
                for k in range(b):
                    if i == j or k == j:
                        out[i, j, k] = zero
                    else:
                        u, v = e[i] - e[j], e[k] - e[j]
                        out[i, j, k] = (u * v).sum() / (u.norm() * v.norm())
        return out

    ds, dt = distances(es), distances(et)
    dist = sum(_torch_huber(ds[i][j] - dt[i][j]) for i in range(b) for j in range(b)) / b**2
    cs, ct = cosines(es), cosines(et)
    angle = sum(_torch_huber(cs[key] - ct[key]) for key in cs) / b**3
    return dist, angle  # type: ignore[return-value]


def test_rkd_by_hand_and_the_reduction_ratio_at_b3() -> None:
    # student: right isosceles triangle; teacher: equilateral triangle (all distances 1)
    es = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=D)
    et = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.5, math.sqrt(3) / 2]], dtype=D)
    # student distances 1, 1, √2 (mean (2+√2)/3); teacher all 1 after normalisation. Each
    # unordered pair appears twice among the 6 off-diagonal entries of the 3×3 matrix.
    mu = (2 + math.sqrt(2)) / 3
    pairs = sum(_huber(x) for x in [1 / mu - 1, 1 / mu - 1, math.sqrt(2) / mu - 1])
    assert rkd_distance_loss(es, et).item() == pytest.approx(2 * pairs / 9, rel=1e-12)
    assert rkd_distance_loss(es, et, "distinct").item() == pytest.approx(2 * pairs / 6, rel=1e-12)
    # student angles 90°, 45°, 45° against 60° each; each vertex appears in two ordered triplets
    # of the 6 distinct ones; the other 21 of the 27 triplets agree exactly
    vertices = sum(_huber(x) for x in [0 - 0.5, math.sqrt(0.5) - 0.5, math.sqrt(0.5) - 0.5])
    assert rkd_angle_loss(es, et).item() == pytest.approx(2 * vertices / 27, rel=1e-12)
    assert rkd_angle_loss(es, et, "distinct").item() == pytest.approx(2 * vertices / 6, rel=1e-12)
    # the ratios at b = 3: distinct is 1.5× (distances) and 4.5× (angles) the reference
    ratio_d = rkd_distance_loss(es, et, "distinct") / rkd_distance_loss(es, et)
    ratio_a = rkd_angle_loss(es, et, "distinct") / rkd_angle_loss(es, et)
    assert (ratio_d.item(), ratio_a.item()) == (pytest.approx(1.5), pytest.approx(4.5))


@pytest.mark.parametrize("b", [3, 6])
def test_rkd_matches_the_reference_value_and_gradient(b: int) -> None:
    es, et = 2 * _randn(b, 4, seed=11), _randn(b, 9, seed=12)
    es.requires_grad_(True)
    ref_dist, ref_angle = _reference_rkd(es, et)
    for got, ref in ((rkd_distance_loss(es, et), ref_dist), (rkd_angle_loss(es, et), ref_angle)):
        assert got.item() == pytest.approx(ref.item(), rel=1e-10)
        (grad,) = torch.autograd.grad(got, es)
        (ref_grad,) = torch.autograd.grad(ref, es, retain_graph=True)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("reduction", ["reference", "distinct"])
def test_rkd_matches_loops(reduction: str) -> None:
    es, et = 2 * _randn(6, 4, seed=11), _randn(6, 9, seed=12)
    got_d, got_a = rkd_distance_loss(es, et, reduction), rkd_angle_loss(es, et, reduction)
    assert got_d.item() == pytest.approx(_naive_rkd_distance(es, et, reduction), rel=1e-9)
    assert got_a.item() == pytest.approx(_naive_rkd_angle(es, et, reduction), rel=1e-10)
    # feature maps are flattened
    fs = es.view(6, 1, 2, 2)
    assert rkd_angle_loss(fs, et, reduction).item() == pytest.approx(got_a.item())


@pytest.mark.parametrize("reduction", ["reference", "distinct"])
def test_rkd_zero_and_invariances(reduction: str) -> None:
    e = _randn(5, 3, seed=13)
    assert rkd_distance_loss(e, e, reduction).item() == 0
    assert rkd_angle_loss(e, e, reduction).item() == 0
    # both are invariant to scaling and translation of one side
    assert rkd_distance_loss(3 * e + 1, e, reduction).item() == pytest.approx(0, abs=1e-12)
    assert rkd_angle_loss(3 * e + 1, e, reduction).item() == pytest.approx(0, abs=1e-12)


@pytest.mark.parametrize("reduction", ["reference", "distinct"])
def test_rkd_gradients_even_with_duplicate_rows(reduction: str) -> None:
    es, et = _randn(5, 3, seed=14), _randn(5, 3, seed=15)
    dist = lambda s, t: rkd_distance_loss(s, t, reduction)  # noqa: E731
    angle = lambda s, t: rkd_angle_loss(s, t, reduction)  # noqa: E731
    _grad_reaches(dist, es, et)
    _grad_reaches(angle, es, et)
    dup = es.clone()
    dup[1] = dup[0]
    _grad_reaches(dist, dup, et)
    _grad_reaches(angle, dup, et)
    assert dist(dup, et).item() == pytest.approx(_naive_rkd_distance(dup, et, reduction), rel=1e-6)
    with pytest.raises(ValueError, match="batch sizes"):
        angle(es[:2], et[:2])
    with pytest.raises(ValueError, match="reduction"):
        rkd_distance_loss(es, et, "sum")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- PKT


def _naive_pkt_distinct(es: torch.Tensor, et: torch.Tensor, eps: float = 1e-7) -> float:
    """The paper's form without self-pairs, in Python floats."""
    b = es.shape[0]

    def probs(e: torch.Tensor) -> list[list[float]]:
        rows = [_unit(_vec(e[i])) for i in range(b)]
        k = [
            [(_dot(rows[i], rows[j]) + 1) / 2 if i != j else 0.0 for j in range(b)]
            for i in range(b)
        ]
        return [[v / sum(row) for v in row] for row in k]

    ps, pt = probs(es), probs(et)
    total = 0.0
    for i in range(b):
        for j in range(b):
            if i != j:
                total += pt[i][j] * math.log((pt[i][j] + eps) / (ps[i][j] + eps))
    return total / b**2


def _reference_pkt(es: torch.Tensor, et: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """RepDistiller's PKT, written from its formula with loops (differentiable): rows scaled by
    1/(‖e‖ + ε), K = (cos + 1)/2 with the self-pairs, P = K / row sum, and the mean over the b×b
    entries of P_t log((P_t + ε)/(P_s + ε))."""
    b = es.shape[0]

    def probs(e: torch.Tensor) -> list[list[torch.Tensor]]:
        e = e.flatten(1)
        z = [e[i] / (e[i].pow(2).sum().sqrt() + eps) for i in range(b)]
        k = [[((z[i] * z[j]).sum() + 1) / 2 for j in range(b)] for i in range(b)]
        return [[v / sum(row) for v in row] for row in k]

    ps, pt = probs(es), probs(et)
    terms = [
        pt[i][j] * torch.log((pt[i][j] + eps) / (ps[i][j] + eps))
        for i in range(b)
        for j in range(b)
    ]
    return sum(terms) / b**2  # type: ignore[return-value]


def test_pkt_by_hand_b2_is_not_zero() -> None:
    # student rows e1, e2; teacher rows e1, e1. Rows are scaled by 1/(1 + ε), so the kernel is
    # K = (r·cos + 1)/2 with r = 1/(1 + ε)²: student [[a, ½], [½, a]], teacher all a, a = (r + 1)/2
    e = 1e-7
    a = (1 / (1 + e) ** 2 + 1) / 2
    es = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=D)
    et = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=D)
    row = 0.5 * math.log((0.5 + e) / (a / (a + 0.5) + e))
    row += 0.5 * math.log((0.5 + e) / (0.5 / (a + 0.5) + e))
    assert pkt_loss(es, et).item() == pytest.approx(2 * row / 4, rel=1e-9)
    assert pkt_loss(es, et).item() > 0.01
    # without self-pairs, each row's only other sample has probability 1 for both nets
    es, et = _randn(2, 3, seed=16), _randn(2, 5, seed=17)
    assert pkt_loss(es, et, "distinct").item() == pytest.approx(0, abs=1e-15)


def test_pkt_by_hand_b3() -> None:
    e = 1e-7
    r = 1 / (1 + e) ** 2
    # teacher rows e1, e1, e2; student rows e1, e2, −e1; K = (r·cos + 1)/2 with self-pairs
    et = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=D)
    es = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], dtype=D)
    cos_t = [[1, 1, 0], [1, 1, 0], [0, 0, 1]]
    cos_s = [[1, 0, -1], [0, 1, 0], [-1, 0, 1]]

    def probs(cos: list[list[int]]) -> list[list[float]]:
        k = [[(r * c + 1) / 2 for c in row] for row in cos]
        return [[v / sum(row) for v in row] for row in k]

    pt, ps = probs(cos_t), probs(cos_s)
    by_hand = sum(
        pt[i][j] * math.log((pt[i][j] + e) / (ps[i][j] + e)) for i in range(3) for j in range(3)
    )
    assert pkt_loss(es, et).item() == pytest.approx(by_hand / 9, rel=1e-9)
    # the distinct form on the same rows: P_t rows (⅔, ⅓), (⅔, ⅓), (½, ½) over the other two
    # samples in index order, P_s rows (1, 0), (½, ½), (0, 1)
    distinct = (
        2 / 3 * math.log((2 / 3 + e) / (1 + e))
        + 1 / 3 * math.log((1 / 3 + e) / e)
        + 2 / 3 * math.log((2 / 3 + e) / (1 / 2 + e))
        + 1 / 3 * math.log((1 / 3 + e) / (1 / 2 + e))
        + 1 / 2 * math.log((1 / 2 + e) / e)
        + 1 / 2 * math.log((1 / 2 + e) / (1 + e))
    ) / 9
    assert pkt_loss(es, et, "distinct").item() == pytest.approx(distinct, rel=1e-9)


@pytest.mark.parametrize("b", [2, 3, 7])
def test_pkt_matches_the_reference_value_and_gradient(b: int) -> None:
    es, et = _randn(b, 4, 2, seed=18), _randn(b, 10, seed=19)
    es.requires_grad_(True)
    got, ref = pkt_loss(es, et), _reference_pkt(es, et)
    assert got.item() == pytest.approx(ref.item(), rel=1e-10)
    (grad,) = torch.autograd.grad(got, es)
    (ref_grad,) = torch.autograd.grad(ref, es)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("reduction", ["reference", "distinct"])
def test_pkt_degenerate_row_is_finite(reduction: str) -> None:
    # both other samples antipodal to sample 2: its kernel row is zero but for the self-pair
    et = torch.tensor([[1.0, 0.0], [1.0, 0.0], [-1.0, 0.0]], dtype=D)
    assert torch.isfinite(pkt_loss(_randn(3, 2, seed=32), et, reduction))


def test_pkt_distinct_matches_loops_zero_grad() -> None:
    es, et = _randn(6, 4, 2, seed=18), _randn(6, 10, seed=19)
    got = pkt_loss(es, et, "distinct")
    assert got.item() == pytest.approx(_naive_pkt_distinct(es, et), rel=1e-10)
    for reduction in ("reference", "distinct"):
        assert pkt_loss(et, et, reduction).item() == 0
        _grad_reaches(lambda s, t, r=reduction: pkt_loss(s, t, r), es, et)
    with pytest.raises(ValueError, match="batch sizes"):
        pkt_loss(es, et[:5])
    with pytest.raises(ValueError, match="reduction"):
        pkt_loss(es, et, "mean")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- NST


def _naive_nst(fs: torch.Tensor, ft: torch.Tensor) -> float:
    b = fs.shape[0]
    total = 0.0
    for n in range(b):
        s = [_unit(_vec(fs[n, c])) for c in range(fs.shape[1])]
        t = [_unit(_vec(ft[n, c])) for c in range(ft.shape[1])]

        def mean_k(xs: list[list[float]], ys: list[list[float]]) -> float:
            return sum(_dot(x, y) ** 2 for x in xs for y in ys) / (len(xs) * len(ys))

        total += mean_k(t, t) + mean_k(s, s) - 2 * mean_k(s, t)
    return total / b


def test_nst_by_hand() -> None:
    # one sample; student channels e1, e2 over two positions, teacher one channel e1
    fs = torch.tensor([[[[1.0, 0.0]], [[0.0, 2.0]]]], dtype=D)
    ft = torch.tensor([[[[3.0, 0.0]]]], dtype=D)
    # k(t,t) = 1; mean k(s,s) = (1+0+0+1)/4 = ½; mean k(s,t) = (1+0)/2 = ½ -> 1 + ½ − 1
    assert nst_loss(fs, ft).item() == pytest.approx(0.5)


def test_nst_matches_loops_pools_zero_grad() -> None:
    fs, ft = _randn(3, 4, 4, 4, seed=20), _randn(3, 6, 4, 4, seed=21)
    assert nst_loss(fs, ft).item() == pytest.approx(_naive_nst(fs, ft), rel=1e-10)
    big = _randn(3, 4, 8, 8, seed=22)
    assert nst_loss(big, ft).item() == pytest.approx(_naive_nst(_block_mean(big, 2), ft), rel=1e-10)
    assert nst_loss(fs, fs).item() == pytest.approx(0, abs=1e-14)
    _grad_reaches(nst_loss, fs, ft)


# ----------------------------------------------------------------------------- DKD


def _softmax(z: list[float]) -> list[float]:
    m = max(z)
    e = [math.exp(v - m) for v in z]
    return [v / sum(e) for v in e]


def _kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True))


def _naive_dkd(zs: torch.Tensor, zt: torch.Tensor, y: torch.Tensor, T: float) -> tuple:
    tckd = nckd = 0.0
    for n in range(len(y)):
        s, t, c = [v / T for v in _vec(zs[n])], [v / T for v in _vec(zt[n])], int(y[n])
        ps, pt = _softmax(s), _softmax(t)
        tckd += _kl([pt[c], 1 - pt[c]], [ps[c], 1 - ps[c]])
        nckd += _kl(_softmax(t[:c] + t[c + 1 :]), _softmax(s[:c] + s[c + 1 :]))
    return tckd / len(y) * T**2, nckd / len(y) * T**2


def test_dkd_matches_loops_and_weights() -> None:
    zs, zt = 3 * _randn(5, 7, seed=23), 3 * _randn(5, 7, seed=24)
    y = torch.tensor([0, 6, 3, 3, 1])
    tckd, nckd = dkd_loss(zs, zt, y, alpha=1.0, beta=1.0, T=2.0)
    ref_t, ref_n = _naive_dkd(zs, zt, y, 2.0)
    assert tckd.item() == pytest.approx(ref_t, rel=1e-10)
    assert nckd.item() == pytest.approx(ref_n, rel=1e-10)
    tckd8, nckd8 = dkd_loss(zs, zt, y, alpha=0.5, beta=8.0, T=2.0)
    assert tckd8.item() == pytest.approx(0.5 * ref_t, rel=1e-10)
    assert nckd8.item() == pytest.approx(8 * ref_n, rel=1e-10)


def test_dkd_reformulates_kd_per_sample() -> None:
    # the paper's identity: KL(p_t ‖ p_s) = TCKD + (1 − p_t,target) · NCKD, for one sample
    zs, zt = _randn(1, 6, seed=25), _randn(1, 6, seed=26)
    y = torch.tensor([2])
    tckd, nckd = dkd_loss(zs, zt, y, alpha=1.0, beta=1.0, T=1.0)
    pt = _softmax(_vec(zt))
    kd = _kl(pt, _softmax(_vec(zs)))
    assert (tckd + (1 - pt[2]) * nckd).item() == pytest.approx(kd, rel=1e-10)


def test_dkd_by_hand_two_classes_and_zero() -> None:
    # two classes: NCKD has one class left, so it is 0; TCKD is the plain binary KL, × T²
    zs = torch.tensor([[0.0, 0.0]], dtype=D)
    zt = torch.tensor([[math.log(3.0), 0.0]], dtype=D)  # teacher p = (¾, ¼)
    tckd, nckd = dkd_loss(zs, zt, torch.tensor([0]), T=1.0)
    assert nckd.item() == 0
    assert tckd.item() == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5))
    z = _randn(4, 5, seed=27)
    assert all(v.item() == pytest.approx(0, abs=1e-14) for v in dkd_loss(z, z, z.argmax(1)))


def test_dkd_large_logits_grad_and_errors() -> None:
    zs, zt = _randn(4, 5, seed=28), _randn(4, 5, seed=29)
    y = torch.tensor([1, 0, 4, 2])
    # float32 logits far apart: p_target rounds to 1 or 0, the terms stay finite
    assert all(torch.isfinite(v) for v in dkd_loss(300 * zs.float(), 200 * zt.float(), y))
    _grad_reaches(lambda s, t: sum(dkd_loss(s, t, y)), zs, zt)
    with pytest.raises(ValueError, match="do not match"):
        dkd_loss(zs, zt, y[:3])


# ----------------------------------------------------------------------------- CRD


def test_nce_contrast_loss_by_hand() -> None:
    pos = torch.tensor([1.0, 0.5], dtype=D)
    neg = torch.tensor([[1.0, 3.0], [0.0, 0.5]], dtype=D)
    m = 2 / 4  # K / N
    row0 = math.log(1 / (1 + m)) + math.log(m / (1 + m)) + math.log(m / (3 + m))
    row1 = math.log(0.5 / (0.5 + m)) + math.log(m / (0 + m)) + math.log(m / (0.5 + m))
    got = nce_contrast_loss(pos, neg, n_samples=4, eps=0.0).item()
    assert got == pytest.approx(-(row0 + row1) / 2, rel=1e-12)


def _reference_crd(memory: ContrastiveMemory, s, t, rows, neg, positive: str, eps: float = 1e-7):
    """One forward of CRD with loops (differentiable in ``s`` and ``t``), read from RepDistiller's
    formulas; the memory is read before the update, ``eps`` guards the NCE denominators.

    ``memory``: a student anchor s_i meets the teacher-memory rows [rows_i, neg_i…] (the first
    is its positive), a teacher anchor t_i the student-memory rows; ``current``: the positive of
    both is exp(s_iᵀt_i/τ). Z = N × the mean of the first batch's b(K+1) scores, a constant, per
    direction; each direction's NCE is
    −Σ_i[log(h⁺/(h⁺ + K/N + ε)) + Σ_k log((K/N)/(h⁻ + K/N + ε))]/b.
    """
    n, k, tau = memory.n_samples, neg.shape[1], memory.tau
    mem_s, mem_t = memory.memory_s.clone(), memory.memory_t.clone()
    b = len(rows)

    def score(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.exp((u * v).sum() / tau)

    total = s.new_zeros(())
    for anchors, others, bank in ((s, t, mem_t), (t, s, mem_s)):
        scores = []
        for i in range(b):
            pos = score(anchors[i], bank[int(rows[i])] if positive == "memory" else others[i])
            scores.append([pos] + [score(anchors[i], bank[int(j)]) for j in neg[i]])
        z = n * sum(float(v.detach()) for row in scores for v in row) / (b * (k + 1))
        m = k / n
        for row in scores:
            h = [v / z for v in row]
            term = torch.log(h[0] / (h[0] + m + eps))
            term = term + sum(torch.log(m / (v + m + eps)) for v in h[1:])
            total = total - term / b
    return total


@pytest.mark.parametrize("positive", ["memory", "current"])
def test_contrastive_memory_matches_the_reference_and_updates(positive: str) -> None:
    torch.manual_seed(0)
    memory = ContrastiveMemory(10, dim=4, k=3, tau=0.5, momentum=0.5, positive=positive).double()
    s = torch.nn.functional.normalize(_randn(3, 4, seed=30), dim=1).requires_grad_(True)
    t = torch.nn.functional.normalize(_randn(3, 4, seed=31), dim=1).requires_grad_(True)
    rows = torch.tensor([7, 0, 4])
    neg = torch.tensor([[0, 1, 1], [9, 8, 2], [5, 0, 3]])
    memory.sample_negatives = lambda rows: neg  # type: ignore[method-assign]
    expected = _reference_crd(memory, s, t, rows, neg, positive)
    old_s, old_t = memory.memory_s.clone(), memory.memory_t.clone()
    loss = memory(s, t, rows)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-9, abs=1e-12)
    grads = torch.autograd.grad(loss, [s, t])
    ref_grads = torch.autograd.grad(expected, [s, t])
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        assert grad.abs().sum() > 0
        torch.testing.assert_close(grad, ref_grad, rtol=1e-6, atol=1e-12)
    # rows written: normalise(½ old + ½ new); other rows untouched
    for i, r in enumerate(rows.tolist()):
        mixed = [
            0.5 * a + 0.5 * b for a, b in zip(_vec(old_s[r]), _vec(s[i].detach()), strict=True)
        ]
        torch.testing.assert_close(memory.memory_s[r], torch.tensor(_unit(mixed), dtype=D))
        mixed = [
            0.5 * a + 0.5 * b for a, b in zip(_vec(old_t[r]), _vec(t[i].detach()), strict=True)
        ]
        torch.testing.assert_close(memory.memory_t[r], torch.tensor(_unit(mixed), dtype=D))
    untouched = [r for r in range(10) if r not in rows.tolist()]
    torch.testing.assert_close(memory.memory_s[untouched], old_s[untouched])
    # Z is estimated once: a second call keeps it
    z_s, z_t = memory.z_s.item(), memory.z_t.item()
    assert z_s > 0 and z_t > 0
    memory(s.detach(), t.detach(), rows)
    assert (memory.z_s.item(), memory.z_t.item()) == (z_s, z_t)


def test_the_memory_positive_is_the_other_networks_row() -> None:
    # a by-hand case: K = 1, one anchor. With the positive from memory, the student's score
    # depends on the teacher-memory row of its own sample, not on the teacher's embedding.
    memory = ContrastiveMemory(4, dim=2, k=1, tau=1.0, momentum=0.5).double()
    memory.memory_t.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]]))
    memory.memory_s.copy_(memory.memory_t)
    memory.sample_negatives = lambda rows: torch.tensor([[2]])  # type: ignore[method-assign]
    s = torch.tensor([[1.0, 0.0]], dtype=D)
    t = torch.tensor([[0.0, 1.0]], dtype=D)
    # student anchor: positive exp(s·m_t[0]) = e, negative exp(s·m_t[2]) = 1/e;
    # teacher anchor: positive exp(t·m_s[0]) = 1, negative exp(t·m_s[2]) = 1
    z_s, z_t = 4 * (math.e + 1 / math.e) / 2, 4 * 1.0
    m = 1 / 4

    def nce(pos: float, neg: float, z: float) -> float:
        hp, hn = pos / z, neg / z
        return -(math.log(hp / (hp + m + 1e-7)) + math.log(m / (hn + m + 1e-7)))

    expected = nce(math.e, 1 / math.e, z_s) + nce(1.0, 1.0, z_t)
    assert memory(s, t, torch.tensor([0])).item() == pytest.approx(expected, rel=1e-12)


def test_negatives_uniform_without_the_anchor_and_seeded() -> None:
    make = lambda: ContrastiveMemory(  # noqa: E731
        5, dim=2, k=4000, generator=torch.Generator().manual_seed(3)
    )
    memory = make()
    rows = torch.tensor([0, 2, 4])
    neg = memory.sample_negatives(rows)
    assert neg.shape == (3, 4000)
    assert (neg != rows[:, None]).all() and neg.min() >= 0 and neg.max() < 5
    counts = torch.stack([torch.bincount(r, minlength=5) for r in neg]).double()
    others = counts[counts > 0]
    assert len(others) == 12 and (others - 1000).abs().max() < 150  # ≈ K/(N−1) each
    torch.testing.assert_close(make().sample_negatives(rows), make().sample_negatives(rows))
    torch.testing.assert_close(make().memory_s, make().memory_s)


def test_negatives_from_other_classes() -> None:
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
    make = lambda k: ContrastiveMemory(  # noqa: E731
        10, dim=2, k=k, labels=labels, generator=torch.Generator().manual_seed(4)
    )
    rows = torch.tensor([0, 4, 9, 5])
    # K = 6 ≤ every class's number of negatives (6, 7, 7): drawn without replacement
    neg = make(6).sample_negatives(rows)
    assert neg.shape == (4, 6)
    assert (labels[neg] != labels[rows][:, None]).all()
    assert all(len(set(row)) == 6 for row in neg.tolist())
    assert set(neg[0].tolist()) == set(range(4, 10))  # class 0's six negatives, each once
    torch.testing.assert_close(make(6).sample_negatives(rows), neg)
    # K = 7 > the six negatives of class 0: that row draws with replacement, the others do not
    neg = make(7).sample_negatives(rows)
    assert (labels[neg] != labels[rows][:, None]).all()
    assert len(set(neg[0].tolist())) <= 6 and all(len(set(r)) == 7 for r in neg[1:].tolist())
    # many draws: uniform over the other classes' samples
    big = make(7000).sample_negatives(torch.tensor([0]))[0]
    counts = torch.bincount(big, minlength=10).double()
    assert (counts[:4] == 0).all() and (counts[4:] - 7000 / 6).abs().max() < 150


def test_contrastive_memory_errors_and_state() -> None:
    memory = ContrastiveMemory(6, dim=3, k=2, generator=torch.Generator().manual_seed(0))
    # the banks start uniform in ±√(3/dim), as the reference's
    bound = math.sqrt(3 / 3)
    assert memory.memory_s.abs().max() <= bound and memory.memory_s.abs().max() > bound / 2
    e = torch.nn.functional.normalize(torch.randn(2, 3), dim=1)
    with pytest.raises(ValueError, match=r"\[0, 6\)"):
        memory(e, e, torch.tensor([0, 6]))
    with pytest.raises(ValueError, match="do not match"):
        memory(e, e, torch.tensor([0]))
    with pytest.raises(ValueError, match="two classes"):
        ContrastiveMemory(6, dim=3, k=2, labels=torch.zeros(6, dtype=torch.long))
    with pytest.raises(ValueError, match="positive"):
        ContrastiveMemory(6, dim=3, k=2, positive="teacher")
    assert set(memory.state_dict()) == {"memory_s", "memory_t", "z_s", "z_t"}
    memory(e, e, torch.tensor([1, 2]))
    fresh = ContrastiveMemory(6, dim=3, k=2)
    fresh.load_state_dict(memory.state_dict())
    assert fresh.z_s.item() == memory.z_s.item() > 0


def test_embed_head_unit_rows() -> None:
    head = Embed(12, dim=5)
    out = head(torch.randn(4, 3, 2, 2))
    assert out.shape == (4, 5)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(4))


# ----------------------------------------------------------------------------- method classes


class _TinyNet(nn.Module):
    """A three-stage CNN with the module names of the CIFAR ResNets (``stages.0`` ... ``fc``)."""

    def __init__(self, widths: tuple[int, int, int, int], strides=(1, 2, 2), classes: int = 5):
        super().__init__()
        self.stem = nn.Conv2d(3, widths[0], 3, padding=1)
        self.stages = nn.Sequential(
            *(
                nn.Sequential(nn.Conv2d(cin, cout, 3, stride, padding=1), nn.ReLU())
                for cin, cout, stride in zip(widths[:-1], widths[1:], strides, strict=True)
            )
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[-1], classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.stages(self.stem(x))).flatten(1))

    def embedding(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.stages(self.stem(x))).flatten(1)


def _data(n: int = 24, batch: int = 8) -> Data:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 5, (n,), generator=g)
    val = TensorLoader(x[:8], y[:8], 8)
    return Data(TensorLoader(x, y, batch, shuffle=True, seed=0), val, val, 5, (3, 8, 8))


def _nets() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    # the teacher halves the resolution one stage earlier: its maps are 4, 2, 1 against 8, 4, 2
    return _TinyNet((4, 4, 6, 8)), _TinyNet((6, 8, 12, 16), strides=(2, 2, 2))


def _build(cls: type, layers: list[str] | None = None, **kwargs) -> tuple:
    """Construct and prepare ``cls`` on the tiny pair; returns (method, student, teacher)."""
    student, teacher = _nets()
    if layers is not None:
        kwargs |= {"student_layers": layers, "teacher_layers": layers}
    method = cls(data=_data(), criterion=nn.CrossEntropyLoss(), teacher=teacher, **kwargs)
    return method, method.prepare(student), teacher


def _step(method, student) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """One training step's loss terms (backpropagated) and the batch's sample indices."""
    method.train()
    student.train()
    x, y, rows = next(method.data.train.indexed())
    terms = method.loss(x, y, student(x), Step(0, 0, rows=rows))
    sum(terms.values()).backward()
    return terms, x, rows


STAGES = ["stages.0", "stages.1", "stages.2"]
CASES = [
    (FitNet, ["stages.1"], {"ce", "feat"}),
    (FitNet, ["penultimate"], {"ce", "feat"}),
    (AT, STAGES, {"ce", "at"}),
    (SP, ["stages.2"], {"ce", "sp"}),
    (RKD, ["penultimate"], {"ce", "rkd_dist", "rkd_angle"}),
    (PKT, ["penultimate"], {"ce", "pkt"}),
    (NST, STAGES, {"ce", "nst"}),
    (DKD, None, {"ce", "dkd_tckd", "dkd_nckd"}),
    (CRD, ["penultimate"], {"ce", "crd"}),
]


@pytest.mark.parametrize(("cls", "layers", "names"), CASES, ids=[c[0].__name__ for c in CASES])
def test_method_terms_and_gradients(cls: type, layers, names: set[str]) -> None:
    method, student, teacher = _build(cls, layers)
    terms, _, _ = _step(method, student)
    assert set(terms) == names
    assert all(torch.isfinite(v) and v.dim() == 0 for v in terms.values())
    assert all(v.item() > 0 for v in terms.values())
    assert all(p.grad is None for p in teacher.parameters())
    assert all(not p.requires_grad for p in teacher.parameters())
    assert student.stem.weight.grad is not None and student.stem.weight.grad.abs().sum() > 0
    # the method's own trainable parameters are its connectors, and all of them are trained
    trainable = [p for p in method.parameters() if p.requires_grad]
    if cls in (FitNet, CRD):
        assert trainable and all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
    else:
        assert not trainable


def test_kd_term_added_on_request() -> None:
    method, student, _ = _build(SP, ["penultimate"], kd_weight=0.5)
    assert set(_step(method, student)[0]) == {"ce", "kd", "sp"}


def test_pkt_term_uses_the_tapped_embeddings() -> None:
    method, student, teacher = _build(PKT, ["penultimate"], beta=2.0, cache_teacher=False)
    terms, x, _ = _step(method, student)
    with torch.no_grad():
        expected = 2.0 * pkt_loss(student.embedding(x), teacher.embedding(x))
    assert terms["pkt"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_fitnet_regressor_shapes() -> None:
    # stages.1: student 6×4×4, teacher 12×2×2, so the reference regressor is a strided 3×3 conv
    method, _, _ = _build(FitNet, ["stages.1", "penultimate"])
    conv, linear = method.regressors
    assert [type(m) for m in conv] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU]
    assert (conv[0].in_channels, conv[0].out_channels) == (6, 12)
    assert (conv[0].kernel_size, conv[0].stride) == ((3, 3), (2, 2))
    assert isinstance(linear, nn.Linear) and (linear.in_features, linear.out_features) == (8, 16)
    method, _, _ = _build(FitNet, ["stages.1"], regressor="pool")
    (conv,) = method.regressors
    assert [type(m) for m in conv] == [nn.Conv2d, nn.BatchNorm2d]
    assert conv[0].kernel_size == (1, 1)


OPTIONS = [
    (FitNet, ["stages.1"], {"regressor": "pool"}),
    (RKD, ["penultimate"], {"reduction": "distinct"}),
    (PKT, ["penultimate"], {"reduction": "distinct"}),
    (CRD, ["penultimate"], {"positive": "current"}),
    (CRD, ["penultimate"], {"negatives": "uniform"}),
]


@pytest.mark.parametrize(("cls", "layers", "options"), OPTIONS, ids=lambda v: str(v))
def test_method_options_train(cls: type, layers, options: dict) -> None:
    method, student, _ = _build(cls, layers, **options)
    terms, _, _ = _step(method, student)
    assert all(torch.isfinite(v) and v.item() > 0 for v in terms.values())
    assert student.stem.weight.grad is not None and student.stem.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("reduction", ["reference", "distinct"])
def test_rkd_terms_use_the_chosen_reduction(reduction: str) -> None:
    method, student, teacher = _build(
        RKD, ["penultimate"], reduction=reduction, cache_teacher=False
    )
    terms, x, _ = _step(method, student)
    with torch.no_grad():
        es, et = student.embedding(x), teacher.embedding(x)
        dist, angle = rkd_distance_loss(es, et, reduction), rkd_angle_loss(es, et, reduction)
    assert terms["rkd_dist"].item() == pytest.approx(25 * dist.item(), rel=1e-5)
    assert terms["rkd_angle"].item() == pytest.approx(50 * angle.item(), rel=1e-5)


def test_dkd_warmup_follows_the_step_context() -> None:
    """w(e) = min((e + 1)/warmup, 1) with e the context's epoch: nothing counted on the side."""
    method, student, _ = _build(DKD, None, warmup=20)
    x, y = next(iter(method.data.train))
    with torch.no_grad():
        logits = student(x)
        early = method.loss(x, y, logits, Step(epoch=0, step=0))
        middle = method.loss(x, y, logits, Step(epoch=9, step=90))
        late = method.loss(x, y, logits, Step(epoch=40, step=400))
        again = method.loss(x, y, logits, Step(epoch=0, step=0))  # no state moved on
    for name in ("dkd_tckd", "dkd_nckd"):
        assert early[name].item() == pytest.approx(late[name].item() / 20, rel=1e-6)
        assert middle[name].item() == pytest.approx(late[name].item() / 2, rel=1e-6)
        assert again[name].item() == early[name].item()
    assert method.warmup_factor(1) == pytest.approx(2 / 20)
    assert _build(DKD, None, warmup=0)[0].warmup_factor(0) == 1.0


def test_crd_memory_follows_the_batch_rows() -> None:
    method, student, _ = _build(CRD, ["penultimate"], nce_k=100)
    assert method.memory.k == 23  # capped at N − 1
    # by default the reference's forms: positive from memory, negatives from other classes
    assert method.memory.positive == "memory"
    assert torch.equal(method.memory.labels, method.data.train.targets)
    assert method.memory.memory_s.shape == (24, 128)
    before = method.memory.memory_t.clone()
    _, _, rows = _step(method, student)
    changed = (method.memory.memory_t != before).any(1)
    assert set(changed.nonzero().flatten().tolist()) == set(rows.tolist())
    assert method.memory.z_s.item() > 0


@pytest.mark.parametrize(
    ("make", "key"),
    [
        (lambda: _build(AT, ["penultimate"]), "method.student_layers"),
        (lambda: _build(NST, []), "method.student_layers"),
        (lambda: _build(AT, STAGES, beta=-1.0), "method.beta"),
        (
            lambda: _build(FitNet, student_layers=["stages.1"], teacher_layers=["penultimate"]),
            "method.teacher_layers",
        ),
        (lambda: _build(CRD, ["penultimate", "stages.2"]), "method.student_layers"),
        (lambda: _build(CRD, ["penultimate"], nce_t=0.0), "method.nce_t"),
        (lambda: _build(DKD, None, warmup=-1), "method.warmup"),
        (lambda: _build(RKD, ["penultimate"], angle_weight=-1.0), "method.angle_weight"),
        (lambda: _build(RKD, ["penultimate"], reduction="mean"), "method.reduction"),
        (lambda: _build(PKT, ["penultimate"], reduction="mean"), "method.reduction"),
        (lambda: _build(FitNet, ["stages.1"], regressor="linear"), "method.regressor"),
        (
            lambda: _build(FitNet, student_layers=["stages.2"], teacher_layers=["stem"]),
            "method.regressor",
        ),
        (lambda: _build(CRD, ["penultimate"], positive="teacher"), "method.positive"),
        (lambda: _build(CRD, ["penultimate"], negatives="same_class"), "method.negatives"),
    ],
)
def test_method_config_errors(make, key: str) -> None:
    with pytest.raises(ConfigError) as error:
        make()
    assert error.value.key.endswith(key)


def test_crd_needs_sample_indices() -> None:
    student, teacher = _nets()
    data = _data()
    data.train = list(data.train)  # batches without their sample indices
    with pytest.raises(ConfigError, match="sample indices"):
        CRD(
            data=data,
            criterion=nn.CrossEntropyLoss(),
            teacher=teacher,
            student_layers=["penultimate"],
            teacher_layers=["penultimate"],
        )
    # negatives from other classes need a second class
    data = _data()
    data.train.targets = torch.zeros_like(data.train.targets)
    with pytest.raises(ConfigError, match="one class") as error:
        CRD(
            data=data,
            criterion=nn.CrossEntropyLoss(),
            teacher=teacher,
            student_layers=["penultimate"],
            teacher_layers=["penultimate"],
        )
    assert error.value.key == "method.negatives"


NAMES = ["fitnet", "at", "sp", "rkd", "pkt", "nst", "dkd", "crd"]


@pytest.mark.parametrize("name", NAMES)
def test_yaml_composes_and_runs(compose_cfg, name: str) -> None:
    cfg = compose_cfg(f"method=distill/{name}")
    assert cfg.teacher._target_ == "kdexp.model.mlp.MLP" and list(cfg.teacher.hidden) == [
        1200,
        1200,
    ]
    student, teacher = _nets()
    method = instantiate(cfg.method)(data=_data(), criterion=nn.CrossEntropyLoss(), teacher=teacher)
    terms, _, _ = _step(method, method.prepare(student))
    assert "ce" in terms and len(terms) >= 2
