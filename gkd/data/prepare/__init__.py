"""`gkd data prepare <dataset>`: raw downloads → folders that a shipped manifest reads, plus a JSON report.

Each preparer takes the raw dataset folder `src` (as the official archives extract) and an output
folder `out`, writes a manifest-compatible layout into `out` (or, for datasets whose raw layout is
already what the manifest reads, only checks it), and returns a `PrepareReport`: counts per split,
every skipped or altered file with the reason, the manifest to read `out` with, and notes.
`prepare_dataset` dispatches by name and writes the report to `out/prepare_report.json`.

A raw folder whose dataset version cannot be recognised is a `PrepareError` that says what was found.

Modules: `base` (report, error, registry, shared file helpers), one per dataset family:
`mapillary`, `gta5`, `cityscapes` (Cityscapes classes; layout checks of cityscapes, acdc,
bdd100k), `isprs` (potsdam_rgb, potsdam_irrg, vaihingen_irrg). Importing this package
registers every preparer.
"""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from gkd.data.prepare import cityscapes, gta5, isprs, mapillary  # noqa: F401  (importing them registers their preparers)
from gkd.data.prepare.base import (IGNORE, PREPARERS, REPORT_NAME, Preparer, PrepareError, PrepareReport,
                                   register)
from gkd.data.prepare.mapillary import MAPILLARY_CLASSES

__all__ = ["IGNORE", "MAPILLARY_CLASSES", "PREPARERS", "REPORT_NAME", "PrepareError", "PrepareReport",
           "prepare_dataset", "preparer_options", "register"]


def prepare_dataset(name: str, src: str | Path, out: str | Path, **options: Any) -> PrepareReport:
    """Run the preparer `name` on `src` into `out`; writes `out/prepare_report.json`.

    An option the preparer does not take is a PrepareError naming the options it does take.
    """
    if name not in PREPARERS:
        raise PrepareError(f"no preparer for {name!r}; known: {', '.join(sorted(PREPARERS))}")
    src, out = Path(src), Path(out)
    _check_options(name, PREPARERS[name], options)
    if not src.is_dir():
        raise FileNotFoundError(f"{name}: raw dataset folder not found: {src}")
    report = PREPARERS[name](src, out, **options)
    report.write(out / REPORT_NAME)
    return report


def preparer_options(fn: Preparer) -> list[str]:
    """The options (keyword arguments after src, out) a preparer takes."""
    params = list(inspect.signature(fn).parameters.values())[2:]
    return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def _check_options(name: str, fn: Preparer, options: dict[str, Any]) -> None:
    takes = preparer_options(fn)
    unknown = [k for k in options if k not in takes]
    if unknown:
        flags = ", ".join("--" + k.replace("_", "-") for k in unknown)
        accepted = ", ".join("--" + k.replace("_", "-") for k in takes) or "no options"
        raise PrepareError(f"{name}: {flags} does not apply to this dataset (it takes: {accepted})")
