"""Decoders: Mask2Former (transformers pieces) and the all-MLP head, on tiny sizes."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gkd.models import DECODERS, Mask2FormerDecoder, MLPDecoder, build_decoder
from gkd.models.decoders import semantic_to_instances
from gkd.models.segmentor import default_vit_layers

TINY_M2F = dict(
    num_queries=8, num_layers=2, pixel_decoder_layers=1, hidden_dim=32, num_heads=2,
    dim_feedforward=64, pixel_decoder_ffn_dim=64, num_points=256,
)
C = 16  # feature channels


def _features(b: int = 2, size: int = 64, seed: int = 0) -> list[torch.Tensor]:
    """Four levels at strides 4, 8, 16, 32 of a ``size`` px input."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, C, size // s, size // s, generator=g) for s in (4, 8, 16, 32)]


def _labels(b: int = 2, size: int = 64) -> torch.Tensor:
    """Blocky labels over 3 classes with an ignored band."""
    lab = torch.zeros(b, size, size, dtype=torch.int64)
    lab[:, : size // 2, size // 2:] = 1
    lab[:, size // 2:, :] = 2
    lab[0, :4] = 255
    return lab


def test_registry_and_unknown_name() -> None:
    assert DECODERS["mask2former"] is Mask2FormerDecoder and DECODERS["mlp"] is MLPDecoder
    with pytest.raises(KeyError, match="unknown decoder"):
        build_decoder("upernet", [C] * 4, 3)


def test_default_vit_layers_follow_the_authors() -> None:
    assert default_vit_layers(12) == [3, 5, 7, 11]
    assert default_vit_layers(24) == [7, 11, 15, 23]
    assert default_vit_layers(6) == [1, 2, 3, 5]
    assert default_vit_layers(2) == [0, 0, 0, 1]


def test_mask2former_defaults_are_the_papers() -> None:
    dec = Mask2FormerDecoder([384] * 4, 19)
    assert dec.kwargs["num_queries"] == 100 and dec.transformer.queries_features.weight.shape == (100, 256)
    assert len(dec.transformer.decoder.layers) == 9  # 9 masked-attention layers (+ the initial prediction)
    assert len(dec.pixel_decoder.encoder.layers) == 6  # deformable-attention pixel decoder
    assert dec.pixel_decoder.mask_projection.out_channels == 256
    assert dec.class_predictor.out_features == 20  # 19 classes + no object
    crit = dec.criterion
    assert crit.empty_weight[-1] == 0.1 and torch.all(crit.empty_weight[:-1] == 1)
    assert (crit.matcher.cost_class, crit.matcher.cost_mask, crit.matcher.cost_dice) == (2.0, 5.0, 5.0)
    assert dec.weights == {"loss_cross_entropy": 2.0, "loss_mask": 5.0, "loss_dice": 5.0}
    assert crit.num_points == 12544 and crit.oversample_ratio == 3.0 and crit.importance_sample_ratio == 0.75
    # transformers' init ran: the pixel decoder's level embedding is allocated uninitialised otherwise
    assert torch.isfinite(dec.pixel_decoder.level_embed).all() and 0.5 < dec.pixel_decoder.level_embed.std() < 1.5


def test_mask2former_shapes_and_semantic_inference() -> None:
    torch.manual_seed(0)
    dec = Mask2FormerDecoder([C] * 4, 3, **TINY_M2F).eval()
    feats = _features()
    with torch.no_grad():
        out = dec(feats)
        scores = dec.predict(feats, (64, 64))
    assert out["class_logits"].shape == (2, 8, 4)
    assert out["mask_logits"].shape == (2, 8, 16, 16)  # stride 4
    assert len(out["aux"]) == 2  # prediction before layer 1 and after layer 1
    assert scores.shape == (2, 3, 64, 64)
    # independent computation: upsample each query's mask logits, then Σ_q p(k|q) σ(m_q)
    probs = torch.softmax(out["class_logits"], dim=-1)[..., :3]  # drop "no object"
    masks = torch.sigmoid(F.interpolate(out["mask_logits"], size=(64, 64), mode="bilinear", align_corners=False))
    expected = torch.zeros(2, 3, 64, 64)
    for q in range(8):
        expected += probs[:, q, :, None, None] * masks[:, q, None]
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-6)


def test_semantic_to_instances_ignores_255() -> None:
    lab = _labels()
    masks, classes = semantic_to_instances(lab)
    assert classes[0].tolist() == [0, 1, 2] and masks[0].shape == (3, 64, 64)
    assert masks[0][:, :4].sum() == 0  # ignored pixels are in no mask
    assert torch.equal(masks[1].sum(0), torch.ones(64, 64))


def test_matcher_assigns_the_obvious_queries() -> None:
    dec = Mask2FormerDecoder([C] * 4, 3, **TINY_M2F)
    matcher = dec.criterion.matcher
    left = torch.zeros(16, 16)
    left[:, :8] = 1
    right = 1 - left
    # three queries: q0 predicts "right, class 2", q1 garbage, q2 predicts "left, class 0"
    mask_logits = torch.stack([right * 20 - 10, torch.zeros(16, 16), left * 20 - 10]).unsqueeze(0)
    class_logits = torch.full((1, 3, 4), -5.0)
    class_logits[0, 0, 2] = class_logits[0, 2, 0] = 5.0
    targets = [torch.stack([left, right])]  # target 0 = left (class 0), target 1 = right (class 2)
    torch.manual_seed(0)
    (src, tgt), = matcher(mask_logits, class_logits, targets, [torch.tensor([0, 2])])
    assert dict(zip(tgt.tolist(), src.tolist())) == {0: 2, 1: 0}


def test_mask2former_class_loss_matches_independent_ce() -> None:
    """loss_cls = 2 × CE over all queries, matched ones to their class, others to "no object" (weight 0.1)."""
    torch.manual_seed(0)
    dec = Mask2FormerDecoder([C] * 4, 3, **dict(TINY_M2F, aux_loss=False)).eval()
    feats, lab = _features(), _labels()
    with torch.no_grad():
        torch.manual_seed(1)
        losses = dec.loss(feats, lab)
        out = dec(feats)
        masks, classes = semantic_to_instances(lab)
        torch.manual_seed(1)  # the matcher draws its points first: same seed, same matching
        indices = dec.criterion.matcher(out["mask_logits"], out["class_logits"], masks, classes)
    target = torch.full((2, 8), 3, dtype=torch.int64)
    for b, (src, tgt) in enumerate(indices):
        target[b, src] = classes[b][tgt]
    logp = torch.log_softmax(out["class_logits"], dim=-1)
    w = torch.tensor([1.0, 1.0, 1.0, 0.1])[target]
    ce = -(w * logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)).sum() / w.sum()
    torch.testing.assert_close(losses["loss_cls"], 2.0 * ce)
    torch.testing.assert_close(losses["loss"].detach(), losses["loss_cls"] + losses["loss_mask"] + losses["loss_dice"])


