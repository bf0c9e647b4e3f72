"""Task-level (stage-3) dense distillation losses: Af-DCD, BCKD and LFD.

Each module follows ``TaskKDLoss``: ``loss(s_out, t_out, labels, progress)`` returns
``{'loss': weighted total, 'loss_<term>': detached weighted term}``; the ``loss_<term>``
entries add up to ``loss`` (other keys, e.g. BCKD's ``bckd_tau`` or LFD's ``raw_<term>``, are
detached diagnostics).

Conventions shared by the three (choices the papers do not make for this setup):

* Teacher tensors are ``.detach()``-ed on entry, so nothing can reach the teacher.
* Distances, softmaxes and reductions run in fp32 with autocast switched off inside the
  loss (teacher/student maps may arrive as bf16/fp16); the loss's own layers therefore
  also run in fp32 — they are small and discarded after training.
* A teacher map of another spatial size is bilinearly resized to the student's
  (``resize_to``); student maps are never resized — except in BCKD, whose fusion resizes every
  level of both networks to the stride-8 grid, as the paper does.
* ``labels`` are [B, H, W] train ids at image size, 255 = ignore.
"""
from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gkd.distill.task_base import IGNORE_INDEX, TaskKDLoss, resize_labels, self_normalised
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
def neighbour_lines(radius: int) -> list[tuple[tuple[int, int], list[tuple[int, int]]]]:
    """The pair offsets δ = j − i of BCKD's bounded neighbourhood and the pixels on each line.

    δ ranges over 0 < max(|δy|, |δx|) ≤ radius, row-major; the line Π_{i,i+δ} is the n + 1 points
    round(m·δ/n), m = 0..n, n = max(|δy|, |δx|), rounded half up (both endpoints included). The
    rounding acts on absolute coordinates, so the line from j back to i is the same pixel set.
    """
    if radius < 1:
        raise ValueError(f"radius must be at least 1, got {radius}")
    out = []
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            n = max(abs(dy), abs(dx))
            if n == 0:
                continue
            pts = sorted({(math.floor(m * dy / n + 0.5), math.floor(m * dx / n + 0.5)) for m in range(n + 1)})
            out.append(((dy, dx), pts))
    return out


def pair_boundary(score: Tensor, radius: int) -> tuple[Tensor, Tensor]:
    """Eq. 2 on a bounded neighbourhood: boundary score map [B,1,h,w] in [0,1] → (T^B [B,P,h,w], valid [P,h,w]).

    T^B[b, p, i] = 1 − max_{u,v ∈ Π(i, i+δ_p)} |s_u − s_v| = 1 − (max − min of s along the line),
    with δ_p the p-th offset of ``neighbour_lines``; valid[p, i] says whether i + δ_p is inside the
    map (the entries of other pairs are meaningless and must be masked).
    """
    b, _, h, w = score.shape
    r = radius
    padded = F.pad(score, (r, r, r, r), mode="replicate")        # only read at valid pairs' lines

    def shifted(oy: int, ox: int) -> Tensor:
        return padded[:, :, r + oy : r + oy + h, r + ox : r + ox + w]

    ys = torch.arange(h, device=score.device).view(h, 1)
    xs = torch.arange(w, device=score.device).view(1, w)
    maps, valid = [], []
    for (dy, dx), pts in neighbour_lines(radius):
        line = torch.cat([shifted(oy, ox) for oy, ox in pts], dim=1)      # [B, n+1, h, w]
        maps.append(1.0 - (line.amax(dim=1) - line.amin(dim=1)))
        valid.append((ys + dy >= 0) & (ys + dy < h) & (xs + dx >= 0) & (xs + dx < w))
    return torch.stack(maps, dim=1), torch.stack(valid)


