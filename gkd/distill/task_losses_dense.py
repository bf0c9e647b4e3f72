"""Task-level (stage-3) dense distillation losses: Af-DCD, BCKD and LFD.

Each module follows ``TaskKDLoss``: ``loss(s_out, t_out, labels, progress)`` returns
``{'loss': weighted total, 'loss_<term>': detached weighted term}``; the ``loss_<term>``
entries add up to ``loss``.

Conventions shared by the three (choices the papers do not make for this setup):

* Teacher tensors are ``.detach()``-ed on entry, so nothing can reach the teacher.
* Distances, softmaxes and reductions run in fp32 with autocast switched off inside the
  loss (teacher/student maps may arrive as bf16/fp16); the loss's own layers therefore
  also run in fp32 — they are small and discarded after training.
* A teacher map of another spatial size is bilinearly resized to the student's
  (``resize_to``); student maps are never resized.
* ``labels`` are [B, H, W] train ids at image size, 255 = ignore.
"""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gkd.distill.task_base import IGNORE_INDEX, TaskKDLoss, resize_labels
from gkd.distill.task_base import pixel_kl as _pixel_kl
from gkd.distill.task_base import teacher_map as _teacher
from gkd.tensors import EncoderInfo, SegOutputs

__all__ = ["AfDCD", "BCKD", "LFD", "LOSSES"]


def _no_autocast(x: Tensor) -> torch.autocast:
    """A context that disables autocast on ``x``'s device, so the loss runs in fp32."""
    return torch.autocast(device_type=x.device.type, enabled=False)


