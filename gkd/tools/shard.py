"""`gkd data shard` and a plan's shard stage: images, or a dataset split's images, as webdataset shards."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional


def shard_images(src: str | Path, out: str | Path, manifest: Optional[str] = None, split: str = "train",
                 **kwargs: Any) -> Any:
    """Write the images under `src` as shards in `out` (``gkd.data.write_shards`` kwargs); with
    `manifest`, the images of its `split` (`src` is the dataset root), and the split recorded in the
    index so that ``gkd eval`` can refuse a target the shards distil on. Returns the ShardIndex."""
    from gkd.data import write_shards

    files = source = None
    if manifest:
        from gkd.data import load_manifest, manifest_image_files
        from gkd.eval.protocol import split_record

        files = manifest_image_files(manifest, split, root=src)
        source = split_record(load_manifest(manifest), split, src, len(files))
    return write_shards(src, out, files=files, source=source, **kwargs)