def tempered_cross_entropy(t: Tensor, s: Tensor, dim: int, valid: Tensor | None = None) -> Tensor:
    """−Σ_dim softmax(t) · log softmax(s), over the entries where ``valid`` (broadcast to t); the
    inputs are already divided by τ. Returns t's shape without ``dim``."""
    if valid is not None:
        t, s = t.masked_fill(~valid, float("-inf")), s.masked_fill(~valid, float("-inf"))
    log_q = F.log_softmax(s, dim=dim)
    if valid is not None:
        log_q = log_q.masked_fill(~valid, 0.0)                    # 0 · (−inf) would be NaN
    return -(F.softmax(t, dim=dim) * log_q).sum(dim=dim)


class _BCKDBranch(nn.Module):
    """One network's side of BCKD: per-level 1×1 convs → resize → concat → 3×3 fuse (Tᶜ / Sᶜ),
    the 1×1 boundary conv (256 → 1) and the feature alignment O (1×1, 256 → 256)."""

    def __init__(self, in_channels: tuple[int, ...], channels: int) -> None:
        super().__init__()
        width = channels // len(in_channels)
        self.reduce = nn.ModuleList(nn.Conv2d(c, width, kernel_size=1) for c in in_channels)
        self.fuse = nn.Conv2d(width * len(in_channels), channels, kernel_size=3, padding=1)
        self.boundary = nn.Conv2d(channels, 1, kernel_size=1)
        self.align = nn.Conv2d(channels, channels, kernel_size=1)

    def fused(self, feats: list[Tensor], size: tuple[int, int]) -> Tensor:
        """4 maps [B,C_l,H_l,W_l] → Tᶜ/Sᶜ [B, channels, *size] (size = the input's 1/8 grid)."""
        maps = [resize_to_size(conv(f), size) for conv, f in zip(self.reduce, feats, strict=True)]
        return self.fuse(torch.cat(maps, dim=1))


