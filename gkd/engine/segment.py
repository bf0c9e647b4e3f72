"""Stage 3: train a segmentation decoder on the frozen stage-2 encoder (build → prepare → loop → save).

The encoder never trains: it is loaded strictly from `encoder.safetensors`, kept in eval mode
without autograd inside the Segmentor, its parameters are left out of the optimizer, and a hash of
its weights taken before training must equal the one taken after (recorded in metrics.jsonl).

Task-level distillation (``method.name`` = a task-level method of ``gkd.distill.METHODS``) is the
exception: the student encoder trains with the decoder, on the segmentation loss plus the method's
loss against a frozen *teacher segmentor* (``teacher=``: stage 3 run on the frozen teacher encoder),
whose forward is part of every step (and of its counted FLOPs).

Model selection reads the source domain only (`select.rule=last|best`, see gkd.engine.selection);
the header records the protocol (`gkd_protocol`) that `gkd eval` checks its targets against.
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

from gkd.config import SegDataConfig, SegmentConfig, to_container
from gkd.data import build_dataset
from gkd.data.seg_transforms import build_seg_train_transform
from gkd.distill import EncoderInfo, SegOutputs, TaskKDLoss, build_task_loss, get_method
from gkd.handoff import file_sha256, read_metadata
from gkd.engine.trainer import Trainer, make_accelerator, make_adamw, micro_batch_size
from gkd.engine.compute import Budget, compute_metadata
from gkd.engine.selection import Selector
from gkd.models.segmentor import Segmentor, build_segmentor, load_encoder_for_segmentor, load_segmentor, save_segmentor

log = logging.getLogger(__name__)


class SegTrainStep(nn.Module):
    """The module DDP wraps: the student segmentor and, for task-level distillation, the loss module
    (whose own layers train with the student). Its forward is the training loss."""

    def __init__(self, segmentor: Segmentor, kd: TaskKDLoss | None = None):
        super().__init__()
        self.segmentor = segmentor
        self.kd = kd

    def forward(self, images: torch.Tensor, labels: torch.Tensor, teacher: SegOutputs | None = None,
                progress: float = 0.0) -> dict[str, torch.Tensor]:
        """images [B,3,H,W] in [0,1], labels [B,H,W] train ids (255 ignore), the teacher segmentor's
        outputs on the same images, budget progress → {'loss', 'loss_*'}."""
        if self.kd is None:
            return self.segmentor.loss(images, labels)
        blocks = self.kd.blocks(self.kd.student_info, "student")
        seg, student = self.segmentor.distill_outputs(images, labels, blocks)
        kd = self.kd(student, teacher, labels, progress)
        return {"loss": self.kd.seg_term(seg["loss"]) + kd["loss"], "loss_seg": seg["loss"].detach(),
                "loss_distill": kd["loss"].detach(), **{k: v for k, v in seg.items() if k != "loss"},
                **{k: v.detach() for k, v in kd.items() if k != "loss"}}


def poly_lr(step: int, progress: float, base: float, power: float, minimum: float, warmup: int) -> float:
    """mmseg's PolyLR (eta_min `minimum`) over the budget's `progress` in [0, 1] (step / iters for
    a step budget), after an optional linear warmup of `warmup` steps."""
    if step < warmup:
        return base * (step + 1) / warmup
    return (base - minimum) * (1 - min(1.0, progress)) ** power + minimum


def encoder_info(segmentor: Segmentor) -> EncoderInfo:
    """The shapes a task-level loss builds its layers from."""
    enc = segmentor.encoder
    if enc.kind == "vit":
        return EncoderInfo("vit", int(enc.embed_dim), int(enc.depth), segmentor.decoder.in_channels,
                           segmentor.decoder.head_channels)
    last = int(enc.encoder.feature_info[-1]["num_chs"])
    return EncoderInfo("cnn", last, 0, segmentor.decoder.in_channels, segmentor.decoder.head_channels)


def check_method(cfg: SegmentConfig) -> None:
    """Refuse, before any work, an unknown or stage-1/2 method, and a task-level one without a teacher."""
    method = cfg.method.name
    if method == "none":
        if cfg.teacher:
            log.warning("teacher=%s is ignored: method.name=none distils nothing", cfg.teacher)
        return
    uses = " and ".join(get_method(method, "task").cls.uses) or "outputs"
    if not cfg.teacher:
        raise ValueError(
            f"method {method!r} distils the teacher segmentor's {uses}, but no teacher segmentor is given: set "
            "teacher=<segmentor.safetensors> (stage 3 run on the frozen teacher encoder; `gkd teacher-encoder` "
            "writes that encoder)")


def check_recipe(cfg: SegmentConfig, train_encoder: bool) -> None:
    """Encoder fine-tuning options need a trained encoder (they would do nothing on a frozen one)."""
    if not train_encoder and (cfg.optim.encoder_lr_scale != 1.0 or cfg.encoder_drop_path > 0):
        raise ValueError("optim.encoder_lr_scale and encoder_drop_path apply to a trained encoder: set "
                         "train_encoder=true (or a task-level method.name), or leave them at 1.0 and 0")
    if cfg.optim.encoder_lr_scale < 0 or not 0 <= cfg.encoder_drop_path < 1:
        raise ValueError(f"optim.encoder_lr_scale must be >= 0 and encoder_drop_path in [0, 1), got "
                         f"{cfg.optim.encoder_lr_scale} and {cfg.encoder_drop_path}")


def encoder_recipe(cfg: SegmentConfig, train_encoder: bool) -> dict[str, Any]:
    """The protocol's record of what stage 3 did to the encoder (the report's "Encoder" column)."""
    if not train_encoder:
        return {"trained": False}
    return {"trained": True, "lr_scale": float(cfg.optim.encoder_lr_scale), "drop_path": float(cfg.encoder_drop_path)}


def check_resize(d: Any) -> None:
    """`data.scale`/`data.ratio_range` only act with `data.short_edges=null`: setting them beside the
    authors' short-edge list would change nothing, which is refused rather than ignored."""
    default = SegDataConfig()
    if d.short_edges is not None and (list(d.scale) != default.scale or list(d.ratio_range) != default.ratio_range):
        raise ValueError("data.scale / data.ratio_range apply only to the keep-ratio resize: set data.short_edges=null "
                         f"to use them (data.short_edges={list(d.short_edges)} draws the short side instead)")


