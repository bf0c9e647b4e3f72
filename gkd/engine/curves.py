"""The curves of a stage-1/2 run, drawn from its metrics.jsonl into one PNG at the end of the run."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["read_metrics", "plot_distill_curves"]

_PANELS = (
    ("loss terms (MSE)", ("loss_token", "loss_fea", "loss_patch"), "log"),
    ("cosine(prediction, target)", ("diag_cos_cls", "diag_cos_patch"), "linear"),
    ("patch-token spread: student / teacher", ("diag_spread_ratio",), "linear"),
    ("QSD attention on its own position (× N)", ("diag_attn_self",), "log"),
)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file (a torn last line, from a killed run, is skipped)."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def plot_distill_curves(metrics: str | Path, out: str | Path, title: str = "") -> Path | None:
    """Loss terms, head cosines, spread ratio and (if probed) probe mIoU against the optimizer step → PNG.

    Returns the PNG's path, or None (logged) when matplotlib is not installed or nothing was logged.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no curves PNG (pip install matplotlib)")
        return None
    records = read_metrics(metrics)
    windows = [r for r in records if "event" not in r and "loss" in r]
    probes = [r for r in records if r.get("event") == "probe"]
    if not windows:
        log.warning("%s has no logged steps: no curves PNG", metrics)
        return None
    panels = list(_PANELS) + ([("probe mIoU (held-out source split, %)", (), "linear"),
                               ("fidelity R² to the teacher (held-out)", ("fidelity_r2",), "linear")] if probes else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    steps = [r["step"] for r in windows]
    student = [r for r in probes if r.get("model") == "student"]
    for ax, (name, keys, scale) in zip(axes[0], panels):
        for key in keys:
            if key == "fidelity_r2":
                ax.plot([r["step"] for r in student], [r.get(key, float("nan")) for r in student], "o-",
                        label="student")
            elif any(key in r for r in windows):
                ax.plot(steps, [r.get(key, float("nan")) for r in windows], label=key.removeprefix("diag_"))
        if not keys:  # the probe panel
            ax.plot([r["step"] for r in student], [r["probe_miou"] for r in student], "o-", label="student")
            for r in probes:
                if r.get("model") == "teacher":
                    ax.axhline(r["probe_miou"], color="grey", ls="--", label="teacher")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step")
        ax.set_yscale(scale)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
