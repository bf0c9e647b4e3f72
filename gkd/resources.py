"""Find the YAML files the project ships (dataset manifests, evaluation suites, plans) by name or path.

In a source checkout or an editable install they live at the repository root (`data_manifests/`,
`configs/suites/`, `plans/`); a wheel carries copies inside the package (`gkd/_resources/...`).
"""
from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent
KINDS = {"manifest": "data_manifests", "suite": "configs/suites", "plan": "plans"}


def resource_dirs(kind: str) -> list[Path]:
    rel = KINDS[kind]
    return [d for d in (_PACKAGE.parent / rel, _PACKAGE / "_resources" / rel) if d.is_dir()]


def available(kind: str) -> list[str]:
    return sorted({p.stem for d in resource_dirs(kind) for p in d.glob("*.yaml")})


def find_resource(kind: str, name_or_path: str | Path) -> Path:
    """A shipped `<kind>` YAML by name (e.g. 'cityscapes'), or an existing file path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise FileNotFoundError(f"{kind} file not found: {path}")
        return path
    for d in resource_dirs(kind):
        candidate = d / f"{name_or_path}.yaml"
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"unknown {kind} {str(name_or_path)!r}; available: {', '.join(available(kind)) or 'none'}")
