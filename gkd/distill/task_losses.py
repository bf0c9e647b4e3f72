"""Task-level (stage-3) distillation baselines: pixel-wise KD, FitNet, CWD and ViTKD.

Every module follows ``TaskKDLoss``: built from the two ``EncoderInfo``s and the class count,
called as ``loss(s_out, t_out, labels, progress)``, and returns ``{'loss': weighted total,
'loss_<term>': detached weighted term}`` (the ``loss_<term>`` entries add up to ``loss``).

Conventions shared by all four (choices the papers do not make for this setup):

* Teacher tensors are ``.detach()``-ed on entry, so no loss can reach the teacher.
* Distances, softmaxes and reductions run in fp32 (teacher/student maps may be bf16/fp16
  under autocast); a loss's own layers (regressor, projections, generator) run in whatever
  precision autocast picks, and their outputs are cast to fp32 before the distance.
* When the teacher's map has a different spatial size it is bilinearly resized to the
  student's (``resize_to``); the student's map is never resized.

Defaults and their sources are listed per class.
"""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gkd.distill.task_base import IGNORE_INDEX, TaskKDLoss, pixel_kl, resize_labels
from gkd.distill.task_base import teacher_map as _teacher
from gkd.tensors import EncoderInfo, SegOutputs

__all__ = ["VanillaKD", "FitNet", "CWD", "ViTKD", "LOSSES"]


def _valid_pixels(labels: Tensor, size: tuple[int, int]) -> Tensor:
    """Labels [B,H,W] → bool mask [B,h,w] of non-ignore pixels, nearest-sampled to ``size``."""
    return resize_labels(labels, size) != IGNORE_INDEX


class VanillaKD(TaskKDLoss):
    """Pixel-wise KD (Hinton et al. 2015) on the decoder logits.

    For each pixel i of the student's logit grid (teacher resized to it):

        L = w · T² · mean_i KL( softmax(t_i / T) ‖ softmax(s_i / T) )      s, t: [B, K, h, w]

    Defaults T = 1, w = 1: the pixel-wise distillation baseline of Structured KD (Liu et al.,
    CVPR 2019/TPAMI 2020) as re-implemented by CIRKD (Yang et al., CVPR 2022;
    ``train_kd.py``: ``--kd-temperature`` default 1.0, train scripts ``--lambda-kd 1.0``;
    ``CriterionKD`` averages the per-pixel KL over all B·h·w pixels and multiplies by T²).

    Open choices, fixed here: the KL is taken at the student's logit resolution (stride 4 for
    the MLP head), not upsampled to the image; pixels are averaged over the whole batch
    (B·h·w); ignore pixels are *not* masked by default (the teacher's soft labels are defined
    everywhere, as in CIRKD) — ``mask_ignore=True`` averages over the non-ignore pixels only,
    with the labels nearest-sampled to the logit grid.
    """

    uses: ClassVar[tuple[str, ...]] = ("logits",)

    def __init__(
        self,
        student: EncoderInfo,
        teacher: EncoderInfo,
        num_classes: int,
        temperature: float = 1.0,
        weight: float = 1.0,
        mask_ignore: bool = False,
    ) -> None:
        super().__init__(student, teacher, num_classes)
        self.temperature, self.weight, self.mask_ignore = float(temperature), float(weight), bool(mask_ignore)

    def forward(self, s: SegOutputs, t: SegOutputs, labels: Tensor, progress: float) -> dict[str, Tensor]:
        s_logits = s.logits.float()                               # [B, K, h, w]
        t_logits = _teacher(t.logits, s_logits)                   # [B, K, h, w]
        T = self.temperature
        kl = pixel_kl(s_logits, t_logits, T)                      # [B, h, w]
        if self.mask_ignore:
            valid = _valid_pixels(labels, kl.shape[-2:])
            # clamp: an all-ignore batch gives 0, not NaN
            kl = (kl * valid).sum() / valid.sum().clamp(min=1)
        else:
            kl = kl.mean()
        loss = self.weight * T * T * kl
        return {"loss": loss, "loss_kd": loss.detach()}