def test_mask2former_loss_is_finite_and_decreases() -> None:
    torch.manual_seed(0)
    dec = Mask2FormerDecoder([C] * 4, 3, **TINY_M2F)
    feats, lab = _features(), _labels()
    opt = torch.optim.AdamW(dec.parameters(), lr=3e-3, weight_decay=0.05)

    def fixed_loss() -> float:
        torch.manual_seed(123)  # same sampled points every time
        with torch.no_grad():
            return float(dec.loss(feats, lab)["loss"])

    before = fixed_loss()
    assert torch.isfinite(torch.tensor(before))
    for _ in range(10):
        loss = dec.loss(feats, lab)["loss"]
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None for p in dec.parameters())  # every parameter is used (DDP-safe)
        opt.step()
    after = fixed_loss()
    assert after < 0.85 * before, (before, after)  # measured: ~0.72


def test_mask2former_refuses_all_ignored_batch_and_bad_labels() -> None:
    dec = Mask2FormerDecoder([C] * 4, 3, **TINY_M2F)
    with pytest.raises(ValueError, match="ignored"):
        dec.loss(_features(), torch.full((2, 64, 64), 255, dtype=torch.int64))
    with pytest.raises(ValueError, match="label values"):
        dec.loss(_features(), torch.full((2, 64, 64), 7, dtype=torch.int64))
    with pytest.raises(ValueError, match="channels"):
        dec(_features()[:3] + [torch.zeros(2, C + 1, 2, 2)])


