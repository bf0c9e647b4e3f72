"""The safetensors handoff: the file one stage writes and the next reads (``encoder.safetensors``,
``segmentor.safetensors``).

A handoff file holds one module's weights, and in its header the model spec a loader must match,
the resolved run config, the code version, the parent file's hash and ``gkd_<key>`` JSON fields
(input normalisation, compute, protocol records). ``load_handoff`` refuses a file whose spec differs
from the model it is asked to fill. Bottom layer: models, engine, eval and tools import it; reading
a header (``read_metadata``) needs no torch.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from safetensors import safe_open

import gkd
from gkd.atomic import atomic_path

if TYPE_CHECKING:
    from torch import nn

__all__ = ["save_handoff", "load_handoff", "read_metadata", "spec_mismatch", "file_sha256", "code_version"]




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
    from safetensors.torch import save_file

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
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The provenance header of a handoff file, JSON fields decoded."""
    with safe_open(str(path), framework="numpy") as f:  # the header only: no torch needed
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
    from safetensors.torch import load_file

    state = load_file(str(path))
    own = set(module.state_dict())
    missing, unexpected = sorted(own - set(state)), sorted(set(state) - own)
    if missing or unexpected:
        raise KeyError(f"{path} does not fit the model: missing keys {missing}, unexpected keys {unexpected}")
    module.load_state_dict(state, strict=True)
    return meta
