"""Evaluation report: `metrics.json`, `results.md`, `results.csv` from a results dict.

A results dict (what `run_eval` returns) is row-oriented, so other tools can add models:

    {"format": "gkd-eval/1",
     "suite":  {"name", "source", "mode", "crop", "stride", "targets": [{"name", "manifest", "split", "resize"}]},
     "models": [{"name", "checkpoint", "spec", "seed",
                 "protocol": {"source": {...}, "selection": {"rule", ...}, "checked_by_files": [...], ...},
                 "datasets": {<target name>: {"manifest", "split", "root", "resize", "num_images",
                                              "aAcc", "mIoU", "mAcc", "IoU": {class: %}, "Acc": {class: %}}},
                 "average": {"mIoU", "mAcc", "aAcc"}}],
     "groups": [{"name", "members": [model names], "seeds",          # optional: runs of one setup
                 "datasets": {<target>: {"mIoU": {"mean", "std", "n"}, "mAcc": …, "aAcc": …}},
                 "average": {"mIoU": {"mean", "std", "n"}, …}}]}

Numbers are percentages at full precision; undefined ones are NaN in memory and `null` in
metrics.json (strict JSON). The tables round mIoU & co. to one decimal, like the paper; "Avg" is
the mean of the unrounded per-target values. A group's std is the sample standard deviation
(n − 1) over its runs; its "Avg" is the mean ± std of the runs' own averages.
"""
from __future__ import annotations

import copy
import csv
import io
import json
import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from gkd.atomic import write_text_atomic

METRICS_JSON, RESULTS_MD, RESULTS_CSV = "metrics.json", "results.md", "results.csv"
_MISSING = "–"
METRIC_KEYS = ("mIoU", "mAcc", "aAcc")


def fmt(value: float | None, digits: int = 1, missing: str = _MISSING) -> str:
    """A percentage with `digits` decimals; `missing` for None/NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return missing
    return f"{value:.{digits}f}"


def target_names(results: Mapping[str, Any]) -> list[str]:
    return [t["name"] for t in results["suite"]["targets"]]


def main_table(results: Mapping[str, Any], missing: str = _MISSING) -> tuple[list[str], list[list[str]]]:
    """The paper-shaped table: header ['Model', target…, 'Avg'], one row of mIoU per model.

    'Avg' (the mean over targets) is present when there is more than one target.
    """
    names = target_names(results)
    with_avg = len(names) > 1
    header = ["Model", *names] + (["Avg"] if with_avg else [])
    rows = []
    for model in results["models"]:
        row = [model["name"]] + [fmt(model["datasets"].get(n, {}).get("mIoU"), missing=missing) for n in names]
        if with_avg:
            row.append(fmt(model.get("average", {}).get("mIoU"), missing=missing))
        rows.append(row)
    return header, rows


def mean_std(values: Sequence[float]) -> dict[str, Any]:
    """Mean and sample standard deviation (n − 1) of per-run values; std is NaN for a single run,
    both are NaN when a run's value is."""
    n = len(values)
    if not n or any(math.isnan(v) for v in values):
        return {"mean": math.nan, "std": math.nan, "n": n}
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else math.nan
    return {"mean": mean, "std": std, "n": n}


def seed_groups(models: Sequence[Mapping[str, Any]], groups: Mapping[str, Sequence[str]]) -> list[dict[str, Any]]:
    """Per group of runs (e.g. seeds): mean ± std of every target's metrics and of the runs' averages."""
    by_name = {m["name"]: m for m in models}
    out = []
    for name, members in groups.items():
        runs = [by_name[m] for m in members]
        out.append({
            "name": name, "members": list(members), "seeds": [r.get("seed") for r in runs],
            "datasets": {t: {k: mean_std([r["datasets"][t][k] for r in runs]) for k in METRIC_KEYS}
                         for t in runs[0]["datasets"]},
            "average": {k: mean_std([r["average"][k] for r in runs]) for k in METRIC_KEYS},
        })
    return out


def fmt_pm(stat: Mapping[str, Any] | None, missing: str = _MISSING) -> str:
    """'54.1 ± 0.3' (one decimal); a single run shows its value alone."""
    if not stat or stat.get("mean") is None or math.isnan(stat["mean"]):
        return missing
    std = stat.get("std")
    return fmt(stat["mean"]) if std is None or math.isnan(std) else f"{fmt(stat['mean'])} ± {fmt(std)}"