def test_mlp_head_cross_entropy_with_ignore() -> None:
    torch.manual_seed(0)
    dec = MLPDecoder([C, 24, 32, 48], 3, channels=32).eval()
    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(2, c, 64 // s, 64 // s, generator=g) for c, s in zip([C, 24, 32, 48], (4, 8, 16, 32))]
    lab = _labels()
    with torch.no_grad():
        logits = dec(feats)
        losses = dec.loss(feats, lab)
        scores = dec.predict(feats, (64, 64))
    assert logits.shape == (2, 3, 16, 16) and scores.shape == (2, 3, 64, 64)
    up = F.interpolate(logits, size=(64, 64), mode="bilinear", align_corners=False)
    torch.testing.assert_close(scores, up)
    # independent CE: -log softmax at the label, averaged over non-ignored pixels only
    valid = lab != 255
    logp = torch.log_softmax(up, dim=1).permute(0, 2, 3, 1)[valid]  # [P, K]
    expected = -logp.gather(1, lab[valid].unsqueeze(1)).mean()
    torch.testing.assert_close(losses["loss"], expected)
    torch.testing.assert_close(losses["loss_ce"], expected)
    assert not losses["loss_ce"].requires_grad
    # changing only ignored pixels' labels changes nothing
    lab2 = lab.clone()
    lab2[0, :4] = 255
    with torch.no_grad():
        torch.testing.assert_close(dec.loss(feats, lab2)["loss"], expected)
        zero = dec.loss(feats, torch.full_like(lab, 255))["loss"]
    assert zero == 0
    with pytest.raises(ValueError, match="label values"):
        dec.loss(feats, torch.full_like(lab, 3))


def test_losses_under_bfloat16_autocast() -> None:
    """Mixed precision: the set loss runs in float32 (scipy's matcher takes no bfloat16)."""
    torch.manual_seed(0)
    feats, lab = _features(), _labels()
    for dec in (Mask2FormerDecoder([C] * 4, 3, **TINY_M2F), MLPDecoder([C] * 4, 3, channels=32)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            losses = dec.loss(feats, lab)
        assert losses["loss"].dtype == torch.float32 and torch.isfinite(losses["loss"])
        losses["loss"].backward()


def test_mlp_feature_before_the_classifier() -> None:
    """``fused`` is SegformerDecodeHead's map before its classifier: classifier(fused) is the head's own
    output (train mode included: same dropout draw), and the distillation forward returns both."""
    torch.manual_seed(0)
    chans = [C, 24, 32, 48]
    dec = MLPDecoder(chans, 3, channels=32)
    g = torch.Generator().manual_seed(1)
    feats = [torch.randn(2, c, 64 // s, 64 // s, generator=g) for c, s in zip(chans, (4, 8, 16, 32))]
    assert dec.head_channels == 32
    for mode in (False, True):
        dec.train(mode)
        torch.manual_seed(5)
        ref = dec.head(feats)                       # transformers' forward, untouched
        torch.manual_seed(5)
        fused = dec.fused(feats)
        torch.manual_seed(5)
        terms, logits, head = dec.distill_forward(feats, _labels())
        assert fused.shape == head.shape == (2, 32, 16, 16)
        torch.testing.assert_close(dec.head.classifier(fused), ref)
        torch.testing.assert_close(logits, ref)
        torch.testing.assert_close(head, fused)
    torch.manual_seed(5)
    plain = dec.loss(feats, _labels())              # train mode, the same dropout draw
    torch.testing.assert_close(terms["loss"], plain["loss"])
    # the fused map is post-ReLU (then dropout): non-negative
    dec.eval()
    assert bool((dec.fused(feats) >= 0).all())
    assert dec.distill_forward(feats)[0] is None


def test_mask2former_feature_before_the_classifier_is_the_mask_features() -> None:
    """Mask2Former's per-pixel map: the pixel decoder's mask_features, which the mask logits are read from."""
    torch.manual_seed(0)
    dec = Mask2FormerDecoder([C] * 4, 3, **TINY_M2F).eval()
    feats = _features()
    with torch.no_grad():
        out = dec(feats)
        terms, logits, head = dec.distill_forward(feats, _labels())
        pixel = dec.pixel_decoder(list(feats), output_attentions=False, output_hidden_states=False, return_dict=True)
    assert dec.head_channels == TINY_M2F["hidden_dim"] and head.shape == (2, TINY_M2F["hidden_dim"], 16, 16)
    torch.testing.assert_close(head, pixel.mask_features)
    torch.testing.assert_close(head, out["mask_features"])
    assert logits.shape == (2, 3, 16, 16) and torch.isfinite(terms["loss"])
    torch.testing.assert_close(logits, dec.logits(feats))
    assert dec.distill_forward(feats)[0] is None
