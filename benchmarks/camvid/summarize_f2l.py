"""The CamVid foundation-to-local table: mean ± sample std over the seeds of runs/camvid-f2l/seed<k>/compare.json.

    python benchmarks/camvid/summarize_f2l.py runs/camvid-f2l     → prints Markdown, writes summary.{md,json}
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

ORDER = ("student", "gkd", "proteus", "kd", "cwd", "teacher")


def _stat(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def _cell(values: list[float]) -> str:
    mean, std = _stat(values)
    return f"{mean:.1f}" if std is None else f"{mean:.1f} ± {std:.1f}"


def summarize(out: Path) -> tuple[str, dict]:
    tables = {p.parent.name: json.loads(p.read_text()) for p in sorted(out.glob("seed*/compare.json"))}
    if not tables:
        raise SystemExit(f"no seed*/compare.json under {out}")
    targets = next(iter(tables.values()))["targets"]
    rows: dict[str, dict[str, list[float]]] = {}
    for seed, table in tables.items():
        for r in table["rows"]:
            acc = rows.setdefault(r["method"], {"seeds": [], "seconds": [], "steps": [], "mean": [],
                                                **{t: [] for t in targets}})
            acc["seeds"].append(seed)
            acc["seconds"].append(r["train_seconds"])
            acc["steps"].append(r["steps"])
            acc["mean"].append(r["mean"])
            for t in targets:
                acc[t].append(r["mIoU"][t])
    header = ["method", "seeds", "train s (mean)", "steps (mean)", *targets, "mean"]
    lines = ["| " + " | ".join(header) + " |", "|:--|--:|--:|--:|" + "--:|" * (len(targets) + 1)]
    summary = {"targets": targets, "seeds": list(tables), "rows": {}}
    for method in sorted(rows, key=lambda m: ORDER.index(m) if m in ORDER else len(ORDER)):
        r = rows[method]
        n = len(set(r["seeds"]))
        if method == "teacher":  # one teacher segmentor shared by every seed: report it once
            r = {k: v[:1] for k, v in r.items()}
            n = 1
        lines.append("| " + " | ".join([method, str(n), f"{statistics.fmean(r['seconds']):.0f}",
                                         f"{statistics.fmean(r['steps']):.0f}",
                                         *(_cell(r[t]) for t in targets), _cell(r["mean"])]) + " |")
        summary["rows"][method] = {k: v for k, v in r.items()}
    md = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(md)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return md, summary


if __name__ == "__main__":
    print(summarize(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/camvid-f2l"))[0])
