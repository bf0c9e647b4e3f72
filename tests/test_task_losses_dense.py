"""Af-DCD, BCKD and LFD (gkd.distill.task_losses_dense) against independent numpy re-computations."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gkd.tensors import EncoderInfo, SegOutputs
from gkd.distill.task_losses_dense import LOSSES, AfDCD, BCKD, LFD

K = 5
STUDENT = EncoderInfo(kind="vit", embed_dim=6, depth=2, feature_channels=(4, 4, 6, 6), head_channels=5)
TEACHER = EncoderInfo(kind="vit", embed_dim=8, depth=2, feature_channels=(5, 7, 7, 9), head_channels=7)


def make_outputs(info: EncoderInfo, grad: bool, seed: int, size: int = 8, dtype=torch.float32) -> SegOutputs:
    """Logits [2,K,size,size], 4 features at size/2^l, last and head feature [2,C,size,size]."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(dtype).requires_grad_(grad)

    feats = [rand(2, c, max(size >> i, 1), max(size >> i, 1)) for i, c in enumerate(info.feature_channels)]
    return SegOutputs(logits=rand(2, K, size, size), features=feats, last=rand(2, info.embed_dim, size, size),
                      head_feature=rand(2, info.head_channels, size, size))


def leaves(out: SegOutputs) -> list[torch.Tensor]:
    return [out.logits, out.last, out.head_feature, *out.features]


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
def np_conv1x1(conv: torch.nn.Conv2d, x: np.ndarray) -> np.ndarray:
    """A 1×1 conv as an explicit channel contraction, float64."""
    w, b = np_(conv.weight)[:, :, 0, 0], np_(conv.bias)
    return np.einsum("oc,bchw->bohw", w, x) + b[None, :, None, None]


def np_fused(branch, feats: list[torch.Tensor], size: tuple[int, int]) -> np.ndarray:
    """Tᶜ/Sᶜ: per-level 1×1 conv, bilinear resize to the stride-8 grid, concat, 3×3 conv (float64)."""
    maps = []
    for conv, f in zip(branch.reduce, feats):
        y = torch.from_numpy(np_conv1x1(conv, np_(f)))
        if tuple(y.shape[-2:]) != size:
            y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
        maps.append(y)
    x = torch.cat(maps, dim=1)
    return F.conv2d(x, branch.fuse.weight.detach().double(), branch.fuse.bias.detach().double(), padding=1).numpy()


def np_line(dy: int, dx: int) -> list[tuple[int, int]]:
    """Pixels on the digital line from (0,0) to (dy,dx): the n+1 samples m/n, rounded half up."""
    n = max(abs(dy), abs(dx))
    return list({(int(math.floor(m * dy / n + 0.5)), int(math.floor(m * dx / n + 0.5))) for m in range(n + 1)})


def np_softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max())
    return e / e.sum()


def np_sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1 + np.tanh(z / 2))  # = 1 / (1 + e^−z), without overflow


def np_bd_term(sc_t: np.ndarray, sc_s: np.ndarray, radius: int, tau: float) -> tuple[float, np.ndarray]:
    """Eqs. 2-3 by loops: per pixel i, T^B_ij = 1 − max over pairs (p,q) on line(i,j) of |s_p − s_q|
    for every in-map j ≠ i in the (2r+1)² window; CE of the neighbour softmaxes of T^B/τ, S^B/τ,
    averaged over i and the batch. Also returns every teacher T^B value (for the τ rule)."""
    b, _, h, w = sc_t.shape
    total, count, values = 0.0, 0, []
    for bi in range(b):
        for y in range(h):
            for x in range(w):
                tb, sb = [], []
                for dy in range(-radius, radius + 1):
                    for dx in range(-radius, radius + 1):
                        if (dy, dx) == (0, 0) or not (0 <= y + dy < h and 0 <= x + dx < w):
                            continue
                        line = [(y + oy, x + ox) for oy, ox in np_line(dy, dx)]
                        for sc, out in ((sc_t, tb), (sc_s, sb)):
                            out.append(1 - max(abs(sc[bi, 0][p] - sc[bi, 0][q]) for p in line for q in line))
                p_t, p_s = np_softmax(np.array(tb) / tau), np_softmax(np.array(sb) / tau)
                total += -(p_t * np.log(p_s)).sum()
                count += 1
                values += tb
    return total / count, np.array(values)


