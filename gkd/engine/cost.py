"""What a stage run will cost, predicted before it runs: optimizer steps, images and training FLOPs.

``stage_cost(stage, cfg)`` needs neither the dataset nor any weight file: the models are built with
random weights on the ``meta`` device (no memory, no initialisation work) and counted inside
``FakeTensorMode`` on fake *CPU* tensors, so that PyTorch dispatches every op — fused attention
included — exactly as a CPU run would, with the same counter a run uses (``Trainer.count_flops``:
``gkd.engine.compute.count_flops`` over one micro-batch's forward + backward, × grad_accum ×
processes). No arithmetic runs, so the paper's configs (ViT-B teacher, batch 512) count in seconds.

A module whose step reads tensor values (Mask2Former's Hungarian matching) cannot run on fake
tensors; it is then counted for real on CPU with random weights and a synthetic batch, which is
exact only when the count does not depend on the data (said in ``notes``).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from gkd.config import ConfigError, DistillConfig, SegmentConfig, check_world
from gkd.engine.compute import Budget, count_flops
from gkd.engine.trainer import step_seed

__all__ = ["stage_cost", "step_seconds"]

# The encoders of random-weight stage-3 segmentors normalise with these (the value does not change FLOPs).
_ANY_NORM = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


def stage_cost(stage: int, cfg: DistillConfig | SegmentConfig, *, world_size: int = 1,
               parent: DistillConfig | Sequence[DistillConfig] | None = None,
               encoder_spec: dict[str, Any] | None = None) -> dict[str, Any]:
    """Predict a stage run of the resolved `cfg` (``gkd.config.load_config`` / ``parse_cli``).

    world_size: processes the run is launched on (the global batch is split over them).
    parent: the resolved config of the run whose encoder this stage starts from, for when that file
        (`init` for stage 2, `encoder` for stage 3) may not exist yet: a stage-1 DistillConfig for
        stage 2, a stage-1 or -2 DistillConfig for stage 3; or the lineage as a sequence, root
        first (``[stage1_cfg, stage2_cfg]``), when the parent itself continues an unwritten encoder.
        When given it is used even if the file exists; None: the architecture is read from that
        file's header. Weights are never read: teachers and students are random.
    encoder_spec: stage 3: the model spec of an encoder file no stage-1/2 run writes (the teacher's,
        a plain student's: ``gkd.tools.encoders.planned_encoder_spec``), for when it may not exist yet.
    Returns ``{"stage", "steps", "images", "flops_per_step", "train_tflops", "notes"}``:
    flops_per_step as the run's ``flops`` event in metrics.jsonl will record it; steps the optimizer
    steps its budget allows (None when unknown: see notes); images = steps × data.batch_size (the
    global batch); train_tflops = steps × flops_per_step / 1e12. Stage 3 with a task-level method
    (a teacher segmentor) is not supported yet (NotImplementedError).
    """
    if stage not in (1, 2, 3):
        raise ConfigError(f"unknown stage {stage}: expected 1, 2 or 3")
    schema = DistillConfig if stage < 3 else SegmentConfig
    if not _is_config(cfg, schema):
        raise TypeError(f"stage {stage} takes a resolved {schema.__name__} (gkd.config.load_config), "
                        f"got {type(cfg).__name__}")
    if cfg.stage != stage:
        raise ConfigError(f"the config is for stage {cfg.stage}, not stage {stage}")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    check_world(cfg, world_size)
    parents = _lineage(parent)
    notes: list[str] = []
    micro_batch = cfg.data.batch_size // (world_size * cfg.optim.grad_accum)
    if stage < 3:
        micro = _distill_micro_flops(cfg, micro_batch, parents, notes)
    else:
        micro = _segment_micro_flops(cfg, micro_batch, parents, notes, encoder_spec=encoder_spec)
    flops_per_step = micro * cfg.optim.grad_accum * world_size
    budget = _distill_budget(cfg, notes) if stage < 3 else _seg_budget(cfg)
    steps = None if budget is None else _budget_steps(budget, flops_per_step, notes)
    return {
        "stage": stage,
        "steps": steps,
        "images": None if steps is None else steps * cfg.data.batch_size,
        "flops_per_step": flops_per_step,
        "train_tflops": None if steps is None else steps * flops_per_step / 1e12,
        "notes": notes,
    }


# ---- budgets -------------------------------------------------------------------------------------

def _distill_budget(cfg: DistillConfig, notes: list[str]) -> Budget | None:
    """Stage 1/2's budget as ``train_distill`` sets it; None when it needs a sample count nobody knows."""
    from gkd.engine.distill import distill_schedule

    b = cfg.budget
    if b.amount is not None:  # an explicit budget: the data does not matter
        return Budget(b.kind, b.amount)
    num_samples = cfg.data.num_samples
    if num_samples is None:
        num_samples = _indexed_samples(cfg, notes)
        if num_samples is None:
            return None
    return distill_schedule(cfg, num_samples)[1]


def _indexed_samples(cfg: DistillConfig, notes: list[str]) -> int | None:
    """The training shards' sample count from their index (or tar headers), None when they are absent."""
    from omegaconf.errors import MissingMandatoryValue

    from gkd.data.wds import resolve_shards

    key = "data.teacher_cache" if cfg.data.teacher_cache else "data.train_shards"
    try:
        spec = cfg.data.teacher_cache or cfg.data.train_shards
        return resolve_shards(spec).num_samples
    except MissingMandatoryValue:
        notes.append(f"steps unknown: {key} is not set; set data.num_samples to give the sample count")
    except FileNotFoundError as e:
        notes.append(f"steps unknown: the training shards are missing ({e}); data.num_samples=<N> gives the count")
    except ValueError as e:  # remote shards without an index
        notes.append(f"steps unknown: {e}")
    return None


def _seg_budget(cfg: SegmentConfig) -> Budget:
    from gkd.engine.segment import seg_budget

    return seg_budget(cfg)


def _budget_steps(budget: Budget, flops_per_step: int, notes: list[str]) -> int | None:
    """Optimizer steps until ``Budget.done``, as the Trainer takes them; None for a seconds budget."""
    if budget.kind == "seconds":
        notes.append(f"steps unknown: a {budget.describe()} budget depends on the step time, known only once a run "
                     "has timed its steps")
        return None
    if budget.kind == "steps":
        return math.ceil(budget.amount)
    cost = flops_per_step / 1e12
    if cost >= budget.amount:
        notes.append(f"the run would refuse its budget: the first step alone spends {cost:.4g} of "
                     f"{budget.amount:g} TFLOPs")
        return None
    # Budget.done stops within half a step of the amount: about amount/cost - 0.5 steps; the exact
    # count is found with done() itself on the Trainer's integer FLOP sum.
    steps = max(0, math.floor(budget.amount / cost - 0.5) - 2)
    while not budget.done({"step": steps, "train_flops": steps * flops_per_step}, cost):
        steps += 1
    return steps


# ---- stages 1 and 2 --------------------------------------------------------------------------------

def _distill_micro_flops(cfg: DistillConfig, micro_batch: int, parents: list[DistillConfig],
                         notes: list[str], measure: Callable[..., Any] | None = None) -> Any:
    """FLOPs of one stage-1/2 micro-batch: the teacher's forward (unless a cache stores its tokens) and
    the student + heads' forward and backward on images [micro_batch, 3, img_size, img_size]."""
    from gkd.engine.distill import build_distill_model, build_stage_student, build_stage_teacher

    parent_spec = _init_spec(cfg, parents, notes) if cfg.init else None
    _check_teacher(cfg)
    if cfg.engine.compile:
        notes.append("engine.compile is not applied here: the count is of the eager model")
    size = cfg.data.img_size

    def build(device: str) -> tuple[list[nn.Module], Callable[[], torch.Tensor]]:
        with torch.device(device):  # meta: random weights and no memory, only the architecture
            teacher = build_stage_teacher(cfg, weights=False)
            student = build_stage_student(cfg, teacher.grid, parent_spec=parent_spec, weights=False)
        model = build_distill_model(cfg, student, teacher)  # small heads on CPU: InputRenorm compares values

        def loss() -> torch.Tensor:
            images = torch.randn(micro_batch, 3, size, size)
            if not cfg.data.teacher_cache:
                return model(images, teacher(images))["loss"]
            with torch.no_grad():  # a cache's tokens were computed when it was written: not part of the step
                tokens = teacher(images)
            return model(images, tokens)["loss"]

        return [model, teacher], loss

    return (measure or _count)(build, cfg.seed, notes, f"student {cfg.student.name or 'from init'}")


def _check_teacher(cfg: DistillConfig) -> None:
    """A ``hf:`` teacher's architecture comes from its config, which must be on disk (nothing is fetched)."""
    name = cfg.teacher.name
    if name.startswith("hf:") and not Path(name[3:]).is_dir():
        raise ValueError(f"teacher {name}: stage_cost builds hf: teachers from a local folder only "
                         "(its config.json); a hub id would need the hub")


# ---- stage 3 ----------------------------------------------------------------------------------------

def _segment_micro_flops(cfg: SegmentConfig, micro_batch: int, parents: list[DistillConfig],
                         notes: list[str], measure: Callable[..., Any] | None = None,
                         encoder_spec: dict[str, Any] | None = None) -> Any:
    """FLOPs of one stage-3 micro-batch: the segmentor's loss, forward and backward, on images
    [micro_batch, 3, crop, crop] in [0, 1] and labels [micro_batch, crop, crop]."""
    from gkd.data import load_manifest
    from gkd.engine.segment import SegTrainStep, build_stage_segmentor, check_method, check_recipe, trains_encoder
    from gkd.models.student import build_student_from_spec

    check_method(cfg)
    if cfg.method.name != "none":
        raise NotImplementedError(f"stage_cost does not count task-level distillation (method.name="
                                  f"{cfg.method.name}) yet: its teacher segmentor's architecture is not predicted")
    train_encoder = trains_encoder(cfg)
    check_recipe(cfg, train_encoder)
    classes = list(load_manifest(cfg.data.manifest).classes)
    spec = encoder_spec or _encoder_file_spec(cfg.encoder, parents, notes, key="encoder")
    crop = cfg.data.crop_size
    crop_hw = (crop, crop) if isinstance(crop, int) else tuple(crop)

    def build(device: str) -> tuple[list[nn.Module], Callable[[], torch.Tensor]]:
        torch.manual_seed(cfg.seed)
        with torch.device(device):
            encoder = build_student_from_spec(spec, drop_path_rate=cfg.encoder_drop_path)
            model = SegTrainStep(build_stage_segmentor(cfg, encoder, _ANY_NORM, classes, train_encoder))

        def loss() -> torch.Tensor:
            images = torch.rand(micro_batch, 3, *crop_hw)
            return model(images, _every_class(micro_batch, crop_hw, len(classes)))["loss"]

        return [model], loss

    return (measure or _count)(build, cfg.seed, notes, f"decoder {cfg.decoder.name}",
                  fallback="counted for real on CPU with random weights and a synthetic batch in which every class "
                           "appears in every crop: if the loss grows with the classes present (Mask2Former's matching "
                           "and mask losses), a real run counts less")


def _every_class(batch: int, hw: tuple[int, int], num_classes: int) -> torch.Tensor:
    """Labels [batch, H, W] int64 with vertical stripes of every class id (the worst case for decoders
    whose loss grows with the classes present)."""
    columns = torch.arange(hw[1]) * num_classes // hw[1]
    return columns.expand(batch, hw[0], hw[1]).clone()


# ---- parents ----------------------------------------------------------------------------------------

def _lineage(parent: Any) -> list[DistillConfig]:
    """`parent` as a list of stage-1/2 configs, root first."""
    if parent is None:
        return []
    parents = [parent] if _is_config(parent, DistillConfig) else list(parent)
    for p in parents:
        if not _is_config(p, DistillConfig):
            raise TypeError(f"parent must be a resolved DistillConfig (stage 1 or 2) or a sequence of them, "
                            f"got {type(p).__name__}")
    return parents


def _init_spec(cfg: DistillConfig, parents: list[DistillConfig], notes: list[str]) -> dict[str, Any]:
    return _encoder_file_spec(cfg.init, parents, notes, key="init")


def _encoder_file_spec(path: str, parents: list[DistillConfig], notes: list[str], key: str) -> dict[str, Any]:
    """The student spec of the encoder file `path` names: of the parent run's config when one is given,
    else read from the file's header."""
    if parents:
        *rest, last = parents
        return _written_spec(last, rest, notes)
    if path and Path(path).is_file():
        from gkd.handoff import read_metadata

        spec = read_metadata(path).get("gkd_spec")
        if not spec or spec.get("kind") not in ("vit", "cnn"):
            raise ValueError(f"{key}={path} is not an encoder.safetensors from stage 1 or 2")
        return spec
    raise FileNotFoundError(f"{key}={path} does not exist yet: pass parent=<the resolved DistillConfig of the run "
                            "that writes it> so its architecture can be predicted")


def _written_spec(cfg: DistillConfig, parents: list[DistillConfig], notes: list[str]) -> dict[str, Any]:
    """The student spec of the encoder.safetensors a stage-1/2 `cfg` writes (random weights, meta device)."""
    from gkd.engine.distill import build_stage_student, build_stage_teacher

    parent_spec = _init_spec(cfg, parents, notes) if cfg.init else None
    _check_teacher(cfg)
    with torch.device("meta"):
        teacher = build_stage_teacher(cfg, weights=False)
        return build_stage_student(cfg, teacher.grid, parent_spec=parent_spec, weights=False).spec


# ---- counting -----------------------------------------------------------------------------------------

def _data_dependent_errors() -> tuple[type[BaseException], ...]:
    from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException

    return (DataDependentOutputException, DynamicOutputShapeException, NotImplementedError, RuntimeError)


_DATA_DEPENDENT = _data_dependent_errors()


def _count(build: Callable[[str], tuple[list[nn.Module], Callable[[], torch.Tensor]]], seed: int,
           notes: list[str], what: str, fallback: str = "counted for real on CPU with random weights") -> int:
    """``count_flops`` of one micro-batch's ``loss().backward()``, as ``Trainer.count_flops`` takes it.

    build(device) → (every module the step runs, loss): built on ``meta`` and run on fake CPU tensors
    (shapes, dtypes and a device but no data: ops dispatch to the CPU kernels a real run takes — meta
    would pick others, e.g. SDPA's math path, counted differently — and none computes anything).
    A step that reads tensor values cannot run so; it is built on CPU and run for real (`fallback`
    says how, in `notes`)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    modules, loss = build("meta")
    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            for m in modules:
                m.to_empty(device="cpu")
            torch.manual_seed(step_seed(seed, 0, 0))
            return count_flops(lambda: loss().backward())
    except _DATA_DEPENDENT as e:
        notes.append(f"{what} reads tensor values in its step ({type(e).__name__}): {fallback}")
    modules, loss = build("cpu")
    torch.manual_seed(step_seed(seed, 0, 0))
    return count_flops(lambda: loss().backward())


def _is_config(cfg: Any, schema: type) -> bool:
    """True for a resolved structured config of `schema` (an OmegaConf DictConfig or the dataclass)."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(cfg, schema):
        return True
    return isinstance(cfg, DictConfig) and OmegaConf.get_type(cfg) is schema


# ---- calibration ---------------------------------------------------------------------------------

def step_seconds(stage: int, cfg: DistillConfig | SegmentConfig, *, world_size: int = 1,
                 parent: DistillConfig | Sequence[DistillConfig] | None = None, repeats: int = 3,
                 encoder_spec: dict[str, Any] | None = None) -> dict[str, Any]:
    """Time one optimizer step of the stage on this machine: the micro-batch's forward + backward
    (random weights, a synthetic batch, on CUDA when present, under the config's autocast) after one
    warm-up, the median of `repeats`, × grad_accum. Each process runs its micro-batches in parallel,
    so this is the step time of a launch on `world_size` such devices — without the data loading,
    the optimizer update and the gradient all-reduce, hence a lower bound.
    Returns ``{"seconds_per_step", "device", "repeats"}``."""
    schema = DistillConfig if stage < 3 else SegmentConfig
    if not _is_config(cfg, schema):
        raise TypeError(f"stage {stage} takes a resolved {schema.__name__}")
    check_world(cfg, world_size)
    device = "cuda" if torch.cuda.is_available() and not cfg.engine.cpu else "cpu"
    micro_batch = cfg.data.batch_size // (world_size * cfg.optim.grad_accum)
    precision = cfg.engine.mixed_precision
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision) if device == "cuda" else None

    def measure(build: Callable[[str], tuple[list[nn.Module], Callable[[], torch.Tensor]]], seed: int,
                notes: list[str], what: str, fallback: str = "") -> float:
        import statistics
        import time

        modules, loss = build(device)
        for m in modules:
            m.to(device)
        torch.manual_seed(step_seed(seed, 0, 0))
        times = []
        for _ in range(repeats + 1):  # the first is the warm-up (allocations, kernel selection)
            started = time.perf_counter()
            with torch.device(device), torch.autocast(device, dtype=dtype, enabled=dtype is not None):
                loss().backward()
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
            for m in modules:
                m.zero_grad(set_to_none=True)
        return statistics.median(times[1:])

    parents = _lineage(parent)
    notes: list[str] = []
    if stage < 3:
        micro = _distill_micro_flops(cfg, micro_batch, parents, notes, measure)
    else:
        micro = _segment_micro_flops(cfg, micro_batch, parents, notes, measure, encoder_spec=encoder_spec)
    return {"seconds_per_step": micro * cfg.optim.grad_accum, "device": device, "repeats": repeats}
