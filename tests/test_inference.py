"""Sliding-window / whole-image inference and the keep-ratio resize."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gkd.eval.inference import (
    coverage_count,
    keep_ratio_size,
    predict,
    slide_inference,
    whole_inference,
    window_grid,
)

K = 5


class PixelModel(nn.Module):
    """A 1×1 conv: translation-equivariant and per-pixel, so windows cannot change its scores.
    Records the input sizes it saw."""

    def __init__(self, k: int = K):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, k, 1)
        self.num_classes = k
        self.seen: list[tuple[int, int]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(tuple(x.shape[-2:]))
        return self.conv(x)


class CallCounter(nn.Module):
    """Scores = the index of the call (window) everywhere: tests the count-map averaging."""

    def __init__(self, k: int = 2):
        super().__init__()
        self.calls = 0
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.full((x.shape[0], self.k, *x.shape[-2:]), float(self.calls))
        self.calls += 1
        return out


def test_window_grid_by_hand():
    # H=10, W=23, crop 8, stride 5: rows start 0 and 5→shifted to 2; columns 0, 5, 10, 15 (last one ends at 23)
    wins = window_grid(10, 23, crop=8, stride=5)
    ys = sorted({(y1, y2) for y1, y2, _, _ in wins})
    xs = sorted({(x1, x2) for _, _, x1, x2 in wins})
    assert ys == [(0, 8), (2, 10)]
    assert xs == [(0, 8), (5, 13), (10, 18), (15, 23)]
    assert len(wins) == 8
    # the paper's setting on a 1024×512 Cityscapes test image: one row, three windows
    wins = window_grid(512, 1024, 512, 341)
    assert wins == [(0, 512, 0, 512), (0, 512, 341, 853), (0, 512, 512, 1024)]
    # smaller than the crop: one window, the whole image
    assert window_grid(360, 480, 512, 341) == [(0, 360, 0, 480)]
    with pytest.raises(ValueError, match="stride"):
        window_grid(100, 100, crop=8, stride=9)


def test_coverage_count():
    count = coverage_count(10, 23, crop=8, stride=5)
    # independent: a pixel is covered by every window whose span contains it
    ys, xs = [(0, 8), (2, 10)], [(0, 8), (5, 13), (10, 18), (15, 23)]
    for y in range(10):
        for x in range(23):
            want = sum(a <= y < b for a, b in ys) * sum(a <= x < b for a, b in xs)
            assert int(count[y, x]) == want
    assert int(count.min()) >= 1
    assert int(count[5, 5]) == 4 and int(count[0, 0]) == 1


@pytest.mark.parametrize("size", [(37, 53), (10, 12), (16, 40), (33, 16), (17, 17)])
@pytest.mark.parametrize("window_batch", [1, 3])
def test_slide_equals_whole_for_pixel_model(size, window_batch):
    model = PixelModel()
    images = torch.rand(2, 3, *size)
    whole = whole_inference(model, images)
    model.seen.clear()
    slide = slide_inference(model, images, K, crop=16, stride=11, window_batch=window_batch)
    assert slide.shape == (2, K, *size)
    torch.testing.assert_close(slide, whole, rtol=1e-5, atol=1e-6)
    assert set(model.seen) == {(16, 16)}  # every crop padded to the crop size, smaller images included


def test_overlaps_are_averaged():
    model = CallCounter()
    h, w, crop, stride = 20, 29, 12, 7
    out = slide_inference(model, torch.zeros(1, 3, h, w), 2, crop=crop, stride=stride)
    wins = window_grid(h, w, crop, stride)
    want = torch.zeros(h, w)
    for y in range(h):
        for x in range(w):
            ids = [i for i, (y1, y2, x1, x2) in enumerate(wins) if y1 <= y < y2 and x1 <= x < x2]
            want[y, x] = sum(ids) / len(ids)
    torch.testing.assert_close(out[0, 0], want)
    assert model.calls == len(wins)


def test_low_resolution_scores_are_upsampled_to_the_input():
    class Stride4(nn.Module):
        num_classes = 3

        def forward(self, x):
            return F.avg_pool2d(x, 4)

    out = slide_inference(Stride4(), torch.rand(1, 3, 30, 50), 3, crop=16, stride=12)
    assert out.shape == (1, 3, 30, 50)
    assert whole_inference(Stride4(), torch.rand(1, 3, 32, 48)).shape == (1, 3, 32, 48)
    with pytest.raises(ValueError, match="channels"):
        slide_inference(Stride4(), torch.rand(1, 3, 16, 16), 5, crop=16, stride=8)


def test_keep_ratio_size():
    assert keep_ratio_size(1024, 2048, [1024, 512]) == (512, 1024)  # Cityscapes
    assert keep_ratio_size(1024, 2048, [512, 1024]) == (512, 1024)  # order of the pair does not matter
    assert keep_ratio_size(1080, 1920, [960, 540]) == (540, 960)  # ACDC
    assert keep_ratio_size(720, 1280, [1280, 720]) == (720, 1280)  # BDD100K: unchanged
    assert keep_ratio_size(400, 600, 512) == (341, 512)  # int: long edge 512 (400·512/600 = 341.3)
    assert keep_ratio_size(3000, 4000, [1024, 512]) == (512, 683)  # short edge binds: 4000·512/3000 = 682.7
    assert keep_ratio_size(100, 150, [1024, 512]) == (512, 768)  # small images are scaled up (mmcv does too)
    assert keep_ratio_size(7, 9, None) == (7, 9)


@pytest.mark.parametrize("mode", ["slide", "whole"])
@pytest.mark.parametrize("resize", [None, 24, [40, 20], 80])
def test_predict_returns_original_size(mode, resize):
    model = PixelModel()
    images = torch.rand(1, 3, 30, 45)
    scores = predict(model, images, mode=mode, resize=resize, crop=16, stride=11)
    assert scores.shape == (1, K, 30, 45)
    # independent composition: resize the image, score it whole (equal for a per-pixel model), resize back
    size = keep_ratio_size(30, 45, resize)
    x = F.interpolate(images, size=size, mode="bilinear", align_corners=False) if resize else images
    want = model.conv(x)
    want = F.interpolate(want, size=(30, 45), mode="bilinear", align_corners=False) if resize else want
    torch.testing.assert_close(scores, want, rtol=1e-5, atol=1e-5)


def test_predict_rejects_unknown_mode():
    with pytest.raises(ValueError, match="mode"):
        predict(PixelModel(), torch.rand(1, 3, 8, 8), mode="tiles")