class FitNet(TaskKDLoss):
    """FitNet hint regression (Romero et al., ICLR 2015), joint with the segmentation loss.

        L = w · mean( (r(s_hint) − t_hint)² )      s_hint: [B, Cs, h, w], t_hint: [B, Ct, h, w]

    r is a convolutional regressor, as in the paper, whose kernel there is sized so that the
    output grid matches the teacher's (k = N_guided − N_hint + 1). Here the teacher's map is
    resized to the student's grid, so that rule gives k = 1 (a 1×1 conv, with bias). The
    regressor is linear because the paper asks u_h and r to share their non-linearity, and
    both hint maps (ViT block output, CNN stage output before any head) are taken as is.

    Defaults: hint = ``"last"`` (``SegOutputs.last``, the final encoder map: the encoder is
    the part the distillation is meant to shape); w = 1 and the element-wise *mean* squared
    error, as in CIRKD's ``CriterionFitNet`` (1×1 conv regressor, ``.mean()`` of the squared
    error). The paper gives no weight for this use: it trains the hint alone in a separate
    first stage with ½·sum of squares; here the hint is one more term of the stage-3 loss, so
    w = 1 on the mean is a choice, not a paper value. ``hint`` may also be an index 0..3
    into ``SegOutputs.features``.
    """

    uses: ClassVar[tuple[str, ...]] = ("features",)

    def __init__(
        self,
        student: EncoderInfo,
        teacher: EncoderInfo,
        num_classes: int,
        weight: float = 1.0,
        hint: str | int = "last",
        kernel_size: int = 1,
    ) -> None:
        super().__init__(student, teacher, num_classes)
        if hint == "last":
            cs, ct = student.embed_dim, teacher.embed_dim
        elif isinstance(hint, int) and 0 <= hint < len(student.feature_channels):
            cs, ct = student.feature_channels[hint], teacher.feature_channels[hint]
        else:
            raise ValueError(f"hint must be 'last' or a feature index, got {hint!r}")
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd (same-size output), got {kernel_size}")
        self.weight, self.hint = float(weight), hint
        self.regressor = nn.Conv2d(cs, ct, kernel_size, padding=kernel_size // 2)

    def _pick(self, out: SegOutputs) -> Tensor:
        return out.last if self.hint == "last" else out.features[self.hint]

    def forward(self, s: SegOutputs, t: SegOutputs, labels: Tensor, progress: float) -> dict[str, Tensor]:
        s_hint = self._pick(s)                                    # [B, Cs, h, w]
        pred = self.regressor(s_hint).float()                     # [B, Ct, h, w]
        target = _teacher(self._pick(t), pred)                    # [B, Ct, h, w]
        loss = self.weight * F.mse_loss(pred, target)
        return {"loss": loss, "loss_fitnet": loss.detach()}


class CWD(TaskKDLoss):
    """Channel-wise distillation (Shu et al., ICCV 2021) on the decoder logits.

    Each channel's map becomes a distribution over the h·w positions:

        φ(y)_{b,c,i} = softmax_i(y_{b,c,i} / τ)                        y: [B, K, h, w]
        L = w · τ² / (B·K) · Σ_{b,c} Σ_i φ(t)_{b,c,i} · log(φ(t)_{b,c,i} / φ(s)_{b,c,i})

    Defaults τ = 4, w = 3 for logits: CIRKD's re-implementation of CWD (``train_kd.py``
    builds ``CriterionCWD(..., norm_type='channel', divergence='kl', temperature=4.)`` and its
    CNN-student script passes ``--lambda-cwd-logit 3``). Note that the CWD authors' own
    configs use other values (mmsegmentation-distiller and mmrazor PSPNet R101→R18 Cityscapes:
    τ = 1, w = 5; mmrazor Segmenter ViT: τ = 1, w = 10), and CIRKD's SegFormer script uses
    w = 0.3; pass ``tau``/``weight`` to match one of those.

    Reduction: summed over positions, averaged over channels and batch, times τ² (as in the
    paper's 1/C normalisation and its code's ``/ (C·N)``). Open choices, fixed here: applied
    at the student's logit resolution; ignore pixels are not masked (the spatial softmax
    covers the whole map, as in the paper); the map is not standardised before the softmax.
    """

    uses: ClassVar[tuple[str, ...]] = ("logits",)

    def __init__(
        self,
        student: EncoderInfo,
        teacher: EncoderInfo,
        num_classes: int,
        tau: float = 4.0,
        weight: float = 3.0,
    ) -> None:
        super().__init__(student, teacher, num_classes)
        self.tau, self.weight = float(tau), float(weight)

    def forward(self, s: SegOutputs, t: SegOutputs, labels: Tensor, progress: float) -> dict[str, Tensor]:
        s_logits = s.logits.float()                               # [B, K, h, w]
        t_logits = _teacher(t.logits, s_logits)
        log_p_s = F.log_softmax(s_logits.flatten(2) / self.tau, dim=-1)   # [B, K, h·w]
        log_p_t = F.log_softmax(t_logits.flatten(2) / self.tau, dim=-1)
        kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=-1)           # [B, K]
        loss = self.weight * self.tau ** 2 * kl.mean()
        return {"loss": loss, "loss_cwd": loss.detach()}


