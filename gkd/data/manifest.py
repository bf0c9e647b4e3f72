"""Dataset manifests: one YAML file per dataset describing its on-disk layout and label encoding.

A manifest is found by name (``data_manifests/<name>.yaml``, via ``gkd.resources``) or by path, and
read into a validated, immutable ``Manifest``. Every error names the manifest file and the field.

Fields (``type: dataset`` — everything explicit; the shipped manifests use it)::

    name: cityscapes
    type: dataset                # or `folder`, see below
    description: free text       # optional
    layout: free text            # optional: the on-disk layout, printed by `gkd data check`
    default_root: cityscapes     # root = $GKD_DATA_ROOT/<default_root> unless a root is given
    root: /data/cs               # optional; relative paths are relative to the manifest file
    image_suffix: _leftImg8bit.png          # str or list of str (a file must end with one)
    label_suffix: _gtFine_labelIds.png
    splits:                      # split -> one part or a list of parts (their union)
      train: {images: leftImg8bit/train, labels: gtFine/train}
      val_night:
        - images: rgb_anon/night/val
          labels: gt/night/val
          include: ["GOPR*"]     # optional fnmatch patterns on the pairing key
    label_encoding: ids          # ids (single-channel values) | palette (P-mode indices) | rgb
    classes: [road, sidewalk, ...]          # train-id order
    palette: [[128, 64, 128], ...]          # one RGB colour per class
    label_map: {7: 0, 8: 1, ...}            # raw value -> train id; rgb: {"255,255,255": 0}
    ignore_values: [0, 1, 2, ...]           # raw values that become ignore_index
    unlisted: error              # error (default): a value neither mapped nor ignored is
                                 # "outside the map"; ignore: such values become ignore_index
    ignore_index: 255
    test_resize: [1024, 512]     # keep-ratio (long, short) bound at test time, or null
    raw_names: {0: unlabeled, ...}          # optional: names of raw values (documentation)

Pairing: every file under a part's image folder (recursively) whose name ends with an image
suffix has the key ``relative path minus suffix``; its label is ``<label folder>/<key><label
suffix>``. ``images``/``labels`` may also be a list of alternative folders: the first that exists
under the root is used (Mapillary ships ``validation/labels`` in v1.1/v1.2 archives but
``validation/v1.2/labels`` in the v2.0 archive).

``type: folder`` is the short form for user datasets (e.g. ``../shared/data/camvid``): defaults
``image_suffix: [.jpg, .jpeg, .png]``, ``label_suffix: .png``, ``label_encoding: ids``, a missing
``label_map`` is the identity on ``0..len(classes)-1``, a missing ``palette`` is generated, and a
split may be just a name (``splits: [train, val]`` means ``images/<split>`` + ``labels/<split>``).
"""
from __future__ import annotations

import colorsys
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from gkd.resources import find_resource

TYPES = ("dataset", "folder")
ENCODINGS = ("ids", "palette", "rgb")
UNLISTED = ("error", "ignore")
_FOLDER_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_TOP_FIELDS = {
    "name", "type", "description", "layout", "default_root", "root", "image_suffix",
    "label_suffix", "splits", "label_encoding", "classes", "palette", "label_map",
    "ignore_values", "unlisted", "ignore_index", "test_resize", "raw_names",
}
_PART_FIELDS = {"images", "labels", "include"}
_RGB_KEY = re.compile(r"^\s*(\d{1,3})\s*,\s*(\d{1,3})\s*,\s*(\d{1,3})\s*$")


class ManifestError(ValueError):
    """A manifest is malformed; the message names the file and the field."""


# ----------------------------------------------------------------------------- data classes

@dataclass(frozen=True)
class SplitPart:
    """One (image folder, label folder) pair of a split; folders are relative to the root.

    ``images``/``labels`` hold alternatives (the first existing one is used).
    ``include``: fnmatch patterns on the pairing key; empty = everything.
    """

    images: tuple[str, ...]
    labels: tuple[str, ...]
    include: tuple[str, ...] = ()


