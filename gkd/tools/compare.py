"""`gkd compare`: distillation methods at one matched compute budget → a table and a plot.

Two ways in:

* ``run_compare(plan)`` (``gkd compare --plan PLAN.yaml [key=value ...]``) runs every method of the
  plan on its own budget — each in ``<out_dir>/<method>/``, skipped when its segmentor already exists
  (so an interrupted comparison continues) — evaluates them on one suite and writes the table;
* ``compare_table(runs, results, baseline)`` (``gkd compare --runs NAME=SEGMENTOR ... --suite S``)
  reads finished runs: their compute comes from each segmentor's metadata (``compute_total``).

Rows of a plan (``methods``):

* ``teacher``: stage 3 (decoder only) on the frozen teacher encoder (``gkd teacher-encoder``);
* ``none``: the student trained on the labels alone, encoder trainable (the undistilled student);
* ``student``: the student's initialisation (e.g. its ImageNet weights) frozen, decoder only — the
  "pretrained student alone" of a foundation-to-local comparison;
* a task-level method (``kd``, ``cwd``, ...): the same student run, plus that loss against the
  teacher segmentor (so ``teacher`` runs first, and its training is not charged to them);
* a representation-level method (``gkd``, ``proteus``): stage 1 → stage 2 → stage 3 (frozen encoder),
  splitting the budget by ``representation.shares``.

Every row gets the same budget (``budget.kind`` seconds | tflops | steps, ``budget.amount``); the
table reports what each run actually used, summed over its stages.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from omegaconf import MISSING

from gkd.config import BudgetConfig, DistillConfig, SegmentConfig, load_config, to_yaml
from gkd.distill import METHODS, get_method
from gkd.handoff import read_metadata
from gkd.engine.trainer import reset_accelerate_state
from gkd.eval.report import nan_to_none, fmt, md_table

log = logging.getLogger(__name__)

ROWS = ("teacher", "none", "student")
COMPARE_JSON, COMPARE_MD, COMPARE_CSV, COMPARE_PNG = "compare.json", "compare.md", "compare.csv", "compare.png"


@dataclass
class EncoderSpec:
    name: Optional[str] = None  # timm name (student) / build_teacher name (teacher); needed by the rows using it
    checkpoint: Optional[str] = None
    pretrained: bool = False
    random_init: bool = False  # teacher only: no weights (pipeline checks)
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class RepresentationPlan:
    stage1: list[str] = field(default_factory=list)  # config overlays of stage 1
    stage2: list[str] = field(default_factory=list)
    overrides: list[str] = field(default_factory=list)  # key=value for stages 1 and 2
    shares: list[float] = field(default_factory=lambda: [0.4, 0.3, 0.3])  # of the budget: stage 1, 2, 3


@dataclass
class EvalPlan:
    limit: Optional[int] = None  # first N images per target (None: all)
    batch_size: int = 1
    num_workers: int = 2


@dataclass
class ComparePlan:
    out_dir: str = "runs/compare"
    suite: str = MISSING
    roots: dict[str, str] = field(default_factory=dict)  # manifest name → dataset root
    methods: list[str] = field(default_factory=lambda: ["none", "teacher", "gkd", "kd"])
    baseline: str = "none"  # the row whose mean mIoU the gains are measured against
    budget: BudgetConfig = field(default_factory=lambda: BudgetConfig(kind="seconds", amount=600.0))
    img_size: int = 512  # stage-3 geometry of the student and teacher encoders
    patch_size: int = 16
    teacher: EncoderSpec = field(default_factory=EncoderSpec)
    student: EncoderSpec = field(default_factory=EncoderSpec)
    stage3: list[str] = field(default_factory=list)  # config overlays of every stage-3 run
    stage3_overrides: list[str] = field(default_factory=list)
    representation: RepresentationPlan = field(default_factory=RepresentationPlan)
    eval: EvalPlan = field(default_factory=EvalPlan)
    seed: int = 0
    # a finished teacher segmentor to reuse (e.g. one trained once for several seeds' plans): the task-level
    # rows distil from it and the `teacher` row reports it, instead of training one in <out_dir>/teacher/
    teacher_segmentor: Optional[str] = None


def check_methods(methods: Sequence[str], baseline: str | None) -> None:
    """Unknown names list what is available; a baseline must be one of the rows."""
    for m in methods:
        if m not in ROWS:
            get_method(m)
    if len(set(methods)) != len(methods):
        raise ValueError(f"methods repeat: {list(methods)}")
    if baseline and baseline not in methods:
        raise ValueError(f"baseline {baseline!r} is not among the methods {list(methods)}")


def _is_task(method: str) -> bool:
    """A task-level method's row: the student trained with that loss against the teacher segmentor."""
    return method in METHODS and METHODS[method].level == "task"