class ViTKD(TaskKDLoss):
    """ViTKD (Yang et al. 2022): mimic the two shallow blocks, generate the last one.

    Block outputs are maps [B, C, h, w] on the token grid (N = h·w tokens, no class token);
    teacher maps are resized to the student's grid. With per-layer linear projections P_0,
    P_1 and P_d (Cs → Ct; identity when Cs == Ct, as in the official code):

        L_mimic = α / B · Σ_{l∈{0,1}} Σ_{b,n,c} (P_l(S_l) − T_l)²        S_l, T_l: block l, pre-norm
        X       = P_d(norm_s(S_last)) with a random λ of its tokens replaced by a learned mask token
        L_gen   = β / (λ·B) · Σ_{b, masked n, c} (G(X) − norm_t(T_last))²
        G       = conv3×3 → ReLU → conv3×3 (Ct → Ct, padding 1), run on the h×w grid

    norm_s / norm_t: each encoder's own final norm (``SegOutputs.last_norm``).

    From the official code (yzd-v/cls_KD, branch 1.0): ``mmcls/models/dis_losses/vitkd.py``
    (``ViTKDLoss``: the projections, mask token initialised at 0, generator, ``MSELoss(reduction=
    'sum')`` divided by the batch size, the generation error multiplied by the mask and divided
    by λ, ``random_masking`` by argsort of uniform noise keeping ``int(N·(1−λ))`` tokens); the
    distilled tensors from ``mmcls/models/backbones/vision_transformer.py`` ``forward`` (lines
    435-449): the shallow pair is the output of blocks 0 and 1 (no norm), the deep one is the last
    block's output *after* the final norm (``x = self.norm1(x)`` for the last layer before
    ``high_f = x[:, 1:]``). Student and teacher run the same backbone code, so the student's
    deep tokens are also taken after its own final norm (``deit3.py`` does the same for the
    DeiT III teachers). Weights α = 3e-5, β = 3e-6, λ = 0.5: every official ViTKD config
    (``configs/distillers/imagenet/deit-s3_distill_deit-t_img.py`` lines 32-34, and the
    deit-b3/deit-l3/deit-s ones) uses these values with these post-norm targets, i.e. the
    official β for normalised targets equals the loss's default.

    Open choices, fixed here: the deep layer is block ``depth−1`` of each encoder (student and
    teacher may have different depths); as ``SegOutputs`` carries patch tokens only, class/
    register tokens are not distilled (the official code also drops the class token); with a
    segmentor built with ``feature_norm=True`` the shallow blocks are normed too (the default
    segmentor takes raw block outputs). ViT encoders only.
    """

    uses: ClassVar[tuple[str, ...]] = ("features",)

    def __init__(
        self,
        student: EncoderInfo,
        teacher: EncoderInfo,
        num_classes: int,
        alpha: float = 3e-5,
        beta: float = 3e-6,
        mask_ratio: float = 0.5,
    ) -> None:
        super().__init__(student, teacher, num_classes)
        for role, info in (("student", student), ("teacher", teacher)):
            if info.kind != "vit":
                raise ValueError(f"ViTKD needs ViT encoders; the {role} encoder is {info.kind!r}")
            if info.depth < 3:
                raise ValueError(f"ViTKD needs at least 3 blocks; the {role} encoder has {info.depth}")
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
        self.alpha, self.beta, self.mask_ratio = float(alpha), float(beta), float(mask_ratio)
        cs, ct = student.embed_dim, teacher.embed_dim

        def proj() -> nn.Module:
            return nn.Linear(cs, ct) if cs != ct else nn.Identity()

        self.mimic_proj = nn.ModuleList([proj(), proj()])
        self.gen_proj = proj()
        self.mask_token = nn.Parameter(torch.zeros(ct))
        self.generator = nn.Sequential(
            nn.Conv2d(ct, ct, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(ct, ct, 3, padding=1)
        )

    def blocks(self, info: EncoderInfo, role: str) -> list[int]:
        # the deep (last) block comes normed in SegOutputs.last_norm
        return [0, 1]

    def random_mask(self, batch: int, tokens: int, device: torch.device | str | None = None) -> Tensor:
        """[B, N] bool, True = masked; exactly N − int(N·(1−λ)) True per row, uniformly placed."""
        keep = int(tokens * (1.0 - self.mask_ratio))
        rank = torch.rand(batch, tokens, device=device).argsort(dim=1).argsort(dim=1)
        return rank >= keep

    @staticmethod
    def _project(proj: nn.Module, x: Tensor) -> Tensor:
        """Apply a channel projection to a map: [B, Cs, h, w] → [B, Ct, h, w]."""
        return proj(x.movedim(1, -1)).movedim(-1, 1)

    def forward(self, s: SegOutputs, t: SegOutputs, labels: Tensor, progress: float) -> dict[str, Tensor]:
        for role, out in (("student", s), ("teacher", t)):
            if out.last_norm is None or any(l not in out.blocks for l in (0, 1)):
                raise ValueError(f"ViTKD needs the {role}'s blocks 0, 1 and its final-norm last map "
                                 "(SegOutputs.blocks / last_norm, given by a ViT Segmentor.distill_outputs)")
        batch = s.blocks[0].shape[0]

        mimic = s.blocks[0].new_zeros((), dtype=torch.float32)
        for l, proj in enumerate(self.mimic_proj):
            pred = self._project(proj, s.blocks[l]).float()      # [B, Ct, h, w]
            mimic = mimic + (pred - _teacher(t.blocks[l], pred)).pow(2).sum()
        mimic = self.alpha * mimic / batch

        x = self._project(self.gen_proj, s.last_norm)             # [B, Ct, h, w]
        _, ct, h, w = x.shape
        mask = self.random_mask(batch, h * w, x.device).view(batch, 1, h, w)
        x = torch.where(mask, self.mask_token.view(1, ct, 1, 1).to(x.dtype), x)
        gen = self.generator(x).float()                           # [B, Ct, h, w]
        err = (gen - _teacher(t.last_norm, gen)).pow(2) * mask
        gen_loss = self.beta * err.sum() / (batch * self.mask_ratio)

        return {
            "loss": mimic + gen_loss,
            "loss_vitkd_mimic": mimic.detach(),
            "loss_vitkd_gen": gen_loss.detach(),
        }


LOSSES = {"kd": VanillaKD, "fitnet": FitNet, "cwd": CWD, "vitkd": ViTKD}
