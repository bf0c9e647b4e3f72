"""Write a folder of images into webdataset tar shards plus an index JSON.

Two source layouts are recognised (``detect_layout``):

* ``class_folders`` — ImageNet's ``train/<wnid>/*.JPEG``: every sub-folder that holds images is
  a class; class index = position of the folder name in the sorted list of class folders.
* ``flat`` — images directly in the folder. When *every* file name starts with a WordNet id
  (``<wnid>_<anything>``, e.g. ``n01440764_tench.jpg``) the wnid is the class (``flat_wnid``);
  otherwise the images are unlabelled and ``cls`` is ``-1`` (``flat``).

Class indices follow the sorted class names found in the source, unless ``classes`` fixes the
list (e.g. all 1000 ImageNet wnids, so that a subset keeps the ImageNet-1k index).

No file under the source is dropped silently: a file the layout does not take (nested deeper than
it reads, not an image by its suffix, loose images beside class folders, hidden) is counted by
reason, logged with the first few paths and recorded in the index (``num_ignored``, ``ignored``);
an image that cannot be read is counted in ``num_skipped`` / ``skipped``.

Each sample is written as ``__key__`` (file stem, see ``_make_keys``), ``jpg`` (the file's
original bytes when it is a JPEG; anything else is converted to RGB JPEG) and ``cls`` (ASCII int).
Shards are ``{prefix}-000000.tar, ...``; each one is written to a temporary name and moved into
place with ``os.replace``, so a crash never leaves a half-written shard under the final name. The
index ``{prefix}-index.json`` is written last, also atomically.
"""
from __future__ import annotations

import io
import json
import logging
import os
import random
import re
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import webdataset as wds
from PIL import Image

from gkd.atomic import check_writable, write_text_atomic

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm"})
INDEX_FORMAT = "gkd-shards"
INDEX_VERSION = 1
_WNID_RE = re.compile(r"^(n\d{8})_")
_KEY_BAD_CHARS = re.compile(r"[^A-Za-z0-9_\-]")
# A fixed tar member mtime makes shards byte-identical across runs of the same input.
_TAR_MTIME = 0.0
# Why a file under the source folder was not taken (index key -> what the messages say).
IGNORED_REASONS = {
    "nested": "nested too deep",
    "not_image": "not an image",
    "outside_classes": "outside the class folders",
    "hidden": "hidden",
}
_SHOWN = 5  # paths a warning names per reason


@dataclass
class ShardIndex:
    """What a shard set holds; saved as ``{prefix}-index.json`` beside the shards.

    ``shards`` are file names relative to the index file's folder; ``counts[i]`` is the number of
    samples in ``shards[i]``.
    """

    shards: list[str]
    counts: list[int]
    classes: list[str] = field(default_factory=list)
    layout: str = "flat"
    prefix: str = "train"
    seed: int | None = 0
    shuffled: bool = True
    num_skipped: int = 0
    skipped: list[str] = field(default_factory=list)
    num_ignored: dict[str, int] = field(default_factory=dict)  # files the layout did not take, by reason
    ignored: dict[str, list[str]] = field(default_factory=dict)  # their paths (relative, the first ones)
    num_converted: int = 0
    sources: list = field(default_factory=list)  # the dataset splits the images come from (manifest, split, root)
    root: str = ""  # folder holding the shards (not saved: it is wherever the index lies)

    @property
    def num_samples(self) -> int:
        return int(sum(self.counts))

    def ignored_summary(self) -> str:
        """``3 not taken (2 nested too deep, 1 not an image)``, or ``0 not taken``."""
        return not_taken_summary(self.num_ignored)

    @property
    def shard_paths(self) -> list[str]:
        """Shard paths joined with ``root``."""
        return [os.path.join(self.root, s) for s in self.shards]

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("root")
        return {"format": INDEX_FORMAT, "version": INDEX_VERSION, "num_samples": self.num_samples,
                "num_classes": len(self.classes), **d}

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ShardIndex":
        """Read an index JSON written by ``write_shards``."""
        path = Path(path)
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
        if d.get("format") != INDEX_FORMAT:
            raise ValueError(f"{path} is not a gkd shard index (format={d.get('format')!r})")
        if len(d["shards"]) != len(d["counts"]):
            raise ValueError(f"{path}: {len(d['shards'])} shards but {len(d['counts'])} counts")
        known = {f for f in cls.__dataclass_fields__ if f != "root"}
        return cls(**{k: v for k, v in d.items() if k in known}, root=str(path.parent))


