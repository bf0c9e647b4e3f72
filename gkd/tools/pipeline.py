"""`gkd pipeline PLAN.yaml`: a chain of stages as one declarative, resumable run.

A plan (`Plan`) lists its stages in order; each runs in `<out_dir>/<name>/`:

* `shard`: `gkd data shard` of an image folder or a dataset split (`src`, `manifest`, `split`);
* `1`, `2`, `3`: the training stages, each under `accelerate launch` as its own process (the
  plan's `launch` section: processes, machines, mixed precision), so one plan runs on a CPU, a GPU
  or several nodes;
* `encoder`: the no-distillation baseline of a distilled encoder (its architecture, random weights);
* `eval`: `gkd eval` of the plan's segmentors on a suite, also under `accelerate launch`.

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
from typing import Any, Mapping, Optional, Sequence

from omegaconf import MISSING

from gkd.config import (ConfigError, DistillConfig, SegmentConfig, check_world, load_config, to_container,
                        to_yaml)

log = logging.getLogger(__name__)

KINDS = ("shard", "1", "2", "3", "encoder", "eval")
SEEDS_FILE = "seeds.json"
STEP_ARGS = "step.json"  # a shard / encoder / eval stage's arguments, to tell a finished one of this plan


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
    args: list[str] = field(default_factory=list)  # further `accelerate launch` options, as given


@dataclass
class StagePlan:
    name: str = MISSING  # its folder under out_dir; stage overrides on the command line: <name>.key=value
    stage: str = MISSING  # shard | 1 | 2 | 3 | encoder | eval
    config: list[str] = field(default_factory=list)  # config files (overlays, in order)
    overrides: list[str] = field(default_factory=list)  # key=value
    parent: Optional[str] = None  # the stage whose handoff this one takes (default: the nearest earlier one)
    shards: Optional[str] = None  # 1 | 2: the shard stage whose folder is data.train_shards
    num_processes: Optional[int] = None  # this stage's processes per machine (default: launch.num_processes)
    # shard
    src: Optional[str] = None  # image folder, or the dataset root of `manifest` (default: the plan's / $GKD_DATA_ROOT's)
    manifest: Optional[str] = None  # shard: the split's images, no labels
    split: str = "train"
    shard_size: int = 1000
    expect_samples: Optional[int] = None  # what the shards will hold: --dry-run's count before they exist
    # eval
    suite: Optional[str] = None
    models: dict[str, str] = field(default_factory=dict)  # report row name → stage-3 stage (default: the nearest)
    limit: Optional[int] = None
    batch_size: int = 1
    num_workers: int = 2


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
    `seeds=[0,1,2]`, `launch.num_processes=8`)."""
    if not Path(path).is_file():
        raise ConfigError(f"plan file not found: {path}")
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
    if per_stage:
        from omegaconf import OmegaConf

        data = to_container(plan)
        for s in data["stages"]:
            for item in per_stage.get(s["name"], []):
                field_name = item.partition("=")[0]
                if field_name in stage_fields:
                    s.update(OmegaConf.to_container(OmegaConf.from_dotlist([item])))
                else:
                    s["overrides"] = [*s["overrides"], item]
        plan = load_config(Plan, [], [], base=data)
    return plan


# ------------------------------------------------------------------------------------------------
# resolution: every stage's command, config and output, before anything runs


@dataclass
class Step:
    """One stage of a plan, resolved."""

    plan: StagePlan
    out: Path  # its folder
    argv: list[str] = field(default_factory=list)  # a training stage's --config/key=value arguments
    cfg: Any = None  # its resolved config (training stages)
    seeds: list[int] = field(default_factory=list)  # the plan's seeds (training and encoder stages)
    parent: Optional["Step"] = None
    models: dict[str, "Step"] = field(default_factory=dict)  # eval

    @property
    def kind(self) -> str:
        return self.plan.stage

    @property
    def output(self) -> Path:
        """What the stage hands over: a file, a seeds folder's seeds.json, a shard folder, a report."""
        if self.kind == "shard":
            return self.out / "train-index.json"
        if self.kind == "eval":
            return self.out / "metrics.json"
        if self.seeds:
            return self.out / SEEDS_FILE
        return self.out / ("segmentor.safetensors" if self.kind == "3" else "encoder.safetensors")

    @property
    def handoff(self) -> Path:
        """The path the next stage is given: the file, or the folder of a multi-seed run."""
        return self.out if self.output.name == SEEDS_FILE else self.output


