"""Resumable checkpoints (accelerate `save_state`, written atomically) and the safetensors handoff.

Resumable state lives in `<out_dir>/checkpoints/step_XXXXXXXX/`: accelerate's `save_state` files
(model weights as safetensors, optimizer, RNG) plus our `trainer_state.json`. A checkpoint is
written into `step_XXXXXXXX.tmp` and renamed when complete, so a run killed mid-write leaves the
previous checkpoint as the latest complete one.

The handoff file (`encoder.safetensors`) holds the student encoder only, with its model spec,
resolved config, code version and the parent file's hash in the safetensors header; `load_handoff`
refuses a file whose spec differs from the model it is asked to fill.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, Mapping

from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import gkd

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
            _write_text_atomic(tmp / TRAINER_STATE, json.dumps(dict(state), indent=2))
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


# ---------------------------------------------------------------------------------------------
# Handoff files
# ---------------------------------------------------------------------------------------------


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def code_version() -> str:
    """Package version plus the git commit of the source tree when there is one."""
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=Path(gkd.__file__).parent,
            capture_output=True, text=True, timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        rev = ""
    return f"{gkd.__version__}+g{rev}" if rev else gkd.__version__


def save_handoff(
    path: str | Path,
    module: nn.Module,
    spec: Mapping[str, Any],
    *,
    stage: int,
    config: Mapping[str, Any] | None = None,
    parent: str | Path | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write `module`'s weights and provenance to a safetensors file, atomically.

    Header fields: gkd_stage, gkd_spec (the model spec a loader must match), gkd_config (resolved
    run config), gkd_version, gkd_parent_sha256, and one `gkd_<key>` JSON field per `extra` item
    (e.g. the input normalisation the encoder was trained with).
    """
    path = Path(path)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}
    metadata = {
        "format": "pt",
        "gkd_stage": str(stage),
        "gkd_spec": json.dumps(dict(spec), sort_keys=True),
        "gkd_config": json.dumps(config or {}, sort_keys=True),
        "gkd_version": code_version(),
        "gkd_parent_sha256": file_sha256(parent) if parent else "",
        **{f"gkd_{k}": json.dumps(v, sort_keys=True) for k, v in (extra or {}).items()},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return path


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The provenance header of a handoff file, JSON fields decoded."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if "gkd_spec" not in meta:
        raise ValueError(f"{path} has no GKD metadata: not an encoder/segmentor handoff file")
    plain = ("gkd_stage", "gkd_version", "gkd_parent_sha256")
    out: dict[str, Any] = {k: (v if k in plain or not k.startswith("gkd_") else json.loads(v)) for k, v in meta.items()}
    out["gkd_stage"] = int(meta["gkd_stage"])
    return out


def spec_mismatch(expected: Mapping[str, Any], found: Mapping[str, Any]) -> list[str]:
    """Human-readable differences between two model specs (empty when they match)."""
    diffs = []
    for key in sorted(set(expected) | set(found)):
        a, b = expected.get(key, "<absent>"), found.get(key, "<absent>")
        if _canon(a) != _canon(b):
            diffs.append(f"{key}: model has {a!r}, file has {b!r}")
    return diffs


def _canon(value: Any) -> str:
    return json.dumps(value, sort_keys=True)  # tuples and lists compare equal


def load_handoff(path: str | Path, module: nn.Module, spec: Mapping[str, Any]) -> dict[str, Any]:
    """Fill `module` (whose spec is `spec`) from a handoff file, strictly; return its metadata."""
    meta = read_metadata(path)
    diffs = spec_mismatch(spec, meta["gkd_spec"])
    if diffs:
        raise ValueError(f"{path} was written for another model; refusing to load it:\n  " + "\n  ".join(diffs))
    state = load_file(str(path))
    own = set(module.state_dict())
    missing, unexpected = sorted(own - set(state)), sorted(set(state) - own)
    if missing or unexpected:
        raise KeyError(f"{path} does not fit the model: missing keys {missing}, unexpected keys {unexpected}")
    module.load_state_dict(state, strict=True)
    return meta


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)

