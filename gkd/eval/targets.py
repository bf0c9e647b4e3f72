"""Domain-generalization evaluation suites (YAML): `Suite`, `Target`, their validation and resize rules.

A suite file (shipped ones live in `configs/suites/`; any path works the same way):

    name: gta2cbm                 # optional; default: the file name
    description: GTA5 → Cityscapes, BDD100K, Mapillary
    source: gta5                  # the training domain, for the report
    mode: slide                   # slide | whole
    crop: 512                     # int or [h, w]   (slide only)
    stride: 341                   # int or [h, w]   (slide only)
    targets:
      - name: Cityscapes          # display name: a column of the report; unique
        manifest: cityscapes      # gkd.data manifest name or path
        split: val
        resize: [1024, 512]       # optional keep-ratio resize; absent: the manifest's test_resize;
                                  # null: score at the original size

Only definitions live here (no data is loaded): `gkd.eval.suite.prepare_targets` turns targets into
`PreparedTarget`s and `gkd.eval.suite.run_eval` scores checkpoints on them.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from .inference import pair

FROM_MANIFEST = "manifest"  # Target.resize sentinel: use the manifest's test_resize
MODES = ("slide", "whole")
_SUITE_KEYS = {"name", "description", "source", "mode", "crop", "stride", "targets"}
_TARGET_KEYS = {"name", "manifest", "split", "resize"}


class SuiteError(ValueError):
    """A suite file that does not validate; the message names the file and the field."""


def slugify(text: str, fallback: str) -> str:
    """File-system-safe form of `text` (`fallback` when nothing is left)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or fallback


@dataclass(frozen=True)
class Target:
    """One evaluation dataset. `resize`: (a, b) edge limits, None (original size) or FROM_MANIFEST."""

    name: str
    manifest: str
    split: str
    resize: Any = FROM_MANIFEST

    @property
    def slug(self) -> str:
        """File-system-safe form of the name (prediction folders)."""
        return slugify(self.name, "target")


@dataclass(frozen=True)
class Suite:
    name: str
    targets: tuple[Target, ...]
    source: str | None = None
    mode: str = "slide"
    crop: tuple[int, int] = (512, 512)
    stride: tuple[int, int] = (341, 341)
    description: str = ""
    path: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "description": self.description, "source": self.source, "mode": self.mode,
            "crop": list(self.crop), "stride": list(self.stride), "path": self.path,
            "targets": [{"name": t.name, "manifest": t.manifest, "split": t.split,
                         "resize": _resize_json(t.resize)} for t in self.targets],
        }


def _resize_json(resize: Any) -> Any:
    return list(resize) if isinstance(resize, tuple) else resize


@dataclass
class PreparedTarget:
    """A target with its manifest, checked root, dataset and effective resize."""

    target: Target
    manifest: Any
    root: Path
    dataset: Any
    resize: tuple[int, int] | None
    classes: list[str] = field(default_factory=list)


# --- Resize --------------------------------------------------------------------------------------

def manifest_resize(manifest: Any) -> tuple[int, int] | None:
    """The manifest's `test_resize` as (a, b) edge limits, or None."""
    value = getattr(manifest, "test_resize", None)
    if value is None:
        return None
    return pair(value if isinstance(value, int) else tuple(value), "test_resize")


def resolve_resize(resize: Any, manifest: Any) -> tuple[int, int] | None:
    """The effective resize: FROM_MANIFEST → the manifest's `test_resize`; anything else as given."""
    return manifest_resize(manifest) if resize == FROM_MANIFEST else resize


# --- Loading and validation ----------------------------------------------------------------------

def load_suite(name_or_path: str | Path | Suite) -> Suite:
    """A shipped suite by name (`gta2cbm`) or a YAML file path → validated `Suite`."""
    if isinstance(name_or_path, Suite):
        return name_or_path
    from gkd.resources import find_resource

    path = find_resource("suite", name_or_path)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise SuiteError(f"{path}: not valid YAML: {e}") from e
    return parse_suite(raw, source=str(path), default_name=path.stem)


