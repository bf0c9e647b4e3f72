"""Stage 3 model selection on the source domain only (`select.rule`: last | best).

`best` scores the segmentor on a source-domain validation split (`select.split` of `data.manifest`)
every `select.every` optimizer steps and after the last one, with the evaluation suites' inference
(sliding windows of the training crop, stride 2/3, the manifest's test-time resize, single scale),
keeps the weights of the best mIoU (the first on ties) and restores them before stage 3 saves.
No target domain is read: the split belongs to the training manifest, and one that shares image
files with the training split is refused before training starts.

The history and the best weights are part of the resumable checkpoint (accelerate's
`register_for_checkpointing`), so a resumed run selects exactly as an uninterrupted one.
"""
from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path
from typing import Any

from torch import nn

from gkd.eval.protocol import overlap_message, shared, split_record
from gkd.eval.visualize import prediction_panel
from gkd.tracking import log_images

log = logging.getLogger(__name__)

RULES = ("last", "best")
METRIC = "mIoU"


class Selector:
    """Evaluates and remembers; `state_dict`/`load_state_dict` make it part of the checkpoint."""

    def __init__(self, cfg: Any, train_set: Any, out_dir: Path):
        s, d = cfg.select, cfg.data
        if s.rule not in RULES:
            raise ValueError(f"select.rule must be one of {RULES}, got {s.rule!r}")
        self.rule, self.every, self.out_dir = s.rule, int(s.every), Path(out_dir)
        self.source = split_record(train_set.manifest, d.split, train_set.root, len(train_set))
        self.source["fraction"] = d.fraction
        self.history: list[list[float]] = []  # [step, score]
        self.best: dict[str, Any] | None = None  # {"step", "score", "weights"}
        self.seconds = 0.0
        self.limit = s.limit
        self.target = self.suite = None
        if s.rule == "last":
            if s.split is not None:
                raise ValueError("select.split is read only by select.rule=best (select.rule=last keeps the final "
                                 "weights and reads no validation data)")
            return
        if not s.split:
            raise ValueError("select.rule=best needs select.split: a source-domain validation split of "
                             f"data.manifest={d.manifest} (splits: {', '.join(train_set.manifest.splits)})")
        if s.split == d.split:
            raise ValueError(f"select.split={s.split} is the training split: selection needs held-out source data")
        if self.every < 1:
            raise ValueError(f"select.every must be >= 1, got {self.every}")
        self.target, self.suite = _selection_target(cfg, train_set)
        common = shared((p for p, _ in train_set.samples), (p for p, _ in self.target.dataset.samples))
        if common:
            raise ValueError(overlap_message(f"select.split={s.split} shares images with data.split={d.split}", common))

    # ---- when and what ---------------------------------------------------------------------------
    def due(self, step: int, final: bool = False) -> bool:
        """Whether the weights after `step` optimizer steps are to be scored (once per step)."""
        if self.rule != "best" or step == 0 or (self.history and self.history[-1][0] == step):
            return False
        return final or step % self.every == 0

    def evaluate(self, segmentor: nn.Module, accelerator: Any, step: int, snapshot: nn.Module) -> float:
        """Score `segmentor` on the selection split (all processes take part); keep `snapshot`'s
        weights (the trainable part of the segmentor) when the score is the best so far."""
        from gkd.eval.suite import evaluate_target

        started = time.perf_counter()
        was_training = segmentor.training
        segmentor.eval()
        panel = [] if accelerator.trackers else None  # a tracker run also gets a panel of the first images
        metric, _ = evaluate_target(segmentor, self.target, self.suite, accelerator, num_workers=0,
                                    limit=self.limit, panel=panel)
        segmentor.train(was_training)
        score = float(metric.compute()[METRIC])
        self.history.append([step, score])
        if self.best is None or score > self.best["score"]:  # NaN never wins
            self.best = {"step": step, "score": score,
                         "weights": {k: v.detach().to("cpu", copy=True) for k, v in snapshot.state_dict().items()}}
        self.seconds += time.perf_counter() - started
        accelerator.log({f"selection/{METRIC}": score}, step=step)
        if panel:
            pt = self.target
            log_images(accelerator, {"selection/panel": prediction_panel(
                panel, getattr(pt.manifest, "palette", None), len(pt.classes), pt.target.name)}, step=step)
        if accelerator.is_main_process:
            log.info("selection: step %d, %s %s %.2f (best %.2f at step %d)", step, self.target.target.name,
                     METRIC, score, self.best["score"], self.best["step"])
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "selection.json").write_text(json.dumps(self.record(), indent=2) + "\n")
        return score

    def restore_best(self, snapshot: nn.Module) -> None:
        """Load the selected weights into `snapshot` (strict: the same keys as were kept)."""
        if self.rule == "best":
            if self.best is None:
                raise RuntimeError("select.rule=best but no evaluation ran: this is a bug")
            snapshot.load_state_dict(self.best["weights"], strict=True)

    # ---- the record ---------------------------------------------------------------------------------
    def record(self) -> dict[str, Any]:
        """The protocol header's `source` and `selection` entries."""
        selection: dict[str, Any] = {"rule": self.rule}
        if self.rule == "best":
            pt = self.target
            selection.update(split_record(pt.manifest, pt.target.split, pt.root, len(pt.dataset)))
            selection.update({
                "metric": METRIC, "every": self.every, "limit": self.limit, "mode": self.suite.mode,
                "crop": list(self.suite.crop), "stride": list(self.suite.stride),
                "resize": list(pt.resize) if pt.resize else None, "seconds": round(self.seconds, 3),
                "step": self.best["step"] if self.best else None, "score": self.best["score"] if self.best else None,
                "history": self.history})
        return {"source": self.source, "selection": selection}

    # ---- accelerate checkpointing ------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history, "best": self.best, "seconds": self.seconds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history, self.best, self.seconds = copy.deepcopy(state["history"]), state["best"], state["seconds"]


def _selection_target(cfg: Any, train_set: Any) -> tuple[Any, Any]:
    """The selection split as an evaluation target + suite (inference settings of the shipped suites)."""
    from gkd.data import build_dataset
    from gkd.eval.targets import PreparedTarget, Suite, Target, manifest_resize

    s, m = cfg.select, train_set.manifest
    dataset = build_dataset(m, s.split, root=train_set.root, on_bad=cfg.data.on_bad)
    if cfg.data.on_bad == "skip":  # drop the bad images now, so each scored image is counted once
        dataset.validate(cfg.data.num_workers, decode_images=True)
    resize = manifest_resize(m)
    target = Target(name=f"{m.name} {s.split}", manifest=m.name, split=s.split, resize=resize)
    crop = int(cfg.data.crop_size)
    suite = Suite(name="selection", targets=(target,), source=m.name, mode=s.mode, crop=(crop, crop),
                  stride=(max(1, crop * 2 // 3),) * 2)
    return PreparedTarget(target, m, Path(train_set.root), dataset, resize, [str(c) for c in m.classes]), suite
