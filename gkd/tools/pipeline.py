"""`gkd pipeline PLAN.yaml`: a chain of stages as one declarative, resumable run.

A plan (`Plan`) lists its stages in order; each runs in `<out_dir>/<name>/`:

* `synth`: the procedural benchmark of `gkd demo` (`gkd.data.synth`; `args`: seed and sizes),
  written into the stage's folder (the root of the `gkd_demo` manifest);
* `shard`: `gkd data shard` of an image folder or a dataset split (`src`, `manifest`, `split`);
* `1`, `2`, `3`: the training stages, each under `accelerate launch` as its own process (the
  plan's `launch` section: processes, machines, mixed precision), so one plan runs on a CPU, a GPU
  or several nodes;
* `encoder`: an encoder file no training stage writes (`make`): `baseline`, the no-distillation row
  of its parent (its architecture, random weights or the `weights` stage's, resampled); `student`,
  a student at a geometry (random or weight-selected from a teacher: `args` as
  `gkd.tools.encoders.write_student_encoder`), which a stage 1 with it as `parent` starts from;
  `teacher`, the frozen teacher (`args` as `write_teacher_encoder`), the upper-bound row;
* `eval`: `gkd eval` of the plan's segmentors on a suite, also under `accelerate launch`;
* `compare`: `gkd compare --plan FILE` (its one `config` file, with `overrides`): methods at one
  matched budget, one process; with seeds, once per seed (the first seed's teacher segmentor
  serves the later ones unless `share_teacher: false`) and a mean ± std table, `summary.md`.

The plan wires the handoffs: a stage's `parent` (default: the nearest earlier stage that makes what
it needs) gives stage 2 its `init=`, stage 3 and `encoder` their encoder, `eval` its segmentors;
`shards` names the shard stage whose folder a distillation stage reads. `seeds` runs every training
stage once per seed (`seeds=[...]`: each seed continues its parent of the same seed) and the
evaluation reports mean ± std. `<out_dir>/<plan name>.pipeline.json` records each stage's state
and time.

Before anything runs, the whole plan is resolved and checked (configs, the batch split over the
processes, a stage-2 student that differs from its parent, an evaluation target that is one of the
plan's training splits, missing data) and refused with every reason found. A stage whose output
exists and whose resolved config is the plan's is skipped; an interrupted one resumes from its own
checkpoint. `dry_run` prints each stage's data, steps, images and training FLOPs instead.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

from omegaconf import MISSING

from gkd.config import (ConfigError, DistillConfig, SegmentConfig, check_world, load_config, to_container,
                        to_yaml)

log = logging.getLogger(__name__)

KINDS = ("synth", "shard", "1", "2", "3", "encoder", "eval", "compare")
MAKES = ("baseline", "student", "teacher")  # what an encoder stage writes
SEEDS_FILE = "seeds.json"
STEP_ARGS = "step.json"  # a synth / shard / encoder / eval stage's arguments, to tell a finished one of this plan


@dataclass
class LaunchPlan:
    """How `accelerate launch` starts each training and evaluation stage."""

    num_processes: int = 1  # per machine
    num_machines: int = 1
    machine_rank: int = 0
    main_process_ip: Optional[str] = None
    main_process_port: Optional[int] = None
    mixed_precision: str = "no"
    cpu: bool = False  # CPU processes (gloo) even where CUDA is present (ACCELERATE_USE_CPU=1)
    # torch threads per process; None: $OMP_NUM_THREADS when set, else the machine's cores shared by its
    # processes (accelerate launch alone would give every process 1 thread)
    cpu_threads: Optional[int] = None
    args: list[str] = field(default_factory=list)  # further `accelerate launch` options, as given


@dataclass
class StagePlan:
    name: str = MISSING  # its folder under out_dir; stage overrides on the command line: <name>.key=value
    stage: str = MISSING  # synth | shard | 1 | 2 | 3 | encoder | eval | compare
    description: str = ""  # printed when the stage starts
    config: list[str] = field(default_factory=list)  # config files (overlays, in order); compare: its one plan file
    overrides: list[str] = field(default_factory=list)  # key=value
    # the stage whose handoff this one takes (default: the nearest earlier one; a stage 1 only when named:
    # an encoder stage whose file is its student.checkpoint)
    parent: Optional[str] = None
    shards: Optional[str] = None  # 1 | 2: the shard stage whose folder is data.train_shards
    num_processes: Optional[int] = None  # this stage's processes per machine (default: launch.num_processes)
    # shard
    src: Optional[str] = None  # image folder, or the dataset root of `manifest` (default: the plan's / $GKD_DATA_ROOT's)
    manifest: Optional[str] = None  # shard: the split's images, no labels
    split: str = "train"
    shard_size: int = 1000
    expect_samples: Optional[int] = None  # what the shards will hold: --dry-run's count before they exist
    # encoder
    make: str = "baseline"  # baseline | student | teacher
    weights: Optional[str] = None  # baseline: the encoder stage whose weights it takes (the distillation's start)
    args: dict[str, Any] = field(default_factory=dict)  # synth: seed and sizes; encoder student | teacher: the writer's
    # eval
    suite: Optional[str] = None
    models: dict[str, str] = field(default_factory=dict)  # report row name → stage-3 stage (default: the nearest)
    limit: Optional[int] = None
    batch_size: int = 1
    num_workers: int = 2
    panels: int = 0  # rows of the image | ground truth | predictions PNG per target (0: none)
    # compare with seeds: the first seed's teacher segmentor serves the later seeds (trained once)
    share_teacher: bool = True


@dataclass
class Plan:
    name: str = "pipeline"
    description: str = ""
    out_dir: str = MISSING
    seeds: list[int] = field(default_factory=list)  # [] : one run per stage, with its config's seed
    roots: dict[str, str] = field(default_factory=dict)  # manifest name → dataset root (stage 3, eval)
    launch: LaunchPlan = field(default_factory=LaunchPlan)
    stages: list[StagePlan] = field(default_factory=list)


class PlanError(ConfigError):
    """A plan that cannot run as written; the message lists every reason found."""


def load_plan(path: str | Path, overrides: Sequence[str] = ()) -> Any:
    """The plan file with `key=value` overrides. `<stage name>.<field>=value` sets a field of that
    stage (`eval.limit=50`, `s3.num_processes=4`); `<stage name>.<config key>=value` is added to
    its config overrides (`s3.optim.iters=100`); anything else sets the plan (`out_dir=`,
    `seeds=[0,1,2]`, `launch.num_processes=8`). `path`: a plan file, or a shipped plan's name (`demo`)."""
    from gkd.resources import find_resource

    try:
        path = find_resource("plan", path)
    except FileNotFoundError as e:
        raise ConfigError(f"plan file not found: {path} ({e})") from None
    import yaml
    from dataclasses import fields

    names = {s.get("name") for s in (yaml.safe_load(Path(path).read_text()) or {}).get("stages") or []
             if isinstance(s, dict)}
    stage_fields = {f.name for f in fields(StagePlan)}
    own, per_stage = [], {}
    for item in overrides:
        key, sep, _ = item.partition("=")
        head, dot, rest = key.partition(".")
        if sep and dot and head in names:
            per_stage.setdefault(head, []).append(item.split(".", 1)[1])
        else:
            own.append(item)
    plan = load_config(Plan, [path], own)
    plan = _shipped_configs(plan, Path(path))
    if per_stage:
        from omegaconf import OmegaConf

        data = to_container(plan)
        for s in data["stages"]:
            for item in per_stage.get(s["name"], []):
                if item.partition("=")[0].split(".")[0] in stage_fields:  # `args.seed=1` merges into args
                    merged = OmegaConf.merge(OmegaConf.create(s), OmegaConf.from_dotlist([item]))
                    s.update(OmegaConf.to_container(merged))
                else:
                    s["overrides"] = [*s["overrides"], item]
        plan = load_config(Plan, [], [], base=data)
    return plan