def index_path(out_dir: str | os.PathLike, prefix: str = "train") -> Path:
    """Where ``write_shards`` puts the index of ``prefix`` shards in ``out_dir``."""
    return Path(out_dir) / f"{prefix}-index.json"


# ----------------------------------------------------------------------------- source listing

def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if _is_image(p))


def detect_layout(src_dir: Path) -> str:
    """``class_folders`` if any sub-folder holds images, else ``flat_wnid`` or ``flat``."""
    subdirs = [d for d in src_dir.iterdir() if d.is_dir() and not d.name.startswith(".")]
    if any(_images_in(d) for d in subdirs):
        return "class_folders"
    files = _images_in(src_dir)
    if files and all(_WNID_RE.match(p.name) for p in files):
        return "flat_wnid"
    return "flat"


@dataclass
class NotTaken:
    """Files under a source folder that its layout does not take: ``counts[reason]`` and the first
    ``limit`` relative paths per reason (``IGNORED_REASONS``, plus ``unreadable``: image names
    that are not regular files, e.g. broken links). A hidden folder is one entry (``name/``)."""

    counts: dict[str, int] = field(default_factory=dict)
    paths: dict[str, list[str]] = field(default_factory=dict)
    limit: int = 1000

    def add(self, reason: str, rel: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        listed = self.paths.setdefault(reason, [])
        if len(listed) < self.limit:
            listed.append(rel)


def not_taken_summary(counts: dict[str, int]) -> str:
    """``3 not taken (2 nested too deep, 1 not an image)``, or ``0 not taken``."""
    parts = [f"{counts[r]} {IGNORED_REASONS.get(r, r)}" for r in IGNORED_REASONS if counts.get(r)]
    return f"{sum(counts.values())} not taken" + (f" ({', '.join(parts)})" if parts else "")


def find_not_taken(src_dir: str | os.PathLike, layout: str, limit: int = 1000) -> NotTaken:
    """Every file under ``src_dir`` that ``list_images`` does not take for ``layout``, by reason.

    Mirrors ``list_images``' rule (class folders: ``src/<class>/<image>``; flat: ``src/<image>``),
    so nothing is dropped unseen; symlinked folders are followed once."""
    out = NotTaken(limit=limit)
    depth_taken = 2 if layout == "class_folders" else 1
    seen: set[str] = set()
    stack = [("", 1)]  # (folder relative to src, '/'-terminated; depth of its files)
    while stack:
        rel_dir, depth = stack.pop()
        folder = os.path.join(src_dir, rel_dir)
        real = os.path.realpath(folder)
        if real in seen:  # a link back up the tree
            continue
        seen.add(real)
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
        subdirs = []
        for e in entries:  # DirEntry caches the file type: no stat per taken image (ImageNet: 1.28M)
            is_dir = e.is_dir()
            if e.name.startswith("."):
                out.add("hidden", rel_dir + e.name + ("/" if is_dir else ""))
            elif is_dir:
                subdirs.append((rel_dir + e.name + "/", depth + 1))
            elif os.path.splitext(e.name)[1].lower() not in IMAGE_SUFFIXES:
                out.add("not_image", rel_dir + e.name)
            elif not e.is_file():
                out.add("unreadable", rel_dir + e.name)
            elif depth == depth_taken:
                continue  # taken
            elif layout == "class_folders" and depth == 1:
                out.add("outside_classes", rel_dir + e.name)
            else:
                out.add("nested", rel_dir + e.name)
        stack += reversed(subdirs)  # depth first, in name order
    order = [*IGNORED_REASONS, "unreadable"]  # a fixed order for the index and the messages
    out.counts = {r: out.counts[r] for r in order if r in out.counts}
    out.paths = {r: sorted(out.paths[r]) for r in order if r in out.paths}
    return out


def _warn_not_taken(src: Path, layout: str, nt: NotTaken) -> None:
    reasons = {r: n for r, n in nt.counts.items() if r in IGNORED_REASONS}
    if not reasons:
        return
    parts = []
    for r, n in reasons.items():
        shown = nt.paths[r][:_SHOWN]
        parts.append(f"{n} {IGNORED_REASONS[r]}{' for the ' + layout + ' layout' if r == 'nested' else ''} "
                     f"(e.g. {', '.join(shown)}{', ...' if n > len(shown) else ''})")
    logger.warning("%s: %d file(s) not taken: %s (listed in the index under 'ignored')", src,
                   sum(reasons.values()), "; ".join(parts))


def list_images(src_dir: str | os.PathLike) -> tuple[str, list[tuple[Path, str | None]]]:
    """Return (layout, sorted list of (path, class name or None)).

    Raises FileNotFoundError for a missing folder and ValueError when it holds no images (saying
    where images lie when they are nested deeper than the layouts read).
    """
    src = Path(src_dir)
    if not src.is_dir():
        raise FileNotFoundError(f"image folder not found: {src}")
    layout = detect_layout(src)
    items: list[tuple[Path, str | None]] = []
    if layout == "class_folders":
        for d in sorted(d for d in src.iterdir() if d.is_dir() and not d.name.startswith(".")):
            items += [(p, d.name) for p in _images_in(d)]
    else:
        for p in _images_in(src):
            m = _WNID_RE.match(p.name)
            items.append((p, m.group(1) if (layout == "flat_wnid" and m) else None))
    if not items:
        nested = find_not_taken(src, layout, limit=1)
        deeper = ""
        if nested.counts.get("nested"):
            deeper = (f"; {nested.counts['nested']} images lie deeper (e.g. {nested.paths['nested'][0]}): pass "
                      "the folder that holds them directly or in class sub-folders")
        raise ValueError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found in {src}{deeper}")
    return layout, items


def _key_base(src: Path, path: Path) -> str:
    """``<folder>_<stem>`` for class folders, but just the stem when it already starts with
    ``<folder>_`` (ImageNet: ``n01440764/n01440764_10026.JPEG`` -> ``n01440764_10026``)."""
    rel = path.relative_to(src)
    stem = path.stem
    if len(rel.parts) > 1 and not stem.startswith(rel.parts[0] + "_"):
        stem = f"{rel.parts[0]}_{stem}"
    return _KEY_BAD_CHARS.sub("_", stem)


def _make_keys(src: Path, paths: Sequence[Path]) -> list[str]:
    """Unique webdataset keys (``_key_base``); characters other than letters, digits, '_' and
    '-' become '_' (webdataset splits member names at the first dot); clashes get ``-1, -2...``."""
    keys, seen = [], set()
    for p in paths:
        base = _key_base(src, p)
        key, n = base, 0
        while key in seen:  # e.g. a.jpg and a.png in one folder
            n += 1
            key = f"{base}-{n}"
        seen.add(key)
        keys.append(key)
    return keys


def _make_file_keys(src: Path, paths: Sequence[Path]) -> list[str]:
    """Keys for an explicit file list: the path relative to ``src`` without its extension,
    '/' and other characters outside ``[A-Za-z0-9_-]`` turned into '_' (names of files outside
    ``src``); clashes get ``-1, -2...`` like ``_make_keys``."""
    keys, seen = [], set()
    base_dir = src.absolute()
    for p in paths:
        try:
            rel = p.absolute().relative_to(base_dir).with_suffix("").as_posix()
        except ValueError:
            rel = p.stem
        base = _KEY_BAD_CHARS.sub("_", rel)
        key, n = base, 0
        while key in seen:
            n += 1
            key = f"{base}-{n}"
        seen.add(key)
        keys.append(key)
    return keys


# ----------------------------------------------------------------------------- image reading

def _load_image_bytes(path: Path, verify: bool) -> tuple[bytes | None, bool, str]:
    """Read one file -> (JPEG bytes or None if unreadable, converted?, error message).

    JPEG bytes are returned unchanged; other formats are decoded and re-encoded as RGB JPEG.
    ``verify`` decodes JPEGs fully (catches truncation); otherwise only the header is parsed.
    """
    try:
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as im:
            if im.format == "JPEG":
                if verify:
                    im.load()
                return data, False, ""
            buf = io.BytesIO()
            im.convert("RGB").save(buf, format="JPEG", quality=95)
            return buf.getvalue(), True, ""
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        return None, False, f"{type(exc).__name__}: {exc}"


def _load_job(args: tuple[Path, bool]) -> tuple[bytes | None, bool, str]:
    return _load_image_bytes(*args)


def _iter_loaded(paths: Sequence[Path], verify: bool, num_workers: int
                 ) -> Iterator[tuple[bytes | None, bool, str]]:
    """Load images in order, optionally in a process pool (decoding dominates the cost)."""
    jobs = [(p, verify) for p in paths]
    if num_workers <= 0:
        yield from map(_load_job, jobs)
        return
    # Executor.map submits everything at once; feeding it blocks bounds the bytes held in memory.
    block = 256 * num_workers
    with ProcessPoolExecutor(max_workers=num_workers) as pool:
        for start in range(0, len(jobs), block):
            yield from pool.map(_load_job, jobs[start:start + block], chunksize=16)


# ----------------------------------------------------------------------------- writing

class _AtomicShardSink:
    """Writes samples into consecutive ``{prefix}-%06d.tar`` shards of ``shard_size`` samples."""

    def __init__(self, out_dir: Path, prefix: str, shard_size: int) -> None:
        self.out_dir, self.prefix, self.shard_size = out_dir, prefix, shard_size
        self.names: list[str] = []
        self.counts: list[int] = []
        self._writer: wds.TarWriter | None = None
        self._tmp: Path | None = None

    def write(self, sample: dict) -> None:
        if self._writer is None:
            self._open()
        self._writer.write(sample)
        self.counts[-1] += 1
        if self.counts[-1] >= self.shard_size:
            self._close()

    def _open(self) -> None:
        name = f"{self.prefix}-{len(self.names):06d}.tar"
        self._tmp = self.out_dir / f".{name}.tmp-{os.getpid()}"
        self._writer = wds.TarWriter(open(self._tmp, "wb"), encoder=True, mtime=_TAR_MTIME)
        self.names.append(name)
        self.counts.append(0)

    def _close(self) -> None:
        writer, tmp = self._writer, self._tmp
        self._writer = self._tmp = None
        writer.close()  # closes the tar stream; the file object is ours
        writer.stream.flush()
        os.fsync(writer.stream.fileno())  # durable before it gets its final name
        writer.stream.close()
        os.replace(tmp, self.out_dir / self.names[-1])
        logger.debug("wrote %s (%d samples)", self.names[-1], self.counts[-1])

    def finish(self) -> None:
        if self._writer is not None:
            self._close()

    def abort(self) -> None:
        """Drop a half-written shard (on error)."""
        if self._writer is not None:
            try:
                self._writer.close()
                self._writer.stream.close()
            finally:
                if self._tmp is not None and self._tmp.exists():
                    self._tmp.unlink()
                self._writer = None


def _class_index(names: Iterable[str | None], classes: Sequence[str] | None) -> tuple[list[str], dict[str, int]]:
    found = sorted({n for n in names if n is not None})
    if classes is None:
        classes = found
    else:
        classes = list(classes)
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise ValueError(f"{len(unknown)} classes not in the given class list, e.g. {unknown[:5]}")
    return list(classes), {c: i for i, c in enumerate(classes)}


def _warn_stale(out_dir: Path, prefix: str, written: Sequence[str]) -> None:
    stale = sorted(set(p.name for p in out_dir.glob(f"{prefix}-*.tar")) - set(written))
    if stale:
        logger.warning("%s holds %d older %s-*.tar shards not in the new index (e.g. %s); "
                       "brace patterns may pick them up", out_dir, len(stale), prefix, stale[0])


def write_shards(
    src_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    shard_size: int = 1000,
    prefix: str = "train",
    seed: int | None = 0,
    *,
    shuffle: bool = True,
    classes: Sequence[str] | None = None,
    verify: bool = True,
    num_workers: int = 0,
    max_skipped_listed: int = 1000,
    files: Sequence[str | os.PathLike] | None = None,
    source: dict | None = None,
) -> ShardIndex:
    """Write the images of ``src_dir`` into webdataset shards in ``out_dir``.

    Args:
        src_dir: ``<root>/<class>/*.JPEG`` class folders or a flat folder of images.
        out_dir: created if missing; receives ``{prefix}-NNNNNN.tar`` and ``{prefix}-index.json``.
        shard_size: samples per shard (the last shard may hold fewer).
        seed: order of samples when ``shuffle`` (so that shards mix classes); the file order is
            sorted first, so the output depends only on the folder's content and the seed.
        classes: fixed class-name list defining the indices (default: sorted names found).
        verify: decode JPEGs fully to catch truncated files (slower); else parse headers only.
        num_workers: processes used to read/verify images (0 = in this process).
        max_skipped_listed: at most this many unreadable files are named in the index.
        files: shard exactly these image files instead of listing ``src_dir`` (e.g. the images
            of a dataset split, ``gkd.data.segmentation.manifest_image_files``). They are
            unlabelled (``cls`` -1, layout ``files``); keys are their paths relative to
            ``src_dir`` (or their names when outside it), so ``src_dir`` should be their root.
        source: what ``files`` are, recorded in the index (``gkd.eval.protocol.split_record``:
            manifest, split, root), so that evaluation can refuse targets the images came from.

    Returns:
        the ``ShardIndex`` also written to ``{prefix}-index.json`` (``root`` = ``out_dir``).
        Unreadable images are skipped, counted in ``num_skipped`` and logged.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    src, out = Path(src_dir), Path(out_dir)
    not_taken = NotTaken()
    if files is None:
        layout, items = list_images(src)
        not_taken = find_not_taken(src, layout, limit=max_skipped_listed)
        _warn_not_taken(src, layout, not_taken)
    else:
        layout, items = "files", [(Path(f), None) for f in sorted(set(map(str, files)))]
        if not items:
            raise ValueError("files is empty: nothing to shard")
    if shuffle:
        random.Random(seed).shuffle(items)
    class_list, class_to_idx = _class_index((c for _, c in items), classes)
    make_keys = _make_keys if files is None else _make_file_keys
    keys = make_keys(src, [p for p, _ in items])
    check_writable(out, "the shard folder").mkdir(parents=True, exist_ok=True)

    sink = _AtomicShardSink(out, prefix, shard_size)
    # image names that are no regular file (broken links) are unreadable images too
    skipped: list[str] = not_taken.paths.pop("unreadable", [])
    num_skipped = not_taken.counts.pop("unreadable", 0)
    for rel in skipped[:10]:
        logger.warning("skipping unreadable image %s (not a regular file)", src / rel)
    converted = 0
    try:
        loaded = _iter_loaded([p for p, _ in items], verify, num_workers)
        for (path, cname), key, (data, was_converted, err) in zip(items, keys, loaded):
            if data is None:
                if num_skipped < 10:
                    logger.warning("skipping unreadable image %s (%s)", path, err)
                skipped.append(str(path.relative_to(src)) if files is None else str(path))
                num_skipped += 1
                continue
            converted += was_converted
            label = class_to_idx[cname] if cname is not None else -1
            sink.write({"__key__": key, "jpg": data, "cls": label})
        sink.finish()
    except BaseException:
        sink.abort()
        raise
    if not sink.names:
        raise ValueError(f"none of the {len(items)} images in {src} could be read")

    index = ShardIndex(shards=sink.names, counts=sink.counts, classes=class_list, layout=layout,
                       prefix=prefix, seed=seed if shuffle else None, shuffled=shuffle,
                       num_skipped=num_skipped, skipped=skipped[:max_skipped_listed],
                       num_ignored=dict(not_taken.counts), ignored=dict(not_taken.paths), num_converted=converted,
                       sources=[dict(source)] if source else [], root=str(out))
    write_text_atomic(index_path(out, prefix), json.dumps(index.to_json(), indent=1) + "\n")
    _warn_stale(out, prefix, sink.names)
    logger.info("wrote %d samples (%d classes, layout %s) into %d shards in %s; "
                "skipped %d unreadable, %s, converted %d to JPEG", index.num_samples, len(class_list),
                layout, len(sink.names), out, num_skipped, index.ignored_summary(), converted)
    return index
