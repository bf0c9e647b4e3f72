"""The safetensors handoff: the file one stage writes and the next reads (``encoder.safetensors``,
``segmentor.safetensors``).

A handoff file holds one module's weights, and in its header the model spec a loader must match,
the resolved run config, the code version, the parent file's hash and ``gkd_<key>`` JSON fields
(input normalisation, compute, protocol records). ``load_handoff`` refuses a file whose spec differs
from the model it is asked to fill. Bottom layer: models, engine, eval and tools import it; reading
a header (``read_metadata``) needs no torch.

Integrity. The header field ``gkd_content_sha256`` is the sha256 of

1. the header itself without that field, as JSON with sorted keys and no spaces
   (``json.dumps(header, sort_keys=True, separators=(",", ":"))``: the tensor table of names, dtypes,
   shapes and offsets, and the ``__metadata__`` fields), followed by
2. the data section: every byte of the file after the header.

Every reader here (``read_metadata``, ``load_handoff``, ``load_tensors``) checks it once per file
version per process, hashing the file through one read-only mapping; a mismatch is a
``HandoffError`` naming the file. Files written before the field existed load with one warning that
they cannot be verified. A file that is not a handoff at all (empty, truncated, a directory, a
pickle, random bytes) is a ``HandoffError`` too, and a missing one a ``FileNotFoundError``: never a
bare safetensors error.

The bytes are safetensors' serialiser's; the file goes through ``gkd.atomic`` (normal file mode, no
temporary left behind), see ``write_safetensors``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
import stat
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Iterable, Mapping

import gkd
from gkd.atomic import atomic_path
from gkd.errors import HandoffError

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["save_handoff", "load_handoff", "load_tensors", "read_metadata", "is_handoff", "write_safetensors", "spec_mismatch",
           "file_sha256", "code_version", "DIGEST_KEY"]

_log = logging.getLogger(__name__)

DIGEST_KEY = "gkd_content_sha256"
_HEADER_LIMIT = 100_000_000  # safetensors' own limit on the header length
_PLAIN = ("gkd_stage", "gkd_version", "gkd_parent_sha256", DIGEST_KEY)  # header fields that are not JSON
_REMEDY = "re-copy it, or re-run the stage that wrote it"

# (real path, device, inode, size, mtime_ns, ctime_ns) of the file versions already verified in this process, and
# the paths already warned about: a file is hashed once however many readers look at it.
_verified: set[tuple[str, int, int, int, int, int]] = set()
_warned: set[str] = set()


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


# ------------------------------------------------------------------------------------------------
# writing


def _digest(header: Mapping[str, Any], data: Iterable[Any]) -> str:
    """``gkd_content_sha256`` of a header (the field itself left out) and the data-section buffers."""
    meta = {k: v for k, v in (header.get("__metadata__") or {}).items() if k != DIGEST_KEY}
    canon = {**{k: v for k, v in header.items() if k != "__metadata__"}, "__metadata__": meta}
    h = hashlib.sha256(json.dumps(canon, sort_keys=True, separators=(",", ":")).encode())
    for buf in data:
        h.update(buf)
    return h.hexdigest()


def write_safetensors(path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> Path:
    """Write `tensors` and string `metadata` as a safetensors file with ``gkd_content_sha256`` added,
    atomically; return the path.

    The bytes are safetensors' own (``safetensors.torch.save``), serialised twice: the digest of the
    first (header without the field, data section) goes into the second's header, whose data section
    is the same. They are written through ``gkd.atomic``, not ``save_file``, whose writer (0.8) goes
    through a hidden 0600 temporary of its own that a killed save leaves behind."""
    from safetensors.torch import save

    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    blob = save(cpu, metadata=dict(metadata))
    n = int.from_bytes(blob[:8], "little")
    digest = _digest(json.loads(blob[8:8 + n]), [memoryview(blob)[8 + n:]])
    blob = save(cpu, metadata={**metadata, DIGEST_KEY: digest})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_bytes(blob)
    return path


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
    run config), gkd_version, gkd_parent_sha256, one `gkd_<key>` JSON field per `extra` item
    (e.g. the input normalisation the encoder was trained with) and gkd_content_sha256 (see the
    module docstring).
    """
    metadata = {
        "format": "pt",
        "gkd_stage": str(stage),
        "gkd_spec": json.dumps(dict(spec), sort_keys=True),
        "gkd_config": json.dumps(config or {}, sort_keys=True),
        "gkd_version": code_version(),
        "gkd_parent_sha256": file_sha256(parent) if parent else "",
        **{f"gkd_{k}": json.dumps(v, sort_keys=True) for k, v in (extra or {}).items()},
    }
    return write_safetensors(path, module.state_dict(), metadata)


