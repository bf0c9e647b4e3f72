"""QSD against an independent re-computation (loops over batch and positions)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gkd.distill.qsd import QSD, LinearHead


def _randomize(module: nn.Module, seed: int) -> None:
    """Random LayerNorm affine and Linear params, so the test does not lean on the init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def _layernorm_linear(x: torch.Tensor, seq: nn.Sequential) -> torch.Tensor:
    """LayerNorm then Linear written out: x [Cs] → [Ct]."""
    ln, lin = seq[0], seq[1]
    mu = x.mean()
    var = ((x - mu) ** 2).mean()
    xn = (x - mu) / math.sqrt(var.item() + ln.eps) * ln.weight + ln.bias
    return lin.weight @ xn + lin.bias


@torch.no_grad()
def _qsd_reference(qsd: QSD, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """softmax(Q Kᵀ) V token by token, float64, no scaling; per-head by channel groups."""
    B, Ns, _ = s.shape
    Nt, Ct = t.shape[1], t.shape[2]
    h = qsd.num_heads
    d = Ct // h
    out = torch.zeros(B, Ns, Ct, dtype=torch.float64)
    for b in range(B):
        q = torch.stack([_layernorm_linear(s[b, i], qsd.proj_q) for i in range(Ns)]).double()
        v = torch.stack([_layernorm_linear(s[b, i], qsd.proj_v) for i in range(Ns)]).double()
        k = t[b].double()
        for head in range(h):
            sl = slice(head * d, (head + 1) * d)
            for i in range(Ns):
                logits = torch.tensor([float(q[i, sl] @ k[j, sl]) for j in range(Nt)], dtype=torch.float64)
                w = torch.exp(logits - logits.max())
                w = w / w.sum()
                out[b, i, sl] = (w[:, None] * v[:, sl]).sum(0)
    return out


@pytest.mark.parametrize("num_heads", [1, 2])
def test_qsd_matches_reference(num_heads: int) -> None:
    torch.manual_seed(0)
    Cs, Ct, B, N = 6, 8, 2, 5
    qsd = QSD(Cs, Ct, num_heads=num_heads)
    _randomize(qsd, seed=1)
    s = torch.randn(B, N, Cs)
    t = torch.randn(B, N, Ct)
    got = qsd(s, t)
    assert got.shape == (B, N, Ct)
    torch.testing.assert_close(got.double(), _qsd_reference(qsd, s, t), rtol=1e-5, atol=1e-5)


def test_qsd_is_not_scaled() -> None:
    """A 1/sqrt(d) or temperature would change the result: scaling K by c must equal scaling the logits by c."""
    torch.manual_seed(0)
    qsd = QSD(4, 16)
    s, t = torch.randn(1, 3, 4), torch.randn(1, 3, 16)
    q = qsd.proj_q(s)
    v = qsd.proj_v(s)
    expected = torch.softmax(q @ t.transpose(1, 2), dim=-1) @ v
    torch.testing.assert_close(qsd(s, t), expected)
    scaled = torch.softmax(q @ t.transpose(1, 2) / 4.0, dim=-1) @ v
    assert not torch.allclose(qsd(s, t), scaled, atol=1e-4)


def test_attention_is_over_teacher_positions() -> None:
    """With V ≡ 1 every output is exactly 1 iff the weights over teacher positions sum to 1."""
    torch.manual_seed(0)
    qsd = QSD(5, 7)
    with torch.no_grad():
        qsd.proj_v[1].weight.zero_()
        qsd.proj_v[1].bias.fill_(1.0)
    s, t = torch.randn(3, 6, 5), torch.randn(3, 6, 7) * 3
    out = qsd(s, t)
    assert out.shape == (3, 6, 7)
    torch.testing.assert_close(out, torch.ones_like(out))
    # and the weights do depend on the teacher: with V = identity-like values the output changes
    qsd2 = QSD(5, 7)
    o1 = qsd2(s, t)
    o2 = qsd2(s, t.flip(1) * 0.1)
    assert not torch.allclose(o1, o2)


def test_single_position_returns_values() -> None:
    torch.manual_seed(0)
    qsd = QSD(6, 9)
    _randomize(qsd, seed=3)
    s, t = torch.randn(4, 1, 6), torch.randn(4, 1, 9) * 100  # huge logits: softmax over 1 is still 1
    torch.testing.assert_close(qsd(s, t), qsd.proj_v(s))


def test_gradients_reach_student_and_projections_not_teacher() -> None:
    torch.manual_seed(0)
    qsd = QSD(6, 8)
    s = torch.randn(2, 5, 6, requires_grad=True)
    t = torch.randn(2, 5, 8, requires_grad=True)  # would get a grad if K were not detached
    ((qsd(s, t) - t.detach()) ** 2).mean().backward()
    assert t.grad is None
    assert s.grad is not None and s.grad.abs().sum() > 0
    for name, p in qsd.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_contract_attributes_and_validation() -> None:
    qsd = QSD(6, 8)
    for proj in (qsd.proj_q, qsd.proj_v):
        assert isinstance(proj, nn.Sequential) and len(proj) == 2
        assert isinstance(proj[0], nn.LayerNorm) and proj[0].normalized_shape == (6,)
        assert isinstance(proj[1], nn.Linear) and (proj[1].in_features, proj[1].out_features) == (6, 8)
    with pytest.raises(ValueError):
        QSD(6, 8, num_heads=3)
    with pytest.raises(ValueError):
        qsd(torch.randn(2, 5, 6), torch.randn(2, 5, 7))
    with pytest.raises(ValueError):
        qsd(torch.randn(2, 5, 6), torch.randn(2, 4, 8))


def test_fp16_teacher_meets_fp32_student() -> None:
    qsd = QSD(4, 6)
    s, t = torch.randn(2, 3, 4), torch.randn(2, 3, 6)
    torch.testing.assert_close(qsd(s, t.half()), qsd(s, t.half().float()))


def test_linear_head_ignores_teacher() -> None:
    torch.manual_seed(0)
    head = LinearHead(6, 8)
    s = torch.randn(2, 5, 6)
    a = head(s, torch.randn(2, 5, 8))
    b = head(s, torch.randn(2, 5, 8))
    torch.testing.assert_close(a, b)
    ln, lin = head.proj[0], head.proj[1]
    torch.testing.assert_close(a, lin(ln(s)))
