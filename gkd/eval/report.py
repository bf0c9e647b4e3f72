"""Evaluation report: `metrics.json`, `results.md`, `results.csv` from a results dict.

A results dict (what `run_eval` returns) is row-oriented, so other tools can add models:

    {"format": "gkd-eval/1",
     "suite":  {"name", "source", "mode", "crop", "stride", "targets": [{"name", "manifest", "split", "resize"}]},
     "models": [{"name", "checkpoint", "spec",
                 "datasets": {<target name>: {"manifest", "split", "root", "resize", "num_images",
                                              "aAcc", "mIoU", "mAcc", "IoU": {class: %}, "Acc": {class: %}}},
                 "average": {"mIoU", "mAcc", "aAcc"}}]}

Numbers are percentages at full precision; undefined ones are NaN in memory and `null` in
metrics.json (strict JSON). The tables round mIoU & co. to one decimal, like the paper; "Avg" is
the mean of the unrounded per-target values.
"""
from __future__ import annotations

import copy
import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

METRICS_JSON, RESULTS_MD, RESULTS_CSV = "metrics.json", "results.md", "results.csv"
_MISSING = "–"


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
    lines += [f"{suite.get('source') or '?'} → {', '.join(names)}. mIoU (%), {setup}.", ""]
    lines += md_table(*main_table(results)) + [""]
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


def to_csv(results: Mapping[str, Any]) -> str:
    """results.csv: the main table (mIoU, one decimal; empty cell where undefined)."""
    header, rows = main_table(results, missing="")
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, Mapping):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_nan_to_none(v) for v in value]
    return value


def to_json(results: Mapping[str, Any]) -> str:
    return json.dumps(_nan_to_none(results), indent=2, allow_nan=False) + "\n"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_report(results: Mapping[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write metrics.json, results.md and results.csv into `out_dir`; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / METRICS_JSON, "md": out / RESULTS_MD, "csv": out / RESULTS_CSV}
    _write_atomic(paths["json"], to_json(results))
    _write_atomic(paths["md"], to_markdown(results))
    _write_atomic(paths["csv"], to_csv(results))
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
    return merged