def np_cd_term(o_t: np.ndarray, o_s: np.ndarray, tau: float) -> float:
    """Eqs. 4-5 by loops: T^R = row-softmax(OᵀO/√d)/τ; CE of the row softmaxes of T^R and S^R."""
    b, d = o_t.shape[:2]
    total, count = 0.0, 0
    for bi in range(b):
        vt, vs = o_t[bi].reshape(d, -1), o_s[bi].reshape(d, -1)            # [d, N]
        n = vt.shape[1]
        for i in range(n):
            rt = np_softmax(np.array([vt[:, i] @ vt[:, j] for j in range(n)]) / math.sqrt(d)) / tau
            rs = np_softmax(np.array([vs[:, i] @ vs[:, j] for j in range(n)]) / math.sqrt(d)) / tau
            total += -(np_softmax(rt) * np.log(np_softmax(rs))).sum()
            count += 1
    return total / count


def bckd_reference(loss: BCKD, s: SegOutputs, t: SegOutputs, tau: float) -> tuple[float, float]:
    """The cross-entropies of Eqs. 3 and 5 before their τ² factor, float64."""
    size = tuple(s.features[1].shape[-2:])
    fs, ft = np_fused(loss.student_branch, s.features, size), np_fused(loss.teacher_branch, t.features, size)
    bd, _ = np_bd_term(np_sigmoid(np_conv1x1(loss.teacher_branch.boundary, ft)),
                       np_sigmoid(np_conv1x1(loss.student_branch.boundary, fs)), loss.radius, tau)
    cd = np_cd_term(np_conv1x1(loss.teacher_branch.align, ft), np_conv1x1(loss.student_branch.align, fs), tau)
    return bd, cd


def bckd_inputs(seed_s: int = 1, seed_t: int = 2) -> tuple[SegOutputs, SegOutputs]:
    # size 8: levels 8, 4, 2, 1 → the stride-8 grid is 4×4 (16 pixels, 16×16 relations)
    return make_outputs(STUDENT, True, seed_s, size=8), make_outputs(TEACHER, False, seed_t, size=8)


def small_bckd(**kw) -> BCKD:
    torch.manual_seed(0)
    return BCKD(STUDENT, TEACHER, K, channels=8, **kw)


def test_bckd_terms_match_eqs_2_to_5():
    s, t = bckd_inputs()
    loss = small_bckd(alpha=3.0, beta=7.0).eval()          # eval: τ stays put
    with torch.no_grad():
        loss.tau.fill_(1.3)                                 # τ ≠ 1, so a misplaced τ or τ² shows
        for branch in (loss.student_branch, loss.teacher_branch):
            branch.boundary.weight.mul_(20.0)               # sharp boundaries: T^B spans most of [0, 1]
    bd, cd = bckd_reference(loss, s, t, tau=1.3)
    out = loss(s, t, make_labels(), 0.25)
    r, tau2 = 0.75, 1.3**2
    np.testing.assert_allclose(float(out["loss_boundary"]), r * 3.0 * tau2 * bd, rtol=1e-5)
    np.testing.assert_allclose(float(out["loss_context"]), r * 7.0 * tau2 * cd, rtol=1e-5)
    np.testing.assert_allclose(float(out["loss"].detach()), r * tau2 * (3.0 * bd + 7.0 * cd), rtol=1e-5)
    assert float(out["bckd_tau"]) == pytest.approx(1.3)
    # reduction="sum" keeps Eqs. 3/5's Σ over the anchors: h·w = 16 times the mean
    summed = small_bckd(alpha=3.0, beta=7.0, reduction="sum").eval()
    summed.load_state_dict(loss.state_dict())
    out_sum = summed(s, t, make_labels(), 0.25)
    np.testing.assert_allclose(float(out_sum["loss"].detach()), 16 * float(out["loss"].detach()), rtol=1e-5)


