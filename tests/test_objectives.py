"""GKD / Proteus objectives against hand-written re-computations on a tiny fake student."""
from __future__ import annotations

import math

import pytest
import torch
from einops import rearrange
from torch import Tensor, nn

from gkd.distill import (
    METHODS,
    GKDObjective,
    LinearHead,
    ProteusObjective,
    QSD,
    batch_patch_mask,
    build_objective,
    random_patch_mask,
)
from gkd.tensors import Tokens

P, IMG, CS, CT = 4, 12, 6, 10  # 3×3 grid, N = 9
N = (IMG // P) ** 2


class FakeStudent(nn.Module):
    """Patch-flatten → linear → mask-token replacement → tanh; cls = tanh(linear(mean)).

    ``batch_coupled`` subtracts the batch mean of the embeddings (a BatchNorm stand-in),
    which makes the output depend on the other samples.
    """

    def __init__(self, batch_independent: bool = True, batch_coupled: bool = False, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Linear(3 * P * P, CS)
        self.cls_proj = nn.Linear(CS, CS)
        self.mask_token = nn.Parameter(torch.randn(CS))
        self.embed_dim = CS
        self.grid = (IMG // P, IMG // P)
        self.num_patches = N
        self.batch_independent = batch_independent
        self.batch_coupled = batch_coupled
        self.calls: list[int] = []
        self.masks: list[Tensor | None] = []

    def forward(self, images: Tensor, mask: Tensor | None = None) -> Tokens:
        self.calls.append(images.shape[0])
        self.masks.append(None if mask is None else mask.clone())
        x = self.embed(rearrange(images, "b c (h p) (w q) -> b (h w) (p q c)", p=P, q=P))
        if mask is not None:
            x = torch.where(mask[..., None], self.mask_token, x)
        if self.batch_coupled:
            x = x - x.mean(0, keepdim=True)
        patch = torch.tanh(x)
        return Tokens(cls=torch.tanh(self.cls_proj(patch.mean(1))), patch=patch, grid=self.grid)


# ----------------------------------------------------------------- independent references
def ref_student(st: FakeStudent, images: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """The fake student written with loops, float64: (cls [B,Cs], patch [B,N,Cs])."""
    B = images.shape[0]
    W, b = st.embed.weight.double(), st.embed.bias.double()
    rows = []
    for i in range(B):
        toks = []
        for gy in range(IMG // P):
            for gx in range(IMG // P):
                cell = images[i, :, gy * P:(gy + 1) * P, gx * P:(gx + 1) * P].double()
                toks.append(W @ cell.permute(1, 2, 0).reshape(-1) + b)  # (p q c) order
        rows.append(torch.stack(toks))
    x = torch.stack(rows)
    if mask is not None:
        for i in range(B):
            for j in range(N):
                if mask[i, j]:
                    x[i, j] = st.mask_token.double()
    if st.batch_coupled:
        x = x - x.mean(0, keepdim=True)
    patch = torch.tanh(x)
    cls = torch.tanh(patch.mean(1) @ st.cls_proj.weight.double().T + st.cls_proj.bias.double())
    return cls, patch


def ref_ln_linear(x: Tensor, seq: nn.Sequential) -> Tensor:
    ln, lin = seq[0], seq[1]
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    xn = (x - mu) / torch.sqrt(var + ln.eps) * ln.weight.double() + ln.bias.double()
    return xn @ lin.weight.double().T + lin.bias.double()


def ref_head(head: nn.Module, s: Tensor, t: Tensor) -> Tensor:
    """QSD: softmax over teacher positions of Q Kᵀ times V; LinearHead: LN+Linear."""
    if isinstance(head, QSD):
        q, v = ref_ln_linear(s, head.proj_q), ref_ln_linear(s, head.proj_v)
        logits = torch.einsum("bic,bjc->bij", q, t.double())
        w = torch.exp(logits - logits.amax(-1, keepdim=True))
        return torch.einsum("bij,bjc->bic", w / w.sum(-1, keepdim=True), v)
    assert isinstance(head, LinearHead)
    return ref_ln_linear(s, head.proj)


@torch.no_grad()
def ref_losses(obj, st: FakeStudent, images: Tensor, teacher: Tokens, mask: Tensor) -> dict[str, float]:
    """The three terms by explicit sums of squares divided by element counts."""
    B = images.shape[0]
    t_cls, t_patch = teacher.cls.double(), teacher.patch.double()
    s_cls, s_patch = ref_student(st, images, None)
    _, s_masked = ref_student(st, images, mask)  # masked pass over the full batch
    c = ref_head(obj.token_head, s_cls[:, None], t_cls[:, None])[:, 0]
    f = ref_head(obj.fea_head, s_patch, t_patch)
    p = ref_head(obj.patch_head, s_masked, t_patch)
    token = ((c - t_cls) ** 2).sum() / (B * CT)
    fea = (((c - t_cls) ** 2).sum() + ((f - t_patch) ** 2).sum()) / (B * (N + 1) * CT)
    if obj.patch_loss_on == "all":
        patch = ((p - t_patch) ** 2).sum() / (B * N * CT)
    else:
        sq = ((p - t_patch) ** 2).sum(-1)  # [B, N]
        patch = sq[mask].sum() / (int(mask.sum()) * CT)
    return {"loss_token": float(token), "loss_fea": float(fea), "loss_patch": float(patch)}


def make_batch(B: int, seed: int = 0) -> tuple[Tensor, Tokens]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(B, 3, IMG, IMG, generator=g)
    teacher = Tokens(cls=torch.randn(B, CT, generator=g), patch=torch.randn(B, N, CT, generator=g), grid=(3, 3))
    return images, teacher


def randomize_heads(obj: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in obj.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def expected_mask(B: int, seed: int) -> Tensor:
    return batch_patch_mask(B, N, 0.5, 0.5, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------- loss terms
@pytest.mark.parametrize("cls", [GKDObjective, ProteusObjective])
@pytest.mark.parametrize("B", [4, 5])
@pytest.mark.parametrize("reuse", [None, False])
def test_terms_match_reference(cls, B: int, reuse) -> None:
    st = FakeStudent()
    obj = cls(CS, CT, reuse_unmasked=reuse)
    randomize_heads(obj, seed=B)
    images, teacher = make_batch(B)
    out = obj(st, images, teacher, generator=torch.Generator().manual_seed(7))
    mask = expected_mask(B, 7)
    ref = ref_losses(obj, st, images, teacher, mask)
    for k, v in ref.items():
        assert out[k].item() == pytest.approx(v, rel=1e-5, abs=1e-7), k
    assert out["loss"].item() == pytest.approx(sum(ref.values()), rel=1e-5)
    assert out["loss"].requires_grad
    assert not any(out[k].requires_grad for k in ref)


def test_mask_handed_to_student() -> None:
    """The masked call gets exactly the documented mask: first B//2 rows, N//2 positions each."""
    B = 7
    for reuse, masked_rows in ((None, B // 2), (False, B)):
        st = FakeStudent()
        images, teacher = make_batch(B)
        GKDObjective(CS, CT, reuse_unmasked=reuse)(st, images, teacher, generator=torch.Generator().manual_seed(3))
        assert st.masks[0] is None  # unmasked pass first
        m = st.masks[1]
        assert m.shape == (masked_rows, N) and m.dtype == torch.bool
        assert torch.equal(m, expected_mask(B, 3)[:masked_rows])
        assert m[: B // 2].sum(1).tolist() == [N // 2] * (B // 2)
        assert not m[B // 2:].any()


def test_weights_scale_the_total() -> None:
    st = FakeStudent()
    images, teacher = make_batch(4)
    w = {"token": 0.5, "fea": 2.0, "patch": 3.0}
    obj = GKDObjective(CS, CT, weights=w)
    out = obj(st, images, teacher, generator=torch.Generator().manual_seed(1))
    total = sum(w[k] * out[f"loss_{k}"].item() for k in w)
    assert out["loss"].item() == pytest.approx(total, rel=1e-6)
    partial = GKDObjective(CS, CT, weights={"patch": 0.0}).weights
    assert partial == {"token": 1.0, "fea": 1.0, "patch": 0.0}
    with pytest.raises(ValueError, match="token"):
        GKDObjective(CS, CT, weights={"cls": 1.0})


def test_token_head_is_shared_by_token_and_fea_terms() -> None:
    """Perturbing only the token QSD's value projection moves both L_token and L_fea."""
    st = FakeStudent()
    images, teacher = make_batch(4)
    obj = GKDObjective(CS, CT)
    a = obj(st, images, teacher, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        obj.token_head.proj_v[1].bias.add_(1.0)
    b = obj(st, images, teacher, generator=torch.Generator().manual_seed(0))
    assert a["loss_token"] != b["loss_token"] and a["loss_fea"] != b["loss_fea"]
    assert a["loss_patch"] == b["loss_patch"]


# ----------------------------------------------------------------- fast path
def _loss_and_grads(st: FakeStudent, obj: nn.Module, B: int) -> tuple[float, list[Tensor]]:
    images, teacher = make_batch(B, seed=2)
    st.zero_grad()
    obj.zero_grad()
    out = obj(st, images, teacher, generator=torch.Generator().manual_seed(5))
    out["loss"].backward()
    return out["loss"].item(), [p.grad.clone() for p in list(st.parameters()) + list(obj.parameters())]


@pytest.mark.parametrize("method", ["gkd", "proteus"])
@pytest.mark.parametrize("B", [6, 5])
def test_fast_path_is_exact_and_cheaper(method: str, B: int) -> None:
    st = FakeStudent(batch_independent=True)
    fast = build_objective(method, CS, CT)
    slow = build_objective(method, CS, CT, reuse_unmasked=False)
    slow.load_state_dict(fast.state_dict())
    lf, gf = _loss_and_grads(st, fast, B)
    fast_images = sum(st.calls)
    st.calls.clear()
    ls, gs = _loss_and_grads(st, slow, B)
    slow_images = sum(st.calls)
    assert lf == pytest.approx(ls, rel=1e-6, abs=1e-7)
    for a, b in zip(gf, gs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert slow_images == 2 * B
    assert fast_images == B + B // 2 < slow_images


def test_batch_dependent_student_gets_full_masked_pass() -> None:
    """Without batch independence the objective must not reuse; reuse would change the loss."""
    B = 4
    st = FakeStudent(batch_independent=False, batch_coupled=True)
    images, teacher = make_batch(B)
    obj = GKDObjective(CS, CT)
    out = obj(st, images, teacher, generator=torch.Generator().manual_seed(9))
    assert st.calls == [B, B]
    ref = ref_losses(obj, st, images, teacher, expected_mask(B, 9))
    assert out["loss_patch"].item() == pytest.approx(ref["loss_patch"], rel=1e-5)
    forced = GKDObjective(CS, CT, reuse_unmasked=True)
    forced.load_state_dict(obj.state_dict())
    wrong = forced(st, images, teacher, generator=torch.Generator().manual_seed(9))
    assert abs(wrong["loss_patch"].item() - ref["loss_patch"]) > 1e-4


def test_missing_attribute_means_slow_path() -> None:
    st = FakeStudent()
    del st.batch_independent
    images, teacher = make_batch(4)
    GKDObjective(CS, CT)(st, images, teacher)
    assert st.calls == [4, 4]


# ----------------------------------------------------------------- gradients & training
def test_teacher_gets_no_gradient_student_and_heads_do() -> None:
    st = FakeStudent()
    images, _ = make_batch(4)
    t_cls = torch.randn(4, CT, requires_grad=True)
    t_patch = torch.randn(4, N, CT, requires_grad=True)
    obj = GKDObjective(CS, CT)
    obj(st, images, Tokens(t_cls, t_patch, (3, 3)))["loss"].backward()
    assert t_cls.grad is None and t_patch.grad is None
    for name, p in list(st.named_parameters()) + list(obj.named_parameters()):
        if name.startswith("token_head.proj_q"):
            # one position: softmax ≡ 1, so Q has no influence (as in the authors' code)
            assert p.grad is None or torch.count_nonzero(p.grad) == 0
            continue
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("method", ["gkd", "proteus"])
def test_adamw_reduces_loss(method: str) -> None:
    torch.manual_seed(0)
    st = FakeStudent()
    obj = build_objective(method, CS, CT)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(8, 3, IMG, IMG, generator=g)
    # a fixed nonlinear "teacher" of the same images
    Wt = torch.randn(3 * P * P, CT, generator=g) * 0.2
    patch = torch.sin(rearrange(images, "b c (h p) (w q) -> b (h w) (p q c)", p=P, q=P) @ Wt)
    teacher = Tokens(cls=patch.mean(1), patch=patch, grid=(3, 3))
    opt = torch.optim.AdamW(list(st.parameters()) + list(obj.parameters()), lr=1e-2, weight_decay=0.05)
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(40):
        out = obj(st, images, teacher, generator=gen)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.5 * losses[0]


# ----------------------------------------------------------------- edge cases & registry
def test_batch_of_one_and_no_masking() -> None:
    st = FakeStudent()
    images, teacher = make_batch(1)
    out = GKDObjective(CS, CT)(st, images, teacher)
    assert all(math.isfinite(v.item()) for v in out.values())
    out = ProteusObjective(CS, CT)(st, images, teacher)
    assert out["loss_patch"].item() == 0.0 and out["loss"].requires_grad
    images, teacher = make_batch(4)
    out = ProteusObjective(CS, CT, mask_ratio=0.0)(st, images, teacher)
    assert out["loss_patch"].item() == 0.0


def test_grid_mismatch_is_an_error() -> None:
    st = FakeStudent()
    images, _ = make_batch(2)
    bad = Tokens(torch.randn(2, CT), torch.randn(2, N + 1, CT), (2, 5))
    with pytest.raises(ValueError, match="grid"):
        GKDObjective(CS, CT)(st, images, bad)


def test_heads_are_the_right_kind() -> None:
    gkd, proteus = GKDObjective(CS, CT), ProteusObjective(CS, CT)
    for name in ("token_head", "fea_head", "patch_head"):
        assert isinstance(getattr(gkd, name), QSD)
        head = getattr(proteus, name)
        assert isinstance(head, LinearHead)
        assert isinstance(head.proj[0], nn.LayerNorm) and isinstance(head.proj[1], nn.Linear)
        assert (head.proj[1].in_features, head.proj[1].out_features) == (CS, CT)
    assert gkd.patch_loss_on == "all" and proteus.patch_loss_on == "masked"
    assert GKDObjective(CS, CT, qsd_heads=2).patch_head.num_heads == 2


def test_registry() -> None:
    assert {n: m.cls for n, m in METHODS.items() if m.level == "representation"} == {
        "gkd": GKDObjective, "proteus": ProteusObjective}
    obj = build_objective("proteus", CS, CT, mask_ratio=0.25, patch_loss_on="all")
    assert isinstance(obj, ProteusObjective) and obj.mask_ratio == 0.25 and obj.patch_loss_on == "all"
    with pytest.raises(ValueError) as e:
        build_objective("vanilla_kd_typo", CS, CT)
    assert "gkd" in str(e.value) and "proteus" in str(e.value)
    with pytest.raises(ValueError):
        build_objective("gkd", CS, CT, mask_ratio=1.5)


# ----------------------------------------------------------------- masking
def test_random_patch_mask_counts_and_rounding() -> None:
    g = torch.Generator().manual_seed(0)
    m = random_patch_mask(50, 256, 0.5, generator=g)
    assert m.shape == (50, 256) and m.dtype == torch.bool
    assert (m.sum(1) == 128).all()
    # authors' rounding: int(N * ratio), i.e. truncation
    assert (random_patch_mask(3, 10, 0.35, generator=g).sum(1) == 3).all()
    assert (random_patch_mask(3, 9, 0.5, generator=g).sum(1) == 4).all()
    assert random_patch_mask(0, 9, 0.5).shape == (0, 9)
    with pytest.raises(ValueError):
        random_patch_mask(2, 9, 1.2)


def test_random_patch_mask_uniform_and_reproducible() -> None:
    g = torch.Generator().manual_seed(0)
    m = random_patch_mask(400, 64, 0.5, generator=g)
    per_position = m.sum(0).float()
    assert (per_position > 0).all()  # every position is masked at some point
    assert per_position.min() > 0.35 * 400 and per_position.max() < 0.65 * 400  # mean 200, sd 10
    rows = {tuple(r.nonzero().flatten().tolist()) for r in m}
    assert len(rows) > 390  # not one block pattern shifted around
    a = random_patch_mask(4, 64, 0.5, generator=torch.Generator().manual_seed(11))
    b = random_patch_mask(4, 64, 0.5, generator=torch.Generator().manual_seed(11))
    c = random_patch_mask(4, 64, 0.5, generator=torch.Generator().manual_seed(12))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("B", [1, 2, 5, 8])
def test_batch_patch_mask_masks_first_half_only(B: int) -> None:
    m = batch_patch_mask(B, 16, 0.5, 0.5, generator=torch.Generator().manual_seed(0))
    assert m.shape == (B, 16)
    assert (m[: B // 2].sum(1) == 8).all()
    assert not m[B // 2:].any()
