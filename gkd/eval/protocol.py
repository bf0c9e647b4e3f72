"""The domain-generalization protocol: which data a run saw, and the check that no target is among it.

Stage 3 records in the segmentor's header (`gkd_protocol`) the source split it trained on and,
with `select.rule=best`, the source split it selected the checkpoint on (dataset roots resolved to
absolute paths at training time). It carries its encoder's record (stages 1-2: the dataset splits
their shards were written from by `gkd data shard --manifest`, and the parent encoder's record) and,
for task-level runs, its teacher segmentor's.

`check_targets` is what `gkd eval` runs before any model is loaded: a target that is a split the
run trained or selected on (same manifest and split name), or that shares image files with one
(compared by resolved real path, so links and `..` do not hide a file), is a `ProtocolError`
naming a few of the shared files. When a recorded root is no longer on disk the file comparison is
impossible; the names are still compared and the report says which uses were checked by name only.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

log = logging.getLogger(__name__)

SHOWN = 5  # shared files listed in an error


class ProtocolError(ValueError):
    """An evaluation that would read data the run used for training or model selection."""


@dataclass(frozen=True)
class SplitUse:
    """A split a run read before evaluation: `role` is training | selection | stage-N distillation
    (prefixed `teacher ` for the teacher segmentor of a task-level run); `root` is the absolute dataset
    root, or None if unknown."""

    role: str
    manifest: str  # the manifest's name
    split: str
    root: str | None
    manifest_ref: str  # what the run's config named (name or path), to reload it

    def describe(self) -> str:
        return f"{self.role} split `{self.split}` of `{self.manifest}`"


def image_files(manifest: Any, split: str, root: str | Path | None) -> set[str]:
    """Real paths of a split's image files (labels not needed)."""
    from gkd.data import manifest_image_files

    return {os.path.realpath(p) for p in manifest_image_files(manifest, split, root)}


def shared(a: Iterable[str | Path], b: Iterable[str | Path]) -> list[str]:
    """Sorted real paths present in both collections."""
    return sorted({os.path.realpath(p) for p in a} & {os.path.realpath(p) for p in b})


def overlap_message(what: str, files: Sequence[str]) -> str:
    shown = ", ".join(files[:SHOWN]) + (f", … ({len(files) - SHOWN} more)" if len(files) > SHOWN else "")
    return f"{what}: {len(files)} shared file(s): {shown}"


def split_record(manifest: Any, split: str, root: Path, num_images: int) -> dict[str, Any]:
    """How stage 3 records a split it read (the protocol header's `source` / `selection` entries)."""
    return {"manifest": manifest.name, "manifest_file": str(manifest.path) if manifest.path else None,
            "split": split, "root": str(Path(root).resolve()), "num_images": num_images}


def split_uses(metadata: Mapping[str, Any]) -> list[SplitUse]:
    """The splits a segmentor's run (and its teacher's) read, from its header. Files written before the
    protocol record existed fall back to the resolved config's data section (root possibly relative)."""
    protocol = metadata.get("gkd_protocol")
    if isinstance(protocol, Mapping):
        return _uses_from_protocol(protocol, "")
    data = (metadata.get("gkd_config") or {}).get("data") or {}
    if not data.get("manifest") or not data.get("split"):
        return []
    manifest = _manifest_name(data["manifest"])
    root = str(Path(data["root"]).resolve()) if data.get("root") else None
    return [SplitUse("training", manifest, data["split"], root, data["manifest"])]


def _uses_from_protocol(protocol: Mapping[str, Any], prefix: str) -> list[SplitUse]:
    """Stage 3: `source`, `selection`, `teacher` (its segmentor's record), `encoder` (the encoder's);
    stages 1-2: `images` (the shards' dataset splits) and `parent` (the parent encoder's record)."""
    records = [("training", protocol.get("source")), ("selection", protocol.get("selection"))]
    if "images" in protocol:
        records += [(f"stage-{protocol.get('stage', '?')} distillation", r) for r in protocol["images"] or []]
    uses = []
    for role, rec in records:
        if isinstance(rec, Mapping) and rec.get("split"):
            ref = rec.get("manifest_file") or rec["manifest"]
            uses.append(SplitUse(prefix + role, rec["manifest"], rec["split"], rec.get("root"), ref))
    for key, deeper in (("teacher", "teacher "), ("encoder", prefix), ("parent", prefix)):
        if isinstance(protocol.get(key), Mapping):
            uses += _uses_from_protocol(protocol[key], deeper)
    return uses


