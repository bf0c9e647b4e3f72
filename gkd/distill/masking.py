"""Random patch masking for the masked-student pass (ARCHITECTURE.md §1).

Rounding follows the authors' collate function (Proteus/GKD ``augmentations.py``):
the number of masked samples is ``int(B * mask_sample_ratio)`` and the number of masked
tokens per masked sample is ``int(N * ratio)`` — both truncated, i.e. floor for the
non-negative values used here. With the paper's 0.5/0.5 an odd batch of 5 masks 2
samples, and a 16×16 grid masks 128 of 256 tokens. Masked samples are the *first* rows
(the authors' ``--mask_first_n``), and positions are uniformly random (not block-wise).
"""
from __future__ import annotations

import torch
from torch import Tensor


def _check_ratio(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


def num_masked_samples(batch_size: int, mask_sample_ratio: float = 0.5) -> int:
    """Samples that get masked: ``int(batch_size * mask_sample_ratio)`` (B//2 by default)."""
    _check_ratio("mask_sample_ratio", mask_sample_ratio)
    return int(batch_size * mask_sample_ratio)


def num_masked_tokens(num_tokens: int, ratio: float = 0.5) -> int:
    """Masked positions per masked sample: ``int(num_tokens * ratio)``."""
    _check_ratio("ratio", ratio)
    return int(num_tokens * ratio)


def random_patch_mask(
    num_masked_samples: int,
    num_tokens: int,
    ratio: float = 0.5,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Uniformly random masks, exactly ``int(num_tokens * ratio)`` True per row.

    Returns a BoolTensor [num_masked_samples, num_tokens]. Randomness comes from one
    ``torch.rand`` draw on ``generator`` (on the generator's device, then moved to
    ``device``), so a seeded generator reproduces the mask.
    """
    k = num_masked_tokens(num_tokens, ratio)
    gen_device = generator.device if generator is not None else torch.device(device or "cpu")
    scores = torch.rand(num_masked_samples, num_tokens, generator=generator, device=gen_device)
    # the k smallest of i.i.d. uniforms form a uniformly random k-subset of positions
    idx = scores.argsort(dim=1)[:, :k]
    mask = torch.zeros(num_masked_samples, num_tokens, dtype=torch.bool, device=gen_device)
    mask.scatter_(1, idx, True)
    return mask if device is None else mask.to(device)


def batch_patch_mask(
    batch_size: int,
    num_tokens: int,
    ratio: float = 0.5,
    mask_sample_ratio: float = 0.5,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Mask for a whole batch: BoolTensor [B, N].

    The first ``int(B * mask_sample_ratio)`` rows come from :func:`random_patch_mask`;
    the remaining rows are all False (those samples see the unmasked image).
    """
    n = num_masked_samples(batch_size, mask_sample_ratio)
    head = random_patch_mask(n, num_tokens, ratio, generator=generator, device=device)
    tail = torch.zeros(batch_size - n, num_tokens, dtype=torch.bool, device=head.device)
    return torch.cat([head, tail], dim=0)