# ----------------------------------------------------------------------------------------
# Af-DCD
# ----------------------------------------------------------------------------------------
class AfDCD(TaskKDLoss):
    """Af-DCD (Fan et al., NeurIPS 2023): masked feature mimicking + omni-contrasting.

    On the encoder's final map (``SegOutputs.last``; the official code uses the backbone's
    last stage ``c4``, which is this map):

        S' = P( A(S) ⊙ M )                  S [B,Cs,h,w] → A: 1×1 conv → [B,Ct,h,w]
                                            M [B,1,h,w] ∈ {0,1}: a pixel is zeroed w.p. mask_ratio
                                            P: conv3×3 → ReLU → conv3×3 (Ct → Ct)
        L_fd  = Σ (S' − T)² / B              (sum over C,h,w; mean over the batch)
        L_ctr = omni-contrastive loss between maxpool(S') and maxpool(T), see ``contrastive``
        L_kd  = T_kd² · mean_pixels KL(softmax(t/T_kd) ‖ softmax(s/T_kd))   (decoder logits)
        loss  = λ_fd·L_fd + λ_ctr·L_ctr + λ_kd·L_kd

    Omni-contrasting: both maps are max-pooled by ``pool_size``, cut into ``patch_size²``
    windows and their channels into ``groups`` (M) groups of Ct/M. Inside one window the
    N = patch² · M student vectors (one per position × group) are contrasted with the N
    teacher vectors: similarity = −L1 distance, the positive is the teacher vector at the
    same position and group, the negatives are the teacher vectors of the *other* groups at
    every position of the window (same-group vectors at other positions are left out):

        L_ctr = 1/(B·h'·w') · Σ_windows Σ_i −log( e^{s_ii/τ} / (e^{s_ii/τ} + Σ_{j: g(j)≠g(i)} e^{s_ij/τ}) )

    Sources (official code OSVAI/Af-DCD ``losses/ocmgd.py``, ``train_ocmgd.py`` and
    ``train_scripts/``): τ = 0.07, M = 16, pool 4, window 4×4, random mask ratio 0.75, the
    projector, −L1 similarity, the negative set, the sum/B and sum/(B·h'·w') normalisations,
    KD with T = 1. Weights: the Cityscapes scripts' λ_fd = 2e-6, λ_ctr = 5e-3, λ_kd = 1
    (argparse defaults are 4e-5 / 1e-3; ADE20K 1e-6 / 4e-2 with λ_kd 0.5; CamVid 8e-6 / 1e-2)
    — λ_fd scales with Ct·h·w because L_fd is a sum, so retune it for other widths.

    Open choices, fixed here: the align conv is the identity when Cs = Ct (the official
    code assumes they differ); the plain projector (the "enhanced" two-branch one is used in
    one Cityscapes script only); when the pooled map is not a multiple of the window the
    window is shrunk to the pooled size and the remainder cropped (the official code
    assumes divisibility); the teacher is resized to the student grid; the logit KD term
    (part of the official recipe, not of the Af-DCD module) can be dropped with
    ``kd_weight=0``; the official clip of this module's gradient norm (15) belongs to the
    training loop, not here.
    """

    uses: ClassVar[tuple[str, ...]] = ("logits", "features")

    def __init__(
        self,
        student: EncoderInfo,
        teacher: EncoderInfo,
        num_classes: int,
        fd_weight: float = 2e-6,
        ctr_weight: float = 5e-3,
        kd_weight: float = 1.0,
        kd_temperature: float = 1.0,
        tau: float = 0.07,
        groups: int = 16,
        pool_size: int = 4,
        patch_size: int = 4,
        mask_ratio: float = 0.75,
    ) -> None:
        super().__init__(student, teacher, num_classes)
        cs, ct = student.embed_dim, teacher.embed_dim
        if ct % groups:
            raise ValueError(f"teacher width {ct} is not divisible into {groups} channel groups")
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        self.fd_weight, self.ctr_weight, self.kd_weight = float(fd_weight), float(ctr_weight), float(kd_weight)
        self.kd_temperature, self.tau = float(kd_temperature), float(tau)
        self.groups, self.pool_size, self.patch_size = int(groups), int(pool_size), int(patch_size)
        self.mask_ratio = float(mask_ratio)
        self.align = nn.Conv2d(cs, ct, kernel_size=1) if cs != ct else nn.Identity()
        self.projector = nn.Sequential(
            nn.Conv2d(ct, ct, kernel_size=3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(ct, ct, kernel_size=3, padding=1)
        )

    def spatial_mask(self, like: Tensor) -> Tensor:
        """Keep-mask [B,1,h,w] for ``like`` [B,C,h,w]: 0 w.p. mask_ratio, drawn from torch's global RNG.

        One ``torch.rand`` call, so a test that re-seeds can redraw the same mask.
        """
        b, _, h, w = like.shape
        u = torch.rand((b, 1, h, w), device=like.device)
        return (u <= 1.0 - self.mask_ratio).float()

    def contrastive(self, s: Tensor, t: Tensor) -> Tensor:
        """Omni-contrastive loss (scalar) between projected student s and teacher t, both [B,C,h,w]."""
        if self.pool_size > 1:
            s, t = F.max_pool2d(s, self.pool_size), F.max_pool2d(t, self.pool_size)
        b, c, h, w = s.shape
        ph, pw = min(self.patch_size, h), min(self.patch_size, w)
        h, w = h - h % ph, w - w % pw
        s, t = s[:, :, :h, :w], t[:, :, :h, :w]
        m, d = self.groups, c // self.groups

        def windows(x: Tensor) -> Tensor:
            # [B,C,h,w] → [B·windows, ph·pw·M, d], row index = position·M + group
            x = x.reshape(b, m, d, h // ph, ph, w // pw, pw)
            x = x.permute(0, 3, 5, 4, 6, 1, 2)
            return x.reshape(-1, ph * pw * m, d)

        sim = -torch.cdist(windows(s), windows(t), p=1) / self.tau   # [R, N, N]
        n = sim.shape[-1]
        group = torch.arange(n, device=sim.device) % m
        same_group = group[:, None] == group[None, :]
        eye = torch.eye(n, dtype=torch.bool, device=sim.device)
        # exclude same-group, other-position pairs; keep the positive (diagonal) and the negatives
        sim_kept = sim.masked_fill(same_group & ~eye, float("-inf"))
        nll = torch.logsumexp(sim_kept, dim=-1) - sim.diagonal(dim1=-2, dim2=-1)
        return nll.sum() / (b * h * w)

    def forward(self, s: SegOutputs, t: SegOutputs, labels: Tensor, progress: float) -> dict[str, Tensor]:
        with _no_autocast(s.last):
            feat_s = s.last.float()                                  # [B, Cs, h, w]
            feat_t = _teacher(t.last, feat_s)                        # [B, Ct, h, w]
            aligned = self.align(feat_s)                             # [B, Ct, h, w]
            proj = self.projector(aligned * self.spatial_mask(aligned))
            fd = (proj - feat_t).pow(2).sum() / feat_s.shape[0]
            ctr = self.contrastive(proj, feat_t)
            out = {"loss_fd": self.fd_weight * fd, "loss_ctr": self.ctr_weight * ctr}
            if self.kd_weight:
                s_logits = s.logits.float()
                kl = _pixel_kl(s_logits, _teacher(t.logits, s_logits), self.kd_temperature)
                out["loss_kd"] = self.kd_weight * self.kd_temperature**2 * kl.mean()
        loss = sum(out.values())
        return {"loss": loss, **{k: v.detach() for k, v in out.items()}}


# ----------------------------------------------------------------------------------------
# BCKD
# ----------------------------------------------------------------------------------------
_NEIGHBOURS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]


def boundary_map(x: Tensor) -> Tensor:
    """Feature-affinity boundary map: [B,C,h,w] → [B,h,w] in [0, 2].

    b_p = 1 − mean over the 8 neighbours q of cos(x_p, x_q); borders use replicate padding,
    so an out-of-image neighbour counts as identical (affinity 1).
    """
    x = F.normalize(x, dim=1)
    h, w = x.shape[-2:]
    padded = F.pad(x, (1, 1, 1, 1), mode="replicate")
    affinity = sum((x * padded[:, :, 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]).sum(dim=1) for dy, dx in _NEIGHBOURS)
    return 1.0 - affinity / len(_NEIGHBOURS)


def self_relation(x: Tensor) -> Tensor:
    """Pixel self-relation: [B,C,h,w] → [B, h·w, h·w] cosine similarities between pixels."""
    v = F.normalize(x.flatten(2), dim=1)                             # [B, C, N]
    return v.transpose(1, 2) @ v


class BCKD(TaskKDLoss):
    """BCKD (Zhang et al., "Towards Customized Knowledge Distillation for Chip-Level Dense
    Image Predictions"): boundary distillation + context distillation with a decaying weight.

        r       = 1 − (t−1)/t_max = 1 − progress
        L_bd    = 1/4 Σ_l mean_p ( b(S_l)_p − b(T_l)_p )²       S_l, T_l: decoder inputs [B,C_l,H_l,W_l]
        L_cd    = mean_{i,j} ( R(z_s)_ij − R(z_t)_ij )²         z: logits pooled to the stride-32 grid
        loss    = r·α·L_bd + r·β·L_cd            (α = 10, β = 50; ``decay`` says which terms get r)

    with b the feature-affinity boundary map (``boundary_map``: one minus the mean cosine
    affinity of a pixel with its 8 neighbours) and R the pixel self-relation
    (``self_relation``: cosine similarity of every pixel pair).

    Sources: the task brief for this project — α = 10, β = 50, r(t) = 1 − (t−1)/t_max and
    the structure (boundaries from feature affinities of the hierarchical maps, contexts
    from pixel self-relations). The paper's equations could not be retrieved here, so the
    following are choices, not transcriptions: which terms r multiplies (both, by default;
    set ``decay=("context",)`` etc. to change), the 8-neighbour cosine affinity and its
    ``1 − mean`` boundary, MSE as the boundary and context distance, equal weights over the
    four decoder inputs, self-relations on the decoder logits rather than on a feature map
    (the logits have the same width K in both networks, so no projection is needed),
    adaptive average pooling of the logits to the student's stride-32 grid to keep the
    N×N relation small, and cosine (not softmax) relations. No ignore-masking: the teacher's
    boundaries and relations are defined at every pixel.
    """

    uses: ClassVar[tuple[str, ...]] = ("logits", "features")

    def __init__(
        self,
        student: EncoderInfo,
        teacher: EncoderInfo,
        num_classes: int,
        alpha: float = 10.0,
        beta: float = 50.0,
        decay: tuple[str, ...] = ("boundary", "context"),
    ) -> None:
        super().__init__(student, teacher, num_classes)
        unknown = set(decay) - {"boundary", "context"}
        if unknown:
            raise ValueError(f"unknown decayed terms {sorted(unknown)}")
        self.alpha, self.beta, self.decay = float(alpha), float(beta), tuple(decay)

    def schedule(self, progress: float) -> float:
        """r(t) = 1 − (t−1)/t_max, with ``progress`` = (t−1)/t_max."""
        return 1.0 - float(progress)

    def boundary_loss(self, s_feats: list[Tensor], t_feats: list[Tensor]) -> Tensor:
        """Mean over levels of the MSE between student and teacher boundary maps."""
        terms = []
        for fs, ft in zip(s_feats, t_feats, strict=True):
            fs = fs.float()
            terms.append(F.mse_loss(boundary_map(fs), boundary_map(_teacher(ft, fs))))
        return torch.stack(terms).mean()

    def context_loss(self, s_logits: Tensor, t_logits: Tensor, size: tuple[int, int]) -> Tensor:
        """MSE between student and teacher self-relations of the logits pooled to ``size``."""
        zs = F.adaptive_avg_pool2d(s_logits.float(), size)
        zt = F.adaptive_avg_pool2d(t_logits.detach().float(), size)
        return F.mse_loss(self_relation(zs), self_relation(zt))

    def forward(self, s: SegOutputs, t: SegOutputs, labels: Tensor, progress: float) -> dict[str, Tensor]:
        r = self.schedule(progress)
        with _no_autocast(s.logits):
            bd = self.boundary_loss(s.features, t.features)
            cd = self.context_loss(s.logits, t.logits, tuple(s.features[-1].shape[-2:]))
        out = {
            "loss_boundary": (r if "boundary" in self.decay else 1.0) * self.alpha * bd,
            "loss_context": (r if "context" in self.decay else 1.0) * self.beta * cd,
        }
        loss = out["loss_boundary"] + out["loss_context"]
        return {"loss": loss, **{k: v.detach() for k, v in out.items()}}


# ----------------------------------------------------------------------------------------
# LFD
# ----------------------------------------------------------------------------------------
class LFD(TaskKDLoss):
    """LFD, "Efficient semantic segmentation via logit-guided feature distillation" (Yu et al.,
    Neural Networks 2026). RECONSTRUCTED: the loss code is not public (the authors' repo
    fate2715/LFD ships the training script but not ``CriterionLFD``), so the formulation
    below is rebuilt from the abstract and that script.

        A       = 1×1 conv (no bias), Cs → Ct                      adapter on S = SegOutputs.last
        kl_p    = KL(softmax(t_p/T) ‖ softmax(s_p/T))              per pixel, decoder logits, on the
                                                                   logit grid; resized to the feature grid
        W       = kl / mean(kl)  per image, detached               spatial mask [B,h,w], mean 1
        L_feat  = mean_{b,p} W_bp · mean_c (A(S) − T)²_bcp
        c_bk    = K · π_bk / Σ_k π_bk,  π_bk = mean_p softmax(t)_bkp   class mask [B,K], mean 1
        H       = shared auxiliary head: conv3×3(Ct→128)-BN-ReLU → conv1×1(128→K)
        L_aux   = Σ_{b,p valid} c_{b,y} (CE(H(A(S)), y) + CE(H(T), y)) / #valid
        L_kd    = T² · mean_p kl_p    (only once progress ≥ kd_start)
        loss    = λ_feat·L_feat + λ_aux·L_aux + λ_kd·L_kd

    From the authors' script (``train_lfd_v1.py``, ``train_lfd.sh``): the bias-free 1×1
    adapter, the auxiliary head's layout (3×3 ConvBNReLU to 128 channels, 1×1 to K) and its
    single instance shared by the branches, λ_feat = 1, λ_aux = 0.1, λ_kd = 1, T = 1 and a
    KL term that starts after iteration 1000 (of 40k: ``kd_start`` = 0.025).
    From the abstract: logits of the deep layers give fine-grained spatial masks for the
    feature distillation, and class masks modulate shallow auxiliary heads.
    Choices (not in any retrieved source): the spatial mask is the detached teacher→student
    pixel KL normalised to mean 1 (pixels where the student's prediction lags the
    teacher's are "critical"); the class mask is the teacher's mean class probability per
    image, normalised to mean 1, used as per-class cross-entropy weights; the shared head
    sees the adapted student map and the (detached) teacher map and learns from the labels
    on both, so the teacher branch calibrates the head that the student is read through;
    the distilled map is ``last``; the script's division of the feature term by its own
    detached value is not applied (it fixes that term's value at λ_feat).
    """

    uses: ClassVar[tuple[str, ...]] = ("logits", "features")

    def __init__(
        self,
        student: EncoderInfo,
        teacher: EncoderInfo,
        num_classes: int,
        feat_weight: float = 1.0,
        aux_weight: float = 0.1,
        kd_weight: float = 1.0,
        temperature: float = 1.0,
        kd_start: float = 0.025,
        aux_channels: int = 128,
    ) -> None:
        super().__init__(student, teacher, num_classes)
        cs, ct = student.embed_dim, teacher.embed_dim
        self.feat_weight, self.aux_weight, self.kd_weight = float(feat_weight), float(aux_weight), float(kd_weight)
        self.temperature, self.kd_start = float(temperature), float(kd_start)
        self.adapter = nn.Conv2d(cs, ct, kernel_size=1, bias=False)
        self.aux_head = nn.Sequential(
            nn.Conv2d(ct, aux_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(aux_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(aux_channels, self.num_classes, kernel_size=1),
        )

    @staticmethod
    def spatial_mask(kl: Tensor, size: tuple[int, int]) -> Tensor:
        """Per-pixel KL [B,h,w] → detached weights [B,*size], mean 1 per image."""
        w = F.interpolate(kl.detach()[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
        return w / w.mean(dim=(1, 2), keepdim=True).clamp(min=1e-12)

    def class_mask(self, t_logits: Tensor) -> Tensor:
        """Teacher logits [B,K,h,w] → class weights [B,K], mean 1 per image."""
        pi = F.softmax(t_logits.detach().float(), dim=1).mean(dim=(2, 3))
        return self.num_classes * pi / pi.sum(dim=1, keepdim=True)

    def aux_loss(self, logits: Tensor, labels: Tensor, weights: Tensor) -> Tensor:
        """Class-weighted CE of aux logits [B,K,h,w] vs labels nearest-sampled to [h,w]."""
        y = resize_labels(labels, logits.shape[-2:])
        valid = y != IGNORE_INDEX
        y = torch.where(valid, y, 0)                # any class id; these pixels are zeroed below
        ce = F.cross_entropy(logits, y, reduction="none")
        w = torch.gather(weights, 1, y.flatten(1)).view_as(y)
        return (w * ce * valid).sum() / valid.sum().clamp(min=1)

    def forward(self, s: SegOutputs, t: SegOutputs, labels: Tensor, progress: float) -> dict[str, Tensor]:
        with _no_autocast(s.last):
            s_logits = s.logits.float()                                      # [B, K, h, w]
            t_logits = _teacher(t.logits, s_logits)
            kl = _pixel_kl(s_logits, t_logits, self.temperature)             # [B, h, w]
            feat_s = s.last.float()                                          # [B, Cs, h', w']
            feat_t = _teacher(t.last, feat_s)                                # [B, Ct, h', w']
            adapted = self.adapter(feat_s)
            w = self.spatial_mask(kl, tuple(feat_s.shape[-2:]))
            feat = (w * (adapted - feat_t).pow(2).mean(dim=1)).mean()
            cls_w = self.class_mask(t_logits)
            aux = self.aux_loss(self.aux_head(adapted), labels, cls_w) + self.aux_loss(
                self.aux_head(feat_t), labels, cls_w
            )
            kd_on = float(progress) >= self.kd_start
            out = {
                "loss_feat": self.feat_weight * feat,
                "loss_aux": self.aux_weight * aux,
                "loss_kd": (self.kd_weight * self.temperature**2 if kd_on else 0.0) * kl.mean(),
            }
        loss = out["loss_feat"] + out["loss_aux"] + out["loss_kd"]
        return {"loss": loss, **{k: v.detach() for k, v in out.items()}}


LOSSES = {"afdcd": AfDCD, "bckd": BCKD, "lfd": LFD}