def _manifest_name(ref: str) -> str:
    try:
        from gkd.data import load_manifest

        return load_manifest(ref).name
    except (OSError, ValueError):
        return str(ref)


def check_targets(checkpoint: str | Path, metadata: Mapping[str, Any], prepared: Sequence[Any],
                  listed: dict[Any, Any] | None = None) -> dict[str, Any]:
    """Refuse targets the run trained or selected on; return the protocol entry of the report.

    `prepared`: `gkd.eval.targets.PreparedTarget`s (target, manifest, dataset with `.samples`).
    `listed`: a dict shared by the calls of one evaluation, so that runs of one setup (seeds) list
    each split's files once.
    Raises ProtocolError listing every violation (target, the use it collides with, shared files).
    """
    listed = {} if listed is None else listed
    for pt in prepared:
        if ("target", pt.target.name) not in listed:
            listed["target", pt.target.name] = {os.path.realpath(img) for img, _ in getattr(pt.dataset, "samples", ())}
    uses = split_uses(metadata)
    problems: list[str] = []
    by_file, by_name = [], []
    for use in uses:
        key = ("use", use.manifest_ref, use.split, use.root)
        if key not in listed:
            listed[key] = _use_files(use)
        files = listed[key]
        (by_file if files is not None else by_name).append(use.describe())
        for pt in prepared:
            what = f"target {pt.target.name!r} (split `{pt.target.split}` of `{pt.manifest.name}`)"
            if pt.manifest.name == use.manifest and pt.target.split == use.split:
                problems.append(f"{what} is the {use.describe()} of {checkpoint}")
            elif files is not None:
                common = sorted(files & listed["target", pt.target.name])
                if common:
                    problems.append(overlap_message(f"{what} shares images with the {use.describe()} of {checkpoint}",
                                                    common))
    if problems:
        raise ProtocolError("the suite would evaluate on data the run used before evaluation (the protocol "
                            "allows source-only training and model selection):\n  " + "\n  ".join(problems))
    protocol = dict(metadata.get("gkd_protocol") or {})
    if not protocol and uses:
        protocol = {"source": {"manifest": uses[0].manifest, "split": uses[0].split, "root": uses[0].root}}
    return {**protocol, "checked_by_files": by_file, "checked_by_name_only": by_name, "known": bool(uses),
            "unrecorded": _unrecorded(protocol, "")}


def _unrecorded(protocol: Mapping[str, Any], prefix: str) -> list[str]:
    """Data the lineage read that no record names (so no check could cover it), for the report."""
    out = []
    if "encoder" in protocol and not protocol["encoder"]:
        out.append(f"{prefix}encoder's distillation data (not in its file)")
    if "images" in protocol and not protocol["images"]:
        out.append(f"{prefix}stage-{protocol.get('stage', '?')} distillation images (shards without a dataset record)")
    for key, deeper in (("teacher", "teacher's "), ("encoder", prefix), ("parent", prefix)):
        if isinstance(protocol.get(key), Mapping):
            out += _unrecorded(protocol[key], deeper)
    return out


def _use_files(use: SplitUse) -> set[str] | None:
    """The use's image files, or None when its data is not on disk here (names are compared instead)."""
    if not use.root or not Path(use.root).is_dir():
        log.warning("%s: root %s is not on this machine; compared by manifest and split name only",
                    use.describe(), use.root)
        return None
    try:
        return image_files(use.manifest_ref, use.split, use.root)
    except (OSError, KeyError, ValueError) as e:
        log.warning("%s: cannot list its files (%s); compared by manifest and split name only", use.describe(), e)
        return None