def parse_suite(raw: Any, source: str = "<suite>", default_name: str = "suite") -> Suite:
    """Validate a suite mapping (as read from YAML); errors name `source` and the field."""
    def fail(field_name: str, msg: str) -> SuiteError:
        return SuiteError(f"{source}: {field_name}: {msg}")

    if not isinstance(raw, Mapping):
        raise SuiteError(f"{source}: a suite must be a mapping with a 'targets' list, got {type(raw).__name__}")
    unknown = sorted(set(raw) - _SUITE_KEYS)
    if unknown:
        raise fail(unknown[0], f"unknown key; allowed: {', '.join(sorted(_SUITE_KEYS))}")
    name = raw.get("name", default_name)
    if not isinstance(name, str) or not name:
        raise fail("name", f"expected a non-empty string, got {name!r}")
    mode = raw.get("mode", "slide")
    if mode not in MODES:
        raise fail("mode", f"expected one of {MODES}, got {mode!r}")
    try:
        crop = pair(raw.get("crop", 512), "crop")
    except (ValueError, TypeError) as e:
        raise fail("crop", str(e)) from e
    try:
        stride = pair(raw.get("stride", 341), "stride")
    except (ValueError, TypeError) as e:
        raise fail("stride", str(e)) from e
    if stride[0] > crop[0] or stride[1] > crop[1]:
        raise fail("stride", f"{list(stride)} exceeds crop {list(crop)}: windows would leave gaps")
    source_name = raw.get("source")
    if source_name is not None and not isinstance(source_name, str):
        raise fail("source", f"expected a string, got {source_name!r}")
    description = raw.get("description", "") or ""
    if not isinstance(description, str):
        raise fail("description", f"expected a string, got {description!r}")
    targets_raw = raw.get("targets")
    if not isinstance(targets_raw, list) or not targets_raw:
        raise fail("targets", "expected a non-empty list of {name, manifest, split[, resize]}")
    targets = tuple(_parse_target(t, f"targets[{i}]", fail) for i, t in enumerate(targets_raw))
    seen: dict[str, int] = {}
    for i, t in enumerate(targets):
        if t.name in seen:
            raise fail(f"targets[{i}].name", f"{t.name!r} is already used by targets[{seen[t.name]}]; names must be unique")
        seen[t.name] = i
    return Suite(name=name, targets=targets, source=source_name, mode=mode, crop=crop, stride=stride,
                 description=description, path=None if source.startswith("<") else source)


def _parse_target(raw: Any, where: str, fail) -> Target:
    if not isinstance(raw, Mapping):
        raise fail(where, f"expected a mapping with manifest and split, got {raw!r}")
    unknown = sorted(set(raw) - _TARGET_KEYS)
    if unknown:
        raise fail(f"{where}.{unknown[0]}", f"unknown key; allowed: {', '.join(sorted(_TARGET_KEYS))}")
    values = {}
    for key in ("manifest", "split"):
        value = raw.get(key)
        if not isinstance(value, str) or not value:
            raise fail(f"{where}.{key}", f"expected a non-empty string, got {value!r}")
        values[key] = value
    name = raw.get("name", values["manifest"])
    if not isinstance(name, (str, int)) or str(name) == "":
        raise fail(f"{where}.name", f"expected a non-empty string, got {name!r}")
    resize: Any = FROM_MANIFEST
    if "resize" in raw:
        resize = raw["resize"]
        if resize is not None and resize != FROM_MANIFEST:
            try:
                resize = pair(resize, "resize")
            except (ValueError, TypeError) as e:
                raise fail(f"{where}.resize", f"{e} (or null for the original size)") from e
    return Target(name=str(name), manifest=values["manifest"], split=values["split"], resize=resize)
