"""Task-level KD losses (KD, FitNet, CWD, ViTKD) against independent re-computations.

The references below are written differently from the modules on purpose: numpy loops in
float64 over pixels/channels/tokens, explicit matrix products for the linear layers, and a
mask built from labels by slicing instead of interpolation.
"""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from gkd.distill.task_base import TaskKDLoss, resize_to
from gkd.tensors import EncoderInfo, SegOutputs
from gkd.distill.task_losses import CWD, LOSSES, FitNet, VanillaKD, ViTKD

B, K, H, W = 2, 5, 4, 6            # logit grid h×w; labels are 4× larger (stride 4)
CS, CT, DEPTH_S, DEPTH_T = 6, 10, 4, 5
FEATS_S, FEATS_T = (4, 6, 8, 6), (5, 7, 9, 10)
STUDENT = EncoderInfo("vit", CS, DEPTH_S, FEATS_S)
TEACHER = EncoderInfo("vit", CT, DEPTH_T, FEATS_T)


def outputs(c_last: int, depth: int, feats: tuple[int, ...], grid: tuple[int, int] = (H, W),
            seed: int = 0, scale: float = 2.0) -> SegOutputs:
    """Random SegOutputs: logits [B,K,h,w], 4 features, last map (and its final-norm version) and blocks 0, 1."""
    g = torch.Generator().manual_seed(seed)
    h, w = grid
    rand = lambda *shape: scale * torch.randn(*shape, generator=g)  # noqa: E731
    blocks = {i: rand(B, c_last, h, w) for i in (0, 1)}
    return SegOutputs(
        logits=rand(B, K, h, w),
        features=[rand(B, c, 2 * h, 2 * w) if i == 0 else rand(B, c, h, w) for i, c in enumerate(feats)],
        last=rand(B, c_last, h, w),
        blocks=blocks,
        last_norm=rand(B, c_last, h, w),
    )


def student_out(seed: int = 0) -> SegOutputs:
    return outputs(CS, DEPTH_S, FEATS_S, seed=seed)


def teacher_out(seed: int = 1, grid: tuple[int, int] = (H, W)) -> SegOutputs:
    return outputs(CT, DEPTH_T, FEATS_T, grid=grid, seed=seed)


