"""A cheap frozen-feature probe for stages 1-2: how much segmentation do the student's tokens hold?

The first ``images`` images of two labelled *source* splits are resized to the stage's input size.
A 1×1 head (a linear map of the per-channel standardised patch tokens) is trained full-batch for
``steps`` AdamW steps on the first split, against each token's class fractions (the share of each
class among the pixels under the token, ignored pixels left out), and scored on the second split:
its token logits are upsampled bilinearly to the input size and compared with the label (mIoU, %).

It runs on the main process between optimizer steps; its seconds are logged, not charged to the
training budget. Scoring the frozen teacher the same way gives the upper reference.

It also measures the student's *fidelity* to the teacher on the held-out split: the share of the
(per-channel standardised) teacher tokens' variance that a ridge-regression map of the student's
tokens, fitted on the first split, explains (R², ``fidelity_r2``). A student that learned only the
teacher's mean token scores about 0.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from gkd.data import build_dataset
from gkd.eval.metrics import SegMetric
from gkd.tensors import Tokens

log = logging.getLogger(__name__)

__all__ = ["ProbeData", "load_probe_data", "class_fractions", "fit_probe", "probe_miou", "fidelity_r2", "run_probe",
           "StageProbe"]


@dataclass
class ProbeData:
    """images [n, 3, S, S] (normalised), labels [n, S, S] int64 (train ids, ignore = `ignore_index`)."""

    train_images: Tensor
    train_labels: Tensor
    val_images: Tensor
    val_labels: Tensor
    num_classes: int
    ignore_index: int


def _load_split(manifest: str, split: str, root: str | None, n: int, size: int,
                mean: Tensor, std: Tensor) -> tuple[Tensor, Tensor, int, int]:
    ds = build_dataset(manifest, split, root=root)
    if len(ds) == 0:
        raise ValueError(f"probe: split {split!r} of {manifest!r} is empty")
    images, labels = [], []
    for i in range(min(n, len(ds))):
        item = ds[i]
        img = F.interpolate(item["image"][None], size=(size, size), mode="bilinear", align_corners=False,
                            antialias=True)[0]
        images.append((img - mean[:, None, None]) / std[:, None, None])
        labels.append(F.interpolate(item["label"][None, None].float(), size=(size, size), mode="nearest")[0, 0].long())
    return torch.stack(images), torch.stack(labels), ds.num_classes, ds.ignore_index


def load_probe_data(manifest: str, root: str | None, train_split: str, val_split: str, images: int, size: int,
                    mean: tuple[float, ...], std: tuple[float, ...]) -> ProbeData:
    """Read and resize the probe's two source splits (refuses one split used twice)."""
    if train_split == val_split:
        raise ValueError(f"probe.train_split and probe.val_split are both {train_split!r}: the probe must be "
                         "scored on images it was not fitted on")
    m, s = torch.tensor(mean), torch.tensor(std)
    xt, yt, k, ignore = _load_split(manifest, train_split, root, images, size, m, s)
    xv, yv, _, _ = _load_split(manifest, val_split, root, images, size, m, s)
    return ProbeData(xt, yt, xv, yv, k, ignore)


def class_fractions(labels: Tensor, grid: tuple[int, int], num_classes: int, ignore_index: int) -> Tensor:
    """labels [n, H, W] → [n, h·w, K]: per token, the share of each class among its pixels (rows sum to
    the token's labelled share: 0 for a token that covers only ignored pixels). H, W multiples of h, w."""
    valid = labels != ignore_index
    onehot = F.one_hot(torch.where(valid, labels, 0), num_classes).permute(0, 3, 1, 2).float()
    onehot = onehot * valid[:, None].float()
    frac = F.adaptive_avg_pool2d(onehot, grid)  # exact averages when H, W are multiples of the grid
    return frac.flatten(2).transpose(1, 2)


@torch.no_grad()
def _tokens(encode: Callable[[Tensor], Tokens], images: Tensor, batch_size: int, device: torch.device) -> Tensor:
    """Patch tokens [n, N, C] (fp32, CPU) of `images`, in batches."""
    out = [encode(images[i:i + batch_size].to(device)).patch.float().cpu() for i in range(0, len(images), batch_size)]
    return torch.cat(out)


