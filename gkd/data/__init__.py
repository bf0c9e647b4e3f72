"""Data: webdataset shard writer and reader, image transforms, dataset manifests and
segmentation datasets.

Names are imported lazily (PEP 562) so that ``import gkd.data`` stays cheap for the CLI:
timm and torch are only loaded when a transform or the reader is first used.
"""
from __future__ import annotations

from gkd._lazy import lazy_exports


_EXPORTS = {
    # gkd.data.shards — writer
    "write_shards": "shards",
    "ShardIndex": "shards",
    "list_images": "shards",
    "index_path": "shards",
    "find_not_taken": "shards",
    # gkd.data.wds — reader
    "build_shard_loader": "wds",
    "resolve_shards": "wds",
    "verify_shards": "wds",
    "check_shards": "wds",
    "ShardReport": "wds",
    "count_samples": "wds",
    "count_tar_samples": "wds",
    "default_steps_per_epoch": "wds",
    "ShardSet": "wds",
    "ShardStream": "wds",
    "ShardReadError": "wds",
    # gkd.data.transforms
    "build_train_transform": "transforms",
    "build_eval_transform": "transforms",
    "teacher_mean_std": "transforms",
    # gkd.data.manifest — dataset manifests (data_manifests/*.yaml)
    "load_manifest": "manifest",
    "parse_manifest": "manifest",
    "available_manifests": "manifest",
    "Manifest": "manifest",
    "ManifestError": "manifest",
    # gkd.data.segmentation — segmentation datasets
    "build_dataset": "segmentation",
    "SegDataset": "segmentation",
    # gkd.data.layout — datasets on disk (roots, split listings, label decoding) and `gkd data check`
    "resolve_root": "layout",
    "check_dataset": "layout",
    "CheckReport": "layout",
    "manifest_image_files": "layout",
    "BadSampleError": "layout",
    # gkd.data.seg_transforms — stage-3 augmentation and test-time resize
    "build_seg_train_transform": "seg_transforms",
    "build_seg_eval_transform": "seg_transforms",
    "rescale_size": "seg_transforms",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