def labels(ignore_frac: float = 0.3, seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    lab = torch.randint(0, K, (B, 4 * H, 4 * W), generator=g)
    lab[torch.rand(lab.shape, generator=g) < ignore_frac] = 255
    return lab


def build(name: str, **kw) -> TaskKDLoss:
    torch.manual_seed(0)
    return LOSSES[name](STUDENT, TEACHER, K, **kw)


def np_softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def np_kl(p: np.ndarray, q: np.ndarray) -> float:
    return float(np.sum(p * (np.log(p) - np.log(q))))


# ---------------------------------------------------------------- reference values


@pytest.mark.parametrize("T,weight", [(1.0, 1.0), (3.0, 0.5)])
@pytest.mark.parametrize("mask_ignore", [False, True])
def test_kd_matches_pixel_loop(T: float, weight: float, mask_ignore: bool) -> None:
    s, t, lab = student_out(), teacher_out(), labels()
    got = build("kd", temperature=T, weight=weight, mask_ignore=mask_ignore)(s, t, lab, 0.0)
    sl, tl = s.logits.double().numpy(), t.logits.double().numpy()
    # nearest sampling of a 4× larger label map picks rows/cols 0, 4, 8, ...
    valid = (lab[:, ::4, ::4] != 255).numpy() if mask_ignore else np.ones((B, H, W), bool)
    kls = [np_kl(np_softmax(tl[b, :, i, j] / T), np_softmax(sl[b, :, i, j] / T))
           for b in range(B) for i in range(H) for j in range(W) if valid[b, i, j]]
    want = weight * T**2 * sum(kls) / len(kls)
    assert got["loss"].item() == pytest.approx(want, rel=1e-5)
    assert got["loss_kd"].item() == pytest.approx(want, rel=1e-5)
    assert not got["loss_kd"].requires_grad


@pytest.mark.parametrize("tau,weight", [(4.0, 3.0), (1.0, 5.0)])
def test_cwd_matches_channel_loop(tau: float, weight: float) -> None:
    s, t = student_out(), teacher_out()
    got = build("cwd", tau=tau, weight=weight)(s, t, labels(), 0.0)["loss"]
    sl, tl = s.logits.double().numpy(), t.logits.double().numpy()
    kls = [np_kl(np_softmax(tl[b, c].ravel() / tau), np_softmax(sl[b, c].ravel() / tau))
           for b in range(B) for c in range(K)]
    want = weight * tau**2 * sum(kls) / (B * K)
    assert got.item() == pytest.approx(want, rel=1e-5)


def test_cwd_defaults() -> None:
    loss = build("cwd")
    assert (loss.tau, loss.weight) == (4.0, 3.0)
    kd = build("kd")
    assert (kd.temperature, kd.weight, kd.mask_ignore) == (1.0, 1.0, False)


@pytest.mark.parametrize("hint", ["last", 2])
def test_fitnet_matches_matrix_product(hint) -> None:
    s, t = student_out(), teacher_out()
    loss = build("fitnet", hint=hint, weight=2.0)
    got = loss(s, t, labels(), 0.0)["loss"]
    sm = (s.last if hint == "last" else s.features[hint]).double().numpy()   # [B, Cs, h, w]
    tm = (t.last if hint == "last" else t.features[hint]).double().numpy()
    wgt = loss.regressor.weight.detach().double().numpy()[:, :, 0, 0]         # [Ct, Cs]
    bias = loss.regressor.bias.detach().double().numpy()
    sq = []
    for b in range(B):
        for i in range(sm.shape[2]):
            for j in range(sm.shape[3]):
                sq.extend((wgt @ sm[b, :, i, j] + bias - tm[b, :, i, j]) ** 2)
    assert got.item() == pytest.approx(2.0 * float(np.mean(sq)), rel=1e-5)


def test_fitnet_channels_follow_hint() -> None:
    assert build("fitnet").regressor.weight.shape[:2] == (CT, CS)
    assert build("fitnet", hint=1).regressor.weight.shape[:2] == (FEATS_T[1], FEATS_S[1])
    with pytest.raises(ValueError):
        build("fitnet", hint=7)


def vitkd_reference(loss: ViTKD, s: SegOutputs, t: SegOutputs, mask: torch.Tensor) -> tuple[float, float]:
    """Mimic and generation terms from token lists, float64; mask: [B, N] bool (True = masked)."""
    def tokens(x: torch.Tensor) -> np.ndarray:  # [B, C, h, w] → [B, N, C]
        return x.detach().double().flatten(2).transpose(1, 2).numpy()

    def linear(layer: torch.nn.Module, x: np.ndarray) -> np.ndarray:
        if isinstance(layer, torch.nn.Identity):
            return x.copy()
        return x @ layer.weight.detach().double().numpy().T + layer.bias.detach().double().numpy()

    b, _, h, w = s.last_norm.shape
    ct = t.last_norm.shape[1]
    mimic = 0.0
    for l in (0, 1):
        diff = linear(loss.mimic_proj[l], tokens(s.blocks[l])) - tokens(t.blocks[l])
        mimic += float((diff**2).sum())
    mimic *= loss.alpha / b

    x = linear(loss.gen_proj, tokens(s.last_norm))                                # [B, N, Ct]
    token = loss.mask_token.detach().double().numpy()
    for bi in range(b):
        for n in range(h * w):
            if mask[bi, n]:
                x[bi, n] = token
    grid = torch.from_numpy(x).transpose(1, 2).reshape(b, ct, h, w)
    gen = tokens(copy.deepcopy(loss.generator).double()(grid))
    target = tokens(t.last_norm)
    err = sum(float(((gen[bi, n] - target[bi, n]) ** 2).sum())
              for bi in range(b) for n in range(h * w) if mask[bi, n])
    return mimic, loss.beta * err / (b * loss.mask_ratio)


def test_vitkd_matches_token_loop() -> None:
    s, t = student_out(), teacher_out()
    loss = build("vitkd")
    with torch.no_grad():  # non-zero mask token, so a wrong masking shows
        loss.mask_token.normal_()
    torch.manual_seed(123)
    got = loss(s, t, labels(), 0.0)
    torch.manual_seed(123)
    mask = loss.random_mask(B, H * W)
    mimic, gen = vitkd_reference(loss, s, t, mask)
    assert got["loss_vitkd_mimic"].item() == pytest.approx(mimic, rel=1e-5)
    assert got["loss_vitkd_gen"].item() == pytest.approx(gen, rel=1e-5)
    assert got["loss"].item() == pytest.approx(mimic + gen, rel=1e-5)


def test_vitkd_defaults_mask_and_blocks() -> None:
    loss = build("vitkd")
    assert (loss.alpha, loss.beta, loss.mask_ratio) == (3e-5, 3e-6, 0.5)
    # the deep layer comes normed in SegOutputs.last_norm, so only the shallow pair is requested
    assert loss.blocks(STUDENT, "student") == [0, 1] and loss.blocks(TEACHER, "teacher") == [0, 1]
    torch.manual_seed(0)
    mask = loss.random_mask(64, 25)
    # keep int(N·(1−λ)) = 12 tokens, mask the other 13, in every row
    assert mask.dtype == torch.bool and (mask.sum(1) == 13).all()
    # positions are not fixed: every column is masked in some row and kept in another
    assert mask.any(0).all() and (~mask).any(0).all()
    # equal widths: no projection layers, as in the official code
    same = ViTKD(STUDENT, STUDENT, K)
    assert all(isinstance(p, torch.nn.Identity) for p in [*same.mimic_proj, same.gen_proj])


def test_vitkd_rejects_cnn() -> None:
    cnn = EncoderInfo("cnn", 8, 0, (2, 4, 6, 8))
    with pytest.raises(ValueError, match="ViT"):
        ViTKD(cnn, TEACHER, K)
    with pytest.raises(ValueError, match="ViT"):
        ViTKD(STUDENT, cnn, K)
    t = teacher_out()
    t.last_norm = None  # a CNN-style SegOutputs
    with pytest.raises(ValueError, match="last_norm"):
        build("vitkd")(student_out(), t, labels(), 0.0)


def test_vitkd_targets_are_the_official_tensors_on_a_tiny_vit() -> None:
    """The generation target (and the student's input) is the last block's patch tokens after the
    encoder's final norm — the official backbone's ``high_f`` (``x = self.norm1(x)`` on the last
    layer, then ``x[:, 1:]``) — computed independently with timm's own forward_features."""
    from gkd.engine.segment import encoder_info
    from gkd.models import build_segmentor, build_student

    def segmentor(seed: int, dim: int):
        torch.manual_seed(seed)
        enc = build_student("deit_small_patch16_224", img_size=64, patch_size=16, embed_dim=dim, depth=3, num_heads=2)
        return build_segmentor(enc, "mlp", K, channels=8, train_encoder=True)

    student, teacher = segmentor(0, 16), segmentor(1, 24)
    with torch.no_grad():  # a non-trivial final norm, so a missing norm shows
        for seg in (student, teacher):
            seg.encoder.encoder.norm.weight.normal_()
            seg.encoder.encoder.norm.bias.normal_()
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    loss = ViTKD(encoder_info(student), encoder_info(teacher), K)
    _, s = student.distill_outputs(images, None, loss.blocks(loss.student_info, "student"), logits=False)
    with torch.no_grad():
        _, t = teacher.distill_outputs(images, None, loss.blocks(loss.teacher_info, "teacher"), logits=False)

    def official_high(seg) -> torch.Tensor:
        x = (images - seg.mean) / seg.std
        with torch.no_grad():
            tokens = seg.encoder.encoder.forward_features(x)[:, seg.encoder.encoder.num_prefix_tokens:]  # [B, N, C]
        return tokens.transpose(1, 2).reshape(2, -1, 4, 4)

    torch.testing.assert_close(t.last_norm, official_high(teacher), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s.last_norm.detach(), official_high(student), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(t.last_norm, t.last, atol=1e-3)  # the pre-norm map differs: the norm matters
    assert sorted(t.blocks) == [0, 1]
    # and the loss's generation term uses exactly that target
    torch.manual_seed(9)
    got = loss(s, t, labels(), 0.0)
    torch.manual_seed(9)
    mask = loss.random_mask(2, 16)
    ref = SegOutputs(t.logits, t.features, t.last, t.blocks, last_norm=official_high(teacher))
    _, gen = vitkd_reference(loss, s, ref, mask)
    assert got["loss_vitkd_gen"].item() == pytest.approx(gen, rel=1e-5)


# ---------------------------------------------------------------- temperature and invariances


def test_kd_identical_logits_zero_and_t_squared_scaling() -> None:
    s, t, lab = student_out(), teacher_out(), labels()
    for T in (1.0, 2.0, 5.0):
        same = VanillaKD(STUDENT, TEACHER, K, temperature=T)(s, student_out(), lab, 0.0)["loss"]
        assert same.item() == pytest.approx(0.0, abs=1e-6)
    # KD_T(s, t) = T² · KD_1(s/T, t/T)
    T = 3.0
    hot = VanillaKD(STUDENT, TEACHER, K, temperature=T)(s, t, lab, 0.0)["loss"]
    s1, t1 = student_out(), teacher_out()
    s1.logits, t1.logits = s.logits / T, t.logits / T
    cold = VanillaKD(STUDENT, TEACHER, K, temperature=1.0)(s1, t1, lab, 0.0)["loss"]
    assert hot.item() == pytest.approx(T**2 * cold.item(), rel=1e-5)
    # KD is shift-invariant per pixel (softmax over classes), but not per channel
    s2 = student_out()
    s2.logits = s.logits + torch.randn(B, 1, H, W)
    shifted = VanillaKD(STUDENT, TEACHER, K, temperature=T)(s2, t, lab, 0.0)["loss"]
    assert shifted.item() == pytest.approx(hot.item(), rel=1e-5)


def test_cwd_identical_zero_channel_shift_invariance_and_tau_squared() -> None:
    s, t, lab = student_out(), teacher_out(), labels()
    loss = CWD(STUDENT, TEACHER, K)
    assert loss(s, student_out(), lab, 0.0)["loss"].item() == pytest.approx(0.0, abs=1e-6)
    base = loss(s, t, lab, 0.0)["loss"].item()
    s2, t2 = student_out(), teacher_out()
    s2.logits = s.logits + 5 * torch.randn(B, K, 1, 1)      # per (sample, channel) constants
    t2.logits = t.logits - 3 * torch.randn(B, K, 1, 1)
    assert loss(s2, t2, lab, 0.0)["loss"].item() == pytest.approx(base, rel=1e-5)
    # a per-pixel shift (the KD invariance) does change CWD
    s3 = student_out()
    s3.logits = s.logits + 3 * torch.randn(B, 1, H, W)
    assert abs(loss(s3, t, lab, 0.0)["loss"].item() - base) > 1e-3
    # CWD_τ(s, t) = τ² · CWD_1(s/τ, t/τ) (same weight)
    s4, t4 = student_out(), teacher_out()
    s4.logits, t4.logits = s.logits / 4.0, t.logits / 4.0
    cold = CWD(STUDENT, TEACHER, K, tau=1.0)(s4, t4, lab, 0.0)["loss"].item()
    assert base == pytest.approx(16.0 * cold, rel=1e-5)


def test_teacher_grid_is_resized_to_student() -> None:
    s, lab = student_out(), labels()
    t_big = teacher_out(grid=(2 * H, 3 * W))
    t_small = teacher_out(grid=(2 * H, 3 * W))
    t_small.logits = resize_to(t_big.logits, s.logits)
    t_small.last = resize_to(t_big.last, s.last)
    t_small.features = [resize_to(tf, sf) for tf, sf in zip(t_big.features, s.features)]
    t_small.blocks = {i: resize_to(v, s.last) for i, v in t_big.blocks.items()}
    t_small.last_norm = resize_to(t_big.last_norm, s.last)
    for name in LOSSES:
        loss = build(name)
        torch.manual_seed(5)
        a = loss(s, t_big, lab, 0.0)["loss"]
        torch.manual_seed(5)
        b = loss(s, t_small, lab, 0.0)["loss"]
        assert a.item() == pytest.approx(b.item(), rel=1e-5), name


@pytest.mark.parametrize("name", list(LOSSES))
def test_half_precision_teacher_gives_fp32_loss(name: str) -> None:
    s, lab, loss = student_out(), labels(), build(name)
    t = teacher_out(grid=(2 * H, 2 * W))  # so the loss also resizes the bf16 maps
    cast = lambda o, dt: SegOutputs(o.logits.to(dt), [f.to(dt) for f in o.features],  # noqa: E731
                                    o.last.to(dt), {i: v.to(dt) for i, v in o.blocks.items()},
                                    last_norm=o.last_norm.to(dt))
    t16 = cast(t, torch.bfloat16)
    t32 = cast(t16, torch.float32)  # the same bf16 values, upcast before the loss
    torch.manual_seed(5)
    ref = loss(s, t32, lab, 0.0)["loss"]
    torch.manual_seed(5)
    got = loss(s, t16, lab, 0.0)["loss"]
    # computing in fp32 leaves the teacher's bf16 rounding (already in ref) as the only difference
    assert got.dtype == torch.float32 and math.isfinite(got.item())
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)


# ---------------------------------------------------------------- training behaviour


def leaf_outputs(out: SegOutputs, requires_grad: bool) -> SegOutputs:
    leaf = lambda x: x.detach().clone().requires_grad_(requires_grad)  # noqa: E731
    return SegOutputs(leaf(out.logits), [leaf(f) for f in out.features], leaf(out.last),
                      {i: leaf(v) for i, v in out.blocks.items()}, last_norm=leaf(out.last_norm))


def tensors(out: SegOutputs) -> list[torch.Tensor]:
    return [out.logits, *out.features, out.last, *out.blocks.values(), out.last_norm]


@pytest.mark.parametrize("name", list(LOSSES))
def test_no_gradient_reaches_teacher(name: str) -> None:
    loss = build(name)
    s, t = leaf_outputs(student_out(), True), leaf_outputs(teacher_out(), True)
    out = loss(s, t, labels(), 0.0)
    out["loss"].backward()
    # a loss that forgot to detach the teacher would fill these
    assert all(x.grad is None for x in tensors(t))
    assert any(x.grad is not None and x.grad.abs().sum() > 0 for x in tensors(s))
    assert all(v.grad is not None for v in loss.parameters())
    assert not any(v.requires_grad for k, v in out.items() if k != "loss")


@pytest.mark.parametrize("name", list(LOSSES))
def test_adam_steps_reduce_loss(name: str) -> None:
    loss = build(name)
    s, t, lab = leaf_outputs(student_out(), True), teacher_out(), labels()
    opt = torch.optim.Adam([*tensors(s), *loss.parameters()], lr=0.05)
    values = []
    for step in range(20):
        torch.manual_seed(step)  # ViTKD: a fresh mask per step, reproducibly
        value = loss(s, t, lab, 0.0)["loss"]
        opt.zero_grad()
        value.backward()
        opt.step()
        values.append(value.item())
    torch.manual_seed(0)
    final = loss(s, t, lab, 0.0)["loss"].item()
    assert final < 0.7 * values[0], (name, values[0], final)


def test_losses_registry() -> None:
    assert LOSSES == {"kd": VanillaKD, "fitnet": FitNet, "cwd": CWD, "vitkd": ViTKD}
    assert VanillaKD.uses == ("logits",) and CWD.uses == ("logits",)
    assert FitNet.uses == ("features",)
    for cls in LOSSES.values():
        assert issubclass(cls, TaskKDLoss)


def test_kd_all_ignore_batch_is_zero_not_nan() -> None:
    lab = torch.full((B, 4 * H, 4 * W), 255)
    got = build("kd", mask_ignore=True)(student_out(), teacher_out(), lab, 0.0)["loss"]
    assert got.item() == 0.0