def _shipped_configs(plan: Any, path: Path) -> Any:
    """A stage config path that is not there relative to the working directory, but is relative to
    the folder that holds the plan's `plans/` (the repository, or a wheel's `gkd/_resources`), made
    absolute: a shipped plan runs from any directory."""
    home = path.resolve().parent.parent
    data, changed = to_container(plan), False
    for s in data["stages"]:
        for i, c in enumerate(s["config"]):
            if not Path(c).is_file() and not Path(c).is_absolute() and (home / c).is_file():
                s["config"][i], changed = str(home / c), True
    return load_config(Plan, [], [], base=data) if changed else plan


# ------------------------------------------------------------------------------------------------
# resolution: every stage's command, config and output, before anything runs


@dataclass
class Step:
    """One stage of a plan, resolved."""

    plan: StagePlan
    out: Path  # its folder
    argv: list[str] = field(default_factory=list)  # a training stage's --config/key=value arguments
    cfg: Any = None  # its resolved config (training stages)
    seeds: list[int] = field(default_factory=list)  # the plan's seeds, where they fan the stage out
    parent: Optional["Step"] = None
    weights: Optional["Step"] = None  # a baseline encoder's start
    models: dict[str, "Step"] = field(default_factory=dict)  # eval
    compare: list[tuple[Path, list[str], Any]] = field(default_factory=list)  # (folder, overrides, plan) per run
    compare_stages: dict[str, Any] = field(default_factory=dict)  # its rows' stage configs (`_compare_configs`)

    @property
    def kind(self) -> str:
        return self.plan.stage

    @property
    def output(self) -> Path:
        """What the stage hands over: a file, a seeds folder's seeds.json, a shard folder, a report."""
        if self.kind == "synth":
            from gkd.data.synth import MANIFEST_NAME

            return self.out / f"{MANIFEST_NAME}.yaml"
        if self.kind == "shard":
            return self.out / "train-index.json"
        if self.kind == "eval":
            return self.out / "metrics.json"
        if self.kind == "compare":
            return self.out / ("summary.json" if self.seeds else "compare.json")
        if self.seeds:
            return self.out / SEEDS_FILE
        return self.out / ("segmentor.safetensors" if self.kind == "3" else "encoder.safetensors")

    @property
    def handoff(self) -> Path:
        """The path the next stage is given: the file, or the folder of a multi-seed run."""
        return self.out if self.output.name == SEEDS_FILE else self.output


_NEEDS = {"2": ("1", "2"), "3": ("1", "2", "encoder"), "encoder": ("1", "2")}  # encoder: a baseline's


def _seeded(sp: StagePlan) -> bool:
    """Whether the plan's seeds fan the stage out (a student or teacher encoder is one file for all)."""
    return sp.stage in ("1", "2", "3", "compare") or (sp.stage == "encoder" and sp.make == "baseline")


def resolve(plan: Any) -> list[Step]:
    """Every stage of `plan` resolved (wiring, configs); a PlanError listing every problem found."""
    problems: list[str] = []
    out = Path(plan.out_dir)
    steps: list[Step] = []
    by_name: dict[str, Step] = {}
    if not plan.stages:
        raise PlanError("the plan has no stages")
    if not plan.name or "/" in plan.name or plan.name.startswith("."):
        raise PlanError(f"plan name {plan.name!r} must be a plain file name (it names {plan.name}.pipeline.json)")
    for sp in plan.stages:
        where = f"stage {sp.name!r}"
        if sp.stage not in KINDS:
            problems.append(f"{where}: stage must be one of {', '.join(KINDS)}, not {sp.stage!r}")
            continue
        if sp.name in by_name or sp.name in ("", ".", "..") or "/" in sp.name:
            problems.append(f"{where}: stage names must be unique folder names")
            continue
        step = Step(sp, out / sp.name, seeds=[int(s) for s in plan.seeds] if _seeded(sp) else [])
        try:
            _wire(step, sp, by_name, steps)
            if sp.stage in ("1", "2", "3"):
                _configure(step, plan)
            elif sp.stage == "compare":
                _configure_compare(step, plan)
        except (ConfigError, ValueError) as e:
            problems.append(f"{where}: {e}")
        steps.append(step)
        by_name[sp.name] = step
    if problems:
        raise PlanError("the plan cannot run:\n  " + "\n  ".join(problems))
    return steps