def run_compare(plan: ComparePlan) -> dict[str, Any]:
    """Run (or reuse) every method of `plan`, evaluate them, write the table and plot; return the table."""
    from gkd.eval import run_eval

    check_methods(plan.methods, plan.baseline)
    out = Path(plan.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "plan.yaml").write_text(to_yaml(plan))
    segmentors = {m: _run_method(plan, m, out) for m in row_order(plan)}
    runs = {m: segmentors[m] for m in plan.methods}
    results = run_eval(list(runs.values()), plan.suite, out / "eval", roots=dict(plan.roots),
                       batch_size=plan.eval.batch_size, num_workers=plan.eval.num_workers, limit=plan.eval.limit,
                       model_name=list(runs))
    reset_accelerate_state()
    table = compare_table(runs, results, plan.baseline)
    write_compare(table, out)
    return table


def row_order(plan: ComparePlan) -> list[str]:
    """The rows `run_compare` runs, in order: the teacher first, added where task-level rows need
    its segmentor and the methods do not list it."""
    order = sorted(plan.methods, key=lambda m: m != "teacher")
    if any(_is_task(m) for m in plan.methods) and "teacher" not in plan.methods:
        order.insert(0, "teacher")
    return order


def row_segmentor(out_dir: str | Path, method: str) -> Path:
    """Where a comparison in `out_dir` writes a row's segmentor."""
    return Path(out_dir) / method / "s3" / "segmentor.safetensors"


def trained_rows(plan: ComparePlan) -> list[str]:
    """The rows that train on the plan's budget (a given `teacher_segmentor` is reused, not trained)."""
    return [m for m in row_order(plan) if not (m == "teacher" and plan.teacher_segmentor)]


def _budget(plan: ComparePlan, share: float = 1.0) -> dict[str, Any]:
    amount = plan.budget.amount * share
    if plan.budget.kind == "steps":
        amount = max(1, round(amount))
    return {"kind": plan.budget.kind, "amount": amount}


def _segment(plan: ComparePlan, out_dir: Path, encoder: Path, extra: dict[str, Any], share: float = 1.0) -> Path:
    from gkd.engine.segment import train_segmentor

    base = {"seed": plan.seed, "out_dir": str(out_dir), "encoder": str(encoder), "budget": _budget(plan, share),
            **extra}
    cfg = load_config(SegmentConfig, plan.stage3, [*plan.stage3_overrides], base=base)
    try:
        return train_segmentor(cfg)
    finally:
        reset_accelerate_state()


def _run_method(plan: ComparePlan, method: str, out: Path) -> Path:
    """This method's segmentor.safetensors: reused when present, else trained on the plan's budget."""
    from gkd.tools.encoders import write_student_encoder, write_teacher_encoder

    root = out / method
    final = row_segmentor(out, method)
    if final.is_file():
        _check_reusable(plan, final)
        log.info("compare: %s: reusing %s", method, final)
        return final
    t, s = plan.teacher, plan.student
    task_row = method in ("none", "student") or _is_task(method)
    if method == "teacher" and plan.teacher_segmentor:
        return Path(plan.teacher_segmentor)
    for role, spec, needed in (("teacher", t, method == "teacher"), ("student", s, task_row)):
        if needed and not spec.name:
            raise ValueError(f"row {method!r} needs {role}.name in the plan")
    if method == "teacher":
        encoder = root / "encoder.safetensors"
        if not encoder.is_file():
            write_teacher_encoder(encoder, t.name, t.checkpoint, img_size=plan.img_size, patch_size=plan.patch_size,
                                  pretrained=t.pretrained, random_init=t.random_init, **t.kwargs)
        return _segment(plan, root / "s3", encoder, {})
    if task_row:
        encoder = out / "student-init" / "encoder.safetensors"
        if not encoder.is_file():
            from gkd.models.student import is_vit_name

            write_student_encoder(encoder, s.name, img_size=plan.img_size,
                                  patch_size=plan.patch_size if is_vit_name(s.name) else None,  # CNNs: no patches
                                  checkpoint=s.checkpoint, seed=plan.seed, **s.kwargs)
        if method in ("none", "student"):
            return _segment(plan, root / "s3", encoder, {"train_encoder": method == "none"})
        teacher = Path(plan.teacher_segmentor) if plan.teacher_segmentor else row_segmentor(out, "teacher")
        return _segment(plan, root / "s3", encoder, {"method": {"name": method}, "teacher": str(teacher)})
    return _run_representation(plan, method, root)


