"""Stage-1/2 diagnostics, standardised targets and the frozen-feature probe, against independent
computations on small tensors; then a tiny stage-1 run that logs them, charges and records them."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from gkd.config import DistillConfig, load_config
from gkd.distill import GKDObjective
from gkd.distill import QSD
from gkd.distill.diagnostics import relative_spread, self_attention_ratio, spread_ratio, token_cosine
from gkd.distill.target_norm import TargetStandardizer, TokenMoments
from gkd.engine import read_metadata, train_distill
from gkd.engine.probe import class_fractions, fidelity_r2, fit_probe, probe_miou
from gkd.models import Tokens, build_student
from helpers import TINY


def _np_cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    return float(np.mean([x @ y / (np.linalg.norm(x) * np.linalg.norm(y)) for x, y in zip(a, b)]))


def _np_spread(x: np.ndarray) -> np.ndarray:
    out = []
    for img in x:  # [N, C]
        mean = img.mean(axis=0)
        out.append(sum(np.sum((t - mean) ** 2) for t in img) / sum(np.sum(t ** 2) for t in img))
    return np.array(out)


def test_diagnostics_equal_an_independent_computation():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(3, 5, 4, generator=g), torch.randn(3, 5, 6, generator=g) + 2.0
    p = torch.randn(3, 5, 6, generator=g)
    assert token_cosine(p, t).item() == pytest.approx(_np_cos(p.numpy(), t.numpy()), rel=1e-5)
    np.testing.assert_allclose(relative_spread(s).numpy(), _np_spread(s.numpy().astype(np.float64)), rtol=1e-5)
    want = _np_spread(s.numpy().astype(np.float64)).mean() / _np_spread(t.numpy().astype(np.float64)).mean()
    assert spread_ratio(s, t).item() == pytest.approx(want, rel=1e-5)
    # a student repeating one token at every position has no spread; the teacher's own ratio is 1
    collapsed = s[:, :1].expand(-1, 5, -1)
    assert spread_ratio(collapsed, t).item() == pytest.approx(0.0, abs=1e-6)
    assert spread_ratio(t, t).item() == pytest.approx(1.0, rel=1e-6)


def test_qsd_attention_is_the_forwards_and_its_self_ratio():
    torch.manual_seed(0)
    head = QSD(6, 8)
    s, t = torch.randn(2, 5, 6), torch.randn(2, 5, 8)
    attn = head.attention(s, t)  # [B, 1, N, N]
    v = head.proj_v(s)
    torch.testing.assert_close(head(s, t), torch.einsum("bqk,bkd->bqd", attn[:, 0], v).detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 1, 5))
    assert self_attention_ratio(torch.eye(5).expand(2, 1, 5, 5)).item() == pytest.approx(5.0)
    assert self_attention_ratio(torch.full((2, 1, 5, 5), 0.2)).item() == pytest.approx(1.0)
    diag = attn.diagonal(dim1=-2, dim2=-1).mean().item() * 5
    assert self_attention_ratio(attn).item() == pytest.approx(diag, rel=1e-6)


def test_query_init_scale_scales_the_initial_logits_only():
    torch.manual_seed(1)
    a = QSD(6, 8)
    torch.manual_seed(1)
    b = QSD(6, 8, query_init_scale=0.1)
    torch.testing.assert_close(b.proj_q[1].weight, 0.1 * a.proj_q[1].weight)
    torch.testing.assert_close(b.proj_v[1].weight, a.proj_v[1].weight)
    s, t = torch.randn(2, 5, 6), torch.randn(2, 5, 8)
    la = torch.einsum("bnc,bmc->bnm", a.proj_q(s), t)
    lb = torch.einsum("bnc,bmc->bnm", b.proj_q(s), t)
    torch.testing.assert_close(lb, 0.1 * la, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="query_init_scale"):
        QSD(6, 8, query_init_scale=0.0)


def test_objective_reports_the_diagnostics_of_its_own_tensors():
    torch.manual_seed(0)
    student = build_student("vit_tiny_patch16_224", img_size=32, grid=(2, 2), depth=1, embed_dim=16, num_heads=2)
    obj = GKDObjective(16, 8)
    images = torch.randn(4, 3, 32, 32)
    teacher = Tokens(cls=torch.randn(4, 8), patch=torch.randn(4, 4, 8) + 1.0, grid=(2, 2))
    out = obj(student, images, teacher)
    with torch.no_grad():
        tokens = student(images)
        cls_pred = obj.token_head(tokens.cls[:, None], teacher.cls[:, None])
        fea_pred = obj.fea_head(tokens.patch, teacher.patch)
    assert out["diag_cos_cls"].item() == pytest.approx(_np_cos(cls_pred.numpy(), teacher.cls[:, None].numpy()), rel=1e-5)
    assert out["diag_cos_patch"].item() == pytest.approx(_np_cos(fea_pred.numpy(), teacher.patch.numpy()), rel=1e-5)
    want = _np_spread(tokens.patch.double().numpy()).mean() / _np_spread(teacher.patch.double().numpy()).mean()
    assert out["diag_spread_ratio"].item() == pytest.approx(want, rel=1e-5)
    attn = obj.fea_head.attention(tokens.patch, teacher.patch)
    assert out["diag_attn_self"].item() == pytest.approx(attn.diagonal(dim1=-2, dim2=-1).mean().item() * 4, rel=1e-5)
    assert all(not out[k].requires_grad for k in ("diag_cos_cls", "diag_cos_patch", "diag_spread_ratio",
                                                  "diag_attn_self"))


def _tokens(g: torch.Generator, b: int = 4, n: int = 6, c: int = 5) -> Tokens:
    scale = torch.tensor([1.0, 50.0, 0.1, 3.0, 7.0][:c])
    return Tokens(cls=torch.randn(b, c, generator=g) * scale + 4.0,
                  patch=torch.randn(b, n, c, generator=g) * scale - 2.0, grid=(2, 3))


def test_standardised_targets_round_trip_and_have_unit_moments():
    g = torch.Generator().manual_seed(1)
    batches = [_tokens(g) for _ in range(3)]
    norm = TargetStandardizer(5)
    assert not norm.ready
    moments = TokenMoments(5)
    for tokens in batches:
        moments.update(tokens)
    norm.set_stats(moments)
    assert norm.ready and norm.num_tokens.tolist() == [12, 72]
    for name in ("cls", "patch"):  # independent: numpy over all tokens of the three batches
        x = np.concatenate([getattr(t, name).reshape(-1, 5).double().numpy() for t in batches])
        np.testing.assert_allclose(getattr(norm, f"{name}_mean").numpy(), x.mean(0), rtol=1e-5)
        np.testing.assert_allclose(getattr(norm, f"{name}_std").numpy(), x.std(0), rtol=1e-5)
        z = np.concatenate([getattr(norm(t), name).reshape(-1, 5).double().numpy() for t in batches])
        np.testing.assert_allclose(z.mean(0), 0.0, atol=1e-5)
        np.testing.assert_allclose(z.std(0), 1.0, rtol=1e-4)
    t = batches[0]
    back = norm.inverse(norm(t))
    torch.testing.assert_close(back.cls, t.cls, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(back.patch, t.patch, rtol=1e-5, atol=1e-4)
    record = json.loads(json.dumps(norm.as_record()))
    assert record["patch"]["std"] == pytest.approx(norm.patch_std.tolist())


def test_moments_add_up_across_processes():
    """What an all-reduce of ``flat()`` gives (two ranks, half the batches each) is the whole data's moments."""
    g = torch.Generator().manual_seed(2)
    batches = [_tokens(g) for _ in range(4)]
    whole = TokenMoments(5)
    halves = [TokenMoments(5), TokenMoments(5)]
    for i, t in enumerate(batches):
        whole.update(t)
        halves[i % 2].update(t)
    merged = TokenMoments(5)
    merged.load_flat(halves[0].flat() + halves[1].flat())
    for name in ("cls", "patch"):
        for a, b in zip(whole.mean_std(name), merged.mean_std(name)):
            torch.testing.assert_close(a, b)