def test_bckd_defaults_and_schedule():
    loss = BCKD(STUDENT, TEACHER, K)
    assert (loss.alpha, loss.beta, loss.channels, float(loss.tau)) == (10.0, 50.0, 256, 1.0)
    assert (loss.tau_growth, loss.tau_range, loss.radius, loss.reduction) == (1.05, 0.5, 2, "mean")
    assert BCKD.uses == ("features",)                          # the teacher's decoder is not needed
    # per-level 1×1 convs to 256/4 = 64 channels, fused by a 3×3 conv to 256; boundary conv 256 → 1
    for branch, info in ((loss.student_branch, STUDENT), (loss.teacher_branch, TEACHER)):
        assert [c.weight.shape for c in branch.reduce] == [(64, c, 1, 1) for c in info.feature_channels]
        assert branch.fuse.weight.shape == (256, 256, 3, 3) and branch.boundary.weight.shape == (1, 256, 1, 1)
        assert branch.align.weight.shape == (256, 256, 1, 1)
    s, t = bckd_inputs()
    small = small_bckd().eval()
    full = float(small(s, t, make_labels(), 0.0)["loss"].detach())
    for progress in (0.5, 0.9):                                 # r(t) = 1 − progress on both terms
        out = small(s, t, make_labels(), progress)
        assert float(out["loss_boundary"]) + float(out["loss_context"]) == pytest.approx((1 - progress) * full, rel=1e-5)
    with pytest.raises(ValueError, match="reduction"):
        BCKD(STUDENT, TEACHER, K, reduction="max")


def test_bckd_tau_follows_the_1_05_rule_and_is_saved():
    s, t = bckd_inputs()
    loss = small_bckd().train()
    with torch.no_grad():                                       # saturated boundaries: T^B ∈ {0, 1}
        for branch in (loss.student_branch, loss.teacher_branch):
            branch.boundary.weight.mul_(1e4)
    # the rule's input, independently: the teacher's T^B spans [0, 1] (range of T^B/τ = 1/τ)
    size = tuple(s.features[1].shape[-2:])
    score = np_sigmoid(np_conv1x1(loss.teacher_branch.boundary, np_fused(loss.teacher_branch, t.features, size)))
    _, values = np_bd_term(score, score, loss.radius, 1.0)
    assert values.max() - values.min() > 0.999
    taus = [float(loss(s, t, make_labels(), 0.0)["bckd_tau"]) for _ in range(20)]
    # 1/τ > 0.5 until τ passes 2: τ = 1.05^k for the first 15 forwards, then it stays at 1.05^15
    np.testing.assert_allclose(taus, [1.05 ** min(k, 15) for k in range(20)], rtol=1e-5)
    assert float(loss.tau) == pytest.approx(1.05**15, rel=1e-5)
    # eval mode leaves τ alone; so does a minibatch whose tempered maps all span less than 0.5
    loss.eval()
    loss(s, t, make_labels(), 0.0)
    assert float(loss.tau) == pytest.approx(1.05**15, rel=1e-5)
    flat = small_bckd().train()
    with torch.no_grad():                                       # constant boundary score, uniform relations
        for branch in (flat.student_branch, flat.teacher_branch):
            branch.boundary.weight.zero_()
            branch.align.weight.zero_()
    flat(s, t, make_labels(), 0.0)
    assert float(flat.tau) == 1.0
    # τ is a buffer: in the state dict (so in the stage-3 checkpoints) and restored by loading it
    assert "tau" in loss.state_dict()
    fresh = small_bckd()
    fresh.load_state_dict(loss.state_dict())
    assert float(fresh.tau) == pytest.approx(1.05**15, rel=1e-5)


