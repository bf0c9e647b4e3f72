"""Resumable training checkpoints (accelerate `save_state`, written atomically).

Resumable state lives in `<out_dir>/checkpoints/step_XXXXXXXX/`: accelerate's `save_state` files
(model weights as safetensors, optimizer, RNG) plus our `trainer_state.json`. A checkpoint is
written into `step_XXXXXXXX.tmp` and renamed when complete, so a run killed mid-write leaves the
previous checkpoint as the latest complete one.

The files one stage hands to the next are ``gkd.handoff``'s.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any, Mapping

from gkd.atomic import write_text_atomic


log = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step_(\d{8})$")
TRAINER_STATE = "trainer_state.json"


class CheckpointManager:
    """Save, find and prune resumable checkpoints under `<out_dir>/checkpoints`."""

    def __init__(self, out_dir: str | Path, keep_last: int = 2):
        self.root = Path(out_dir) / "checkpoints"
        self.keep_last = max(1, keep_last)

    def latest(self) -> Path | None:
        """The newest complete checkpoint directory, or None."""
        if not self.root.is_dir():
            return None
        done = sorted(p for p in self.root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name))
        return done[-1] if done else None

    def save(self, accelerator, state: Mapping[str, Any]) -> Path:
        """Write a checkpoint for `state["step"]` on all ranks; rename it into place on the main one."""
        final = self.root / f"step_{int(state['step']):08d}"
        tmp = final.with_name(final.name + ".tmp")
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp), safe_serialization=True)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            write_text_atomic(tmp / TRAINER_STATE, json.dumps(dict(state), indent=2))
            if final.exists():  # re-saving the same step (e.g. the final step) replaces it
                shutil.rmtree(final)
            os.replace(tmp, final)
            self._prune()
        accelerator.wait_for_everyone()
        return final

    def load(self, accelerator, path: str | Path) -> dict[str, Any]:
        """Restore model/optimizer/RNG state from `path`; return the saved trainer state."""
        path = Path(path)
        state_file = path / TRAINER_STATE
        if not state_file.is_file():
            raise FileNotFoundError(f"{path} is not a complete checkpoint (no {TRAINER_STATE})")
        accelerator.load_state(str(path))
        return json.loads(state_file.read_text())

    def _prune(self) -> None:
        done = sorted(p for p in self.root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name))
        for old in done[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)