def test_class_fractions_match_a_pixel_count():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, (2, 8, 12))
    labels[0, :4, :4] = 255  # one token fully ignored
    labels[1, 0, 0] = 255
    frac = class_fractions(torch.from_numpy(labels), (2, 3), 3, 255).numpy()  # 4×4-pixel tokens
    for b in range(2):
        for i in range(2):
            for j in range(3):
                cell = labels[b, 4 * i:4 * i + 4, 4 * j:4 * j + 4].ravel()
                want = [np.sum(cell == k) / 16 for k in range(3)]
                np.testing.assert_allclose(frac[b, i * 3 + j], want, atol=1e-6)
    assert frac[0, 0].sum() == 0.0


def test_probe_separates_classes_its_tokens_encode():
    """Tokens whose first channels are the class one-hot (plus noise): the fitted head labels held-out
    images almost perfectly (bilinear upsampling blurs only the token borders); pure noise does not."""
    g = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 3, (16, 2, 2), generator=g).repeat_interleave(4, 1).repeat_interleave(4, 2)  # 8×8 px
    token_labels = labels[:, ::4, ::4].reshape(16, 4)
    tokens = torch.nn.functional.one_hot(token_labels, 3).float() * 3 + 0.1 * torch.randn(16, 4, 3, generator=g)
    tokens = torch.cat([tokens, torch.randn(16, 4, 5, generator=g)], -1)
    frac = class_fractions(labels[:8], (2, 2), 3, 255)
    head = fit_probe(tokens[:8], frac, steps=200, lr=5e-2)
    assert probe_miou(tokens[8:], (2, 2), labels[8:], head, 3, 255) > 85.0
    noise = torch.randn(16, 4, 8, generator=g)
    head = fit_probe(noise[:8], frac, steps=200, lr=5e-2)
    assert probe_miou(noise[8:], (2, 2), labels[8:], head, 3, 255) < 60.0


