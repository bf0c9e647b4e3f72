"""SegMetric against an independent NumPy computation (per-class pixel counting, no confusion matrix)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gkd.eval.metrics import SegMetric


def numpy_reference(pred: np.ndarray, target: np.ndarray, k: int, ignore: int = 255) -> dict:
    """mmseg IoUMetric semantics written as per-class masks: NaN for 0/0, NaNs left out of the means."""
    valid = target != ignore
    iou, acc = [], []
    tp_all = 0
    for c in range(k):
        tp = np.sum((pred == c) & (target == c) & valid)
        gt = np.sum((target == c) & valid)
        pr = np.sum((pred == c) & valid)
        union = gt + pr - tp
        iou.append(100.0 * tp / union if union else math.nan)
        acc.append(100.0 * tp / gt if gt else math.nan)
        tp_all += tp
    iou_a, acc_a = np.array(iou), np.array(acc)
    return {"aAcc": 100.0 * tp_all / valid.sum(), "mIoU": float(np.nanmean(iou_a)),
            "mAcc": float(np.nanmean(acc_a)), "IoU": iou, "Acc": acc}


def _random_case(seed: int = 0, k: int = 7, shape=(3, 31, 45)):
    """Random pred/target where class 6 is absent from both (it is predicted only on ignored pixels),
    class 5 is predicted but never labelled and class 4 is labelled but never predicted."""
    rng = np.random.default_rng(seed)
    target = rng.integers(0, 5, size=shape)  # labels use classes 0..4
    pred = rng.choice([0, 1, 2, 3, 5], size=shape)  # predictions never say 4
    ignore = rng.random(shape) < 0.2
    target[ignore] = 255
    pred[ignore & (rng.random(shape) < 0.5)] = 6  # class 6 only where the label is ignored
    agree = rng.random(shape) < 0.4  # make the classes partly right so IoUs are not all tiny
    pred[agree & ~ignore] = target[agree & ~ignore]
    pred[(pred == 4)] = 0
    return pred, target, k


def _assert_same(got: dict, want: dict) -> None:
    for key in ("aAcc", "mIoU", "mAcc"):
        assert got[key] == pytest.approx(want[key], rel=1e-12), key
    for key in ("IoU", "Acc"):
        np.testing.assert_allclose(np.array(got[key]), np.array(want[key]), rtol=1e-12, equal_nan=True)


def test_matches_numpy_with_ignore_and_absent_classes():
    pred, target, k = _random_case()
    metric = SegMetric(k)
    metric.update(torch.from_numpy(pred), torch.from_numpy(target))
    got, want = metric.compute(), numpy_reference(pred, target, k)
    _assert_same(got, want)
    # the edge cases the module documents
    assert math.isnan(got["IoU"][6]) and math.isnan(got["Acc"][6])  # absent from both
    assert got["IoU"][5] == 0.0 and math.isnan(got["Acc"][5])  # predicted only
    assert got["IoU"][4] == 0.0 and got["Acc"][4] == 0.0  # labelled only
    assert got["mIoU"] == pytest.approx(np.mean(got["IoU"][:6]))  # NaN class left out of the mean


def test_hand_computed_example():
    target = torch.tensor([[[0, 0, 1, 255], [1, 1, 2, 2]]])
    pred = torch.tensor([[[0, 1, 1, 3], [1, 0, 2, 3]]])
    m = SegMetric(num_classes=5)
    m.update(pred, target)
    r = m.compute()
    # class 0: tp 1, gt 2, pr 2 → IoU 1/3; class 1: tp 2, gt 3, pr 3 → 2/4; class 2: tp 1, gt 2, pr 1 → 1/2
    # class 3: predicted once on a labelled pixel → IoU 0, Acc NaN; class 4: absent → NaN
    assert r["IoU"][:4] == pytest.approx([100 / 3, 50.0, 50.0, 0.0])
    assert math.isnan(r["IoU"][4])
    assert r["Acc"][:3] == pytest.approx([50.0, 200 / 3, 50.0])
    assert math.isnan(r["Acc"][3]) and math.isnan(r["Acc"][4])
    assert r["aAcc"] == pytest.approx(100 * 4 / 7)
    assert r["mIoU"] == pytest.approx((100 / 3 + 50 + 50 + 0) / 4)
    assert r["mAcc"] == pytest.approx((50 + 200 / 3 + 50) / 3)


def test_merge_of_halves_equals_whole_and_batches_accumulate():
    pred, target, k = _random_case(seed=1)
    whole = SegMetric(k)
    whole.update(torch.from_numpy(pred), torch.from_numpy(target))
    a, b = SegMetric(k), SegMetric(k)
    a.update(torch.from_numpy(pred[:1]), torch.from_numpy(target[:1]))
    for i in range(1, pred.shape[0]):  # several updates, one image each
        b.update(torch.from_numpy(pred[i:i + 1]), torch.from_numpy(target[i:i + 1]))
    merged = a.merge(b)
    assert torch.equal(merged.confusion, whole.confusion)
    _assert_same(merged.compute(), whole.compute())
    assert merged.reduce(None) is merged and torch.equal(merged.confusion, whole.confusion)  # 1 process: no-op
    merged.reset()
    assert int(merged.confusion.sum()) == 0


def test_empty_metric_is_nan_without_warnings():
    import warnings

    m = SegMetric(3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = m.compute()
    assert all(math.isnan(r[key]) for key in ("aAcc", "mIoU", "mAcc"))


def test_bad_input_is_an_error():
    m = SegMetric(3)
    with pytest.raises(ValueError, match="outside"):
        m.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.tensor([[[0, 7], [1, 255]]]))
    with pytest.raises(ValueError, match="shape"):
        m.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.zeros(1, 2, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        m.update(torch.zeros(1, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="predicted"):
        m.update(torch.full((1, 2, 2), 3), torch.zeros(1, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="merge"):
        m.merge(SegMetric(4))