def group_table(results: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header ['Model', target…, 'Avg'] and one 'mean ± std' mIoU row per group."""
    names = target_names(results)
    with_avg = len(names) > 1
    header = ["Model", *names] + (["Avg"] if with_avg else [])
    rows = []
    for g in results.get("groups", []):
        row = [f"{g['name']} (n={len(g['members'])})"] + [fmt_pm(g["datasets"].get(n, {}).get("mIoU")) for n in names]
        rows.append(row + ([fmt_pm(g["average"]["mIoU"])] if with_avg else []))
    return header, rows


def md_table(header: Sequence[str], rows: Iterable[Sequence[str]], left: int = 1) -> list[str]:
    """A Markdown table's lines; the first `left` columns are left-aligned, the rest right-aligned."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join([":--"] * left + ["--:"] * (len(header) - left)) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def to_markdown(results: Mapping[str, Any]) -> str:
    """results.md: the main mIoU table, then per target a summary and per-class IoU / Acc tables."""
    suite = results["suite"]
    names = target_names(results)
    lines = [f"# {suite['name']}", ""]
    if suite.get("description"):
        lines += [suite["description"], ""]
    setup = f"{suite['mode']} inference"
    if suite["mode"] == "slide":
        setup += f", crop {suite['crop'][0]}×{suite['crop'][1]}, stride {suite['stride'][0]}×{suite['stride'][1]}"
    lines += [f"{suite.get('source') or '?'} → {', '.join(names)}. mIoU (%), {setup}, single scale, no flip.", ""]
    if results.get("groups"):
        lines += ["Mean ± sample standard deviation (n − 1) over runs; Avg: over the runs' own averages.", ""]
        lines += md_table(*group_table(results)) + ["", "Each run:", ""]
    lines += md_table(*main_table(results)) + [""]
    lines += protocol_lines(results)
    for target in suite["targets"]:
        name = target["name"]
        entries = [(m["name"], m["datasets"][name]) for m in results["models"] if name in m["datasets"]]
        if not entries:
            continue
        first = entries[0][1]
        resize = first.get("resize")
        lines += [f"## {name}", "",
                  f"`{first['manifest']}` split `{first['split']}`, {first['num_images']} images, "
                  f"resize {'×'.join(map(str, resize)) + ' (keep ratio)' if resize else 'none'}.", ""]
        lines += md_table(["Model", "aAcc", "mIoU", "mAcc"],
                           [[n, fmt(d["aAcc"]), fmt(d["mIoU"]), fmt(d["mAcc"])] for n, d in entries]) + [""]
        for key, title in (("IoU", "IoU per class (%)"), ("Acc", "Accuracy per class (%)")):
            classes = list(first[key])
            lines += [f"### {title}", ""]
            lines += md_table(["Model", *classes],
                               [[n, *(fmt(d[key].get(c)) for c in classes)] for n, d in entries]) + [""]
    return "\n".join(lines)


def protocol_lines(results: Mapping[str, Any]) -> list[str]:
    """results.md's protocol section: targets and inference, then per model its source and selection."""
    suite = results["suite"]
    if suite["mode"] == "slide":
        inference = (f"sliding window {suite['crop'][0]}×{suite['crop'][1]}, stride "
                     f"{suite['stride'][0]}×{suite['stride'][1]}")
    else:
        inference = "whole image"
    first = results["models"][0]["datasets"] if results["models"] else {}
    lines = ["## Protocol", "", f"- Inference: {inference}; single scale, no flip; scores resized back to the label size.",
             "- Targets (never read before this evaluation):"]
    for t in suite["targets"]:
        entry = first.get(t["name"], {})
        resize = entry.get("resize", t.get("resize"))
        size = f"resize {'×'.join(map(str, resize))} (keep ratio)" if isinstance(resize, list) else "original size"
        lines.append(f"  - {t['name']}: `{entry.get('dataset', t['manifest'])}` split `{t['split']}`, "
                     f"{entry.get('num_images', '?')} images, {size}")
    rows = [[m["name"], str(m.get("seed", "–")), _source_text(p), _encoder_text(p), _selection_text(p),
             _checked_text(p)] for m in results["models"] for p in [m.get("protocol") or {}]]
    lines += ["", *md_table(["Model", "Seed", "Source (training)", "Encoder in stage 3", "Model selection",
                             "Checked against the targets"], rows, left=6), ""]
    exports = [(m["name"], e) for m in results["models"] for e in m.get("submissions", [])]
    if exports:
        lines += ["Test-server exports (same inference; upload the zip):", ""]
        lines += [f"- {name}: `{e['manifest']}` split `{e['split']}`, {sum(e['counts'].values())} of {e['num_images']} "
                  f"images{'' if e.get('complete') else ' (INCOMPLETE: see its report)'} → `{e['zips'].get('all')}`"
                  for name, e in exports] + [""]
    return lines


def _source_text(p: Mapping[str, Any]) -> str:
    src = p.get("source")
    if not src:
        return "unknown (no protocol record)"
    text = f"`{src['manifest']}` split `{src['split']}`"
    if src.get("num_images") is not None:
        text += f", {src['num_images']} images"
    if src.get("fraction") not in (None, 1, 1.0):
        text += f" ({100 * src['fraction']:g} % used)"
    teacher = (p.get("teacher") or {}).get("source")
    return text + (f"; teacher segmentor: `{teacher['manifest']}` `{teacher['split']}`" if teacher else "")


def _encoder_text(p: Mapping[str, Any]) -> str:
    recipe = p.get("encoder_recipe")
    if not recipe:
        return "not recorded"
    if not recipe.get("trained"):
        return "frozen"
    extras = [f"lr ×{recipe['lr_scale']:g}" if recipe.get("lr_scale", 1) != 1 else "",
              f"drop path {recipe['drop_path']:g}" if recipe.get("drop_path") else ""]
    return "trained" + (f" ({', '.join(e for e in extras if e)})" if any(extras) else "")


def _selection_text(p: Mapping[str, Any]) -> str:
    sel = p.get("selection")
    if not sel:
        return "unknown" if not p.get("source") else "last checkpoint"
    if sel.get("rule") != "best":
        return "last checkpoint"
    limit = f", first {sel['limit']} images" if sel.get("limit") else ""
    return (f"best mIoU on `{sel['manifest']}` split `{sel['split']}`{limit}, every {sel['every']} steps: "
            f"step {sel['step']} ({fmt(sel['score'])})")


def _checked_text(p: Mapping[str, Any]) -> str:
    parts = []
    if p.get("checked_by_files"):
        parts.append("files: " + "; ".join(p["checked_by_files"]))
    if p.get("checked_by_name_only"):
        parts.append("names only (data not on this machine): " + "; ".join(p["checked_by_name_only"]))
    if p.get("unrecorded"):
        parts.append("not recorded, so not checked: " + "; ".join(p["unrecorded"]))
    return " / ".join(parts) or "nothing recorded to check"


def to_csv(results: Mapping[str, Any]) -> str:
    """results.csv: the main table (mIoU, one decimal; empty cell where undefined), then per group a
    `<group> mean` and a `<group> std` row."""
    header, rows = main_table(results, missing="")
    names = target_names(results)
    with_avg = len(names) > 1  # as main_table
    for g in results.get("groups", []):
        for key in ("mean", "std"):
            row = [f"{g['name']} {key}"] + [fmt(g["datasets"][n]["mIoU"][key], missing="") for n in names]
            rows.append(row + ([fmt(g["average"]["mIoU"][key], missing="")] if with_avg else []))
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def nan_to_none(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, Mapping):
        return {k: nan_to_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [nan_to_none(v) for v in value]
    return value


def to_json(results: Mapping[str, Any]) -> str:
    return json.dumps(nan_to_none(results), indent=2, allow_nan=False) + "\n"




def write_report(results: Mapping[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write metrics.json, results.md and results.csv into `out_dir`; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / METRICS_JSON, "md": out / RESULTS_MD, "csv": out / RESULTS_CSV}
    write_text_atomic(paths["json"], to_json(results))
    write_text_atomic(paths["md"], to_markdown(results))
    write_text_atomic(paths["csv"], to_csv(results))
    return paths


def read_results(path: str | Path) -> dict[str, Any]:
    """Load a metrics.json (file or its directory) back into a results dict, null → NaN."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_JSON
    results = json.loads(path.read_text())
    for model in results.get("models", []):
        for entry in model.get("datasets", {}).values():
            for key in ("aAcc", "mIoU", "mAcc"):
                entry[key] = math.nan if entry.get(key) is None else entry[key]
            for key in ("IoU", "Acc"):
                entry[key] = {c: math.nan if v is None else v for c, v in entry.get(key, {}).items()}
        model["average"] = {k: math.nan if v is None else v for k, v in model.get("average", {}).items()}
    for group in results.get("groups", []):
        for stats in [*group["datasets"].values(), group["average"]]:
            for stat in stats.values():
                stat.update({k: math.nan for k in ("mean", "std") if stat.get(k) is None})
    return results


def merge_results(parts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One results dict whose rows are all models of `parts` (same suite targets required)."""
    if not parts:
        raise ValueError("nothing to merge")
    merged = copy.deepcopy(dict(parts[0]))
    names = target_names(merged)
    for other in parts[1:]:
        if target_names(other) != names:
            raise ValueError(f"cannot merge results over different targets: {names} vs {target_names(other)}")
        merged["models"].extend(copy.deepcopy(list(other["models"])))
        if other.get("groups"):
            merged.setdefault("groups", []).extend(copy.deepcopy(list(other["groups"])))
    return merged