def fit_probe(train_tokens: Tensor, train_frac: Tensor, steps: int, lr: float, seed: int = 0
              ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fit the 1×1 head: tokens [n, N, C], class fractions [n, N, K] → (mean [C], std [C], W [C, K], b [K])."""
    c, k = train_tokens.shape[-1], train_frac.shape[-1]
    x = train_tokens.reshape(-1, c)
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    x = (x - mean) / std
    target = train_frac.reshape(-1, k)
    weight = target.sum(-1)  # labelled share of each token
    target = target / weight.clamp_min(1e-12)[:, None]
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(c, k, generator=g) * 0.01).requires_grad_()
    b = torch.zeros(k, requires_grad=True)
    opt = torch.optim.AdamW([w, b], lr=lr, weight_decay=1e-4)
    with torch.enable_grad():
        for _ in range(steps):
            logp = torch.log_softmax(x @ w + b, dim=-1)
            loss = -((target * logp).sum(-1) * weight).sum() / weight.sum().clamp_min(1e-12)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return mean, std, w.detach(), b.detach()


def probe_miou(tokens: Tensor, grid: tuple[int, int], labels: Tensor, head: tuple[Tensor, Tensor, Tensor, Tensor],
               num_classes: int, ignore_index: int) -> float:
    """mIoU (%) of the head on tokens [n, N, C] against labels [n, H, W] (logits upsampled bilinearly)."""
    mean, std, w, b = head
    logits = ((tokens - mean) / std) @ w + b  # [n, N, K]
    logits = logits.transpose(1, 2).reshape(len(tokens), num_classes, *grid)
    logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    metric = SegMetric(num_classes, ignore_index)
    metric.update(logits.argmax(1), labels)
    return float(metric.compute()["mIoU"])


def fidelity_r2(student_fit: Tensor, teacher_fit: Tensor, student_val: Tensor, teacher_val: Tensor,
                ridge: float = 1e-1) -> float:
    """Held-out R² of teacher tokens [n, N, Ct] predicted linearly from student tokens [n, N, Cs].

    Both sides are standardised per channel with the fit split's statistics; the map is ridge
    regression (``ridge`` × the number of fit tokens on the diagonal) with a bias, solved in float64.
    """
    def flat(x: Tensor) -> Tensor:
        return x.reshape(-1, x.shape[-1]).double()

    xs, ys, xv, yv = flat(student_fit), flat(teacher_fit), flat(student_val), flat(teacher_val)
    xm, xsd = xs.mean(0), xs.std(0).clamp_min(1e-6)
    ym, ysd = ys.mean(0), ys.std(0).clamp_min(1e-6)
    xs, xv = (xs - xm) / xsd, (xv - xm) / xsd
    ys, yv = (ys - ym) / ysd, (yv - ym) / ysd
    gram = xs.T @ xs + ridge * len(xs) * torch.eye(xs.shape[1], dtype=xs.dtype)
    w = torch.linalg.solve(gram, xs.T @ ys)  # the bias is 0: both sides are centred on the fit split
    residual = (yv - xv @ w).square().sum()
    total = (yv - yv.mean(0)).square().sum().clamp_min(1e-12)
    return float(1.0 - residual / total)


def run_probe(encode: Callable[[Tensor], Tokens], data: ProbeData, steps: int, lr: float, device: torch.device,
              batch_size: int = 32, seed: int = 0, teacher: tuple[Tensor, Tensor] | None = None) -> dict[str, Any]:
    """Probe `encode` (images [b,3,S,S] → Tokens): {'probe_miou' (held-out split), 'probe_fit_miou',
    'probe_seconds', and with `teacher` = its (fit, held-out) patch tokens, 'fidelity_r2'}; '_tokens'
    holds this model's (fit, held-out) patch tokens for reuse."""
    t0 = time.perf_counter()
    train = _tokens(encode, data.train_images, batch_size, device)
    val = _tokens(encode, data.val_images, batch_size, device)
    side = int(round(train.shape[1] ** 0.5))
    grid = (side, side)  # square inputs: the probe resizes every image to S × S
    if side * side != train.shape[1]:
        raise ValueError(f"probe: {train.shape[1]} tokens do not form a square grid")
    frac = class_fractions(data.train_labels, grid, data.num_classes, data.ignore_index)
    head = fit_probe(train, frac, steps, lr, seed)
    out: dict[str, Any] = {
        "probe_miou": probe_miou(val, grid, data.val_labels, head, data.num_classes, data.ignore_index),
        "probe_fit_miou": probe_miou(train, grid, data.train_labels, head, data.num_classes, data.ignore_index),
    }
    if teacher is not None:
        out["fidelity_r2"] = fidelity_r2(train, teacher[0], val, teacher[1])
    out["probe_seconds"] = round(time.perf_counter() - t0, 3)
    out["_tokens"] = (train, val)
    return out


class StageProbe:
    """The probe of a stage-1/2 run: on the main process, logged to the trainer's metrics.jsonl.

    The teacher is probed once, at construction (its tokens are kept for the students' fidelity R²);
    ``probe(model)`` scores ``model.student`` (in eval mode, on ``model.renorm``-ed inputs) at the
    trainer's current step and keeps the record in ``last``.
    """

    def __init__(self, data: ProbeData, steps: int, lr: float, seed: int, accelerator: Any, trainer: Any,
                 teacher: Callable[[Tensor], Tokens]) -> None:
        self.data, self.steps, self.lr, self.seed = data, steps, lr, seed
        self.accelerator, self.trainer = accelerator, trainer
        self.last: dict[str, Any] | None = None
        self.teacher_tokens: tuple[Tensor, Tensor] | None = None
        if accelerator.is_main_process:
            self.teacher_tokens = self._log("teacher", teacher).pop("_tokens")
        accelerator.wait_for_everyone()

    def _log(self, model: str, encode: Callable[[Tensor], Tokens]) -> dict[str, Any]:
        result = run_probe(encode, self.data, self.steps, self.lr, self.accelerator.device, seed=self.seed,
                           teacher=self.teacher_tokens)
        tokens = result.pop("_tokens")
        record = {"event": "probe", "model": model, "step": self.trainer.step_index, **result}
        self.trainer.metrics.write(record)
        self.accelerator.log({f"probe/{model}/{k}": v for k, v in result.items() if isinstance(v, (int, float))},
                             step=record["step"])
        log.info("probe (%s, step %d): held-out source mIoU %.1f%s", model, record["step"], result["probe_miou"],
                 f", fidelity R² {result['fidelity_r2']:.3f}" if "fidelity_r2" in result else "")
        return {**record, "_tokens": tokens}

    def __call__(self, model: Any) -> None:
        if self.accelerator.is_main_process:
            student = model.student
            was_training = student.training
            student.eval()  # BatchNorm statistics, no dropout: the features stage 3 will see
            self.last = self._log("student", lambda x: student(model.renorm(x)))
            self.last.pop("_tokens")
            student.train(was_training)
        self.accelerator.wait_for_everyone()
