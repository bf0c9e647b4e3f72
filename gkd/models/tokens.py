"""The token bundle every teacher and student returns."""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class Tokens:
    """Final-norm tokens of one forward pass.

    cls:   [B, C]    class token
    patch: [B, N, C] patch tokens in row-major grid order, N = grid[0] * grid[1]
    grid:  (h, w)    token grid
    """

    cls: Tensor
    patch: Tensor
    grid: tuple[int, int]