def load_teacher_segmentor(path: str, class_names: list[str]) -> Segmentor:
    """The teacher segmentor a task-level method learns from, frozen whole (eval mode, no parameter
    requires grad); an error when it predicts other classes than the student's dataset."""
    teacher, _ = load_segmentor(path)
    if teacher.class_names != class_names:
        raise ValueError(f"teacher segmentor {path} predicts {teacher.class_names}, the student's "
                         f"dataset has {class_names}")
    return teacher.requires_grad_(False).eval()


def label_subset(n: int, fraction: float, seed: int) -> list[int]:
    """Indices of a reproducible random `fraction` of n labelled images (at least one), sorted."""
    if not 0 < fraction <= 1:
        raise ValueError(f"data.fraction must be in (0, 1], got {fraction}")
    if fraction == 1:
        return list(range(n))
    k = max(1, round(n * fraction))
    return sorted(np.random.default_rng(seed).choice(n, size=k, replace=False).tolist())


def weights_hash(module: nn.Module) -> str:
    """SHA-256 over every tensor of `module`'s state dict (names and raw bytes).

    Tensors are flattened before the byte view: a 0-dim tensor (BatchNorm's int64
    ``num_batches_tracked``) cannot be viewed as bytes, and for n-dim tensors reshape(-1) keeps the
    same bytes in the same order, so hashes of files without 0-dim tensors (ViTs) are unchanged.
    """
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def trains_encoder(cfg: SegmentConfig) -> bool:
    """Whether stage 3 trains the encoder: `train_encoder`, by default only for task-level distillation."""
    return cfg.method.name != "none" if cfg.train_encoder is None else bool(cfg.train_encoder)


def seg_budget(cfg: SegmentConfig) -> Budget:
    """Stage 3's budget: `budget.kind` with `budget.amount`, by default `optim.iters` (steps)."""
    return Budget(cfg.budget.kind, cfg.budget.amount if cfg.budget.amount is not None else cfg.optim.iters)