def _wire(step: Step, sp: StagePlan, by_name: Mapping[str, Step], earlier: Sequence[Step]) -> None:
    def named(name: str, kinds: Sequence[str], what: str) -> Step:
        if name not in by_name:
            raise ValueError(f"{what} {name!r} is not an earlier stage of the plan")
        if by_name[name].kind not in kinds:
            raise ValueError(f"{what} {name!r} is a stage {by_name[name].kind}; it must be a stage {' or '.join(kinds)}")
        return by_name[name]

    def nearest(kinds: Sequence[str], what: str) -> Step:
        for s in reversed(earlier):
            if s.kind in kinds:
                return s
        raise ValueError(f"needs {what}: no earlier stage {' or '.join(kinds)} (name one with parent:)")

    if sp.stage == "encoder":
        if sp.make not in MAKES:
            raise ValueError(f"make must be one of {', '.join(MAKES)}, not {sp.make!r}")
        if sp.make != "baseline":
            _check_args(sp)
            if sp.parent:
                raise ValueError(f"parent: a {sp.make} encoder is made from its args, not from another stage")
        if sp.weights:
            if sp.make != "baseline":
                raise ValueError("weights: only a baseline encoder takes another stage's weights")
            step.weights = named(sp.weights, ("encoder",), "weights")
    elif sp.stage == "synth":
        _check_args(sp)
    if sp.stage == "1" and sp.parent:
        step.parent = named(sp.parent, ("encoder",), "parent")
        if step.parent.plan.make != "student":
            raise ValueError(f"parent {sp.parent!r} must be an encoder stage with make: student (stage 1 starts "
                             "its student from that file)")
    elif sp.stage in _NEEDS and (sp.stage != "encoder" or sp.make == "baseline"):
        kinds = _NEEDS[sp.stage]
        step.parent = named(sp.parent, kinds, "parent") if sp.parent else nearest(kinds, "an encoder to start from")
    if sp.shards:
        if sp.stage not in ("1", "2"):
            raise ValueError("shards: only a stage 1 or 2 reads shards")
        named(sp.shards, ("shard",), "shards")
    if sp.stage == "shard" and not (sp.src or sp.manifest):
        raise ValueError("a shard stage needs src: (an image folder) or manifest: (a dataset split)")
    if sp.stage == "eval":
        if not sp.suite:
            raise ValueError("an eval stage needs suite:")
        rows = dict(sp.models)
        if not rows:
            s3 = nearest(("3",), "a segmentor to evaluate")
            rows = {s3.plan.name: s3.plan.name}
        step.models = {row: named(stage, ("3",), "model") for row, stage in rows.items()}


def _configure(step: Step, plan: Any) -> None:
    """The stage's argv (its config files, overrides and the wired paths) and resolved config."""
    sp = step.plan
    stage = int(sp.stage)
    argv = [a for f in sp.config for a in ("--config", f)] + list(sp.overrides)
    wired = [f"out_dir={step.out}"]
    if plan.seeds:
        wired.append(f"seeds=[{','.join(str(int(s)) for s in plan.seeds)}]")
    if step.parent is not None:
        key = {1: "student.checkpoint", 2: "init", 3: "encoder"}[stage]
        wired.append(f"{key}={step.parent.handoff}")
    if sp.shards:
        wired.append(f"data.train_shards={step.out.parent / sp.shards}")
    schema = SegmentConfig if stage == 3 else DistillConfig
    step.argv = argv + wired
    step.cfg = _parse(schema, step.argv, stage)
    # dataset roots from the plan's `roots`: stage 3's data, stages 1-2's source probe
    section = "data" if stage == 3 else "probe"
    data = step.cfg[section]
    if data.manifest and data.root is None and root_for(plan, data.manifest):
        root = root_for(plan, data.manifest)
        step.argv.append(f"{section}.root={root}")
        from omegaconf import OmegaConf

        OmegaConf.set_readonly(step.cfg, False)
        data.root = root  # what parsing the argument gives, without a second parse
        OmegaConf.set_readonly(step.cfg, True)
    if step.cfg.stage != stage:
        raise ConfigError(f"its config says stage={step.cfg.stage}")


def _configure_compare(step: Step, plan: Any) -> None:
    """A compare stage's runs: its plan file with the stage's overrides, the plan's roots, and per
    seed `seed=` and `out_dir=` (the later seeds given the first one's teacher segmentor)."""
    from gkd.tools import compare

    sp = step.plan
    if len(sp.config) != 1:
        raise ValueError(f"a compare stage takes config: [one gkd compare plan file], not {list(sp.config)}")
    if sp.num_processes not in (None, 1):
        raise ValueError("a compare stage runs as one process (num_processes: 1)")
    own = [*sp.overrides, *(f"roots.{m}={r}" for m, r in plan.roots.items())]
    for k, seed in enumerate(step.seeds or [None]):
        out = step.out if seed is None else step.out / f"seed{seed}"
        wired = [f"out_dir={out}", *([] if seed is None else [f"seed={seed}"])]
        if k and sp.share_teacher:
            first = step.compare[0][2]
            if not first.teacher_segmentor and "teacher" in compare.row_order(first):
                wired.append(f"teacher_segmentor={compare.row_segmentor(first.out_dir, 'teacher')}")
        cfg = compare.load_plan(sp.config[0], [*own, *wired])
        compare.check_methods(cfg.methods, cfg.baseline)
        step.compare.append((out, [*own, *wired], cfg))
    from omegaconf import OmegaConf

    # the seeds differ only in seed, out_dir and the teacher: one parse of the stage configs serves them all
    step.compare_stages = _compare_configs(step.compare[0][2])
    for name, c in step.compare_stages.items():
        key = "manifest" if name == "stage3" else "train_shards"
        if OmegaConf.is_missing(c.data, key):
            raise ValueError(f"its {name} configs give no data.{key}")


def _compare_configs(cfg: Any) -> dict[str, Any]:
    """The stage configs a comparison trains with (`stage3`; `stage1`, `stage2` where it has a
    representation-level row), parsed for the plan's checks; the encoder is the run's own."""
    from gkd.distill import METHODS

    configs = {"stage3": load_config(SegmentConfig, cfg.stage3, cfg.stage3_overrides, base={"encoder": "<row>"})}
    if any(m in METHODS and METHODS[m].level == "representation" for m in cfg.methods):
        r = cfg.representation
        for stage, overlays in ((1, r.stage1), (2, r.stage2)):
            configs[f"stage{stage}"] = load_config(DistillConfig, overlays, r.overrides, base={"stage": stage})
    return configs