@dataclass(frozen=True, eq=False)
class Manifest:
    """A validated dataset manifest (see the module docstring for the YAML fields).

    Mappings are plain dicts so that datasets holding a manifest pickle into DataLoader workers;
    treat them as read-only.

    ``label_map`` keys are raw label values; with ``label_encoding == "rgb"`` a colour (r, g, b) is
    the integer ``r << 16 | g << 8 | b`` (``pack_rgb``). ``ignore_values`` uses the same keys.
    """

    name: str
    type: str
    default_root: str
    image_suffixes: tuple[str, ...]
    label_suffix: str
    splits: Mapping[str, tuple[SplitPart, ...]]
    label_encoding: str
    classes: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    label_map: Mapping[int, int]
    ignore_values: frozenset[int]
    unlisted: str = "error"
    ignore_index: int = 255
    test_resize: tuple[int, int] | None = None
    description: str = ""
    layout: str = ""
    root: Path | None = None
    raw_names: Mapping[int, str] = field(default_factory=dict)
    path: Path | None = None  # the YAML file it was read from (None when built in code)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def split_names(self) -> list[str]:
        return list(self.splits)

    def format_raw(self, value: int) -> str:
        """A raw value as written in the manifest (``"R,G,B"`` for rgb labels)."""
        return format_rgb(value) if self.label_encoding == "rgb" else str(value)

    def source(self) -> str:
        """Where this manifest came from, for messages."""
        return str(self.path) if self.path is not None else f"manifest {self.name!r}"


def pack_rgb(r: int, g: int, b: int) -> int:
    """(r, g, b) -> one int, the key of an rgb colour in ``Manifest.label_map``."""
    return (int(r) << 16) | (int(g) << 8) | int(b)


def format_rgb(value: int) -> str:
    return f"{(value >> 16) & 255},{(value >> 8) & 255},{value & 255}"


# ----------------------------------------------------------------------------- loading

def load_manifest(name_or_path: "str | os.PathLike | Manifest") -> Manifest:
    """Read and validate a manifest given by name (``data_manifests/<name>.yaml``) or path.

    Raises FileNotFoundError for an unknown name/missing file and ``ManifestError`` (a
    ValueError) naming the file and field for invalid content. A ``Manifest`` passes through.
    """
    if isinstance(name_or_path, Manifest):
        return name_or_path
    path = find_resource("manifest", name_or_path)
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as exc:
        raise ManifestError(f"{path}: not valid YAML: {exc}") from exc
    return parse_manifest(data, path)


def parse_manifest(data: Any, path: Path | None = None) -> Manifest:
    """Validate a manifest already read into python objects (``path`` is used in messages)."""
    return _Parser(data, path).parse()


