"""Resumable training checkpoints (accelerate `save_state`, written atomically), and what a resume
must agree with.

Resumable state lives in `<out_dir>/checkpoints/step_XXXXXXXX/`: accelerate's `save_state` files
(model weights as safetensors, optimizer, RNG) plus our `config.yaml` (the resolved config the run
had when it wrote the checkpoint) and `trainer_state.json` (the Trainer's counters and, under
``"checkpoint"``, the size of every file, whether it is the final one, the launch and where
metrics.jsonl stood). A checkpoint is written into `step_XXXXXXXX.tmp` and renamed when complete, so
a run killed mid-write leaves the previous checkpoint as the latest complete one. The Trainer only
writes checkpoints whose tensors are all finite (`gkd.engine.trainer`).

`read` checks a checkpoint without loading it (its record parses, every file has the size it was
written with: a truncated or missing file is found before accelerate meets it); `restore` loads it.
A checkpoint that cannot be used is renamed `step_XXXXXXXX.unusable` once the run has resumed from an
older one (kept for inspection; `latest` and pruning ignore it).

`config_changes` compares a resumed run's config with the checkpoint's: every key but
``RESUME_HARMLESS`` must be equal, or the resumed run is not the run that was interrupted.

The files one stage hands to the next are ``gkd.handoff``'s.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from gkd.atomic import default_file_mode, write_text_atomic
from gkd.errors import GKDError

log = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step_(\d{8})$")
TRAINER_STATE = "trainer_state.json"
CONFIG = "config.yaml"
META = "checkpoint"  # trainer_state.json's entry for what the manager records itself
UNUSABLE = ".unusable"

# Keys whose change cannot alter what the run computes: logging and checkpoint cadence, trackers,
# where the run lives and how it was asked to resume. (`data.num_workers` is not among them: the
# shard reader's resume is exact only for the same worker count, and stage 3's augmentation RNG
# follows the workers.) A key matches an entry equal to it or below it (``engine.trackers.0``).
RESUME_HARMLESS = ("resume", "out_dir", "seeds", "engine.log_every", "engine.save_every", "engine.keep_last",
                   "engine.trackers", "engine.log_sample_keys", "engine.resume_changes")
ABSENT = "(absent)"


class ResumeError(GKDError):
    """A checkpoint that cannot be resumed from, or a resume the config does not allow."""


@dataclass
class Checkpoint:
    """A checkpoint on disk that `CheckpointManager.read` found complete."""

    path: Path
    state: dict[str, Any]  # the Trainer's counters
    config: dict[str, Any] | None  # the resolved config it was written under; None: written before configs were kept
    meta: dict[str, Any] = field(default_factory=dict)  # files, final, launch, metrics_offset

    @property
    def step(self) -> int:
        return int(self.state["step"])


def _step_dirs(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name))


class CheckpointManager:
    """Save, find, check and prune resumable checkpoints under `<out_dir>/checkpoints`."""

    def __init__(self, out_dir: str | Path, keep_last: int = 2):
        self.root = Path(out_dir) / "checkpoints"
        self.keep_last = max(1, keep_last)

    def complete(self) -> list[Path]:
        """The complete (renamed into place) checkpoint directories, newest first."""
        return _step_dirs(self.root)[::-1]

    def latest(self) -> Path | None:
        """The newest complete checkpoint directory, or None."""
        done = self.complete()
        return done[0] if done else None

    def save(self, accelerator, state: Mapping[str, Any], config: str = "", final: bool = False,
             metrics_offset: int | None = None) -> Path:
        """Write a checkpoint for `state["step"]` on all ranks; rename it into place on the main one.

        config: the run's resolved config (YAML); final: written by ``Trainer.finish``; metrics_offset:
        the size of metrics.jsonl at this point (a resume cuts the file back to it)."""
        final_dir = self.root / f"step_{int(state['step']):08d}"
        tmp = final_dir.with_name(final_dir.name + ".tmp")
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp), safe_serialization=True)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            write_text_atomic(tmp / CONFIG, config)
            # Sizes of every file (all ranks' RNG states included): `read` finds a truncated one cheaply.
            files = {p.relative_to(tmp).as_posix(): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
            mode = default_file_mode()
            for name in files:  # safetensors' writer creates 0600; the run's other files are 0666 & ~umask
                (tmp / name).chmod(mode)
            meta = {"files": files, "final": final, "metrics_offset": metrics_offset,
                    "launch": {"num_processes": accelerator.num_processes,
                               "mixed_precision": str(accelerator.mixed_precision)}}
            write_text_atomic(tmp / TRAINER_STATE, json.dumps({**dict(state), META: meta}, indent=2))
            if final_dir.exists():  # re-saving the same step (e.g. the final step) replaces it
                shutil.rmtree(final_dir)
            os.replace(tmp, final_dir)
            self._prune()
        accelerator.wait_for_everyone()
        return final_dir

    def read(self, path: str | Path) -> Checkpoint:
        """Check `path` without loading its tensors; ResumeError says what is wrong with it."""
        path = Path(path)
        if not path.is_dir():
            raise ResumeError(f"{path} is not a checkpoint directory")
        state_file = path / TRAINER_STATE
        if not state_file.is_file():
            raise ResumeError(f"{path} is not a complete checkpoint (no {TRAINER_STATE})")
        try:
            record = json.loads(state_file.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
            raise ResumeError(f"{state_file} is corrupt ({e})") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise ResumeError(f"{state_file} holds no step count")
        meta = record.pop(META, None) or {}
        for name, size in sorted(meta.get("files", {}).items()):
            f = path / name
            if not f.is_file():
                raise ResumeError(f"{f} is missing")
            if f.stat().st_size != size:
                raise ResumeError(f"{f} is {f.stat().st_size} bytes, {size} when written (truncated?)")
        config = None
        if (path / CONFIG).is_file():
            from omegaconf import OmegaConf

            try:
                config = OmegaConf.to_container(OmegaConf.create((path / CONFIG).read_text(encoding="utf-8")))
            except Exception as e:  # OmegaConf/YAML raise many types for a damaged file
                raise ResumeError(f"{path / CONFIG} is corrupt ({type(e).__name__}: {e})") from None
            if not isinstance(config, dict):
                raise ResumeError(f"{path / CONFIG} is not a config")
        return Checkpoint(path, record, config, meta)

    def restore(self, accelerator, ckpt: Checkpoint) -> None:
        """Load model/optimizer/RNG (and registered objects) from a checkpoint `read` accepted;
        ResumeError when accelerate cannot (a damaged file of the right size)."""
        try:
            accelerator.load_state(str(ckpt.path))
        except Exception as e:  # safetensors, pickle, zip and shape errors all mean: not loadable
            raise ResumeError(f"{ckpt.path} cannot be loaded ({type(e).__name__}: {e})") from e

    def load(self, accelerator, path: str | Path) -> dict[str, Any]:
        """Check and restore `path`; return the saved trainer state."""
        ckpt = self.read(path)
        self.restore(accelerator, ckpt)
        return ckpt.state

    def set_aside(self, path: Path, suffix: str = UNUSABLE) -> Path:
        """Rename a checkpoint out of `latest`'s and pruning's sight (main process only)."""
        target = path.with_name(path.name + suffix)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(path, target)
        return target

    def _prune(self) -> None:
        for old in _step_dirs(self.root)[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)


# ---- config comparison ---------------------------------------------------------------------------------


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted keys of a nested config; an empty section contributes no key (so adding the first
    entry to `teacher.kwargs` shows as that entry)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _covered(key: str, entries: Sequence[str]) -> bool:
    return any(key == e or key.startswith(e + ".") for e in entries)


def config_changes(old: Mapping[str, Any], new: Mapping[str, Any],
                   harmless: Sequence[str] = RESUME_HARMLESS) -> dict[str, tuple[Any, Any]]:
    """key → (old, new) for every key whose value differs, except the `harmless` ones; a key only
    one side has shows ``ABSENT`` on the other."""
    a, b = flatten(old), flatten(new)
    return {k: (a.get(k, ABSENT), b.get(k, ABSENT)) for k in sorted(a.keys() | b.keys())
            if not _covered(k, harmless) and a.get(k, ABSENT) != b.get(k, ABSENT)}


def _show(v: Any) -> str:
    return v if v is ABSENT else json.dumps(v, default=str)


def describe_changes(changes: Mapping[str, Sequence[Any]]) -> str:
    """``key: old → new; ...`` with JSON values (null, true, [0.9, 0.95]) as a message lists them."""
    return "; ".join(f"{k}: {_show(a)} → {_show(b)}" for k, (a, b) in changes.items())


def check_resume_config(ckpt: Checkpoint, config: Mapping[str, Any], accepted: Sequence[str]) -> dict[str, Any]:
    """The changes from `ckpt`'s config (and launch) to `config` that `accepted` (engine.resume_changes)
    allows, as {key: [old, new]}; ResumeError listing the others, and what to pass."""
    if ckpt.config is None:
        log.warning("%s records no config (written by an older version): the resumed config is not compared",
                    ckpt.path)
        return {}
    old, new = dict(ckpt.config), dict(config)
    if "launch" in ckpt.meta and "launch" in config:
        old["launch"] = ckpt.meta["launch"]
    else:
        new.pop("launch", None)
    changes = config_changes(old, new)
    refused = {k: v for k, v in changes.items() if not _covered(k, accepted)}
    if refused:
        listed = describe_changes(refused)
        keys = ",".join(sorted({*accepted, *refused}))
        raise ResumeError(
            f"cannot resume from {ckpt.path}: the config differs from the one it was written with ({listed}), so "
            f"the resumed run would not equal an uninterrupted one. To resume with the new values anyway pass "
            f"engine.resume_changes=[{keys}]; to start over use a new out_dir (or resume=never)")
    return {k: [a, b] for k, (a, b) in changes.items()}