def _args(sp: StagePlan) -> dict[str, Any]:
    """A stage's `args` as plain Python values (nested ones too)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(sp.args, resolve=True) if OmegaConf.is_config(sp.args) else dict(sp.args)


def _check_args(sp: StagePlan) -> None:
    """A synth or student / teacher encoder stage's `args`: known names, the required ones given."""
    import inspect

    if sp.stage == "synth":
        from dataclasses import fields

        from gkd.data.synth import BenchmarkSizes

        known, required = {"seed", *(f.name for f in fields(BenchmarkSizes))}, set()
    else:
        from gkd.tools import encoders

        writer = encoders.write_student_encoder if sp.make == "student" else encoders.write_teacher_encoder
        params = list(inspect.signature(writer).parameters.values())[1:]  # after `out`
        known = {p.name for p in params if p.kind is not p.VAR_KEYWORD} | {"kwargs"}  # kwargs: the timm ones
        required = {p.name for p in params if p.default is p.empty and p.kind is not p.VAR_KEYWORD}
    unknown, absent = sorted(set(sp.args) - known), sorted(required - set(sp.args))
    if unknown or absent:
        what = "synth" if sp.stage == "synth" else f"{sp.make} encoder"
        raise ValueError(f"args of a {what} stage: " + "; ".join(
            ([f"unknown {', '.join(unknown)}"] if unknown else []) + ([f"missing {', '.join(absent)}"] if absent else []))
            + f" (it takes {', '.join(sorted(known))})")


def _parse(schema: type, argv: Sequence[str], stage: int) -> Any:
    from gkd.config import parse_cli

    return parse_cli(schema, list(argv), base={"stage": stage, "out_dir": f"runs/stage{stage}"})


# ------------------------------------------------------------------------------------------------
# checks before anything runs


def check_plan(plan: Any, steps: Sequence[Step], need_data: bool = True) -> list[str]:
    """Refuse a plan whose stages cannot fit together (PlanError with every reason); return the
    missing data paths (refused too when `need_data`)."""
    problems: list[str] = []
    for step in steps:
        where = f"stage {step.plan.name!r}"
        if step.cfg is not None:
            try:
                check_world(step.cfg, world_size(plan, step.plan))
            except ConfigError as e:
                problems.append(f"{where}: {e}")
        if step.kind == "2" and step.parent.cfg is not None:
            mine, theirs = step.cfg.student, step.parent.cfg.student
            # as stage 2 builds it: the config's name and kwargs where given, else the parent's
            if mine.name is not None and (mine.name, dict(mine.kwargs) or dict(theirs.kwargs)) != (
                    theirs.name, dict(theirs.kwargs)):
                def text(name: str, kwargs: Any) -> str:
                    return f"{name} {dict(kwargs)}" if kwargs else str(name)

                problems.append(f"{where}: its student {text(mine.name, mine.kwargs)} differs from the student of "
                                f"its parent {step.parent.plan.name!r} ({text(theirs.name, theirs.kwargs)}); stage 2 "
                                "continues its parent's student")
    problems += _overlaps(steps)
    missing = _missing_data(plan, steps)
    if need_data and missing:
        problems += [f"missing data: {m}" for m in missing]
    if problems:
        raise PlanError("the plan cannot run:\n  " + "\n  ".join(problems))
    return missing


def _training_splits(steps: Sequence[Step]) -> dict[tuple[str, str], str]:
    """(manifest, split) → the stage that trains, selects or distils on it."""
    used = {}
    for s in steps:
        if s.kind == "shard" and s.plan.manifest:
            used[(_manifest_name(s.plan.manifest), s.plan.split)] = s.plan.name
        s3 = s.cfg if s.kind == "3" else s.compare_stages.get("stage3")  # a compare stage's stage-3 recipe
        if s3 is not None:
            used[(_manifest_name(s3.data.manifest), s3.data.split)] = s.plan.name
            if s3.select.split:
                used[(_manifest_name(s3.data.manifest), s3.select.split)] = f"{s.plan.name} (selection)"
    return used


def root_for(plan: Any, manifest: str) -> Optional[str]:
    """The plan's (or a compare plan's) root of a manifest, by the name the stage gives or the
    manifest's own name."""
    return plan.roots.get(manifest) or plan.roots.get(_manifest_name(manifest))


def _manifest_name(name: str) -> str:
    from gkd.data import load_manifest

    try:
        return load_manifest(name).name
    except Exception:  # an unknown manifest is the stage's own error, reported when it runs
        return str(name)


def _overlaps(steps: Sequence[Step]) -> list[str]:
    from gkd.eval.targets import load_suite

    used, problems = _training_splits(steps), []
    for s in steps:
        if s.kind not in ("eval", "compare"):
            continue
        try:
            suite = load_suite(s.plan.suite if s.kind == "eval" else s.compare[0][2].suite)
        except Exception as e:  # noqa: BLE001 - a bad suite is one of the plan's reasons
            problems.append(f"stage {s.plan.name!r}: {e}")
            continue
        for t in suite.targets:
            key = (_manifest_name(t.manifest), t.split)
            if key in used:
                problems.append(f"stage {s.plan.name!r}: target {t.name} ({key[0]} {key[1]}) is the data stage "
                                f"{used[key]!r} trains on; evaluate on unseen splits only")
    return problems


def _missing_data(plan: Any, steps: Sequence[Step]) -> list[str]:
    from gkd.data import resolve_root

    missing: list[str] = []
    made = {s.plan.name for s in steps if s.kind == "shard"}
    written = [s.out.resolve() for s in steps if s.kind == "synth"]  # data an earlier stage generates

    def generated(path: Optional[str]) -> bool:
        return path is not None and _under(path, written)

    def check_root(where: str, manifest: str, root: Optional[str]) -> None:
        try:
            if not generated(root):
                resolve_root(manifest, root)
        except (FileNotFoundError, ValueError) as e:
            missing.append(f"{where}: {e}")

    for s in steps:
        where = f"stage {s.plan.name!r}"
        if s.kind == "shard" and not generated(s.plan.src or root_for(plan, s.plan.manifest)):
            try:
                shard_src(plan, s.plan)
            except (FileNotFoundError, ValueError) as e:
                missing.append(f"{where}: {e}")
        if s.kind in ("1", "2") and s.plan.shards not in made:
            pattern = str(s.cfg.data.train_shards)
            if not _shards_exist(pattern):
                missing.append(f"{where}: data.train_shards={pattern}")
        if s.kind == "3":
            check_root(where, s.cfg.data.manifest, s.cfg.data.root)
        if s.kind == "eval":
            from gkd.eval.targets import load_suite

            for t in load_suite(s.plan.suite).targets:
                check_root(f"{where}: target {t.name}", t.manifest, root_for(plan, t.manifest))
        if s.kind == "compare":
            missing += _compare_missing(s, steps, check_root)
    return missing


