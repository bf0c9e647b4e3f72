"""Experiment trackers through accelerate: TensorBoard, Weights & Biases and MLflow.

Each writes under the run folder unless the user points it elsewhere: TensorBoard event files in
`OUT/gkd/`, W&B runs in `OUT/wandb/` (offline with `WANDB_MODE=offline`), MLflow a local SQLite
store `OUT/mlflow.db` with its artifacts in `OUT/mlartifacts/` (or the server `MLFLOW_TRACKING_URI`
names). A resumed run continues the same W&B and MLflow runs: their ids are kept in
`OUT/trackers.json`.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from gkd.config import ConfigError

log = logging.getLogger(__name__)

# tracker → the modules it imports (all must be installed) and the pyproject extra that installs them
TRACKERS: dict[str, tuple[tuple[str, ...], str]] = {
    "tensorboard": (("tensorboard",), "tensorboard"),
    "wandb": (("wandb",), "wandb"),
    "mlflow": (("mlflow", "sqlalchemy", "alembic"), "mlflow"),  # the SQLite store needs the last two
}
IDS_FILE = "trackers.json"


def check_trackers(names: Sequence[str], key: str = "engine.trackers") -> list[str]:
    """The tracker names, checked: each known and installed (else a ConfigError naming the extra)."""
    names = [str(n) for n in names]
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise ConfigError(f"{key}: unknown tracker(s) {', '.join(unknown)}; choose from {', '.join(TRACKERS)}")
    for name in names:
        missing = [m for m in TRACKERS[name][0] if importlib.util.find_spec(m) is None]
        if missing:
            raise ConfigError(f"{key}: {name} needs {', '.join(missing)}, which is not installed: "
                              f"pip install -e '.[{TRACKERS[name][1]}]'")
    if len(set(names)) != len(names):
        raise ConfigError(f"{key}: {names} names a tracker twice")
    return names


def start_trackers(accelerator: Any, project: str, config: Mapping[str, Any], out_dir: Path,
                   resumed_at: int | None = None) -> None:
    """`accelerator.init_trackers` with every tracker writing under `out_dir` (main process).

    resumed_at: the step of the checkpoint a run resumes from. The W&B / MLflow runs recorded in
    `out_dir/trackers.json` are continued, and TensorBoard discards what the killed run logged after
    that step (`purge_step`), as metrics.jsonl does; W&B and MLflow, which cannot, are sent those
    steps again (a resume is exact: the values equal the first ones but for the timings).
    None: new runs, whose ids replace the file's."""
    if not accelerator.log_with or not accelerator.is_main_process:
        return
    names = [str(t) for t in accelerator.log_with]
    ids_path = out_dir / IDS_FILE
    resumed = resumed_at is not None
    ids = json.loads(ids_path.read_text()) if resumed and ids_path.is_file() else {}
    kwargs: dict[str, dict[str, Any]] = {}
    if "tensorboard" in names and resumed:
        kwargs["tensorboard"] = {"purge_step": resumed_at + 1}
    if "wandb" in names:
        kwargs["wandb"] = {"dir": str(out_dir), "name": out_dir.name}
        if ids.get("wandb"):
            kwargs["wandb"].update(id=ids["wandb"], resume="allow")
    if "mlflow" in names:
        import mlflow

        local = not os.environ.get("MLFLOW_TRACKING_URI")
        if local:  # MLflow 3 refuses a plain folder store; a SQLite file is its local store
            mlflow.set_tracking_uri(f"sqlite:///{(out_dir / 'mlflow.db').resolve()}")
        kwargs["mlflow"] = {"run_name": out_dir.name, "run_id": ids.get("mlflow"),
                            "logging_dir": str((out_dir / "mlartifacts").resolve()) if local else None}
    accelerator.init_trackers(project, config=dict(config), init_kwargs=kwargs)
    ids = {}
    if "wandb" in names:
        ids["wandb"] = accelerator.get_tracker("wandb", unwrap=True).id
    if "mlflow" in names:
        ids["mlflow"] = accelerator.get_tracker("mlflow", unwrap=True).info.run_id
    if ids:
        ids_path.write_text(json.dumps(ids, indent=2) + "\n")


def log_images(accelerator: Any, images: Mapping[str, np.ndarray], step: int) -> None:
    """Log RGB uint8 images [H,W,3] by name to every started tracker (main process)."""
    if not images or not accelerator.is_main_process:
        return
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({k: v[None] for k, v in images.items()}, step=step, dataformats="NHWC")
        elif tracker.name == "wandb":
            tracker.log_images({k: [v] for k, v in images.items()}, step=step)
        elif tracker.name == "mlflow":
            import mlflow

            for k, v in images.items():
                mlflow.log_image(v, key=k.replace("/", "."), step=step)  # MLflow keys: no slashes


def log_files(accelerator: Any, paths: Sequence[Path]) -> None:
    """Attach files (a report) to the runs of trackers that store artifacts (MLflow, main process)."""
    if not accelerator.is_main_process:
        return
    for tracker in accelerator.trackers:
        if tracker.name == "mlflow":
            for path in paths:
                tracker.log_artifact(str(path))