_NEEDS = {"2": ("1", "2"), "3": ("1", "2", "encoder"), "encoder": ("1", "2")}
_TRAINS = ("1", "2", "3", "encoder")  # the stages a plan's seeds fan out


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
        step = Step(sp, out / sp.name, seeds=[int(s) for s in plan.seeds] if sp.stage in _TRAINS else [])
        try:
            _wire(step, sp, by_name, steps)
            if sp.stage in ("1", "2", "3"):
                _configure(step, plan)
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

    if sp.stage in _NEEDS:
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
        wired.append(f"{'encoder' if stage == 3 else 'init'}={step.parent.handoff}")
    if sp.shards:
        wired.append(f"data.train_shards={step.out.parent / sp.shards}")
    schema = SegmentConfig if stage == 3 else DistillConfig
    probe = _parse(schema, argv + wired, stage)
    if stage == 3 and probe.data.root is None and root_for(plan, probe.data.manifest):
        wired.append(f"data.root={root_for(plan, probe.data.manifest)}")
    step.argv = argv + wired
    step.cfg = _parse(schema, step.argv, stage)
    if step.cfg.stage != stage:
        raise ConfigError(f"its config says stage={step.cfg.stage}")


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
        if s.kind == "3":
            used[(_manifest_name(s.cfg.data.manifest), s.cfg.data.split)] = s.plan.name
            if s.cfg.select.split:
                used[(_manifest_name(s.cfg.data.manifest), s.cfg.select.split)] = f"{s.plan.name} (selection)"
    return used


def root_for(plan: Any, manifest: str) -> Optional[str]:
    """The plan's root of a manifest, by the name the stage gives or the manifest's own name."""
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
        if s.kind != "eval":
            continue
        try:
            suite = load_suite(s.plan.suite)
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
    for s in steps:
        where = f"stage {s.plan.name!r}"
        if s.kind == "shard":
            try:
                shard_src(plan, s.plan)
            except (FileNotFoundError, ValueError) as e:
                missing.append(f"{where}: {e}")
        if s.kind in ("1", "2") and s.plan.shards not in made:
            pattern = str(s.cfg.data.train_shards)
            if not _shards_exist(pattern):
                missing.append(f"{where}: data.train_shards={pattern}")
        if s.kind == "3":
            try:
                resolve_root(s.cfg.data.manifest, s.cfg.data.root)
            except (FileNotFoundError, ValueError) as e:
                missing.append(f"{where}: {e}")
        if s.kind == "eval":
            from gkd.eval.targets import load_suite

            for t in load_suite(s.plan.suite).targets:
                try:
                    resolve_root(t.manifest, root_for(plan, t.manifest))
                except (FileNotFoundError, ValueError) as e:
                    missing.append(f"{where}: target {t.name}: {e}")
    return missing


def _shards_exist(pattern: str) -> bool:
    """A folder of shards, or a pattern (braces or a glob) naming at least one file, all present."""
    if Path(pattern).is_dir():
        return bool(glob.glob(os.path.join(pattern, "*.tar")))
    import braceexpand

    files = [f for p in braceexpand.braceexpand(pattern) for f in (glob.glob(p) or [p])]
    return bool(files) and all(Path(f).is_file() for f in files)


# ------------------------------------------------------------------------------------------------
# running