def _compare_missing(step: Step, steps: Sequence[Step], check_root: Callable[[str, str, Optional[str]], None]) -> list[str]:
    """A compare stage's absent data: its targets' and stage 3's roots (through `check_root`), the
    shards of its stages 1 and 2 that no shard stage of the plan writes, a given teacher segmentor."""
    from gkd.eval.targets import load_suite
    from gkd.tools.compare import row_segmentor

    where, missing = f"stage {step.plan.name!r}", []
    cfg = step.compare[0][2]
    configs = step.compare_stages
    s3 = configs["stage3"]
    check_root(f"{where}: stage 3", s3.data.manifest, s3.data.root)
    for t in load_suite(cfg.suite).targets:
        check_root(f"{where}: target {t.name}", t.manifest, root_for(cfg, t.manifest))
    written = [s.out.resolve() for s in steps if s.kind == "shard"]
    for name in ("stage1", "stage2"):
        pattern = str(configs[name].data.train_shards) if name in configs else None
        if pattern and not _under(pattern, written) and not _shards_exist(pattern):
            missing.append(f"{where}: {name} data.train_shards={pattern}")
    wired = {str(row_segmentor(c.out_dir, "teacher")) for _, _, c in step.compare}
    for _, _, c in step.compare:
        if c.teacher_segmentor and c.teacher_segmentor not in wired and not Path(c.teacher_segmentor).is_file():
            missing.append(f"{where}: teacher_segmentor={c.teacher_segmentor}")
            break
    return missing


def _under(path: str, folders: Sequence[Path]) -> bool:
    """Whether `path` lies in one of the (resolved) folders an earlier stage writes."""
    return any(Path(path).resolve().is_relative_to(f) for f in folders)


def _shards_exist(pattern: str) -> bool:
    """A folder of shards, or a pattern (braces or a glob) naming at least one file, all present."""
    if Path(pattern).is_dir():
        return bool(glob.glob(os.path.join(pattern, "*.tar")))
    import braceexpand

    files = [f for p in braceexpand.braceexpand(pattern) for f in (glob.glob(p) or [p])]
    return bool(files) and all(Path(f).is_file() for f in files)


# ------------------------------------------------------------------------------------------------
# running


