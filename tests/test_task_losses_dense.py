"""Af-DCD, BCKD and LFD (gkd.distill.task_losses_dense) against independent numpy re-computations."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gkd.tensors import EncoderInfo, SegOutputs
from gkd.distill.task_losses_dense import LOSSES, AfDCD, BCKD, LFD

K = 5
STUDENT = EncoderInfo(kind="vit", embed_dim=6, depth=2, feature_channels=(4, 4, 6, 6))
TEACHER = EncoderInfo(kind="vit", embed_dim=8, depth=2, feature_channels=(5, 7, 7, 9))


def make_outputs(info: EncoderInfo, grad: bool, seed: int, size: int = 8, dtype=torch.float32) -> SegOutputs:
    """Logits [2,K,size,size], 4 features at size/2^l, last [2,C,size,size]."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(dtype).requires_grad_(grad)

    feats = [rand(2, c, max(size >> i, 1), max(size >> i, 1)) for i, c in enumerate(info.feature_channels)]
    return SegOutputs(logits=rand(2, K, size, size), features=feats, last=rand(2, info.embed_dim, size, size))


def make_labels(size: int = 16) -> torch.Tensor:
    lab = torch.randint(0, K, (2, size, size), generator=torch.Generator().manual_seed(3))
    lab[:, :2, :] = 255
    return lab


def np_(x: torch.Tensor) -> np.ndarray:
    return x.detach().double().numpy()