def test_bckd_only_the_student_side_learns_and_the_teacher_gets_nothing():
    s = make_outputs(STUDENT, True, 1, size=8)
    t = make_outputs(TEACHER, True, 2, size=8)                  # a trap: leaves that would collect gradient
    frozen = small_bckd()                                       # default: "only the student's parameters are updated"
    assert not any(p.requires_grad for p in frozen.teacher_branch.parameters())
    frozen(s, t, make_labels(), 0.3)["loss"].backward()
    assert all(p.grad is None for p in frozen.teacher_branch.parameters())
    assert all(p.grad is not None for p in frozen.student_branch.parameters())
    assert all(x.grad is None for x in t.features)
    for x in t.features:
        x.grad = None
    loss = small_bckd(train_teacher_layers=True)
    loss(s, t, make_labels(), 0.3)["loss"].backward()
    assert all(x.grad is None for x in t.features)
    assert all(p.grad is not None for p in loss.teacher_branch.parameters())


def test_bckd_pair_boundary_on_an_edge():
    from gkd.distill.task_losses_dense import neighbour_lines, pair_boundary

    offsets = [d for d, _ in neighbour_lines(2)]
    assert len(offsets) == 24 and (0, 0) not in offsets
    assert dict(neighbour_lines(2))[(1, 2)] == [(0, 0), (1, 1), (1, 2)]
    score = torch.zeros(1, 1, 5, 6)
    score[..., 3:] = 1.0                                        # a vertical edge between columns 2 and 3
    tb, valid = pair_boundary(score, 2)
    right = offsets.index((0, 1))
    assert tb[0, right, 0, 2] == 0.0 and tb[0, right, 0, 1] == 1.0 and tb[0, right, 0, 3] == 1.0
    assert not valid[right, 0, 5] and valid[right, 0, 4]        # i + (0, 1) leaves the map at the last column
    up = offsets.index((-1, 0))
    assert not valid[up, 0].any() and valid[up, 1:].all()


# ------------------------------------------------------------------------------ LFD
def lfd_reference(loss: LFD, s: SegOutputs, t: SegOutputs, labels: torch.Tensor, kl_on: bool) -> dict[str, float]:
    """Raw KD / feature values and the weighted terms as the script combines them (float64 loops)."""
    sl, tl = np_(s.logits), np_(t.logits)
    kl = np_kl(sl, tl, loss.temperature)                               # [B,h,w]; logits and head share the grid
    weight = kl / kl.mean(axis=(1, 2), keepdims=True)
    with torch.no_grad():
        adapted = loss.adapter(s.head_feature)
        aux_s, aux_t = loss.aux_head(adapted), loss.aux_head(t.head_feature)
    feat = (weight * ((np_(adapted) - np_(t.head_feature)) ** 2).mean(axis=1)).mean()
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
    kd = loss.temperature**2 * kl.mean()
    # kd and feat enter as weight · x / x.detach(): value = weight
    return {"raw_kd": kd, "raw_feat": feat, "kd": loss.kd_weight, "feat": loss.feat_weight,
            "aux": loss.aux_weight * aux, "kl": loss.kl_weight * kd if kl_on else 0.0}


def test_lfd_matches_independent_computation():
    torch.manual_seed(0)
    loss = LFD(STUDENT, TEACHER, K, temperature=2.0, feat_weight=0.6, aux_weight=0.3, kd_weight=0.8,
               kl_weight=0.4).eval()
    s, t, labels = make_outputs(STUDENT, True, 1), make_outputs(TEACHER, False, 2), make_labels()
    for progress, kl_on in ((0.5, True), (0.01, False)):
        out = loss(s, t, labels, progress)
        ref = lfd_reference(loss, s, t, labels, kl_on)
        for term in ("kd", "feat", "aux", "kl"):
            np.testing.assert_allclose(float(out[f"loss_{term}"]), ref[term], rtol=1e-5, atol=1e-12)
        for raw in ("raw_kd", "raw_feat"):
            np.testing.assert_allclose(float(out[raw]), ref[raw], rtol=1e-5)
        np.testing.assert_allclose(float(out["loss"].detach()), sum(ref[k] for k in ("kd", "feat", "aux", "kl")),
                                   rtol=1e-5)
    # vanilla KD is on from the first step, LFD's own KL term only from kl_start
    first = loss(s, t, labels, 0.0)
    assert float(first["loss_kd"]) == pytest.approx(0.8) and float(first["loss_kl"]) == 0.0