def run_pipeline(plan: Any, dry_run: bool = False, calibrate: bool = False,
                 echo: Optional[Callable[[str], None]] = None) -> dict[str, Any]:
    """Check the plan, then run its stages in order (skipping the finished ones); the pipeline record.

    dry_run: print the cost of each stage instead (`describe`), running nothing; calibrate: with
    a wall-clock estimate on this machine from a few timed steps. echo: where the line announcing
    each stage goes (default: stdout, flushed before the stage's own output follows)."""
    echo = echo or (lambda line: print(line, flush=True))
    steps = resolve(plan)
    missing = check_plan(plan, steps, need_data=not dry_run)
    if dry_run:
        return describe(plan, steps, missing, calibrate)
    # before anything runs or is written: a folder of another config is refused here
    finished = [_finished(step, plan) for step in steps]
    out = Path(plan.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    main = plan.launch.machine_rank == 0
    record = {"plan": plan.name, "out_dir": str(out), "stages": []}
    earlier = _earlier_seconds(out, plan.name)
    if main:
        (out / f"{plan.name}.plan.yaml").write_text(to_yaml(plan))
    for i, step in enumerate(steps, 1):
        head = f"[{i}/{len(steps)}] {step.plan.name} ({'stage ' if step.kind.isdigit() else ''}{step.kind})"
        entry = {"name": step.plan.name, "stage": step.kind, "output": str(step.output), "state": "running"}
        record["stages"].append(entry)
        started = time.perf_counter()
        if finished[i - 1]:
            # skipped: not run now; `seconds` stays what the stage took when it ran (if recorded)
            entry.update(state="skipped", seconds=earlier.get(step.plan.name))
            echo(f"{head}: finished before, skipped ({step.output})")
        else:
            if main:
                _write_record(out, plan.name, record)
            echo(f"{head}{': ' + step.plan.description if step.plan.description else ''} → {step.out}")
            try:
                entry.update(_run_step(step, plan) or {})
            except BaseException:
                entry.update(state="failed", seconds=round(time.perf_counter() - started, 3))
                if main:
                    _write_record(out, plan.name, record)
                raise
            entry.update(state="done", seconds=round(time.perf_counter() - started, 3))
        if main:
            _write_record(out, plan.name, record)
    return record


def _earlier_seconds(out: Path, name: str) -> dict[str, float]:
    """stage name → seconds it took, from the plan's previous record (none: {})."""
    path = record_path(out, name)
    if not path.is_file():
        return {}
    return {e["name"]: e["seconds"] for e in json.loads(path.read_text()).get("stages", [])
            if e.get("state") in ("done", "skipped") and e.get("seconds") is not None}


def record_path(out_dir: str | Path, plan_name: str) -> Path:
    """`<out_dir>/<plan>.pipeline.json`: per plan, so that plans sharing stages (the label-efficient
    variant reuses a benchmark's stages 1 and 2) can share an out_dir."""
    return Path(out_dir) / f"{plan_name}.pipeline.json"


def _write_record(out: Path, name: str, record: Mapping[str, Any]) -> None:
    path = record_path(out, name)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(path)


def _step_args(step: Step, plan: Any) -> dict[str, Any]:
    """What a synth / shard / encoder / eval stage is run with (recorded beside its output)."""
    sp = step.plan
    if step.kind == "synth":
        return {"args": _args(sp)}
    if step.kind == "shard":
        return {"src": str(shard_src(plan, sp)), "manifest": sp.manifest, "split": sp.split,
                "shard_size": sp.shard_size}
    if step.kind == "encoder" and sp.make != "baseline":
        return {"make": sp.make, "args": _args(sp)}
    if step.kind == "encoder":
        return {"parent": str(step.parent.handoff), "seeds": list(plan.seeds),
                **({"weights": str(step.weights.output)} if step.weights else {})}
    return {"suite": sp.suite, "models": {k: str(v.output) for k, v in step.models.items()},
            "roots": dict(plan.roots), "limit": sp.limit, **({"panels": sp.panels} if sp.panels else {})}


def _finished(step: Step, plan: Any) -> bool:
    """The stage's output exists and was made by this plan's resolved config; an output of another
    config is an error (the plan would silently mix runs)."""
    if step.kind == "compare":
        return _compare_finished(step)
    if not step.output.is_file():
        return False
    if step.cfg is None:
        args_file = step.out / STEP_ARGS
        if not args_file.is_file():  # stopped between writing its output and recording its arguments
            return False
        if json.loads(args_file.read_text()) == _step_args(step, plan):
            return True
        raise PlanError(f"stage {step.plan.name!r}: {step.out} holds the output of other arguments than the plan's "
                        f"({args_file} differs); give the plan another out_dir, or delete that folder")
    for run_dir, cfg in _runs(step):
        saved = run_dir / "config.yaml"
        if not saved.is_file() or saved.read_text() != to_yaml(cfg):
            raise PlanError(f"stage {step.plan.name!r}: {run_dir} holds a finished run of another config "
                            f"({_diff(saved, cfg)}); give the plan another out_dir, or delete that run")
    return True


def _compare_finished(step: Step) -> bool:
    """Every run of the compare stage has its table (and, with seeds, the summary covers them); a
    run folder holding another comparison plan is an error, finished or not (its rows would be
    reused under this plan's name)."""
    done = True
    for run_dir, _, cfg in step.compare:
        saved = run_dir / "plan.yaml"
        if saved.is_file() and saved.read_text() != to_yaml(cfg):
            raise PlanError(f"stage {step.plan.name!r}: {run_dir} holds a comparison of another plan ({saved} differs); "
                            "give the plan another out_dir, or delete that folder")
        done = done and (run_dir / "compare.json").is_file()
    if done and step.seeds:
        summary = json.loads(step.output.read_text()) if step.output.is_file() else {}
        done = summary.get("seeds") == [f"seed{s}" for s in step.seeds]
    return done


def _runs(step: Step) -> list[tuple[Path, Any]]:
    """(run folder, resolved config) of each run the stage makes: one, or one per seed (as
    gkd.engine.runner runs them)."""
    cfg = step.cfg
    if not cfg.seeds:
        return [(step.out, cfg)]
    from gkd.engine.runner import seed_overrides

    return [(step.out / f"seed{seed}", _parse(type_of(cfg), [*step.argv, *seed_overrides(int(step.kind), cfg, seed)],
                                              int(step.kind))) for seed in cfg.seeds]


def type_of(cfg: Any) -> type:
    return SegmentConfig if "decoder" in cfg else DistillConfig


def _diff(saved: Path, cfg: Any) -> str:
    if not saved.is_file():
        return f"no {saved.name}"
    import yaml

    from gkd.engine.trainer import flat_config

    old, new = flat_config(yaml.safe_load(saved.read_text())), flat_config(to_container(cfg))
    keys = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    return "differing keys: " + ", ".join(keys[:8]) + (" ..." if len(keys) > 8 else "")


def _per_machine(plan: Any, sp: StagePlan | None = None) -> int:
    """Processes of a stage on each machine (a compare stage is one process)."""
    if sp is not None and sp.stage == "compare":
        return 1
    return sp.num_processes if sp is not None and sp.num_processes else plan.launch.num_processes


def world_size(plan: Any, sp: StagePlan | None = None) -> int:
    """Processes of a stage over all machines."""
    return _per_machine(plan, sp) * plan.launch.num_machines


def launch_command(plan: Any, module_args: Sequence[str], sp: StagePlan | None = None) -> tuple[list[str], dict[str, str]]:
    """`accelerate launch` of `python -m gkd.cli <module_args>` with the plan's launcher (and the
    stage's process count); (argv, env)."""
    lp, world = plan.launch, world_size(plan, sp)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(world),
           "--num_machines", str(lp.num_machines), "--machine_rank", str(lp.machine_rank),
           "--mixed_precision", str(lp.mixed_precision), "--dynamo_backend", "no",
           "--num_cpu_threads_per_process", str(cpu_threads(plan, sp))]
    if world > 1:
        cmd.append("--multi_gpu")
    if lp.main_process_ip:
        cmd += ["--main_process_ip", str(lp.main_process_ip)]
    if lp.main_process_port:
        cmd += ["--main_process_port", str(lp.main_process_port)]
    cmd += [*map(str, lp.args), "-m", "gkd.cli", *module_args]
    return cmd, _env(plan)


def _env(plan: Any) -> dict[str, str]:
    env = dict(os.environ)
    if plan.launch.cpu:
        env["ACCELERATE_USE_CPU"] = "1"
    return env