# ------------------------------------------------------------------------------------------------
# reading


def _not_safetensors(path: Path, head: bytes, why: str) -> HandoffError:
    """The error for a file that is no safetensors file, saying what it looks like where we can tell."""
    if head.startswith(b"PK\x03\x04"):
        what = "a zip archive, as torch.save writes (.pt/.pth)"
    elif head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        what = "a pickle (an older torch.save file?)"
    else:
        return HandoffError(f"{path} is not a safetensors handoff file ({why}); {_REMEDY}")
    return HandoffError(
        f"{path} is not a safetensors handoff file: it is {what}. Handoff files are written by the gkd stages "
        f"(re-run the stage); a student's torch.save state dict becomes an encoder file with "
        f"`gkd student-encoder MODEL OUT --checkpoint {path}`"
    )


def _check_table(path: Path, header: Any, data_len: int, head: bytes) -> None:
    """The header is a tensor table whose offsets tile the data section exactly."""
    if not isinstance(header, dict) or not isinstance(header.get("__metadata__", {}), dict):
        raise _not_safetensors(path, head, "its header is not a safetensors tensor table")
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise _not_safetensors(path, head, f"its header entry {name!r} has no data offsets")
        spans.append(offsets)
    end = 0
    for begin, stop in sorted(spans):
        if begin != end or stop < begin:
            raise HandoffError(f"{path}: its header's tensor offsets do not tile the data (at byte {begin}); "
                               f"the file is damaged: {_REMEDY}")
        end = stop
    if end > data_len:
        raise HandoffError(f"{path} is truncated: its header describes {end} bytes of tensor data, the file holds "
                           f"{data_len}; it was cut short while written or copied: {_REMEDY}")
    if end < data_len:
        raise HandoffError(f"{path} has {data_len - end} bytes after its tensor data; the file is damaged: {_REMEDY}")


def _read_header(path: Path, f: BinaryIO, size: int) -> tuple[dict[str, Any], int]:
    """The parsed header of the open file `f` and where its data section starts."""
    head = f.read(8)
    if size == 0:
        raise HandoffError(f"{path} is empty (0 bytes): the write or copy of it did not finish; {_REMEDY}")
    if size < 8:
        raise HandoffError(f"{path} is truncated: {size} bytes, shorter than any safetensors header; {_REMEDY}")
    n = int.from_bytes(head, "little")
    if not 2 <= n <= _HEADER_LIMIT:
        raise _not_safetensors(path, head, "its first 8 bytes are no header length")
    raw = f.read(n)
    if raw and not raw.startswith(b"{"):
        raise _not_safetensors(path, head, "no JSON header after the header length")
    if len(raw) < n:
        raise HandoffError(f"{path} is truncated: it ends inside its {n}-byte header; {_REMEDY}")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise HandoffError(f"{path}: its header is not valid JSON ({e}); the file is damaged: {_REMEDY}") from None
    _check_table(path, header, size - 8 - n, head)
    return header, 8 + n