def _check_reusable(plan: ComparePlan, segmentor: Path) -> None:
    """A finished row is reused only if it was trained on the plan's budget."""
    kind = ((read_metadata(segmentor).get("gkd_compute") or {}).get("budget") or {}).get("kind")
    amount = _lineage_budget(segmentor)
    if kind != plan.budget.kind or amount is None or not math.isclose(amount, plan.budget.amount, rel_tol=1e-6):
        raise ValueError(f"{segmentor} was trained on a budget of {amount} {kind}, the plan asks for "
                         f"{plan.budget.amount:g} {plan.budget.kind}: give another out_dir or delete that run")


def _run_representation(plan: ComparePlan, method: str, root: Path) -> Path:
    from gkd.engine.distill import train_distill

    r = plan.representation
    if len(r.shares) != 3 or any(x <= 0 for x in r.shares) or not math.isclose(sum(r.shares), 1.0, abs_tol=1e-6):
        raise ValueError(f"representation.shares must be 3 positive fractions summing to 1, got {list(r.shares)}")
    parent = None
    for stage, overlays in ((1, r.stage1), (2, r.stage2)):
        out_dir = root / f"s{stage}"
        encoder = out_dir / "encoder.safetensors"
        if not encoder.is_file():
            base = {"stage": stage, "seed": plan.seed, "out_dir": str(out_dir), "init": parent,
                    "method": {"name": method}, "budget": _budget(plan, r.shares[stage - 1])}
            cfg = load_config(DistillConfig, overlays, [*r.overrides], base=base)
            try:
                train_distill(cfg)
            finally:
                reset_accelerate_state()
        parent = str(encoder)
    return _segment(plan, root / "s3", Path(parent), {}, share=r.shares[2])


# ------------------------------------------------------------------------------------------------
# the table


def _row_kind(name: str) -> str:
    if name in METHODS:
        return f"{METHODS[name].level}-level"
    return {"teacher": "teacher (frozen VFM + decoder)", "none": "no distillation",
            "student": "student alone (frozen + decoder)"}.get(name, "run")


def compare_table(runs: Mapping[str, str | Path], results: Mapping[str, Any], baseline: str | None) -> dict[str, Any]:
    """Rows of method, budget, compute used (summed over the run's stages), mIoU per target, mean, gain.

    runs: row name → segmentor.safetensors (the report rows of `results` carry the same names).
    """
    from gkd.eval.report import target_names

    targets = target_names(results)
    by_name = {m["name"]: m for m in results["models"]}
    rows = []
    for name, path in runs.items():
        meta = read_metadata(path)
        own = meta.get("gkd_compute") or {}
        total = meta.get("gkd_compute_total") or {}
        model = by_name[name]
        miou = {t: model["datasets"].get(t, {}).get("mIoU", math.nan) for t in targets}
        mean = model.get("average", {}).get("mIoU") if len(targets) > 1 else miou[targets[0]]
        rows.append({
            "method": name, "kind": _row_kind(name), "budget_kind": own.get("budget", {}).get("kind"),
            "budget_amount": _lineage_budget(path),
            "train_seconds": total.get("train_seconds"), "train_tflops": total.get("train_tflops"),
            "steps": total.get("steps"), "images_seen": total.get("images_seen"), "stages": total.get("runs"),
            "mIoU": miou, "mean": mean, "segmentor": str(path),
        })
    base = next((r["mean"] for r in rows if r["method"] == baseline), None) if baseline else None
    for r in rows:
        r["gain"] = None if base is None or r["mean"] is None else r["mean"] - base
    return {"format": "gkd-compare/1", "suite": results["suite"]["name"], "targets": targets,
            "baseline": baseline, "rows": rows}