def resize_to_size(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear up-/down-sampling of [B,C,h,w] to ``size`` (no-op when equal)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class BCKD(TaskKDLoss):
    """BCKD (Zhang et al., "Towards Customized Knowledge Distillation for Chip-Level Dense Image
    Predictions"): boundary distillation + context distillation, both decayed by r(t).

    From the paper (text in ``shared/papers/004_*.txt``), on the 4 decoder inputs S_l, T_l:

        Sᶜ = Conv3×3(concat_l resize_{1/8}(Conv1×1_l(S_l)))    [B, 256, h, w]   (§IV-A; Tᶜ alike)
        T^B_ij = 1 − max_{p,q ∈ Π_ij} B(c_p, c_q),  c = Conv1×1(Tᶜ) (256 → 1)            (Eq. 2)
        L_BD = −τ² Σ_i Σ_j ρ(T^B_i/τ)_j log ρ(S^B_i/τ)_j                                 (Eq. 3)
        T^R  = σ(O(Tᶜ)ᵀ O(Tᶜ) / √d) / τ ∈ R^{hw×hw},  d = 256                           (Eq. 4)
        L_CD = −τ² Σ_i Σ_j σ(T^R_i)_j log σ(S^R_i)_j                                     (Eq. 5)
        loss = r(t)·α·L_BD + r(t)·β·L_CD,  r(t) = 1 − (t−1)/t_max = 1 − progress         (Eqs. 7-8)

    α = 10, β = 50; τ starts at 1 and is multiplied by 1.05 whenever the range of values in a
    minibatch exceeds 0.5 (§V-B). The paper's σ(·)^{1/τ} is realised, as it says (§III, "we use
    T_i/S_i divided by τ"), by dividing the softmax inputs by τ: T^B/τ in Eq. 3, and in Eq. 5 the
    /τ that Eq. 4 already puts into T^R (not applied a second time).

    Choices (the paper leaves them open):

    * Layers: every 1×1 / 3×3 conv of the fusion, the boundary conv and O are learned layers of
      this module, one set per network (teacher and student do not share them), PyTorch default
      init, with bias. The per-level 1×1 convs map to 256/4 = 64 channels, so that the concatenation
      has the 256 channels the 3×3 conv maps to 256 (the paper: "the concatenated features with 256
      channel dimension"); resizing is bilinear, after the 1×1 conv, to the stride-8 map's grid
      (``features[1]``, the student's). O is a 1×1 conv 256 → 256.
    * Teacher side: the teacher's maps are detached, and its side's convs stay at their (seeded)
      random init (``train_teacher_layers=False``): §V-B says "only the student's parameters are
      updated", and teacher-side layers that learned from L_BD/L_CD could lower the loss by moving
      the teacher's boundaries and relations towards the student's. ``train_teacher_layers=True``
      lets them learn with the student (as MMRazor-style teacher connectors do).
    * B and Π (Eq. 2): B(u, v) = |sigmoid(u) − sigmoid(v)| — a soft "p and q are on different
      sides" indicator (the paper's B outputs 0/1, which would pass no gradient; the paper defines
      a boundary between two pixels as 1 when their classes differ). The max over all pairs on the
      line is then the range (max − min) of sigmoid(c) along it (``pair_boundary``). The pairs
      (i, j) are bounded: j within a (2r+1)² window around i (r = ``radius`` = 2, 24 neighbours,
      ±16 px at stride 8), i ≠ j, j inside the map; Π_ij is the rounded digital line
      (``neighbour_lines``).
    * ρ (Eq. 3) and σ (Eqs. 4, 5): softmaxes over j — for each pixel i, over its neighbours j for
      T^B, over all h·w pixels for the relations (σ in Eq. 4 row-wise, like attention). As written,
      Eq. 5 takes a softmax of T^R, whose entries are probabilities in [0, 1/τ], so its
      distributions are close to uniform; implemented as written.
    * Reductions: cross-entropy (the paper's form, so the value includes the teacher's entropy;
      the gradient is that of the KL); the Σ over anchor pixels i is averaged over i and the batch
      (``reduction="mean"``, the usual KD implementation of such sums; "sum" keeps the Σ over i,
      which scales each term by h·w).
    * τ rule: after each training forward (``self.training``; once per micro-batch), "the range
      of values" is max − min over the minibatch of each tempered map — T^B/τ and S^B/τ (valid
      pairs), T^R and S^R — and τ ← 1.05·τ (for the next forward) when any of the four exceeds 0.5.
      As the maps are divided by τ, the rule is self-limiting (T^B ∈ [0, 1] stops it at τ > 2).
      One τ for both terms. It is a buffer (``tau``): saved in the stage-3 checkpoints with the
      loss module and restored on resume; under DDP rank 0's value is broadcast
      (``broadcast_buffers``). ``tau_growth``/``tau_range`` change 1.05/0.5.
    * r(t) is applied per optimizer step with t−1 = the budget fraction used (the paper: epochs).
    * No ignore-masking: the teacher's boundaries and relations are defined at every pixel.
    """

    uses: ClassVar[tuple[str, ...]] = ("features",)

    def __init__(
        self,
        student: EncoderInfo,
        teacher: EncoderInfo,
        num_classes: int,
        alpha: float = 10.0,
        beta: float = 50.0,
        channels: int = 256,
        radius: int = 2,
        tau_growth: float = 1.05,
        tau_range: float = 0.5,
        reduction: str = "mean",
        train_teacher_layers: bool = False,
    ) -> None:
        super().__init__(student, teacher, num_classes)
        if len(student.feature_channels) != len(teacher.feature_channels):
            raise ValueError(f"student and teacher give {len(student.feature_channels)} and "
                             f"{len(teacher.feature_channels)} decoder inputs; BCKD fuses matching levels")
        if len(student.feature_channels) < 2:
            raise ValueError("BCKD needs the decoder inputs at strides 4, 8, ... (the fused grid is the stride-8 one)")
        if channels < len(student.feature_channels):
            raise ValueError(f"channels={channels} is fewer than the {len(student.feature_channels)} levels")
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        self.alpha, self.beta, self.channels, self.radius = float(alpha), float(beta), int(channels), int(radius)
        neighbour_lines(self.radius)  # validates the radius
        self.tau_growth, self.tau_range, self.reduction = float(tau_growth), float(tau_range), reduction
        self.student_branch = _BCKDBranch(tuple(student.feature_channels), self.channels)
        self.teacher_branch = _BCKDBranch(tuple(teacher.feature_channels), self.channels)
        self.teacher_branch.requires_grad_(bool(train_teacher_layers))
        # τ is training state: a buffer, so checkpoints save it and a resumed run continues with it
        self.register_buffer("tau", torch.tensor(1.0))

    def schedule(self, progress: float) -> float:
        """r(t) = 1 − (t−1)/t_max, with ``progress`` = (t−1)/t_max."""
        return 1.0 - float(progress)

    def _reduce(self, ce: Tensor) -> Tensor:
        """Per-anchor cross-entropies [B, N...] → scalar: mean over anchors and batch, or Σ anchors / B."""
        return ce.mean() if self.reduction == "mean" else ce.sum() / ce.shape[0]

    def terms(self, s_feats: list[Tensor], t_feats: list[Tensor], tau: float) -> dict[str, Tensor]:
        """The unweighted L_BD, L_CD (scalars) and the tempered items (for the τ rule) at temperature τ."""
        size = tuple(s_feats[1].shape[-2:])                         # the input's 1/8 grid
        if size[0] * size[1] < 2:
            raise ValueError(f"BCKD needs at least 2 pixels on the stride-8 grid, got {size}")
        fused_s = self.student_branch.fused([f.float() for f in s_feats], size)
        fused_t = self.teacher_branch.fused([f.detach().float() for f in t_feats], size)

        # boundary distillation, Eqs. 2-3
        sb, valid = pair_boundary(torch.sigmoid(self.student_branch.boundary(fused_s)), self.radius)
        tb, _ = pair_boundary(torch.sigmoid(self.teacher_branch.boundary(fused_t)), self.radius)
        bd = self._reduce(tempered_cross_entropy(tb / tau, sb / tau, dim=1, valid=valid))

        # context distillation, Eqs. 4-5
        def relation(branch: _BCKDBranch, fused: Tensor) -> Tensor:
            o = branch.align(fused).flatten(2)                       # [B, d, N]
            return F.softmax(o.transpose(1, 2) @ o / math.sqrt(o.shape[1]), dim=-1) / tau   # [B, N, N]

        tr, sr = relation(self.teacher_branch, fused_t), relation(self.student_branch, fused_s)
        cd = self._reduce(tempered_cross_entropy(tr, sr, dim=-1))
        v = valid.unsqueeze(0).expand_as(tb)
        items = (tb[v] / tau, sb[v] / tau, tr, sr)
        return {"boundary": bd, "context": cd, "items": items}

    @torch.no_grad()
    def update_tau(self, items: tuple[Tensor, ...]) -> None:
        """§V-B: τ ← 1.05·τ when the range (max − min over the minibatch) of any tempered map exceeds 0.5."""
        spread = max(float(x.max() - x.min()) for x in items)
        if spread > self.tau_range:
            self.tau.mul_(self.tau_growth)

    def forward(self, s: SegOutputs, t: SegOutputs, labels: Tensor, progress: float) -> dict[str, Tensor]:
        r = self.schedule(progress)
        tau = float(self.tau)  # a Python number: the in-place update below must not touch the graph
        with _no_autocast(s.features[0]):
            terms = self.terms(s.features, t.features, tau)
        out = {
            "loss_boundary": r * self.alpha * tau**2 * terms["boundary"],
            "loss_context": r * self.beta * tau**2 * terms["context"],
        }
        if self.training:
            self.update_tau(terms["items"])
        loss = out["loss_boundary"] + out["loss_context"]
        return {"loss": loss, **{k: v.detach() for k, v in out.items()},
                "bckd_tau": torch.tensor(tau, device=loss.device)}


# ----------------------------------------------------------------------------------------
# LFD
# ----------------------------------------------------------------------------------------
class LFD(TaskKDLoss):
    """LFD, "Efficient semantic segmentation via logit-guided feature distillation" (Yu et al.,
    Neural Networks 2026), as the authors' training script combines it. The ``CriterionLFD`` loss
    code is not public (fate2715/LFD ships the script, not the loss), so the inside of the
    feature/auxiliary/KL terms is RECONSTRUCTED from the abstract; the rest follows the script.

        F_s, F_t = SegOutputs.head_feature              the decoder's map before its classifier
        A       = 1×1 conv (no bias), D_s → D_t         adapter on F_s
        kl_p    = KL(softmax(t_p/T) ‖ softmax(s_p/T))   per pixel, decoder logits (teacher resized)
        L_kd    = T² · mean_p kl_p                       vanilla KD (CIRKD's CriterionKD, 'batchmean')
        W       = kl / mean(kl)  per image, detached    spatial mask [B,h,w], mean 1
        L_feat  = mean_{b,p} W_bp · mean_c (A(F_s) − F_t)²_bcp
        c_bk    = K · π_bk / Σ_k π_bk,  π_bk = mean_p softmax(t)_bkp        class mask [B,K], mean 1
        H       = shared auxiliary head: conv3×3(D_t→128)-BN-ReLU → conv1×1(128→K)
        L_aux   = Σ_{b,p valid} c_{b,y} (CE(H(A(F_s)), y) + CE(H(F_t), y)) / #valid
        L_kl    = T² · mean_p kl_p, only once progress ≥ kl_start           LFD's own KL term
        total   = L_seg/⌊L_seg⌋ + λ_kd·L_kd/⌊L_kd⌋ + λ_feat·L_feat/⌊L_feat⌋ + λ_aux·L_aux + λ_kl·L_kl

    ⌊x⌋ = x.detach(): those terms are divided by their own detached value (value λ, gradient
    λ·∇x/x; ``self_normalised``); the segmentation loss too (``seg_term``).

    From the script (fate2715/LFD ``train_lfd_v1.py``; ``train_scripts/train_kd/train_lfd.sh``):
    the distilled map is the head's feature after the context module and before the classifier
    (``s_outputs[-1]`` = DeepLabV3's ``x_feat_after_aspp``, ``models/deeplabv3.py`` lines 92-97,
    taken after the head's dropout); the bias-free 1×1 ``Adapter`` (L56-62, ``Adapter(128, 256)``
    L261: student head width → teacher head width); the auxiliary ``SegmentHead(256, 128, K)``
    (L65-76, L262), one instance handed to the LFD criterion; ``CriterionLFD(kd_temperature=T,
    lambda_kd=--lambda-lfd, lambda_feature=1.0, lambda_aux=0.1, start_iter=--lfd-start-iter)``
    (L297-303); the total (L434-447): ``task_loss / task_loss.detach() + kd_loss /
    kd_loss.detach() + fea_loss / fea_loss.detach() + aux_loss + kl_loss``, with ``kd_loss =
    lambda_kd · CriterionKD(s_logits, t_logits)`` (L413-414) present from the first iteration;
    T = 1 (``--kd-temperature`` default, L118); the .sh passes ``--lambda-kd 1.0`` (line 8),
    ``--lfd-start-iter 1000`` (line 13) and ``--lambda-lfd 1.`` (line 14); 40k iterations
    (``--max-iterations`` default, L108), so kl_start = 1000/40000 = 0.025. In the script λ_kd and
    λ_feat cancel in x/x.detach(); here ``weight · x/x.detach()``, equal at the default weight 1.

    RECONSTRUCTED (choices, not in any retrieved source): L_feat's spatial mask — the detached
    teacher→student pixel KL normalised to mean 1 ("logits of the deep layers give fine-grained
    spatial masks"); the class mask (teacher's mean class probability per image, mean 1, as
    per-class CE weights); the shared head applied to both the adapted student map and the
    (detached) teacher map with labels as targets; L_kl = the same pixel KL as L_kd (the script
    only shows that CriterionLFD returns a ``kl_loss`` from ``start_iter`` on, weighted λ_kl).
    Choices for this project's decoders: MLP head — the fused map after its dropout (as DeepLab's
    ``x_feat_after_aspp``); Mask2Former — the pixel decoder's ``mask_features`` (its last
    per-pixel map, see ``Mask2FormerDecoder``). Both are on the logit grid (stride 4).
    """

    uses: ClassVar[tuple[str, ...]] = ("logits", "head_feature")

    def __init__(
        self,
        student: EncoderInfo,
        teacher: EncoderInfo,
        num_classes: int,
        kd_weight: float = 1.0,
        feat_weight: float = 1.0,
        aux_weight: float = 0.1,
        kl_weight: float = 1.0,
        temperature: float = 1.0,
        kl_start: float = 0.025,
        aux_channels: int = 128,
        normalize_seg: bool = True,
    ) -> None:
        super().__init__(student, teacher, num_classes)
        for role, info in (("student", student), ("teacher", teacher)):
            if info.head_channels <= 0:
                raise ValueError(f"LFD distils the decoder's feature before its classifier, but the {role}'s "
                                 "EncoderInfo.head_channels is unknown (0): build it from the segmentor "
                                 "(gkd.engine.segment.encoder_info)")
        cs, ct = student.head_channels, teacher.head_channels
        self.kd_weight, self.feat_weight = float(kd_weight), float(feat_weight)
        self.aux_weight, self.kl_weight = float(aux_weight), float(kl_weight)
        self.temperature, self.kl_start, self.normalize_seg = float(temperature), float(kl_start), bool(normalize_seg)
        self.adapter = nn.Conv2d(cs, ct, kernel_size=1, bias=False)
        self.aux_head = nn.Sequential(
            nn.Conv2d(ct, aux_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(aux_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(aux_channels, self.num_classes, kernel_size=1),
        )

    def seg_term(self, seg_loss: Tensor) -> Tensor:
        """The script's ``task_loss / task_loss.detach()`` (unless ``normalize_seg=False``)."""
        return self_normalised(seg_loss) if self.normalize_seg else seg_loss

    @staticmethod
    def spatial_mask(kl: Tensor, size: tuple[int, int]) -> Tensor:
        """Per-pixel KL [B,h,w] → detached weights [B,*size], mean 1 per image."""
        w = resize_to_size(kl.detach()[:, None], size)[:, 0]
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
        for role, out in (("student", s), ("teacher", t)):
            if out.logits is None or out.head_feature is None:
                raise ValueError(f"LFD needs the {role} decoder's logits and head_feature (run its decoder)")
        with _no_autocast(s.logits):
            s_logits = s.logits.float()                                      # [B, K, h, w]
            t_logits = _teacher(t.logits, s_logits)
            kl = _pixel_kl(s_logits, t_logits, self.temperature)             # [B, h, w]
            kd = self.temperature**2 * kl.mean()
            feat_s = s.head_feature.float()                                  # [B, Ds, h', w']
            feat_t = _teacher(t.head_feature, feat_s)                        # [B, Dt, h', w']
            adapted = self.adapter(feat_s)
            w = self.spatial_mask(kl, tuple(feat_s.shape[-2:]))
            feat = (w * (adapted - feat_t).pow(2).mean(dim=1)).mean()
            cls_w = self.class_mask(t_logits)
            aux = self.aux_loss(self.aux_head(adapted), labels, cls_w) + self.aux_loss(
                self.aux_head(feat_t), labels, cls_w
            )
            kl_on = float(progress) >= self.kl_start
            out = {
                "loss_kd": self_normalised(kd, self.kd_weight),
                "loss_feat": self_normalised(feat, self.feat_weight),
                "loss_aux": self.aux_weight * aux,
                "loss_kl": (self.kl_weight if kl_on else 0.0) * kd,
            }
        loss = out["loss_kd"] + out["loss_feat"] + out["loss_aux"] + out["loss_kl"]
        # the self-normalised terms always read λ: log their raw values too
        return {"loss": loss, **{k: v.detach() for k, v in out.items()},
                "raw_kd": kd.detach(), "raw_feat": feat.detach()}


LOSSES = {"afdcd": AfDCD, "bckd": BCKD, "lfd": LFD}
