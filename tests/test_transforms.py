"""Transforms: the paper's recipe is what timm builds, and size/normalisation match an
independent computation (PIL + numpy, torchvision)."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from gkd.data.transforms import (PAPER_AUTO_AUGMENT, build_eval_transform, build_train_transform,
                                 teacher_mean_std)

IMNET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))


@pytest.fixture(scope="module")
def square() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8))


def reference(img: Image.Image, size: int, mean, std, flip: bool = False) -> torch.Tensor:
    """Independent resize (PIL bicubic) + optional flip + scale to [0,1] + normalise (numpy)."""
    out = img.resize((size, size), Image.BICUBIC)
    if flip:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    arr = np.asarray(out, dtype=np.float32) / 255.0
    arr = (arr - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1)


def seeded(tf, img, seed: int) -> torch.Tensor:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return tf(img)


@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("mean_std", [IMNET, CLIP])
def test_crop_flip_normalise_match_independent_computation(square, flip, mean_std):
    # scale = ratio = (1, 1): RandomResizedCrop must take the whole square image and resize it
    tf = build_train_transform(img_size=32, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=float(flip),
                               auto_augment=None, re_prob=0.0, mean=mean_std[0], std=mean_std[1])
    got = tf(square)
    assert got.shape == (3, 32, 32) and got.dtype == torch.float32
    torch.testing.assert_close(got, reference(square, 32, *mean_std, flip=flip), atol=1e-5, rtol=0)


def test_random_crop_matches_torchvision_pipeline(square):
    """With the default random crop scale, timm's RRC + flip equals torchvision's resized_crop with
    the crop box timm sampled (same python RNG draws), then flip and normalise."""
    from torchvision.transforms import functional as F
    from torchvision.transforms import InterpolationMode
    tf = build_train_transform(img_size=24, auto_augment=None, re_prob=0.0, hflip=0.0)
    rrc = tf.transforms[0]
    for seed in range(5):
        random.seed(seed)
        top, left, h, w = rrc.get_params(square, rrc.scale, rrc.ratio)
        crop = F.resized_crop(square, top, left, h, w, [24, 24], InterpolationMode.BICUBIC)
        expected = F.normalize(F.to_tensor(crop), IMNET[0], IMNET[1])
        torch.testing.assert_close(seeded(tf, square, seed), expected, atol=1e-5, rtol=0)


def test_paper_recipe_components():
    tf = build_train_transform(img_size=224)
    names = [type(t).__name__ for t in tf.transforms]
    assert names == ["RandomResizedCropAndInterpolation", "RandomHorizontalFlip", "RandAugment",
                     "MaybeToTensor", "Normalize", "RandomErasing"], names
    rrc, flip, ra, _, norm, erase = tf.transforms
    assert rrc.size == (224, 224) and rrc.scale == (0.08, 1.0)
    assert str(rrc.interpolation.value) == "bicubic"
    assert flip.p == 0.5
    assert PAPER_AUTO_AUGMENT == "rand-m9-mstd0.5-inc1"
    assert ra.num_layers == 2 and all(op.magnitude == 9 for op in ra.ops)
    assert all(op.magnitude_std == 0.5 for op in ra.ops)
    assert {"PosterizeIncreasing", "SolarizeIncreasing"} <= {op.name for op in ra.ops}  # "inc1"
    assert erase.probability == 0.25 and erase.mode == "pixel" and erase.max_count == 1
    torch.testing.assert_close(norm.mean, torch.tensor(IMNET[0]))
    assert "ColorJitter" not in names


def test_train_transform_is_seeded_and_random(square):
    tf = build_train_transform(img_size=32)
    a, b = seeded(tf, square, 1), seeded(tf, square, 1)
    assert a.shape == (3, 32, 32) and torch.equal(a, b)
    assert not torch.equal(a, seeded(tf, square, 2))


def test_eval_transform_matches_torchvision(square):
    from torchvision import transforms as T
    img = square.resize((60, 40))
    got = build_eval_transform(img_size=32, crop_pct=0.8, mean=CLIP[0], std=CLIP[1])(img)
    ref = T.Compose([T.Resize(40, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(32),
                     T.ToTensor(), T.Normalize(*CLIP)])(img)
    assert got.shape == (3, 32, 32)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def test_teacher_normalisation_from_timm_configs():
    assert teacher_mean_std("eva02_base_patch14_224") == CLIP  # EVA-02: OpenAI CLIP statistics
    assert teacher_mean_std("eva02_small_patch14_224.mim_in22k") == CLIP
    assert teacher_mean_std("vit_base_patch14_dinov2") == IMNET
    assert teacher_mean_std("hf:facebook/dinov2-base") == IMNET
    assert teacher_mean_std("hf:some/eva02-large") == CLIP
    assert teacher_mean_std("not_a_model_name") == IMNET


def test_posterize_to_zero_bits_does_not_crash(square):
    """m9 + mstd0.5 reaches magnitude 10 -> PosterizeIncreasing keeps 0 bits; Pillow >= 13 raises
    on that. The transform must give a black image instead (what older Pillow returned)."""
    import copy
    tf = build_train_transform(img_size=32)
    ra = tf.transforms[2]
    op = copy.copy(next(o for o in ra.ops if o.name == "PosterizeIncreasing"))
    op.prob, op.magnitude, op.magnitude_std = 1.0, 10, 0.0
    out = op(square)
    assert out.size == square.size and np.asarray(out).max() == 0
    op.magnitude = 5  # 2 bits kept: the ordinary path
    assert np.array_equal(np.asarray(op(square)), np.asarray(square) & 0b11000000)