def test_lfd_self_normalised_terms_have_the_scaled_gradient():
    """x / x.detach() (train_lfd_v1.py L434-447): value λ, gradient λ·∇x / x, for KD, features and the seg loss."""
    torch.manual_seed(0)
    loss = LFD(STUDENT, TEACHER, K, kd_weight=0.8, feat_weight=0.6, aux_weight=0.0, kl_weight=0.0).eval()
    t, labels = make_outputs(TEACHER, False, 2), make_labels()
    s = make_outputs(STUDENT, True, 1)
    out = loss(s, t, labels, 0.5)
    out["loss"].backward()
    assert float(out["loss_kd"]) == pytest.approx(0.8) and float(out["loss_feat"]) == pytest.approx(0.6)
    # independently: the gradient of 0.8·KD/KD₀ + 0.6·feat/feat₀, with KD₀ and feat₀ plain numbers
    s2 = make_outputs(STUDENT, True, 1)
    kd0, feat0 = float(out["raw_kd"]), float(out["raw_feat"])
    log_p_t = torch.log_softmax(t.logits, 1)
    kl_map = (log_p_t.exp() * (log_p_t - torch.log_softmax(s2.logits, 1))).sum(1)
    w = kl_map.detach() / kl_map.detach().mean(dim=(1, 2), keepdim=True)
    adapted = torch.einsum("oc,bchw->bohw", loss.adapter.weight[:, :, 0, 0].detach(), s2.head_feature)
    feat = (w * (adapted - t.head_feature).pow(2).mean(1)).mean()
    (0.8 * kl_map.mean() / kd0 + 0.6 * feat / feat0).backward()
    torch.testing.assert_close(s.logits.grad, s2.logits.grad, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(s.head_feature.grad, s2.head_feature.grad, rtol=1e-5, atol=1e-9)
    # the segmentation loss: value 1, gradient ∇L / L; kept as it is with normalize_seg=False
    x = torch.tensor(2.5, requires_grad=True)
    term = loss.seg_term(x * x)
    term.backward()
    assert float(term.detach()) == 1.0 and float(x.grad) == pytest.approx(2 * 2.5 / 6.25)
    plain = LFD(STUDENT, TEACHER, K, normalize_seg=False)
    y = torch.tensor(3.0)
    assert plain.seg_term(y) is y


def test_lfd_defaults_from_authors_script():
    loss = LFD(STUDENT, TEACHER, K)
    assert (loss.kd_weight, loss.feat_weight, loss.aux_weight, loss.kl_weight) == (1.0, 1.0, 0.1, 1.0)
    assert loss.temperature == 1.0 and loss.normalize_seg
    assert loss.kl_start == pytest.approx(1000 / 40000)
    # the adapter maps the student head's width to the teacher head's, bias-free (Adapter(128, 256))
    assert loss.adapter.bias is None
    assert loss.adapter.weight.shape[:2] == (TEACHER.head_channels, STUDENT.head_channels)
    assert loss.aux_head[0].in_channels == TEACHER.head_channels and loss.aux_head[0].out_channels == 128
    assert LFD.uses == ("logits", "head_feature")
    with pytest.raises(ValueError, match="head_channels"):
        LFD(EncoderInfo("vit", 6, 2, (4, 4, 6, 6)), TEACHER, K)
    s = make_outputs(STUDENT, True, 1)
    s.head_feature = None
    with pytest.raises(ValueError, match="head_feature"):
        loss(s, make_outputs(TEACHER, False, 2), make_labels(), 0.5)


def test_lfd_spatial_mask_follows_the_logit_discrepancy():
    kl = torch.tensor([[[0.0, 1.0], [3.0, 0.0]]])
    w = LFD.spatial_mask(kl, (2, 2))
    assert torch.allclose(w, kl / kl.mean()) and w.mean() == pytest.approx(1.0)


# ------------------------------------------------------------------------------ all three
def build(name: str):
    """Each loss with small layers (Af-DCD: 4 channel groups, 2×2 pooling / windows; BCKD: 8 fused channels)."""
    kw = {"afdcd": {"groups": 4, "pool_size": 2, "patch_size": 2}, "bckd": {"channels": 8}}.get(name, {})
    return LOSSES[name](STUDENT, TEACHER, K, **kw)


def bckd_floor(loss, s, t, r: float) -> float:
    """r·(α·H(T^B) + β·H(T^R)) at τ = 1: the teacher-side entropies, the least BCKD's cross-entropies
    can reach (the frozen teacher side fixes them)."""
    from gkd.distill.task_losses_dense import pair_boundary, tempered_cross_entropy

    with torch.no_grad():
        ft = loss.teacher_branch.fused([f.float() for f in t.features], tuple(s.features[1].shape[-2:]))
        tb, valid = pair_boundary(torch.sigmoid(loss.teacher_branch.boundary(ft)), loss.radius)
        o = loss.teacher_branch.align(ft).flatten(2)
        tr = F.softmax(o.transpose(1, 2) @ o / math.sqrt(o.shape[1]), dim=-1)
        hb = tempered_cross_entropy(tb, tb, dim=1, valid=valid).mean()
        hr = tempered_cross_entropy(tr, tr, dim=-1).mean()
    return float(r * (loss.alpha * hb + loss.beta * hr))


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_loss_decreases_under_adam(name: str):
    torch.manual_seed(0)
    size = 8
    loss = build(name)
    if name == "bckd":
        loss.eval()  # a fixed τ: the τ rule's growth multiplies the loss by τ², by design
    s, t, labels = make_outputs(STUDENT, True, 1, size), make_outputs(TEACHER, False, 2, size), make_labels(2 * size)
    params = [*leaves(s), *loss.parameters()]
    opt = torch.optim.Adam(params, lr=0.05)
    values = []
    for _ in range(20):
        torch.manual_seed(7)  # the same Af-DCD mask every step
        out = loss(s, t, labels, 0.5)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        values.append(float(out["loss"].detach()))
    if name == "bckd":  # cross-entropies: only the excess above the teacher's entropy (the KL) can shrink
        floor = bckd_floor(loss, s, t, 0.5)
        assert values[-1] - floor < 0.2 * (values[0] - floor), (floor, values)
    else:
        assert values[-1] < 0.8 * values[0], values


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_no_gradient_reaches_the_teacher(name: str):
    size = 8
    loss = build(name)
    s = make_outputs(STUDENT, True, 1, size)
    # a trap: teacher leaves that *would* collect gradient if the loss did not detach them
    t = make_outputs(TEACHER, True, 2, size)
    out = loss(s, t, make_labels(2 * size), 0.5)
    out["loss"].backward()
    for x in leaves(t):
        assert x.grad is None
    assert any(x.grad is not None and x.grad.abs().sum() > 0 for x in leaves(s))
    assert all(not v.requires_grad for k, v in out.items() if k != "loss")
    # the usual case: teacher tensors without autograd history stay that way
    plain = make_outputs(TEACHER, False, 2, size)
    loss(s, plain, make_labels(2 * size), 0.5)
    assert not any(x.requires_grad for x in leaves(plain))


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_half_precision_teacher_and_resized_maps(name: str):
    size = 8
    loss = build(name)
    s = make_outputs(STUDENT, True, 1, size)
    t = make_outputs(TEACHER, False, 2, 2 * size, dtype=torch.bfloat16)   # teacher on a 2× finer grid, bf16
    out = loss(s, t, make_labels(2 * size), 0.5)
    assert out["loss"].dtype == torch.float32 and math.isfinite(float(out["loss"].detach()))
    terms = [float(v) for k, v in out.items() if k.startswith("loss_")]
    assert sum(terms) == pytest.approx(float(out["loss"].detach()), rel=1e-5)
    out["loss"].backward()
    assert any(x.grad is not None and x.grad.abs().sum() > 0 for x in leaves(s))


def test_registry():
    assert LOSSES == {"afdcd": AfDCD, "bckd": BCKD, "lfd": LFD}
    assert AfDCD.uses == ("logits", "features")
