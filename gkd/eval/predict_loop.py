"""The batched prediction loop over a dataset, shared by evaluation (`gkd.eval.suite.evaluate_target`)
and the test-server export (`gkd.eval.submission.export_submission`).

Samples are dicts with an 'image' [3,H,W] in [0,1]; a DataLoader batch keeps them apart (images of
one dataset may differ in size) and runs of consecutive same-size images are stacked and scored
with `gkd.eval.inference.predict` under the process state's mixed precision, if it has one.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Iterator, Sequence

import torch

from .inference import predict


def process_state(log_with: Sequence[str] = (), project_dir: str | None = None) -> Any:
    """accelerate's PartialState: rank, world size, device; `wait_for_everyone`. With trackers
    (`log_with`), an Accelerator on the same processes that logs to them from `project_dir`.

    A multi-process launch on a machine without CUDA must ask for CPU explicitly, or accelerate
    falls back to independent single processes that would each score everything.
    """
    from accelerate import Accelerator, PartialState

    multi = int(os.environ.get("WORLD_SIZE", "1")) > 1
    use_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    cpu = use_cpu or (multi and not torch.cuda.is_available())
    if log_with:
        return Accelerator(cpu=cpu, log_with=list(log_with), project_dir=project_dir)
    return PartialState(cpu=cpu)


def collate_list(batch: list[dict]) -> list[dict]:
    """Keep samples apart: images of one dataset may differ in size."""
    return batch


def same_size_runs(samples: list[dict]) -> list[list[dict]]:
    """Runs of consecutive samples whose images have the same size (so they stack into one batch)."""
    runs: list[list[dict]] = []
    for sample in samples:
        if runs and runs[-1][0]["image"].shape == sample["image"].shape:
            runs[-1].append(sample)
        else:
            runs.append([sample])
    return runs


def predict_dataset(model: Any, dataset: Any, indices: Sequence[int], state: Any, *, mode: str, resize: Any,
                    crop: Any, stride: Any, num_classes: int, batch_size: int = 1, num_workers: int = 2,
                    desc: str = "", keep: Callable[[dict], bool] | None = None,
                    ) -> Iterator[tuple[list[dict], torch.Tensor]]:
    """Score the samples `indices` of `dataset` (this process's share) in batches.

    Yields (run, scores) per run of same-size images: the samples and their scores [B,K,H,W] on
    `state.device`. `keep(sample)`, called for every sample of a loader batch before any of them is
    scored, drops the samples it returns False for (it may also raise). A progress bar (main
    process only, labelled `desc`) counts the images.
    """
    from torch.utils.data import DataLoader, Subset
    from tqdm.auto import tqdm

    if not indices:
        return
    autocast = getattr(state, "autocast", None) or contextlib.nullcontext
    loader = DataLoader(Subset(dataset, list(indices)), batch_size=batch_size, shuffle=False,
                        num_workers=num_workers, collate_fn=collate_list)
    bar = tqdm(total=len(indices), desc=desc, unit="img", disable=not state.is_main_process)
    for batch in loader:
        samples = [s for s in batch if keep is None or keep(s)]
        for run in same_size_runs(samples):
            images = torch.stack([s["image"] for s in run]).to(state.device)
            with autocast():  # the accelerator's mixed precision, if it has one
                scores = predict(model, images.float(), mode=mode, resize=resize, crop=crop, stride=stride,
                                 num_classes=num_classes)
            yield run, scores
        bar.update(len(batch))
    bar.close()