def test_fidelity_r2_matches_numpy_ridge_and_sees_a_collapse():
    g = torch.Generator().manual_seed(4)
    student = torch.randn(12, 5, 4, generator=g)
    mix = torch.randn(4, 6, generator=g)
    teacher = student @ mix + 0.3 * torch.randn(12, 5, 6, generator=g)
    got = fidelity_r2(student[:8], teacher[:8], student[8:], teacher[8:], ridge=1e-2)
    # independent: numpy, the same standardisation and ridge, solved with lstsq on an augmented system
    xs, ys = student[:8].reshape(-1, 4).double().numpy(), teacher[:8].reshape(-1, 6).double().numpy()
    xv, yv = student[8:].reshape(-1, 4).double().numpy(), teacher[8:].reshape(-1, 6).double().numpy()
    xm, xsd, ym, ysd = xs.mean(0), xs.std(0, ddof=1), ys.mean(0), ys.std(0, ddof=1)
    xs, xv, ys, yv = (xs - xm) / xsd, (xv - xm) / xsd, (ys - ym) / ysd, (yv - ym) / ysd
    lam = 1e-2 * len(xs)
    a = np.vstack([xs, np.sqrt(lam) * np.eye(4)])
    w = np.linalg.lstsq(a, np.vstack([ys, np.zeros((4, 6))]), rcond=None)[0]
    want = 1 - ((yv - xv @ w) ** 2).sum() / ((yv - yv.mean(0)) ** 2).sum()
    assert got == pytest.approx(want, rel=1e-6) and got > 0.5
    collapsed = student[:, :1].expand(-1, 5, -1) + 1e-3 * torch.randn(12, 5, 4, generator=g)
    assert fidelity_r2(collapsed[:8], teacher[:8], collapsed[8:], teacher[8:]) < 0.2


def _records(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_stage1_logs_diagnostics_probe_and_standardised_targets(tmp_path, shards, folder_dataset):
    root, manifest, _ = folder_dataset
    out = tmp_path / "run"
    cfg = load_config(DistillConfig, [], [*TINY, f"data.train_shards={shards}", f"out_dir={out}", "optim.epochs=1",
                                          "targets.standardize=true", "targets.stats_batches=2",
                                          f"probe.manifest={manifest}", f"probe.root={root}", "probe.images=6", "probe.steps=20",
                                          "probe.every=3", "engine.save_every=100"])
    path = train_distill(cfg)
    records = _records(out)
    windows = [r for r in records if "loss" in r and "event" not in r]
    assert all({"diag_cos_cls", "diag_cos_patch", "diag_spread_ratio"} <= set(r) for r in windows)
    probes = [r for r in records if r.get("event") == "probe"]
    assert [(r["model"], r["step"]) for r in probes] == [("teacher", 0), ("student", 0), ("student", 3),
                                                         ("student", 6)]
    assert all(0.0 <= r["probe_miou"] <= 100.0 for r in probes)
    assert all("fidelity_r2" in r for r in probes if r["model"] == "student")
    charged = [r for r in records if r.get("event") == "charged"]
    assert [r["what"] for r in charged] == ["calibration"]
    compute = [r for r in records if r.get("event") == "compute"][-1]
    assert compute["train_seconds"] >= charged[0]["seconds"]  # the estimate is paid for by the budget
    meta = read_metadata(path)
    stats = meta["gkd_target_stats"]
    assert stats["num_tokens"] == {"cls": 2 * 8, "patch": 2 * 8 * 16}  # 2 micro-batches of 8 images, 4×4 grid
    assert len(stats["patch"]["mean"]) == 48 and min(stats["patch"]["std"]) > 0
    assert meta["gkd_probe"]["step"] == 6
    assert (out / "curves.png").stat().st_size > 1000


def test_probe_without_data_is_refused_before_training(tmp_path, shards, folder_dataset):
    _, manifest, _ = folder_dataset
    cfg = load_config(DistillConfig, [], [*TINY, f"data.train_shards={shards}", f"out_dir={tmp_path}",
                                          f"probe.manifest={manifest}", f"probe.root={tmp_path / 'nowhere'}"])
    with pytest.raises(FileNotFoundError, match="folder not found"):
        train_distill(cfg)
    assert not (tmp_path / "metrics.jsonl").exists()


def test_standardize_is_one_switch(tmp_path, shards):
    cfg = load_config(DistillConfig, [], [*TINY, f"data.train_shards={shards}", f"out_dir={tmp_path}",
                                          "method.options.standardize_targets=true"])
    with pytest.raises(ValueError, match="targets.standardize"):
        train_distill(cfg)