def np_kl(s: np.ndarray, t: np.ndarray, T: float) -> np.ndarray:
    """Per-pixel KL(p_t ‖ p_s) for [B,K,h,w] arrays, via explicit softmax."""
    def softmax(z):
        e = np.exp(z / T - (z / T).max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    ps, pt = softmax(s), softmax(t)
    return (pt * (np.log(pt) - np.log(ps))).sum(axis=1)


# ------------------------------------------------------------------------------ Af-DCD
def np_omni_contrastive(s: np.ndarray, t: np.ndarray, pool: int, patch: int, groups: int, tau: float) -> float:
    """Explicit loops: per window, per (position, group) row, −L1 similarities and CE."""
    b, c, h, w = s.shape
    s = s.reshape(b, c, h // pool, pool, w // pool, pool).max(axis=(3, 5))
    t = t.reshape(b, c, h // pool, pool, w // pool, pool).max(axis=(3, 5))
    h, w, d = h // pool, w // pool, c // groups
    total = 0.0
    for bi in range(b):
        for wy in range(0, h, patch):
            for wx in range(0, w, patch):
                items = [(y, x, g) for y in range(wy, wy + patch) for x in range(wx, wx + patch) for g in range(groups)]
                vec = lambda a, y, x, g: a[bi, g * d:(g + 1) * d, y, x]  # noqa: E731
                for (y, x, g) in items:
                    q = vec(s, y, x, g)
                    pos = -np.abs(q - vec(t, y, x, g)).sum() / tau
                    neg = [-np.abs(q - vec(t, y2, x2, g2)).sum() / tau for (y2, x2, g2) in items if g2 != g]
                    logits = np.array([pos] + neg)
                    total += -pos + np.log(np.exp(logits - logits.max()).sum()) + logits.max()
    return total / (b * h * w)


def test_afdcd_matches_independent_computation():
    torch.manual_seed(0)
    loss = AfDCD(STUDENT, TEACHER, K, groups=4, pool_size=2, patch_size=2, kd_temperature=2.0,
                 fd_weight=0.3, ctr_weight=0.7, kd_weight=0.5)
    s, t = make_outputs(STUDENT, True, 1), make_outputs(TEACHER, False, 2)
    torch.manual_seed(123)
    out = loss(s, t, make_labels(), 0.0)

    # redraw the same mask independently: one torch.rand call, pixel kept iff u <= 1 - 0.75
    torch.manual_seed(123)
    keep = (torch.rand(2, 1, 8, 8) <= 0.25).float()
    assert 0.05 < keep.mean() < 0.5
    with torch.no_grad():
        proj = loss.projector(loss.align(s.last) * keep)
    p, tl = np_(proj), np_(t.last)
    fd = ((p - tl) ** 2).sum() / 2
    ctr = np_omni_contrastive(p, tl, pool=2, patch=2, groups=4, tau=0.07)
    kd = 4.0 * np_kl(np_(s.logits), np_(t.logits), 2.0).mean()
    np.testing.assert_allclose(float(out["loss_fd"]), 0.3 * fd, rtol=1e-5)
    np.testing.assert_allclose(float(out["loss_ctr"]), 0.7 * ctr, rtol=1e-5)
    np.testing.assert_allclose(float(out["loss_kd"]), 0.5 * kd, rtol=1e-5)
    np.testing.assert_allclose(float(out["loss"].detach()), 0.3 * fd + 0.7 * ctr + 0.5 * kd, rtol=1e-5)


def test_afdcd_defaults_from_official_code():
    loss = AfDCD(STUDENT, TEACHER, K, groups=4)
    assert (loss.tau, loss.mask_ratio, loss.pool_size, loss.patch_size) == (0.07, 0.75, 4, 4)
    assert (loss.fd_weight, loss.ctr_weight, loss.kd_weight, loss.kd_temperature) == (2e-6, 5e-3, 1.0, 1.0)
    wide = EncoderInfo(kind="vit", embed_dim=32, depth=2, feature_channels=TEACHER.feature_channels)
    assert AfDCD(STUDENT, wide, K).groups == 16
    with pytest.raises(ValueError):
        AfDCD(STUDENT, TEACHER, K, groups=3)


# ------------------------------------------------------------------------------ BCKD
def np_boundary(x: np.ndarray) -> np.ndarray:
    """1 − mean cosine affinity with the 8 neighbours (indices clamped at the border)."""
    b, c, h, w = x.shape
    out = np.zeros((b, h, w))
    for bi in range(b):
        for y in range(h):
            for xx in range(w):
                v = x[bi, :, y, xx]
                cos = []
                for dy in (-1, 0, 1):
                    for dx in (-1, 0, 1):
                        if dy == dx == 0:
                            continue
                        u = x[bi, :, min(max(y + dy, 0), h - 1), min(max(xx + dx, 0), w - 1)]
                        cos.append(v @ u / (np.linalg.norm(v) * np.linalg.norm(u)))
                out[bi, y, xx] = 1 - np.mean(cos)
    return out


def np_relation(z: np.ndarray, size: int) -> np.ndarray:
    """Block-average z [B,K,H,W] to size×size, then cosine similarity of every pixel pair."""
    b, k, h, w = z.shape
    z = z.reshape(b, k, size, h // size, size, w // size).mean(axis=(3, 5)).reshape(b, k, -1)
    rel = np.zeros((b, size * size, size * size))
    for bi in range(b):
        for i in range(size * size):
            for j in range(size * size):
                u, v = z[bi, :, i], z[bi, :, j]
                rel[bi, i, j] = u @ v / (np.linalg.norm(u) * np.linalg.norm(v))
    return rel


def bckd_reference(s: SegOutputs, t: SegOutputs) -> tuple[float, float]:
    bd = np.mean([((np_boundary(np_(a)) - np_boundary(np_(b))) ** 2).mean() for a, b in zip(s.features, t.features)])
    size = s.features[-1].shape[-1]
    cd = ((np_relation(np_(s.logits), size) - np_relation(np_(t.logits), size)) ** 2).mean()
    return float(bd), float(cd)


def bckd_inputs() -> tuple[SegOutputs, SegOutputs]:
    # size 16: features 16, 8, 4, 2 → relations on a 2×2 grid of 4×4 logit blocks
    return make_outputs(STUDENT, True, 1, size=16), make_outputs(TEACHER, False, 2, size=16)


def test_bckd_matches_independent_computation():
    s, t = bckd_inputs()
    loss = BCKD(STUDENT, TEACHER, K, alpha=3.0, beta=7.0)
    bd, cd = bckd_reference(s, t)
    out = loss(s, t, make_labels(), 0.25)
    np.testing.assert_allclose(float(out["loss_boundary"]), 0.75 * 3.0 * bd, rtol=1e-5)
    np.testing.assert_allclose(float(out["loss_context"]), 0.75 * 7.0 * cd, rtol=1e-5)
    np.testing.assert_allclose(float(out["loss"].detach()), 0.75 * (3.0 * bd + 7.0 * cd), rtol=1e-5)
    assert bd > 0 and cd > 0


def test_bckd_schedule_r_equals_one_minus_progress():
    s, t = bckd_inputs()
    loss = BCKD(STUDENT, TEACHER, K)
    assert (loss.alpha, loss.beta) == (10.0, 50.0)
    bd, cd = bckd_reference(s, t)
    full = 10.0 * bd + 50.0 * cd
    for progress in (0.0, 0.5, 1.0 - 1e-6):
        out = loss(s, t, make_labels(), progress)
        np.testing.assert_allclose(float(out["loss"].detach()), (1.0 - progress) * full, rtol=1e-5, atol=1e-9)
    assert float(loss(s, t, make_labels(), 0.0)["loss"].detach()) == pytest.approx(full, rel=1e-5)
    # only the decayed terms follow r: with decay=("context",) the boundary term stays put
    partial = BCKD(STUDENT, TEACHER, K, decay=("context",))
    for progress in (0.0, 0.5, 0.9):
        out = partial(s, t, make_labels(), progress)
        np.testing.assert_allclose(float(out["loss_boundary"]), 10.0 * bd, rtol=1e-5)
        np.testing.assert_allclose(float(out["loss_context"]), (1 - progress) * 50.0 * cd, rtol=1e-5)


def test_bckd_boundary_is_high_on_an_edge():
    x = torch.zeros(1, 2, 6, 6)
    x[:, 0, :, :3] = 1.0
    x[:, 1, :, 3:] = 1.0
    from gkd.distill.task_losses_dense import boundary_map

    b = boundary_map(x)[0]
    assert torch.allclose(b[:, 0], torch.zeros(6)) and torch.all(b[:, 2] > 0.3) and torch.all(b[:, 3] > 0.3)


# ------------------------------------------------------------------------------ LFD
def lfd_reference(loss: LFD, s: SegOutputs, t: SegOutputs, labels: torch.Tensor, kd_on: bool) -> dict[str, float]:
    sl, tl = np_(s.logits), np_(t.logits)
    kl = np_kl(sl, tl, loss.temperature)                               # [B,h,w]; logits and last share the grid
    weight = kl / kl.mean(axis=(1, 2), keepdims=True)
    with torch.no_grad():
        adapted = loss.adapter(s.last)
        aux_s, aux_t = loss.aux_head(adapted), loss.aux_head(t.last)
    feat = (weight * ((np_(adapted) - np_(t.last)) ** 2).mean(axis=1)).mean()
    e = np.exp(tl - tl.max(axis=1, keepdims=True))
    pi = (e / e.sum(axis=1, keepdims=True)).mean(axis=(2, 3))          # [B,K]
    cls_w = K * pi / pi.sum(axis=1, keepdims=True)
    y = labels[:, ::2, ::2].numpy()                                    # nearest sampling, image 16 → grid 8

    def weighted_ce(z: np.ndarray) -> float:
        total, count = 0.0, 0
        for b in range(z.shape[0]):
            for i in range(z.shape[2]):
                for j in range(z.shape[3]):
                    c = y[b, i, j]
                    if c == 255:
                        continue
                    logit = z[b, :, i, j]
                    lse = np.log(np.exp(logit - logit.max()).sum()) + logit.max()
                    total += cls_w[b, c] * (lse - logit[c])
                    count += 1
        return total / count

    aux = weighted_ce(np_(aux_s)) + weighted_ce(np_(aux_t))
    kd = loss.temperature**2 * kl.mean() if kd_on else 0.0
    return {"feat": loss.feat_weight * feat, "aux": loss.aux_weight * aux, "kd": loss.kd_weight * kd}


def test_lfd_matches_independent_computation():
    torch.manual_seed(0)
    loss = LFD(STUDENT, TEACHER, K, temperature=2.0, feat_weight=0.6, aux_weight=0.3, kd_weight=0.8).eval()
    s, t, labels = make_outputs(STUDENT, True, 1), make_outputs(TEACHER, False, 2), make_labels()
    for progress, kd_on in ((0.5, True), (0.01, False)):
        out = loss(s, t, labels, progress)
        ref = lfd_reference(loss, s, t, labels, kd_on)
        for term in ("feat", "aux", "kd"):
            np.testing.assert_allclose(float(out[f"loss_{term}"]), ref[term], rtol=1e-5, atol=1e-12)
        np.testing.assert_allclose(float(out["loss"].detach()), sum(ref.values()), rtol=1e-5)
    assert float(loss(s, t, labels, 0.01)["loss_kd"]) == 0.0


def test_lfd_defaults_from_authors_script():
    loss = LFD(STUDENT, TEACHER, K)
    assert (loss.feat_weight, loss.aux_weight, loss.kd_weight, loss.temperature) == (1.0, 0.1, 1.0, 1.0)
    assert loss.kd_start == pytest.approx(1000 / 40000)
    assert loss.adapter.bias is None and loss.adapter.out_channels == TEACHER.embed_dim


def test_lfd_spatial_mask_follows_the_logit_discrepancy():
    kl = torch.tensor([[[0.0, 1.0], [3.0, 0.0]]])
    w = LFD.spatial_mask(kl, (2, 2))
    assert torch.allclose(w, kl / kl.mean()) and w.mean() == pytest.approx(1.0)


# ------------------------------------------------------------------------------ all three
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_loss_decreases_under_adam(name: str):
    torch.manual_seed(0)
    size = 16 if name == "bckd" else 8
    loss = LOSSES[name](STUDENT, TEACHER, K, **({"groups": 4, "pool_size": 2, "patch_size": 2} if name == "afdcd" else {}))
    s, t, labels = make_outputs(STUDENT, True, 1, size), make_outputs(TEACHER, False, 2, size), make_labels(2 * size)
    params = [s.logits, s.last, *s.features, *loss.parameters()]
    opt = torch.optim.Adam(params, lr=0.05)
    values = []
    for _ in range(20):
        torch.manual_seed(7)  # the same Af-DCD mask every step
        out = loss(s, t, labels, 0.5)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        values.append(float(out["loss"].detach()))
    assert values[-1] < 0.8 * values[0], values


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_no_gradient_reaches_the_teacher(name: str):
    size = 16 if name == "bckd" else 8
    loss = LOSSES[name](STUDENT, TEACHER, K, **({"groups": 4, "pool_size": 2, "patch_size": 2} if name == "afdcd" else {}))
    s = make_outputs(STUDENT, True, 1, size)
    # a trap: teacher leaves that *would* collect gradient if the loss did not detach them
    t = make_outputs(TEACHER, True, 2, size)
    out = loss(s, t, make_labels(2 * size), 0.5)
    out["loss"].backward()
    for x in (t.logits, t.last, *t.features):
        assert x.grad is None
    assert s.logits.grad is not None and s.logits.grad.abs().sum() > 0
    assert all(not v.requires_grad for k, v in out.items() if k != "loss")
    # the usual case: teacher tensors without autograd history stay that way
    plain = make_outputs(TEACHER, False, 2, size)
    loss(s, plain, make_labels(2 * size), 0.5)
    assert not any(x.requires_grad for x in (plain.logits, plain.last, *plain.features))


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_half_precision_teacher_and_resized_maps(name: str):
    size = 16 if name == "bckd" else 8
    loss = LOSSES[name](STUDENT, TEACHER, K, **({"groups": 4, "pool_size": 2, "patch_size": 2} if name == "afdcd" else {}))
    s = make_outputs(STUDENT, True, 1, size)
    t = make_outputs(TEACHER, False, 2, 2 * size, dtype=torch.bfloat16)   # teacher on a 2× finer grid, bf16
    out = loss(s, t, make_labels(2 * size), 0.5)
    assert out["loss"].dtype == torch.float32 and math.isfinite(float(out["loss"].detach()))
    assert sum(float(v) for k, v in out.items() if k != "loss") == pytest.approx(float(out["loss"].detach()), rel=1e-5)
    out["loss"].backward()
    assert any(x.grad is not None and x.grad.abs().sum() > 0 for x in (s.logits, s.last, *s.features))


def test_registry():
    assert LOSSES == {"afdcd": AfDCD, "bckd": BCKD, "lfd": LFD}
    assert all(set(cls.uses) == {"logits", "features"} for cls in LOSSES.values())