def build_stage_segmentor(cfg: SegmentConfig, encoder: nn.Module, input_norm: dict[str, list[float]],
                          class_names: list[str], train_encoder: bool) -> Segmentor:
    """The segmentor a stage-3 config trains: `encoder` (a Student) with the config's decoder for
    `class_names`, normalising [0,1] images with the encoder's `input_norm` ({"mean", "std"})."""
    return build_segmentor(encoder, decoder=cfg.decoder.name, num_classes=len(class_names), mean=input_norm["mean"],
                           std=input_norm["std"], layers=cfg.decoder.layers, class_names=list(class_names),
                           train_encoder=train_encoder, **cfg.decoder.kwargs)


def train_segmentor(cfg: SegmentConfig) -> Path:
    """Run stage 3; return the path of the written `segmentor.safetensors`."""
    check_method(cfg)
    method = cfg.method.name
    kd_method = method != "none"
    train_encoder = trains_encoder(cfg)
    check_recipe(cfg, train_encoder)
    accelerator = make_accelerator(cfg, find_unused_parameters=train_encoder)
    out_dir = Path(cfg.out_dir)
    accum = cfg.optim.grad_accum
    micro_batch = micro_batch_size(cfg, accelerator)

    # ---- build ---------------------------------------------------------------------------------
    d = cfg.data
    check_resize(d)
    transform = build_seg_train_transform(crop_size=d.crop_size, scale=tuple(d.scale), ratio_range=tuple(d.ratio_range),
                                          cat_max_ratio=d.cat_max_ratio, photometric=d.photometric,
                                          short_edges=d.short_edges, max_size=d.max_size)
    dataset = build_dataset(d.manifest, d.split, root=d.root, transform=transform, on_bad=d.on_bad)
    if d.on_bad == "skip":  # drop every bad sample now: the loader's workers would skip them uncounted
        from accelerate.utils import gather_object

        dataset.validate(d.num_workers, decode_images=True, rank=accelerator.process_index,
                         world_size=accelerator.num_processes, gather=gather_object)
    subset = label_subset(len(dataset), d.fraction, cfg.seed)
    if accelerator.is_main_process and d.fraction < 1:  # which labelled images a label-efficient run saw
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "train_subset.txt").write_text("".join(f"{dataset.image_path(i)}\n" for i in subset))
    train_set = Subset(dataset, subset) if d.fraction < 1 else dataset
    selector = Selector(cfg, dataset, out_dir)  # refuses a selection split that is not held-out source data
    if len(train_set) < cfg.data.batch_size:
        raise ValueError(f"{len(train_set)} labelled images are fewer than one global batch ({cfg.data.batch_size})")

    teacher = load_teacher_segmentor(cfg.teacher, list(dataset.classes)) if kd_method else None

    torch.manual_seed(cfg.seed)
    encoder, input_norm = load_encoder_for_segmentor(cfg.encoder, drop_path_rate=cfg.encoder_drop_path)
    if input_norm is None:
        raise ValueError(f"{cfg.encoder} records no input normalisation (gkd_input_norm): re-export it with this version")
    segmentor = build_stage_segmentor(cfg, encoder, input_norm, list(dataset.classes), train_encoder)
    encoder_hash = weights_hash(segmentor.encoder)
    snapshot = segmentor if train_encoder else segmentor.decoder  # what selection keeps: the trained part
    kd = None
    if kd_method:
        kd = build_task_loss(method, encoder_info(segmentor), encoder_info(teacher), dataset.num_classes,
                             **cfg.method.options)
        teacher_blocks = kd.blocks(kd.teacher_info, "teacher")
        teacher_logits = "logits" in kd.uses  # else the teacher's decoder is not run (nor paid for)
    model = SegTrainStep(segmentor, kd)
    optimizer = make_adamw(model, cfg.optim.lr, cfg.optim.weight_decay, tuple(cfg.optim.betas), roles=(
        {"encoder": segmentor.encoder, "decoder": segmentor.decoder, **({"distill": kd} if kd else {})}
        if train_encoder else None), decay_rule="mmseg")
    for group in optimizer.param_groups:  # a fine-tuned encoder may learn slower than the decoder
        if group.get("role") == "encoder":
            group["lr_scale"] = float(cfg.optim.encoder_lr_scale)
    loader = DataLoader(train_set, batch_size=micro_batch, shuffle=True, drop_last=True,
                        num_workers=d.num_workers, pin_memory=torch.cuda.is_available(),
                        persistent_workers=d.num_workers > 0, generator=torch.Generator().manual_seed(cfg.seed))
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)  # shards batches across ranks
    if teacher is not None:
        teacher.to(accelerator.device)  # frozen, never wrapped by DDP
    o = cfg.optim
    budget = seg_budget(cfg)
    trainer = Trainer(cfg, accelerator, model, optimizer, budget, desc="stage 3")
    if selector.rule == "best":
        accelerator.register_for_checkpointing(selector)  # history + best weights resume with the run
    trainer.start()  # resumes from the latest checkpoint when there is one
    if d.on_bad == "skip":
        trainer.metrics.write({"event": "skipped", "images": len(dataset.skipped_images),
                               "files": dataset.skipped_images[:10]})
    if accelerator.is_main_process:
        log.info("stage 3: %s, %s encoder, budget %s", f"task-level distillation {method!r}" if kd_method else
                 "no distillation", "trainable" if train_encoder else "frozen", budget.describe())

    # ---- loop ------------------------------------------------------------------------------------
    def loss_fn(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        images, labels = batch["image"], batch["label"]
        if teacher is None:
            return model(images, labels)
        with torch.no_grad():
            _, t_out = teacher.distill_outputs(images, None, teacher_blocks, logits=teacher_logits)
        return model(images, labels, t_out, trainer.fraction)

    steps_per_epoch = max(1, len(loader) // accum)
    batches = _forever(accelerator, loader, trainer.step_index * accum)
    batches = trainer.count_flops(batches, loss_fn)
    segmentor.train()  # the decoder trains; the Segmentor keeps a frozen encoder in eval mode
    while not trainer.done:
        step = trainer.step_index
        if selector.due(step):  # before the step: a run resumed at this step still scores it
            selector.evaluate(segmentor, accelerator, step, snapshot)
        trainer.step(batches, loss_fn, poly_lr(step, trainer.fraction, o.lr, o.power, o.min_lr, o.warmup_iters),
                     step // steps_per_epoch)
    if selector.due(trainer.step_index, final=True):
        selector.evaluate(segmentor, accelerator, trainer.step_index, snapshot)
    compute = trainer.finish()
    selector.restore_best(snapshot)
    protocol = {**selector.record(), "encoder": read_metadata(cfg.encoder).get("gkd_protocol"),
                "encoder_recipe": encoder_recipe(cfg, train_encoder)}
    protocol["source"] = {**protocol["source"], "skipped_images": len(dataset.skipped_images)}  # num_images: used
    if kd_method:  # the teacher segmentor's own source data is part of this run's lineage
        protocol["teacher"] = read_metadata(cfg.teacher).get("gkd_protocol")
    trainer.metrics.write({"event": "selection", **protocol["selection"]})

    # ---- save --------------------------------------------------------------------------------------
    segmentor = accelerator.unwrap_model(model).segmentor
    unchanged = weights_hash(segmentor.encoder) == encoder_hash
    trainer.metrics.write({"event": "end", "step": trainer.step_index, "encoder_sha256": encoder_hash,
                           "encoder_unchanged": unchanged, "encoder_trained": train_encoder})
    if not unchanged and not train_encoder:
        raise RuntimeError("the frozen encoder's weights changed during stage 3: this is a bug")
    path = out_dir / "segmentor.safetensors"
    if accelerator.is_main_process:
        extra = {**compute_metadata(compute, cfg.encoder),
                 "method": {"name": method, "options": to_container(cfg.method.options),
                            "encoder_trained": train_encoder,
                            "teacher": cfg.teacher if kd_method else None,
                            "teacher_sha256": file_sha256(cfg.teacher) if kd_method else None},
                 "protocol": protocol}
        save_segmentor(path, segmentor.train(False), config=to_container(cfg), parent=cfg.encoder, extra=extra)
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