def _lineage_budget(path: str | Path) -> float | None:
    """The budget amounts of a run and its parents added up (a GKD row's stage 1 + 2 + 3 shares)."""
    amount, seen = 0.0, False
    p: str | None = str(path)
    while p:
        try:
            meta = read_metadata(p)
        except (OSError, ValueError):
            break
        budget = (meta.get("gkd_compute") or {}).get("budget")
        if budget:
            amount, seen = amount + float(budget["amount"]), True
        cfg = meta.get("gkd_config") or {}
        p = cfg.get("init") or cfg.get("encoder")
    return amount if seen else None


def _fmt(v: Any, digits: int = 1) -> str:
    """A float with `digits` decimals (– for None/NaN, as in the eval report); ints as they are."""
    return str(v) if isinstance(v, int) else fmt(v, digits)


def table_rows(table: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    header = ["method", "kind", "budget", "used: s", "used: TFLOPs", "steps", "images", *table["targets"], "mean",
              f"gain vs {table['baseline']}" if table["baseline"] else "gain"]
    rows = []
    for r in table["rows"]:
        budget = f"{_fmt(r['budget_amount'], 0)} {r['budget_kind']}" if r["budget_kind"] else "–"
        gain = "–" if r["gain"] is None else f"{r['gain']:+.1f}"
        rows.append([r["method"], r["kind"], budget, _fmt(r["train_seconds"], 0), _fmt(r["train_tflops"], 1),
                     _fmt(r["steps"]), _fmt(r["images_seen"]), *(_fmt(r["mIoU"][t]) for t in table["targets"]),
                     _fmt(r["mean"]), gain])
    return header, rows


def to_markdown(table: Mapping[str, Any]) -> str:
    header, rows = table_rows(table)
    lines = [f"# {table['suite']}: methods at a matched budget", "",
             "mIoU (%) per target; 'used' sums every stage of a run (a GKD row: stage 1 + 2 + 3).", "",
             *md_table(header, rows, left=2)]
    return "\n".join(lines) + "\n"


def to_csv(table: Mapping[str, Any]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["method", "kind", "budget_kind", "budget_amount", "train_seconds", "train_tflops", "steps",
                     "images_seen", *table["targets"], "mean", "gain"])
    for r in table["rows"]:
        writer.writerow([r["method"], r["kind"], r["budget_kind"], r["budget_amount"], r["train_seconds"],
                         r["train_tflops"], r["steps"], r["images_seen"], *(r["mIoU"][t] for t in table["targets"]),
                         r["mean"], r["gain"]])
    return buf.getvalue()


def plot(table: Mapping[str, Any], path: str | Path) -> Path:
    """Mean mIoU against compute used — wall-clock seconds (left) and TFLOPs (right) — as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), dpi=120, sharey=True)
    base = next((r["mean"] for r in table["rows"] if r["method"] == table["baseline"]), None)
    for ax, x, label in ((axes[0], "train_seconds", "training wall-clock (s, all stages)"),
                         (axes[1], "train_tflops", "training TFLOPs (all stages, teacher forwards included)")):
        for r in table["rows"]:
            if r[x] is None or r["mean"] is None or math.isnan(r["mean"]):
                continue
            ax.scatter(r[x], r["mean"], marker={"teacher": "*", "none": "s"}.get(r["method"], "o"), s=70)
            ax.annotate(r["method"], (r[x], r["mean"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
        if base is not None and not math.isnan(base):
            ax.axhline(base, color="grey", lw=0.8, ls="--", label=f"{table['baseline']} (baseline)")
            ax.legend(loc="best", fontsize=8)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"mean mIoU over {len(table['targets'])} target(s) (%)")
    fig.suptitle(f"{table['suite']}: mIoU vs training compute")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def write_compare(table: Mapping[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """compare.json / .md / .csv and compare.png (mIoU vs seconds and vs TFLOPs)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / COMPARE_JSON, "md": out / COMPARE_MD, "csv": out / COMPARE_CSV, "png": out / COMPARE_PNG}
    paths["json"].write_text(json.dumps(nan_to_none(table), indent=2, allow_nan=False) + "\n")
    paths["md"].write_text(to_markdown(table))
    paths["csv"].write_text(to_csv(table))
    plot(table, paths["png"])
    return paths


# ------------------------------------------------------------------------------------------------
# several seeds of one comparison


