"""Print the CamVid mini-benchmark table from runs/bench-camvid/{camvid.pipeline.json,eval/metrics.json}
(`gkd pipeline plans/camvid.yaml`: the stage times and the report)."""
from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path


def main(out: Path) -> None:
    seconds: dict[str, dict[str, float]] = defaultdict(dict)
    for entry in json.loads((out / "camvid.pipeline.json").read_text())["stages"]:
        method, _, stage = entry["name"].rpartition("-")  # gkd-s1 → (gkd, s1); none-s3; eval
        if entry.get("seconds") is None:
            continue
        if entry["stage"] in ("1", "2", "3"):
            seconds[method][f"stage{stage[1:]}"] = float(entry["seconds"])
        elif entry["stage"] == "eval":
            seconds["all"]["eval"] = float(entry["seconds"])
    models = json.loads((out / "eval" / "metrics.json").read_text())["models"]
    targets = list(models[0]["datasets"])
    keys = {"no distillation": "none", "GKD": "gkd", "Proteus": "proteus"}
    print("| method | stage 1 (s) | stage 2 (s) | stage 3 (s) | total (s) | "
          + " | ".join(f"{t} mIoU" for t in targets) + " |")
    print("|:--|" + "--:|" * (4 + len(targets)))
    for model in models:
        t = seconds[keys.get(model["name"], model["name"])]
        cells = [f"{t[s]:.0f}" if s in t else "–" for s in ("stage1", "stage2", "stage3")]
        cells.append(f"{sum(t.values()):.0f}")
        cells += [f"{model['datasets'][x]['mIoU']:.1f}" for x in targets]
        print(f"| {model['name']} | " + " | ".join(cells) + " |")
    print(f"\nevaluation of the three models: {seconds['all'].get('eval', float('nan')):.0f} s")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/bench-camvid"))