def run_pipeline(plan: Any, dry_run: bool = False, calibrate: bool = False) -> dict[str, Any]:
    """Check the plan, then run its stages in order (skipping the finished ones); the pipeline record.

    dry_run: print the cost of each stage instead (`describe`), running nothing; calibrate: with
    a wall-clock estimate on this machine from a few timed steps."""
    steps = resolve(plan)
    missing = check_plan(plan, steps, need_data=not dry_run)
    if dry_run:
        return describe(plan, steps, missing, calibrate)
    out = Path(plan.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    main = plan.launch.machine_rank == 0
    record = {"plan": plan.name, "out_dir": str(out), "stages": []}
    earlier = _earlier_seconds(out, plan.name)
    if main:
        (out / f"{plan.name}.plan.yaml").write_text(to_yaml(plan))
    for step in steps:
        entry = {"name": step.plan.name, "stage": step.kind, "output": str(step.output), "state": "running"}
        record["stages"].append(entry)
        started = time.perf_counter()
        if _finished(step, plan):
            # skipped: not run now; `seconds` stays what the stage took when it ran (if recorded)
            entry.update(state="skipped", seconds=earlier.get(step.plan.name))
            log.info("pipeline: %s: finished before, skipped (%s)", step.plan.name, step.output)
        else:
            if main:
                _write_record(out, plan.name, record)
            log.info("pipeline: %s: stage %s → %s", step.plan.name, step.kind, step.out)
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
    """What a shard / encoder / eval stage is run with (recorded beside its output)."""
    sp = step.plan
    if step.kind == "shard":
        return {"src": str(shard_src(plan, sp)), "manifest": sp.manifest, "split": sp.split,
                "shard_size": sp.shard_size}
    if step.kind == "encoder":
        return {"parent": str(step.parent.handoff), "seeds": list(plan.seeds)}
    return {"suite": sp.suite, "models": {k: str(v.output) for k, v in step.models.items()},
            "roots": dict(plan.roots), "limit": sp.limit}


def _finished(step: Step, plan: Any) -> bool:
    """The stage's output exists and was made by this plan's resolved config; an output of another
    config is an error (the plan would silently mix runs)."""
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


def _runs(step: Step) -> list[tuple[Path, Any]]:
    """(run folder, resolved config) of each run the stage makes: one, or one per seed (as
    gkd.engine.runner runs them)."""
    cfg = step.cfg
    if not cfg.seeds:
        return [(step.out, cfg)]
    from gkd.engine.runner import seed_run

    runs = []
    for seed in cfg.seeds:
        extra = [f"seed={seed}", f"out_dir={step.out / f'seed{seed}'}", "seeds=[]"]
        if step.parent is not None:
            key = "encoder" if step.kind == "3" else "init"
            extra.append(f"{key}={seed_run(step.parent.handoff, seed)}")
        runs.append((step.out / f"seed{seed}", _parse(type_of(cfg), [*step.argv, *extra], int(step.kind))))
    return runs


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


def world_size(plan: Any, sp: StagePlan | None = None) -> int:
    """Processes of a stage over all machines."""
    per_machine = sp.num_processes if sp is not None and sp.num_processes else plan.launch.num_processes
    return per_machine * plan.launch.num_machines


def launch_command(plan: Any, module_args: Sequence[str], sp: StagePlan | None = None) -> tuple[list[str], dict[str, str]]:
    """`accelerate launch` of `python -m gkd.cli <module_args>` with the plan's launcher (and the
    stage's process count); (argv, env)."""
    lp, world = plan.launch, world_size(plan, sp)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(world),
           "--num_machines", str(lp.num_machines), "--machine_rank", str(lp.machine_rank),
           "--mixed_precision", str(lp.mixed_precision), "--dynamo_backend", "no"]
    if world > 1:
        cmd.append("--multi_gpu")
    if lp.main_process_ip:
        cmd += ["--main_process_ip", str(lp.main_process_ip)]
    if lp.main_process_port:
        cmd += ["--main_process_port", str(lp.main_process_port)]
    cmd += [*map(str, lp.args), "-m", "gkd.cli", *module_args]
    env = dict(os.environ)
    if lp.cpu:
        env["ACCELERATE_USE_CPU"] = "1"
    return cmd, env


def _launch(step: Step, plan: Any, module_args: Sequence[str]) -> None:
    cmd, env = launch_command(plan, module_args, step.plan)
    done = subprocess.run(cmd, env=env)
    if done.returncode != 0:
        raise PlanError(f"stage {step.plan.name!r} failed (exit status {done.returncode}); its output above says why. "
                        f"Rerunning the plan resumes it from its last checkpoint. Command: {' '.join(cmd)}")


