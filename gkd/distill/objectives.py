"""Three-term token distillation objectives: GKD (QSD heads) and Proteus (linear heads).

Both follow the authors' ``MetaArch.forward`` (GKD ``distillation_models_*.py``, Proteus
``models_proteus_dinov2.py``); they differ only in the head class (and in which patch
positions L_patch averages over, see ``patch_loss_on``):

    teacher  t_cls [B, Ct], T [B, N, Ct]          (no grad)
    student  unmasked pass → s_cls [B, Cs], S [B, N, Cs]
             masked pass   → S_m [B, N, Cs]        (first int(B·0.5) samples 50% masked)

    c       = head_token(s_cls[:, None], t_cls[:, None])            [B, 1, Ct]
    L_token = MSE(c, t_cls)
    L_fea   = MSE([c ; head_fea(S, T)], [t_cls ; T])                 [B, 1+N, Ct]
    L_patch = MSE(head_patch(S_m, T), T)        over all B·N tokens  (GKD)
              … restricted to the masked tokens                      (Proteus)
    loss    = w_token·L_token + w_fea·L_fea + w_patch·L_patch

``MSE`` is the mean over every element (``nn.MSELoss()`` default), computed in fp32.
The token head's output ``c`` is one tensor used by both L_token and L_fea (the head is
shared, as in the authors' code) and comes from the *unmasked* pass; the masked pass
contributes only its patch tokens.

Cost: when ``student.batch_independent`` is True the unmasked rows of the masked pass
are the very tokens of the unmasked pass, so the masked pass runs on the masked samples
only and the rest is reused — exact, and about a quarter less student work. Otherwise
(drop path, dropout, BatchNorm) the masked pass runs on the full batch with all-False
masks on the unmasked rows, as the authors do.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gkd.distill.diagnostics import self_attention_ratio, spread_ratio, token_cosine
from gkd.distill.masking import batch_patch_mask, num_masked_samples
from gkd.distill.qsd import QSD, LinearHead
from gkd.distill.target_norm import TargetStandardizer
from gkd.tensors import Tokens

LOSS_TERMS: tuple[str, ...] = ("token", "fea", "patch")
PatchLossOn = Literal["all", "masked"]


def _mse(pred: Tensor, target: Tensor) -> Tensor:
    """Mean squared error over all elements, in fp32 (autocast keeps mse_loss in fp32 too)."""
    return F.mse_loss(pred.float(), target.float())


class TokenDistillationObjective(nn.Module):
    """Shared structure of GKD and Proteus; subclasses only choose the head.

    Args:
        student_dim: Cs.
        teacher_dim: Ct.
        mask_ratio: fraction of patch tokens masked in a masked sample (paper: 0.5);
            ``int(N * mask_ratio)`` positions, uniformly at random.
        mask_sample_ratio: fraction of the batch that is masked (paper: 0.5); the first
            ``int(B * mask_sample_ratio)`` samples, i.e. ``B // 2`` by default (odd B:
            the smaller half is masked).
        weights: per-term weights, keys among ``token``, ``fea``, ``patch``; missing keys
            are 1.0 (paper: all 1).
        patch_loss_on: ``"all"`` averages L_patch over all B·N tokens of the masked pass
            (GKD); ``"masked"`` over the masked tokens only (Proteus). ``None`` takes the
            class default.
        reuse_unmasked: ``None`` (default) reuses the unmasked pass for the unmasked rows
            of the masked pass iff ``student.batch_independent`` is True; ``True`` /
            ``False`` force it on / off (forcing it on is exact only for a
            batch-independent student).
        standardize_targets: standardise the teacher's tokens per channel before the losses
            (``gkd.distill.target_norm``; the caller sets the statistics, identity until then).

    ``forward`` returns ``{"loss", "loss_token", "loss_fea", "loss_patch"}``: ``loss`` is
    the weighted sum with grad; the three terms are the *unweighted* MSEs, detached. It also
    returns the detached ``DIAGNOSTICS`` (``gkd.distill.diagnostics``): the cosine of the token
    and feature heads' predictions with their targets, and the spread ratio of the student's
    patch tokens to the (raw) teacher's.
    """

    default_patch_loss_on: ClassVar[PatchLossOn] = "all"

    def __init__(
        self,
        student_dim: int,
        teacher_dim: int,
        *,
        mask_ratio: float = 0.5,
        mask_sample_ratio: float = 0.5,
        weights: Mapping[str, float] | None = None,
        patch_loss_on: PatchLossOn | None = None,
        reuse_unmasked: bool | None = None,
        standardize_targets: bool = False,
    ) -> None:
        super().__init__()
        for name, value in (("mask_ratio", mask_ratio), ("mask_sample_ratio", mask_sample_ratio)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        unknown = set(weights or {}) - set(LOSS_TERMS)
        if unknown:
            raise ValueError(f"unknown loss weight(s) {sorted(unknown)}; terms are {list(LOSS_TERMS)}")
        patch_loss_on = patch_loss_on or self.default_patch_loss_on
        if patch_loss_on not in ("all", "masked"):
            raise ValueError(f"patch_loss_on must be 'all' or 'masked', got {patch_loss_on!r}")
        self.student_dim = student_dim
        self.teacher_dim = teacher_dim
        self.mask_ratio = float(mask_ratio)
        self.mask_sample_ratio = float(mask_sample_ratio)
        self.weights: dict[str, float] = {t: float((weights or {}).get(t, 1.0)) for t in LOSS_TERMS}
        self.patch_loss_on: PatchLossOn = patch_loss_on
        self.reuse_unmasked = reuse_unmasked
        # names follow the authors' MetaArch (token_head / fea_head / patch_head)
        self.token_head = self.build_head(student_dim, teacher_dim)
        self.fea_head = self.build_head(student_dim, teacher_dim)
        self.patch_head = self.build_head(student_dim, teacher_dim)
        self.target_norm = TargetStandardizer(teacher_dim) if standardize_targets else None

    def build_head(self, student_dim: int, teacher_dim: int) -> nn.Module:
        """A module mapping (student [B,N,Cs], teacher [B,N,Ct]) → [B,N,Ct]."""
        raise NotImplementedError

    # ------------------------------------------------------------------ student passes
    def _masked_pass(
        self, student: nn.Module, images: Tensor, mask: Tensor, n_masked: int, unmasked: Tokens
    ) -> Tensor:
        """Patch tokens of the masked pass: [B', N, Cs].

        images [B,3,H,W], mask [B,N] (rows ≥ n_masked all False). B' = n_masked when only
        masked samples enter L_patch (``patch_loss_on="masked"``), else B.
        """
        only_masked_rows = self.patch_loss_on == "masked"
        reuse = self.reuse_unmasked
        if reuse is None:
            reuse = bool(getattr(student, "batch_independent", False))
        if not reuse:
            masked_patch = student(images, mask=mask).patch
            return masked_patch[:n_masked] if only_masked_rows else masked_patch
        parts = []
        if n_masked > 0:
            parts.append(student(images[:n_masked], mask=mask[:n_masked]).patch)
        if not only_masked_rows:
            # identical inputs, no RNG, no batch coupling → identical tokens
            parts.append(unmasked.patch[n_masked:])
        return torch.cat(parts, dim=0) if parts else unmasked.patch[:0]

    # ------------------------------------------------------------------ loss
    def forward(
        self,
        student: nn.Module,
        images: Tensor,
        teacher: Tokens,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """images [B,3,H,W]; teacher Tokens (cls [B,Ct], patch [B,N,Ct], no grad).

        The mask is the first random draw on ``generator``:
        ``batch_patch_mask(B, N, mask_ratio, mask_sample_ratio, generator)``.
        """
        B, N, Ct = teacher.patch.shape
        if images.shape[0] != B:
            raise ValueError(f"{images.shape[0]} images but teacher tokens for {B}")
        if Ct != self.teacher_dim:
            raise ValueError(f"teacher has {Ct} channels, objective built for {self.teacher_dim}")
        unmasked = student(images)
        if unmasked.patch.shape[1] != N:
            raise ValueError(
                f"student has {unmasked.patch.shape[1]} patch tokens (grid {unmasked.grid}), "
                f"teacher {N} (grid {teacher.grid}); token grids must match"
            )
        n_masked = num_masked_samples(B, self.mask_sample_ratio)
        mask = batch_patch_mask(
            B, N, self.mask_ratio, self.mask_sample_ratio, generator=generator, device=images.device
        )
        masked_patch = self._masked_pass(student, images, mask, n_masked, unmasked)

        raw_patch = teacher.patch.detach()
        if self.target_norm is not None:
            teacher = self.target_norm(teacher)
        t_cls = teacher.cls.detach()[:, None]  # [B, 1, Ct]
        t_patch = teacher.patch.detach()  # [B, N, Ct]

        # token head on the unmasked class token; N = 1 so for QSD the softmax is 1
        cls_pred = self.token_head(unmasked.cls[:, None], t_cls)  # [B, 1, Ct]
        fea_pred = self.fea_head(unmasked.patch, t_patch)  # [B, N, Ct]
        loss_token = _mse(cls_pred, t_cls)
        loss_fea = _mse(torch.cat([cls_pred, fea_pred], dim=1), torch.cat([t_cls, t_patch], dim=1))

        if self.patch_loss_on == "all":
            patch_pred = self.patch_head(masked_patch, t_patch)  # [B, N, Ct]
            loss_patch = _mse(patch_pred, t_patch)
        else:
            rows = mask[:n_masked]
            if rows.any():
                patch_pred = self.patch_head(masked_patch, t_patch[:n_masked])  # [n, N, Ct]
                loss_patch = _mse(patch_pred[rows], t_patch[:n_masked][rows])
            else:
                # nothing masked (B < 2 or mask_ratio 0): a zero that keeps the graph
                loss_patch = masked_patch.sum() * 0.0

        w = self.weights
        loss = w["token"] * loss_token + w["fea"] * loss_fea + w["patch"] * loss_patch
        return {
            "loss": loss,
            "loss_token": loss_token.detach(),
            "loss_fea": loss_fea.detach(),
            "loss_patch": loss_patch.detach(),
            "diag_cos_cls": token_cosine(cls_pred.detach(), t_cls),
            "diag_cos_patch": token_cosine(fea_pred.detach(), t_patch),
            "diag_spread_ratio": spread_ratio(unmasked.patch.detach(), raw_patch),
            **self._attention_diagnostic(unmasked.patch, t_patch),
        }

    def _attention_diagnostic(self, student_patch: Tensor, teacher_patch: Tensor) -> dict[str, Tensor]:
        """``diag_attn_self`` of the feature head when it attends (QSD), on the first 4 images."""
        head = self.fea_head
        if not hasattr(head, "attention"):
            return {}
        attn = head.attention(student_patch[:4].detach(), teacher_patch[:4])
        return {"diag_attn_self": self_attention_ratio(attn)}

    def extra_repr(self) -> str:
        return (
            f"mask_ratio={self.mask_ratio}, mask_sample_ratio={self.mask_sample_ratio}, "
            f"weights={self.weights}, patch_loss_on={self.patch_loss_on!r}, "
            f"reuse_unmasked={self.reuse_unmasked}, standardize_targets={self.target_norm is not None}"
        )


class GKDObjective(TokenDistillationObjective):
    """GKD: three :class:`QSD` heads; L_patch over all tokens of the masked pass.

    Extra options: ``qsd_heads`` (default 1), the ``num_heads`` of each QSD, and
    ``query_init_scale`` (default 1.0, the authors' init), see :class:`QSD`.
    """

    default_patch_loss_on: ClassVar[PatchLossOn] = "all"

    def __init__(self, student_dim: int, teacher_dim: int, *, qsd_heads: int = 1, query_init_scale: float = 1.0,
                 **options) -> None:
        # plain attributes: read by build_head during super().__init__
        self.qsd_heads, self.query_init_scale = qsd_heads, query_init_scale
        super().__init__(student_dim, teacher_dim, **options)

    def build_head(self, student_dim: int, teacher_dim: int) -> nn.Module:
        return QSD(student_dim, teacher_dim, num_heads=self.qsd_heads, query_init_scale=self.query_init_scale)


class ProteusObjective(TokenDistillationObjective):
    """Proteus: LayerNorm+Linear heads that ignore the teacher tokens.

    L_patch averages over the masked tokens only, as Proteus' code does (it gathers
    ``mask_indices_list`` before the head); pass ``patch_loss_on="all"`` for the GKD
    variant.
    """

    default_patch_loss_on: ClassVar[PatchLossOn] = "masked"

    def build_head(self, student_dim: int, teacher_dim: int) -> nn.Module:
        return LinearHead(student_dim, teacher_dim)