def _stat(values: Sequence[float]) -> dict[str, Any]:
    """Mean and sample standard deviation (None for one value) of the finite values, and their
    count `n` (a run without a score for a target is left out of that cell, and shown)."""
    import statistics

    vals = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else None, "n": len(vals)}


def seed_summary(tables: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Mean ± sample std per row over the seeds' `compare_table`s (seed name → table).

    A row whose segmentor is the same file in several seeds (one teacher segmentor shared by all)
    is one run, counted once."""
    if not tables:
        raise ValueError("no comparison tables to summarise")
    first = next(iter(tables.values()))
    targets, baseline = list(first["targets"]), first["baseline"]
    runs: dict[str, list[tuple[str, Mapping[str, Any]]]] = {}
    for seed, table in tables.items():
        if list(table["targets"]) != targets:
            raise ValueError(f"seed {seed}: targets {table['targets']} differ from {targets}")
        for r in table["rows"]:
            same = runs.setdefault(r["method"], [])
            if all(r["segmentor"] != other["segmentor"] for _, other in same):
                same.append((seed, r))
    rows = []
    for method, same in runs.items():
        rs = [r for _, r in same]
        rows.append({"method": method, "kind": rs[0]["kind"], "seeds": [s for s, _ in same],
                     "train_seconds": _stat([r["train_seconds"] for r in rs])["mean"],
                     "steps": _stat([r["steps"] for r in rs])["mean"],
                     "mIoU": {t: _stat([r["mIoU"][t] for r in rs]) for t in targets},
                     "mean": _stat([r["mean"] for r in rs])})
    base = next((r["mean"]["mean"] for r in rows if r["method"] == baseline), None)
    for r in rows:
        r["gain"] = None if base is None or r["mean"]["mean"] is None else r["mean"]["mean"] - base
    return {"format": "gkd-compare-seeds/1", "suite": first["suite"], "targets": targets, "baseline": baseline,
            "seeds": list(tables), "rows": rows}


def summary_markdown(summary: Mapping[str, Any]) -> str:
    def cell(stat: Mapping[str, Any], runs: int) -> str:
        if stat["mean"] is None:
            return "–"
        return (f"{stat['mean']:.1f}" + ("" if stat["std"] is None else f" ± {stat['std']:.1f}")
                + ("" if stat["n"] == runs else f" (of {stat['n']} runs)"))

    header = ["method", "kind", "runs", "used: s (mean)", "steps (mean)", *summary["targets"], "mean",
              f"gain vs {summary['baseline']}" if summary["baseline"] else "gain"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join([":--"] * 2 + ["--:"] * (len(header) - 2)) + "|"]
    for r in summary["rows"]:
        gain = "–" if r["gain"] is None else f"{r['gain']:+.1f}"
        lines.append("| " + " | ".join([r["method"], r["kind"], str(len(r["seeds"])), _fmt(r["train_seconds"], 0),
                                         _fmt(r["steps"], 0),
                                         *(cell(r["mIoU"][t], len(r["seeds"])) for t in summary["targets"]),
                                         cell(r["mean"], len(r["seeds"])), gain]) + " |")
    return "\n".join(lines) + "\n"


def write_seed_summary(runs: Mapping[str, str | Path], out_dir: str | Path) -> dict[str, Any]:
    """`seed_summary` of each seed's `<run>/compare.json` (seed name → run folder), written as
    `<out_dir>/summary.md` and `summary.json`; the summary."""
    tables = {}
    for seed, run in runs.items():
        path = Path(run) / COMPARE_JSON
        if not path.is_file():
            raise FileNotFoundError(f"seed {seed}: no {path} (that comparison has not finished)")
        tables[seed] = json.loads(path.read_text())
    summary = seed_summary(tables)
    out = Path(out_dir)
    (out / "summary.md").write_text(summary_markdown(summary))
    (out / "summary.json").write_text(json.dumps(nan_to_none(summary), indent=2) + "\n")
    return summary


def load_plan(path: str | Path | None, overrides: Sequence[str] = ()) -> ComparePlan:
    return load_config(ComparePlan, [path] if path else [], overrides)


__all__ = ["ComparePlan", "run_compare", "compare_table", "write_compare", "load_plan", "check_methods",
           "row_order", "row_segmentor", "trained_rows", "seed_summary", "summary_markdown", "write_seed_summary"]