class _Parser:
    def __init__(self, data: Any, path: Path | None) -> None:
        self.data, self.path = data, path
        self.where = str(path) if path is not None else "<manifest>"

    def fail(self, fld: str, msg: str) -> ManifestError:
        return ManifestError(f"{self.where}: field '{fld}': {msg}")

    # -- small typed getters
    def _str(self, key: str, default: str | None = None, required: bool = True) -> str | None:
        v = self.data.get(key, default)
        if v is None:
            if required:
                raise self.fail(key, "is required")
            return None
        if not isinstance(v, str) or not v.strip():
            raise self.fail(key, f"must be a non-empty string, got {v!r}")
        return v

    def _str_list(self, key: str, v: Any) -> tuple[str, ...]:
        items = [v] if isinstance(v, str) else v
        if not isinstance(items, list) or not items or not all(isinstance(s, str) and s for s in items):
            raise self.fail(key, f"must be a non-empty string or list of strings, got {v!r}")
        return tuple(items)

    def _int(self, key: str, v: Any, lo: int | None = None, hi: int | None = None) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise self.fail(key, f"must be an integer, got {v!r}")
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise self.fail(key, f"{v} is outside [{lo}, {hi}]")
        return v

    def _color(self, key: str, v: Any) -> tuple[int, int, int]:
        if not isinstance(v, (list, tuple)) or len(v) != 3:
            raise self.fail(key, f"a colour must be [r, g, b], got {v!r}")
        return tuple(self._int(key, c, 0, 255) for c in v)  # type: ignore[return-value]

    def _raw_key(self, key: str, v: Any, encoding: str) -> int:
        """A raw label value: an int (ids/palette) or an "R,G,B" string / [r, g, b] (rgb)."""
        if encoding == "rgb":
            if isinstance(v, str):
                m = _RGB_KEY.match(v)
                if not m or any(int(c) > 255 for c in m.groups()):
                    raise self.fail(key, f"an rgb key must look like \"255,0,0\", got {v!r}")
                return pack_rgb(*map(int, m.groups()))
            return pack_rgb(*self._color(key, v))
        return self._int(key, v, 0, 2**31 - 1)

    # -- the whole manifest
    def parse(self) -> Manifest:
        if not isinstance(self.data, dict):
            raise ManifestError(f"{self.where}: a manifest must be a YAML mapping, got "
                                f"{type(self.data).__name__}")
        unknown = sorted(set(map(str, self.data)) - _TOP_FIELDS)
        if unknown:
            raise self.fail(unknown[0], f"unknown field (known: {', '.join(sorted(_TOP_FIELDS))})")
        d = self.data
        name = self._str("name")
        mtype = self._str("type", "dataset")
        if mtype not in TYPES:
            raise self.fail("type", f"must be one of {TYPES}, got {mtype!r}")
        folder = mtype == "folder"

        encoding = self._str("label_encoding", "ids" if folder else None)
        if encoding not in ENCODINGS:
            raise self.fail("label_encoding", f"must be one of {ENCODINGS}, got {encoding!r}")
        if folder and encoding == "rgb":
            raise self.fail("label_encoding", "a `folder` manifest has single-channel labels "
                                              "(ids or palette); use `type: dataset` for rgb")

        classes = d.get("classes")
        if (not isinstance(classes, list) or not classes
                or not all(isinstance(c, str) and c for c in classes)):
            raise self.fail("classes", f"must be a non-empty list of class names, got {classes!r}")
        if len(set(classes)) != len(classes):
            raise self.fail("classes", "class names must be unique")
        num_classes = len(classes)

        ignore_index = self._int("ignore_index", d.get("ignore_index", 255), 0, 2**31 - 1)
        if ignore_index < num_classes:
            raise self.fail("ignore_index", f"{ignore_index} collides with a train id "
                                            f"(there are {num_classes} classes)")

        palette = self._palette(d.get("palette"), num_classes, folder)
        label_map = self._label_map(d.get("label_map"), encoding, num_classes, folder)
        ignore_values = self._ignore_values(d.get("ignore_values", []), encoding)
        both = sorted(set(label_map) & ignore_values)
        if both:
            raise self.fail("ignore_values", f"value {self._fmt(both[0], encoding)} is also in "
                                             "label_map")
        unlisted = self._str("unlisted", "error")
        if unlisted not in UNLISTED:
            raise self.fail("unlisted", f"must be one of {UNLISTED}, got {unlisted!r}")

        if "image_suffix" in d:
            image_suffixes = self._str_list("image_suffix", d["image_suffix"])
        elif folder:
            image_suffixes = _FOLDER_IMAGE_SUFFIXES
        else:
            raise self.fail("image_suffix", "is required")
        label_suffix = self._str("label_suffix", ".png" if folder else None)

        root = d.get("root")
        if root is not None:
            root = Path(self._str("root")).expanduser()
            if not root.is_absolute() and self.path is not None:
                root = self.path.parent / root
        raw_names = d.get("raw_names") or {}
        if not isinstance(raw_names, dict):
            raise self.fail("raw_names", f"must be a mapping raw value -> name, got {raw_names!r}")
        raw_names = {self._raw_key("raw_names", k, encoding): str(v) for k, v in raw_names.items()}

        return Manifest(
            name=name, type=mtype,
            default_root=self._str("default_root", name if folder else None),
            image_suffixes=image_suffixes, label_suffix=label_suffix,
            splits=self._splits(d.get("splits"), folder),
            label_encoding=encoding, classes=tuple(classes), palette=palette,
            label_map=label_map, ignore_values=frozenset(ignore_values),
            unlisted=unlisted, ignore_index=ignore_index,
            test_resize=self._test_resize(d.get("test_resize")),
            description=str(d.get("description") or ""), layout=str(d.get("layout") or ""),
            root=root, raw_names=raw_names, path=self.path)

    @staticmethod
    def _fmt(value: int, encoding: str) -> str:
        return format_rgb(value) if encoding == "rgb" else str(value)

    def _palette(self, v: Any, num_classes: int, folder: bool) -> tuple[tuple[int, int, int], ...]:
        if v is None:
            if not folder:
                raise self.fail("palette", "is required")
            return default_palette(num_classes)
        if not isinstance(v, list) or len(v) != num_classes:
            raise self.fail("palette", f"must list one [r, g, b] per class ({num_classes}), got "
                                       f"{len(v) if isinstance(v, list) else repr(v)}")
        return tuple(self._color("palette", c) for c in v)

    def _label_map(self, v: Any, encoding: str, num_classes: int, folder: bool) -> dict[int, int]:
        if v is None:
            if not folder:
                raise self.fail("label_map", "is required")
            return {i: i for i in range(num_classes)}
        if not isinstance(v, dict) or not v:
            raise self.fail("label_map", f"must be a non-empty mapping raw value -> train id, got {v!r}")
        out: dict[int, int] = {}
        for k, t in v.items():
            raw = self._raw_key("label_map", k, encoding)
            if raw in out:
                raise self.fail("label_map", f"raw value {k!r} is listed twice")
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < num_classes:
                raise self.fail("label_map", f"{k!r} -> {t!r}: a train id must be an integer in "
                                             f"[0, {num_classes - 1}] (ignored values go in "
                                             "ignore_values)")
            out[raw] = t
        return out

    def _ignore_values(self, v: Any, encoding: str) -> set[int]:
        if v is None:
            return set()
        if not isinstance(v, list):
            raise self.fail("ignore_values", f"must be a list of raw values, got {v!r}")
        return {self._raw_key("ignore_values", x, encoding) for x in v}

    def _test_resize(self, v: Any) -> tuple[int, int] | None:
        if v is None:
            return None
        if isinstance(v, int) and not isinstance(v, bool):
            v = [v, v]
        if not isinstance(v, list) or len(v) != 2:
            raise self.fail("test_resize", f"must be [long, short], an int or null, got {v!r}")
        a, b = (self._int("test_resize", x, 1) for x in v)
        return (max(a, b), min(a, b))

    def _splits(self, v: Any, folder: bool) -> dict[str, tuple[SplitPart, ...]]:
        if folder and isinstance(v, list) and all(isinstance(s, str) for s in v):
            v = {s: {"images": f"images/{s}", "labels": f"labels/{s}"} for s in v}
        if not isinstance(v, dict) or not v:
            raise self.fail("splits", f"must be a non-empty mapping split -> folders, got {v!r}")
        out = {}
        for name, spec in v.items():
            key = f"splits.{name}"
            if folder and spec is None:
                spec = {"images": f"images/{name}", "labels": f"labels/{name}"}
            parts = spec if isinstance(spec, list) else [spec]
            if not parts:
                raise self.fail(key, "has no parts")
            out[str(name)] = tuple(self._part(key, p) for p in parts)
        return out

    def _part(self, key: str, p: Any) -> SplitPart:
        if not isinstance(p, dict):
            raise self.fail(key, f"a split part must be a mapping with images/labels, got {p!r}")
        unknown = sorted(set(map(str, p)) - _PART_FIELDS)
        if unknown:
            raise self.fail(f"{key}.{unknown[0]}", f"unknown field (known: {sorted(_PART_FIELDS)})")
        for req in ("images", "labels"):
            if req not in p:
                raise self.fail(f"{key}.{req}", "is required")
        include = p.get("include") or []
        return SplitPart(images=self._str_list(f"{key}.images", p["images"]),
                         labels=self._str_list(f"{key}.labels", p["labels"]),
                         include=self._str_list(f"{key}.include", include) if include else ())


def default_palette(n: int) -> tuple[tuple[int, int, int], ...]:
    """``n`` well-separated colours (golden-ratio hues) for manifests without a palette."""
    out = []
    for i in range(n):
        r, g, b = colorsys.hsv_to_rgb((i * 0.618033988749895) % 1.0, 0.65, 0.95)
        out.append((round(r * 255), round(g * 255), round(b * 255)))
    return tuple(out)


def available_manifests() -> list[str]:
    """Names of the manifests shipped in ``data_manifests/``."""
    from gkd.resources import available
    return available("manifest")
