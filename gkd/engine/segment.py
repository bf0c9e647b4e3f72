"""Stage 3: train a segmentation decoder on the frozen stage-2 encoder (build → prepare → loop → save).

The encoder never trains: it is loaded strictly from `encoder.safetensors`, kept in eval mode
without autograd inside the Segmentor, its parameters are left out of the optimizer, and a hash of
its weights taken before training must equal the one taken after (recorded in metrics.jsonl).
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from gkd.config import SegmentConfig, to_container
from gkd.data import build_dataset
from gkd.data.seg_transforms import build_seg_train_transform
from gkd.engine.common import Trainer, make_accelerator, micro_batch_size, param_groups
from gkd.models.segmentor import build_segmentor, load_encoder_for_segmentor, save_segmentor

log = logging.getLogger(__name__)


class SegTrainStep(nn.Module):
    """The module DDP wraps: its forward is the segmentor's training loss."""

    def __init__(self, segmentor: nn.Module):
        super().__init__()
        self.segmentor = segmentor

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """images [B,3,H,W] in [0,1], labels [B,H,W] train ids (255 ignore) → {'loss', 'loss_*'}."""
        return self.segmentor.loss(images, labels)


def poly_lr(step: int, total: int, base: float, power: float, minimum: float, warmup: int) -> float:
    """mmseg's PolyLR (eta_min `minimum`) after an optional linear warmup."""
    if step < warmup:
        return base * (step + 1) / warmup
    return (base - minimum) * (1 - min(step, total) / total) ** power + minimum


def label_subset(n: int, fraction: float, seed: int) -> list[int]:
    """Indices of a reproducible random `fraction` of n labelled images (at least one), sorted."""
    if not 0 < fraction <= 1:
        raise ValueError(f"data.fraction must be in (0, 1], got {fraction}")
    if fraction == 1:
        return list(range(n))
    k = max(1, round(n * fraction))
    return sorted(np.random.default_rng(seed).choice(n, size=k, replace=False).tolist())


def weights_hash(module: nn.Module) -> str:
    """SHA-256 over every tensor of `module`'s state dict (names and raw bytes)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def train_segmentor(cfg: SegmentConfig) -> Path:
    """Run stage 3; return the path of the written `segmentor.safetensors`."""
    accelerator = make_accelerator(cfg)
    out_dir = Path(cfg.out_dir)
    accum = cfg.optim.grad_accum
    micro_batch = micro_batch_size(cfg.data.batch_size, accelerator, accum)

    # ---- build ---------------------------------------------------------------------------------
    d = cfg.data
    transform = build_seg_train_transform(crop_size=d.crop_size, scale=tuple(d.scale), ratio_range=tuple(d.ratio_range),
                                          cat_max_ratio=d.cat_max_ratio, photometric=d.photometric)
    dataset = build_dataset(d.manifest, d.split, root=d.root, transform=transform, on_bad=d.on_bad)
    subset = label_subset(len(dataset), d.fraction, cfg.seed)
    if accelerator.is_main_process and d.fraction < 1:  # which labelled images a label-efficient run saw
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "train_subset.txt").write_text("".join(f"{dataset.image_path(i)}\n" for i in subset))
    train_set = Subset(dataset, subset) if d.fraction < 1 else dataset
    if len(train_set) < cfg.data.batch_size:
        raise ValueError(f"{len(train_set)} labelled images are fewer than one global batch ({cfg.data.batch_size})")

    torch.manual_seed(cfg.seed)
    encoder, input_norm = load_encoder_for_segmentor(cfg.encoder)
    if input_norm is None:
        raise ValueError(f"{cfg.encoder} records no input normalisation (gkd_input_norm): re-export it with this version")
    segmentor = build_segmentor(encoder, decoder=cfg.decoder.name, num_classes=dataset.num_classes,
                                mean=input_norm["mean"], std=input_norm["std"], layers=cfg.decoder.layers,
                                class_names=list(dataset.classes), **cfg.decoder.kwargs)
    encoder_hash = weights_hash(segmentor.encoder)
    model = SegTrainStep(segmentor)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr,
                                  betas=tuple(cfg.optim.betas))
    loader = DataLoader(train_set, batch_size=micro_batch, shuffle=True, drop_last=True,
                        num_workers=d.num_workers, pin_memory=torch.cuda.is_available(),
                        generator=torch.Generator().manual_seed(cfg.seed))
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)  # shards batches across ranks
    o = cfg.optim
    trainer = Trainer(cfg, accelerator, model, optimizer, o.iters, desc="stage 3")
    trainer.start()  # resumes from the latest checkpoint when there is one

    # ---- loop ------------------------------------------------------------------------------------
    steps_per_epoch = max(1, len(loader) // accum)
    batches = _forever(accelerator, loader, trainer.step_index * accum)
    segmentor.train()  # the decoder trains; the Segmentor keeps its encoder in eval mode
    while trainer.step_index < o.iters:
        step = trainer.step_index
        trainer.step(batches, lambda batch: model(batch["image"], batch["label"]),
                     poly_lr(step, o.iters, o.lr, o.power, o.min_lr, o.warmup_iters), step // steps_per_epoch)
    trainer.finish()

    # ---- save --------------------------------------------------------------------------------------
    segmentor = accelerator.unwrap_model(model).segmentor
    unchanged = weights_hash(segmentor.encoder) == encoder_hash
    trainer.metrics.write({"event": "end", "step": trainer.step_index, "encoder_sha256": encoder_hash,
                           "encoder_unchanged": unchanged})
    if not unchanged:
        raise RuntimeError("the frozen encoder's weights changed during stage 3: this is a bug")
    path = out_dir / "segmentor.safetensors"
    if accelerator.is_main_process:
        save_segmentor(path, segmentor, config=to_container(cfg), parent=cfg.encoder)
        log.info("wrote %s", path)
    model = optimizer = loader = batches = None  # noqa: F841  (see Trainer.close)
    trainer.close()
    return path


def _forever(accelerator, loader, skip: int) -> Iterator[dict[str, Any]]:
    """Batches over as many epochs as needed, skipping the first `skip` (resume mid-training)."""
    epoch, per_epoch = divmod(skip, max(1, len(loader)))
    while True:
        loader.set_epoch(epoch)
        it = accelerator.skip_first_batches(loader, per_epoch) if per_epoch else loader
        yield from it
        epoch, per_epoch = epoch + 1, 0
