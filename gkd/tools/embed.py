"""``gkd embed``: encoder features of image files as one safetensors file.

``embed_paths(checkpoint, inputs, out, output="tokens"|"maps", size=None)`` loads an encoder (or a
segmentor: its frozen encoder) with ``gkd.load`` and embeds each image of ``inputs`` (files and/or
folders, ``collect_images`` of ``gkd predict``), one at a time, with ``embed`` of ``gkd.api``:

* tokens: ``patch`` [N,C] and ``cls`` [C] per image (the student's final-norm tokens at its own
  input size; images are resized to it);
* maps: ``feat4``, ``feat8``, ``feat16``, ``feat32`` [C,H/s,W/s] per image (the decoder inputs), at
  the image's size, or at ``size`` (h, w) when given.

Tensor names: when every image gives tensors of the same shapes they are stacked, image i at row
i (``patch`` [B,N,C], ``feat4`` [B,C,H/4,W/4], ...); otherwise ``<name>.<i>`` per image. The header
metadata (all strings) holds ``gkd_images`` (JSON list of the image paths, in row/index order),
``gkd_stems``, ``gkd_output``, ``gkd_stacked`` ("true"/"false"), ``gkd_size`` (JSON [h, w] or null),
``gkd_input_norm`` (applied before the encoder), ``gkd_source`` / ``gkd_source_sha256`` (the model
file), ``gkd_skipped`` (JSON list of [path, reason] of unreadable images, which are skipped).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import torch

_log = logging.getLogger(__name__)

__all__ = ["EmbedSummary", "embed_paths", "TOKEN_NAMES"]

TOKEN_NAMES = ("patch", "cls")


@dataclass
class EmbedSummary:
    """What ``embed_paths`` wrote: the file, its tensor shapes and the skipped (image, reason)s."""

    path: Path
    output: str
    images: list[Path] = field(default_factory=list)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    stacked: bool = True
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    def format(self) -> str:
        how = ("stacked: " + ", ".join(f"{k} {list(v)}" for k, v in self.shapes.items()) if self.stacked
               else f"one set per image (<name>.<i>; sizes differ), {len(self.shapes)} tensors")
        lines = [f"wrote {self.output} of {len(self.images)} image(s) to {self.path} ({how})"]
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)} unreadable image(s):")
            lines += [f"  {p}: {r}" for p, r in self.skipped]
        return "\n".join(lines)


def embed_paths(
    checkpoint: str | Path,
    inputs: str | Path | Iterable[str | Path],
    out: str | Path,
    *,
    output: str = "tokens",
    size: Sequence[int] | None = None,
    device: str | torch.device | None = None,
    recursive: bool = False,
) -> EmbedSummary:
    """Embed every image of ``inputs`` with the encoder in ``checkpoint``; write ``out`` (.safetensors).

    output: "tokens" or "maps" (see the module docstring). size: (h, w) to resize every image to
    first (tokens: must be the student's input size, the default). device: default CPU.
    """
    from gkd.api import OUTPUTS, load
    from gkd.atomic import check_writable
    from gkd.data.layout import BadSampleError
    from gkd.data.segmentation import read_image
    from gkd.handoff import file_sha256, write_safetensors

    from .predict import collect_images

    if output not in OUTPUTS:
        raise ValueError(f"unknown output {output!r}; expected one of {OUTPUTS}")
    size = None if size is None else (int(size[0]), int(size[1]))
    images = collect_images(inputs, recursive=recursive)  # input errors before the model loads
    check_writable(Path(out).parent, "the output folder")  # before the model loads and runs
    model = load(checkpoint, device=device)
    per_image: list[dict[str, torch.Tensor]] = []
    summary = EmbedSummary(path=Path(out), output=output)
    stems: list[str] = []
    for path, stem in images:
        try:
            image = read_image(path)
        except BadSampleError as e:
            _log.warning("skipping unreadable image %s: %s", path, e)
            summary.skipped.append((path, str(e)))
            continue
        result = model.embed(image.unsqueeze(0), output=output, size=size)
        if output == "tokens":
            tensors = {"patch": result.patch[0], "cls": result.cls[0]}
        else:
            from gkd.api import MAP_NAMES

            tensors = {name: m[0] for name, m in zip(MAP_NAMES, result)}
        per_image.append(tensors)
        summary.images.append(path)
        stems.append(stem)
    if not per_image:
        raise ValueError("no readable image to embed: " + "; ".join(f"{p}: {r}" for p, r in summary.skipped))
    shapes = {k: tuple(v.shape) for k, v in per_image[0].items()}
    summary.stacked = all({k: tuple(v.shape) for k, v in t.items()} == shapes for t in per_image)
    if summary.stacked:
        out_tensors = {k: torch.stack([t[k] for t in per_image]) for k in shapes}
    else:
        out_tensors = {f"{k}.{i}": v for i, t in enumerate(per_image) for k, v in t.items()}
    summary.shapes = {k: tuple(v.shape) for k, v in out_tensors.items()}
    metadata = {
        "gkd_images": json.dumps([str(p) for p in summary.images]),
        "gkd_stems": json.dumps(stems),
        "gkd_output": output,
        "gkd_stacked": "true" if summary.stacked else "false",
        "gkd_size": json.dumps(list(size) if size is not None else None),
        "gkd_input_norm": json.dumps(model.input_norm),
        "gkd_source": str(checkpoint),
        "gkd_source_sha256": file_sha256(checkpoint),
        "gkd_skipped": json.dumps([[str(p), r] for p, r in summary.skipped]),
    }
    write_safetensors(out, out_tensors, metadata)
    return summary