def cpu_threads(plan: Any, sp: StagePlan | None = None) -> int:
    """Torch threads per launched process (`launch.cpu_threads`, else $OMP_NUM_THREADS, else this
    machine's cores over the stage's processes per machine)."""
    if plan.launch.cpu_threads:
        return int(plan.launch.cpu_threads)
    if os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        return int(os.environ["OMP_NUM_THREADS"])
    return max(1, len(os.sched_getaffinity(0)) // _per_machine(plan, sp))


def _launch(step: Step, plan: Any, module_args: Sequence[str]) -> None:
    cmd, env = launch_command(plan, module_args, step.plan)
    _call(step, cmd, env)


def _call(step: Step, cmd: Sequence[str], env: Mapping[str, str]) -> None:
    done = subprocess.run(list(cmd), env=dict(env))
    if done.returncode != 0:
        raise PlanError(f"stage {step.plan.name!r} failed (exit status {done.returncode}); its output above says why. "
                        f"Rerunning the plan resumes it from its last checkpoint. Command: {' '.join(cmd)}")


def _run_step(step: Step, plan: Any) -> dict[str, Any] | None:
    """Run one stage; what it reports for the pipeline record (a shard stage: its sample count)."""
    sp = step.plan
    if step.kind in ("1", "2", "3"):
        _launch(step, plan, [f"stage{step.kind}", *step.argv])
        return None
    if step.kind == "compare":
        if plan.launch.machine_rank == 0:
            _compare(step, plan)
        else:
            _wait_for(step.output)
        return None
    report = None
    if step.kind == "eval":
        args = ["eval", *_eval_models(step), "--suite", sp.suite, "--out", str(step.out)]
        for manifest, root in plan.roots.items():
            args += ["--root", f"{manifest}={root}"]
        if sp.limit is not None:
            args += ["--limit", str(sp.limit)]
        args += ["--batch-size", str(sp.batch_size), "--workers", str(sp.num_workers)]
        if sp.panels:
            args += ["--panels", str(sp.panels)]
        _launch(step, plan, args)
    elif plan.launch.machine_rank == 0:  # one writer of the synth / shard / encoder files (shared storage)
        report = {"synth": _synth, "shard": _shard, "encoder": _encoder}[step.kind](step, plan)
    else:
        _wait_for(step.output)
    if plan.launch.machine_rank == 0:
        (step.out / STEP_ARGS).write_text(json.dumps(_step_args(step, plan), indent=2) + "\n")
    return report


def _compare(step: Step, plan: Any) -> None:
    """Each run of a compare stage as its own `gkd compare` process (a finished one is kept), then
    the mean ± std summary over the seeds."""
    from gkd.tools.compare import summary_markdown, write_seed_summary

    env = {**_env(plan), "OMP_NUM_THREADS": str(cpu_threads(plan, step.plan))}
    for run_dir, overrides, cfg in step.compare:
        if (run_dir / "compare.json").is_file():  # _compare_finished checked its plan.yaml
            log.info("pipeline: %s: %s finished before, kept", step.plan.name, run_dir)
            continue
        _call(step, [sys.executable, "-m", "gkd.cli", "compare", "--plan", step.plan.config[0], *overrides], env)
    if step.seeds:
        summary = write_seed_summary({run_dir.name: run_dir for run_dir, _, _ in step.compare}, step.out)
        print(summary_markdown(summary) + f"wrote {step.out}/summary.md, summary.json", flush=True)


def _eval_models(step: Step) -> list[str]:
    """gkd eval's model arguments: `NAME=run,run,...` per row of a multi-seed plan (mean ± std),
    else the files with one --name each."""
    if step.models and next(iter(step.models.values())).seeds:
        from gkd.engine.runner import seed_runs

        return [f"{row}=" + ",".join(str(p) for p in seed_runs(m.out).values()) for row, m in step.models.items()]
    return [*(str(m.output) for m in step.models.values()), *(a for row in step.models for a in ("--name", row))]


def shard_src(plan: Any, sp: StagePlan) -> Path:
    """A shard stage's source folder: `src`, else its manifest's root (the plan's, else the
    manifest's default); FileNotFoundError naming it when absent."""
    if sp.src:
        if not Path(sp.src).is_dir():
            raise FileNotFoundError(f"shard src {sp.src} is not a folder")
        return Path(sp.src)
    from gkd.data import resolve_root

    return resolve_root(sp.manifest, root_for(plan, sp.manifest))


def _shard(step: Step, plan: Any) -> dict[str, Any]:
    from gkd.tools.shard import shard_images

    sp = step.plan
    index = shard_images(shard_src(plan, sp), step.out, sp.manifest, sp.split, shard_size=sp.shard_size)
    if sp.expect_samples is not None and index.num_samples != sp.expect_samples:
        log.warning("pipeline: %s: the shards hold %d samples, the plan expected %d (expect_samples); the stages "
                    "reading them use the shards' count", sp.name, index.num_samples, sp.expect_samples)
    return {"samples": index.num_samples, "expected_samples": sp.expect_samples}


def _synth(step: Step, plan: Any) -> dict[str, Any]:
    from gkd.data.synth import BenchmarkSizes, write_benchmark

    args = _args(step.plan)
    bench = write_benchmark(step.out, seed=int(args.pop("seed", 0)), sizes=BenchmarkSizes(**args), progress=True)
    return {"images": bench.splits}


def _encoder(step: Step, plan: Any) -> None:
    from gkd.tools import encoders

    sp = step.plan
    if sp.make != "baseline":
        args = _args(sp)
        kwargs = dict(args.pop("kwargs", None) or {})  # the timm kwargs of the model
        writer = encoders.write_student_encoder if sp.make == "student" else encoders.write_teacher_encoder
        writer(step.output, **args, **kwargs)
        return None
    parent = step.parent
    # the start's weights resampled to the parent's geometry as the parent's stage resampled its own start
    start = {} if step.weights is None else {"init": step.weights.output,
                                             "patch_resample": parent.cfg.student.patch_resample}
    if not plan.seeds:
        encoders.write_baseline_encoder(parent.output, step.output, seed=parent.cfg.seed, **start)
        return None
    from gkd.engine.runner import seed_run

    runs = [str(encoders.write_baseline_encoder(seed_run(parent.handoff, s),
                                                step.out / f"seed{s}" / "encoder.safetensors", seed=s, **start))
            for s in plan.seeds]
    (step.out / SEEDS_FILE).write_text(json.dumps({"stage": 0, "seeds": list(plan.seeds), "runs": runs}, indent=2) + "\n")


def _wait_for(path: Path, timeout: float = 24 * 3600) -> None:
    started = time.monotonic()
    while not path.is_file():
        if time.monotonic() - started > timeout:
            raise PlanError(f"machine 0 did not write {path} within {timeout:.0f} s")
        time.sleep(10)


# ------------------------------------------------------------------------------------------------
# dry run


def describe(plan: Any, steps: Sequence[Step], missing: Sequence[str], calibrate: bool = False) -> dict[str, Any]:
    """Each stage's data, steps, images and training FLOPs (`gkd.engine.cost.stage_cost`) and the
    totals, printed; with `calibrate`, the seconds per step timed here (`step_seconds`) and the
    wall-clock they give. Nothing runs or is written."""
    from gkd.engine.cost import stage_cost, step_seconds

    world = world_size(plan)
    runs = max(1, len(plan.seeds))
    rows, lines = [], [f"plan {plan.name}: {len(steps)} stages in {plan.out_dir}, {world} process(es), "
                       f"{runs} run(s) per training stage" + (f" (seeds {list(plan.seeds)})" if plan.seeds else "")]
    for step in steps:
        row: dict[str, Any] = {"name": step.plan.name, "stage": step.kind, "output": str(step.output),
                               "finished": step.output.is_file()}
        if step.cfg is not None:
            kwargs = {"world_size": world_size(plan, step.plan), "parent": _lineage(step) or None,
                      "encoder_spec": _planned_spec(step)}
            cost = stage_cost(int(step.kind), _expected_count(step, steps), **kwargs)
            row.update({k: v for k, v in cost.items() if k != "stage"}, runs=runs)
            if calibrate:
                timed = step_seconds(int(step.kind), step.cfg, **kwargs)
                row.update(timed, seconds=None if cost["steps"] is None else timed["seconds_per_step"] * cost["steps"] * runs)
            data = step.cfg.data.train_shards if step.kind != "3" else f"{step.cfg.data.manifest} {step.cfg.data.split}"
            tflops = cost.get("train_tflops")
            lines.append(f"- {step.plan.name} (stage {step.kind}): data {data}; {_num(cost.get('steps'))} steps, "
                         f"{_num(cost.get('images'))} images, {cost['flops_per_step'] / 1e12:.4g} TFLOPs/step, "
                         f"{'?' if tflops is None else f'{tflops * runs:.4g}'} TFLOPs"
                         + (f" ({runs} runs)" if runs > 1 else ""))
            if calibrate:
                lines.append(f"    {row['seconds_per_step']:.3g} s/step timed on this machine ({row['device']}, "
                             f"{world_size(plan, step.plan)} such device(s) in parallel) → "
                             + ("? (steps unknown)" if row["seconds"] is None else _duration(row["seconds"]))
                             + " (lower bound: no data loading, optimizer update or all-reduce)")
            lines += [f"    {n}" for n in cost.get("notes", [])]
            lines.append("    " + " ".join(step.argv))
        elif step.kind == "compare":
            row.update(_compare_cost(step))
            lines.append(f"- {step.plan.name} (compare): {step.plan.config[0]}; " + row["text"])
            lines += [f"    {' '.join(o)}" for _, o, _ in step.compare]
        else:
            try:
                args = _step_args(step, plan)
            except (FileNotFoundError, ValueError):  # its data is missing: listed below
                args = {"src": step.plan.src, "manifest": step.plan.manifest, "split": step.plan.split}
            lines.append(f"- {step.plan.name} ({step.kind}): " + json.dumps(args))
        rows.append(row)
    known = [r["train_tflops"] * r["runs"] for r in rows if r.get("train_tflops") is not None]
    unknown = [r["name"] for r in rows if ("flops_per_step" in r or r["stage"] == "compare")
               and r.get("train_tflops") is None]
    budgeted = sum(r.get("budget_seconds") or 0.0 for r in rows)  # compare rows on a seconds budget
    total = {"train_tflops": sum(known), "stages_of_unknown_length": unknown, "budget_seconds": budgeted}
    lines.append(f"total: {sum(known):.4g} training TFLOPs" + (f" (+ {', '.join(unknown)}: not counted)" if unknown else ""))
    if budgeted:
        lines.append(f"compare stages on a seconds budget: {_duration(budgeted)} of training (+ evaluation)")
    if calibrate:
        total["seconds"] = sum(r["seconds"] for r in rows if r.get("seconds") is not None) + budgeted
        lines.append(f"total wall-clock on this machine, training stages: {_duration(total['seconds'])} (lower bound)")
    lines.append("reference GPU: none yet: BENCHMARKS.md has no measured GPU training throughput to scale by; "
                 "run --dry-run --calibrate on the machine that will train")
    if missing:
        lines.append("missing data (the run would refuse to start):")
        lines += [f"  {m}" for m in missing]
    print("\n".join(lines))
    return {"plan": plan.name, "stages": rows, "total": total, "missing": list(missing)}


def _compare_cost(step: Step) -> dict[str, Any]:
    """A compare stage's budget: every row it trains gets `budget.amount` (summed over the row's
    stages), so its cost is that times the rows trained over the runs; FLOPs are known for a
    `tflops` budget, wall-clock for a `seconds` one, neither for `steps`."""
    from gkd.tools.compare import trained_rows

    rows = [m for _, _, cfg in step.compare for m in trained_rows(cfg)]
    budget = step.compare[0][2].budget
    total = float(budget.amount) * len(rows)
    cost = {"budget_kind": budget.kind, "budget_amount": float(budget.amount), "rows_trained": len(rows), "runs": 1,
            "train_tflops": total if budget.kind == "tflops" else None,
            "budget_seconds": total if budget.kind == "seconds" else None}
    runs = f" over {len(step.compare)} runs" if len(step.compare) > 1 else ""
    spent = {"tflops": f"{total:.4g} TFLOPs", "seconds": f"{_duration(total)} of training",
             "steps": f"{total:,.0f} steps (FLOPs not counted ahead)"}[budget.kind]
    cost["text"] = (f"{len(rows)} rows trained{runs} ({', '.join(dict.fromkeys(rows))}) at {budget.amount:g} "
                    f"{budget.kind} each: {spent}, + evaluation")
    return cost


def _expected_count(step: Step, steps: Sequence[Step]) -> Any:
    """The stage's config, for the cost only: with `data.num_samples` from its shard stage's
    `expect_samples` when those shards are not written yet (the run itself counts the index)."""
    source = next((s for s in steps if s.plan.name == step.plan.shards), None)
    if source is None or source.output.is_file() or source.plan.expect_samples is None or step.cfg.data.num_samples:
        return step.cfg
    return _parse(type_of(step.cfg), [*step.argv, f"data.num_samples={source.plan.expect_samples}"], int(step.kind))


def _lineage(step: Step) -> list[Any]:
    """The configs of the distillation runs the stage's encoder descends from, root first (an
    `encoder` stage keeps its parent's architecture, so it adds none)."""
    configs, parent = [], step.parent
    while parent is not None:
        if parent.cfg is not None:
            configs.insert(0, parent.cfg)
        parent = parent.parent
    return configs


def _planned_spec(step: Step) -> Optional[dict[str, Any]]:
    """A stage 3's encoder spec when its parent is a student / teacher encoder stage not written yet."""
    p = step.parent
    if step.kind != "3" or p is None or p.kind != "encoder" or p.plan.make == "baseline" or p.output.is_file():
        return None
    from gkd.tools.encoders import planned_encoder_spec

    return planned_encoder_spec(p.plan.make, _args(p.plan))


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.3g} h" if seconds >= 3600 else f"{seconds:.3g} s"


def _num(v: Any) -> str:
    return "?" if v is None else f"{v:,}"


__all__ = ["Plan", "PlanError", "StagePlan", "LaunchPlan", "load_plan", "resolve", "check_plan", "run_pipeline",
           "describe", "launch_command"]