def _run_step(step: Step, plan: Any) -> dict[str, Any] | None:
    """Run one stage; what it reports for the pipeline record (a shard stage: its sample count)."""
    sp = step.plan
    if step.kind in ("1", "2", "3"):
        _launch(step, plan, [f"stage{step.kind}", *step.argv])
        return None
    report = None
    if step.kind == "eval":
        args = ["eval", *_eval_models(step), "--suite", sp.suite, "--out", str(step.out)]
        for manifest, root in plan.roots.items():
            args += ["--root", f"{manifest}={root}"]
        if sp.limit is not None:
            args += ["--limit", str(sp.limit)]
        args += ["--batch-size", str(sp.batch_size), "--workers", str(sp.num_workers)]
        _launch(step, plan, args)
    elif plan.launch.machine_rank == 0:  # one writer of the shard / encoder files (shared storage)
        report = _shard(step, plan) if step.kind == "shard" else _baseline_encoder(step, plan)
    else:
        _wait_for(step.output)
    if plan.launch.machine_rank == 0:
        (step.out / STEP_ARGS).write_text(json.dumps(_step_args(step, plan), indent=2) + "\n")
    return report


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
    from gkd.data import write_shards

    sp = step.plan
    src = shard_src(plan, sp)
    files = source = None
    if sp.manifest:
        from gkd.data import load_manifest, manifest_image_files
        from gkd.eval.protocol import split_record

        files = manifest_image_files(sp.manifest, sp.split, root=src)
        source = split_record(load_manifest(sp.manifest), sp.split, src, len(files))
    index = write_shards(src, step.out, shard_size=sp.shard_size, files=files, source=source)
    if sp.expect_samples is not None and index.num_samples != sp.expect_samples:
        log.warning("pipeline: %s: the shards hold %d samples, the plan expected %d (expect_samples); the stages "
                    "reading them use the shards' count", sp.name, index.num_samples, sp.expect_samples)
    return {"samples": index.num_samples, "expected_samples": sp.expect_samples}


def _baseline_encoder(step: Step, plan: Any) -> None:
    from gkd.tools.encoders import write_baseline_encoder

    parent = step.parent
    if not plan.seeds:
        write_baseline_encoder(parent.output, step.output, seed=parent.cfg.seed)
        return
    from gkd.engine.runner import seed_run

    runs = [str(write_baseline_encoder(seed_run(parent.handoff, s), step.out / f"seed{s}" / "encoder.safetensors",
                                       seed=s)) for s in plan.seeds]
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
            kwargs = {"world_size": world_size(plan, step.plan), "parent": _lineage(step) or None}
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
        else:
            try:
                args = _step_args(step, plan)
            except (FileNotFoundError, ValueError):  # its data is missing: listed below
                args = {"src": step.plan.src, "manifest": step.plan.manifest, "split": step.plan.split}
            lines.append(f"- {step.plan.name} ({step.kind}): " + json.dumps(args))
        rows.append(row)
    known = [r["train_tflops"] * r["runs"] for r in rows if r.get("train_tflops") is not None]
    unknown = [r["name"] for r in rows if "flops_per_step" in r and r.get("train_tflops") is None]
    total = {"train_tflops": sum(known), "stages_of_unknown_length": unknown}
    lines.append(f"total: {sum(known):.4g} training TFLOPs" + (f" (+ {', '.join(unknown)}: steps unknown)" if unknown else ""))
    if calibrate:
        total["seconds"] = sum(r["seconds"] for r in rows if r.get("seconds") is not None)
        lines.append(f"total wall-clock on this machine, training stages: {_duration(total['seconds'])} (lower bound)")
    lines.append("reference GPU: none yet: BENCHMARKS.md has no measured GPU training throughput to scale by; "
                 "run --dry-run --calibrate on the machine that will train")
    if missing:
        lines.append("missing data (the run would refuse to start):")
        lines += [f"  {m}" for m in missing]
    print("\n".join(lines))
    return {"plan": plan.name, "stages": rows, "total": total, "missing": list(missing)}


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


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.3g} h" if seconds >= 3600 else f"{seconds:.3g} s"


def _num(v: Any) -> str:
    return "?" if v is None else f"{v:,}"


__all__ = ["Plan", "PlanError", "StagePlan", "LaunchPlan", "load_plan", "resolve", "check_plan", "run_pipeline",
           "describe", "launch_command"]