def _verify(path: Path, f: BinaryIO, st: os.stat_result, header: Mapping[str, Any], data_start: int) -> None:
    """Check ``gkd_content_sha256`` (once per file version); warn once for a handoff file that has none."""
    real = os.path.realpath(path)
    key = (real, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if key in _verified:
        return
    meta = header.get("__metadata__") or {}
    expected = meta.get(DIGEST_KEY)
    if expected is None:
        if "gkd_spec" in meta and real not in _warned:  # a plain weights file has no digest to check
            _warned.add(real)
            _log.warning("%s has no content digest (written before gkd recorded one): its tensors cannot be "
                         "verified; re-run the stage that wrote it for a file that can", path)
        return
    # one read of the file, through the page cache, hashed in place (the file is never empty here)
    with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm, memoryview(mm) as view:
        got = _digest(header, [view[data_start:]])
    if got != expected:
        raise HandoffError(f"{path}: its contents changed after it was written (sha256 {got[:16]}…, recorded "
                           f"{expected[:16]}…): the file is damaged; {_REMEDY}")
    _verified.add(key)


def _scan(path: str | Path, verify: bool) -> dict[str, Any]:
    """The header of a safetensors file, checked (see the module docstring); clean errors only."""
    path = Path(path)
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise FileNotFoundError(f"handoff file not found: {path}") from None
    except IsADirectoryError:
        f = None
    if f is None or stat.S_ISDIR(os.fstat(f.fileno()).st_mode):
        if f is not None:
            f.close()
        inside = [path / n for n in ("segmentor.safetensors", "encoder.safetensors") if (path / n).is_file()]
        hint = f"; did you mean {inside[0]}?" if inside else ""
        raise HandoffError(f"{path} is a directory, not a handoff file{hint}")
    with f:
        st = os.fstat(f.fileno())
        header, data_start = _read_header(path, f, st.st_size)
        if verify:
            _verify(path, f, st, header, data_start)
    return header


def is_handoff(path: str | Path) -> bool:
    """True for a gkd handoff file, False for a plain safetensors weights file; a damaged or
    unreadable file is the ``HandoffError`` of ``read_metadata``."""
    return "gkd_spec" in (_scan(path, verify=True).get("__metadata__") or {})


def read_metadata(path: str | Path, *, verify: bool = True) -> dict[str, Any]:
    """The provenance header of a handoff file, JSON fields decoded.

    The file's content digest is checked first (once per file version and process; ``verify=False``
    reads the header alone), so a damaged file fails here whichever reader looks at it first."""
    meta = _scan(path, verify).get("__metadata__") or {}
    if "gkd_spec" not in meta:
        raise HandoffError(f"{path} has no GKD metadata: a plain safetensors file, not an encoder.safetensors or "
                           "segmentor.safetensors written by a gkd stage")
    out: dict[str, Any] = {}
    for k, v in meta.items():
        try:
            out[k] = v if k in _PLAIN or not k.startswith("gkd_") else json.loads(v)
        except (TypeError, ValueError):
            raise HandoffError(f"{path}: its header field {k} is not valid JSON; the file is damaged: "
                               f"{_REMEDY}") from None
    try:
        out["gkd_stage"] = int(meta["gkd_stage"])
    except (KeyError, TypeError, ValueError):
        raise HandoffError(f"{path}: its header has no valid gkd_stage; the file is damaged: {_REMEDY}") from None
    return out


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file (CPU), after the checks of ``read_metadata``: the content digest
    when the file has one (a plain safetensors weights file has none and loads without a warning)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    _scan(path, verify=True)
    try:
        return load_file(str(path), device="cpu")
    except SafetensorError as e:  # what our header checks do not cover, e.g. a shape that does not fit its bytes
        raise HandoffError(f"{path}: safetensors cannot read it ({e}); the file is damaged: {_REMEDY}") from None


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
    state = load_tensors(path)
    own = set(module.state_dict())
    missing, unexpected = sorted(own - set(state)), sorted(set(state) - own)
    if missing or unexpected:
        raise KeyError(f"{path} does not fit the model: missing keys {missing}, unexpected keys {unexpected}")
    module.load_state_dict(state, strict=True)
    return meta
