"""Experiment trackers (gkd.tracking): what a stage logs to TensorBoard, MLflow and W&B equals its
metrics.jsonl, a resumed run continues the same tracker runs, and bad tracker names are refused."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gkd.config import ConfigError
from gkd.eval.visualize import PANEL_GAP, PANEL_HEADER, colorize, prediction_panel
from gkd.tracking import check_trackers

from helpers import TINY, reset_accelerate

pytest.importorskip("tensorboard")
pytest.importorskip("mlflow")
pytest.importorskip("wandb")

ALL = "engine.trackers=[tensorboard,mlflow,wandb]"


@pytest.fixture
def offline_trackers(tmp_path, monkeypatch):
    """W&B offline with its config and cache in tmp; MLflow's local store (no server named)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for key, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONFIG_DIR": tmp_path / "wandb_cfg",
                       "WANDB_CACHE_DIR": tmp_path / "wandb_cache", "WANDB_DATA_DIR": tmp_path / "wandb_data"}.items():
        monkeypatch.setenv(key, str(value))


def _rows(out: Path) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def _tensorboard_scalars(folder: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) as TensorBoard shows them: every event file of the folder in order (a resumed
    run writes a second one), with what a restart purged left out."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_stage_logs_to_every_tracker_and_a_resume_continues_their_runs(tmp_path, shards, offline_trackers,
                                                                      monkeypatch):
    import mlflow
    import wandb
    from mlflow.tracking import MlflowClient

    import gkd.engine.distill as loop

    out = tmp_path / "run"
    args = [*TINY, f"data.train_shards={shards}", f"out_dir={out}", ALL]
    real_lr_at = loop.lr_at

    def dying_lr_at(step, *a):  # killed during step 7, after the step-6 checkpoint
        if step == 7:
            raise KeyboardInterrupt("simulated kill")
        return real_lr_at(step, *a)

    from gkd.engine.runner import run_stage

    monkeypatch.setattr(loop, "lr_at", dying_lr_at)
    with pytest.raises(KeyboardInterrupt):
        run_stage(1, args)
    first_ids = json.loads((out / "trackers.json").read_text())
    mlflow.end_run()  # a killed process ends its runs by exiting; this one lives on
    wandb.finish()
    reset_accelerate()
    monkeypatch.setattr(loop, "lr_at", real_lr_at)
    run_stage(1, args)
    reset_accelerate()

    ids = json.loads((out / "trackers.json").read_text())
    assert ids == first_ids and set(ids) == {"mlflow", "wandb"}
    assert len(list((out / "gkd").glob("events.out.tfevents.*"))) == 2
    rows = _rows(out)
    assert [r["step"] for r in rows] == list(range(1, 13))  # step 7 of the killed run was cut
    for key in ("loss", "lr", "loss_fea"):
        expected = [(r["step"], r[key]) for r in rows]
        tb = _tensorboard_scalars(out / "gkd", key)  # float32 in the event file
        assert [s for s, _ in tb] == [s for s, _ in expected], key
        np.testing.assert_allclose([v for _, v in tb], [v for _, v in expected], rtol=1e-6, err_msg=key)
        # MLflow cannot drop the killed run's step 7: it holds it twice, with equal values
        history = MlflowClient(f"sqlite:///{out / 'mlflow.db'}").get_metric_history(ids["mlflow"], key)
        assert sorted((m.step, m.value) for m in history) == sorted([*expected, expected[6]]), key
    run = MlflowClient(f"sqlite:///{out / 'mlflow.db'}").get_run(ids["mlflow"])
    assert run.info.status == "FINISHED" and run.data.params["optim.lr"] == "0.002"
    offline = sorted((out / "wandb").glob(f"offline-run-*-{ids['wandb']}"))
    assert len(offline) == 2 and all((d / f"run-{ids['wandb']}.wandb").stat().st_size > 0 for d in offline)


def test_a_new_run_in_a_fresh_folder_gets_new_tracker_runs(tmp_path, shards, offline_trackers):
    from gkd.engine.runner import run_stage

    ids = []
    for name in ("a", "b"):
        run_stage(1, [*TINY, f"data.train_shards={shards}", f"out_dir={tmp_path / name}", "optim.epochs=1",
                      "engine.trackers=[mlflow]"])
        reset_accelerate()
        ids.append(json.loads((tmp_path / name / "trackers.json").read_text())["mlflow"])
    assert ids[0] != ids[1]


def test_bad_tracker_names_are_refused_before_training(tmp_path, shards, monkeypatch):
    import gkd.tracking as tracking
    from gkd.engine.runner import run_stage

    with pytest.raises(ConfigError, match="engine.trackers: unknown tracker.s. comet; choose from tensorboard, wandb, mlflow"):
        run_stage(1, [*TINY, f"data.train_shards={shards}", f"out_dir={tmp_path / 'x'}", "engine.trackers=[comet]"])
    reset_accelerate()
    assert not (tmp_path / "x" / "metrics.jsonl").exists()
    with pytest.raises(ConfigError, match="names a tracker twice"):
        check_trackers(["mlflow", "mlflow"])
    real = tracking.importlib.util.find_spec
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda m: None if m == "alembic" else real(m))
    with pytest.raises(ConfigError, match=r"mlflow needs alembic, which is not installed: pip install -e '\.\[mlflow\]'"):
        check_trackers(["tensorboard", "mlflow"], "trackers")
    assert check_trackers(["tensorboard"]) == ["tensorboard"]


def test_prediction_panel_tiles_equal_independent_drawing():
    rng = np.random.default_rng(0)
    palette = [[10, 20, 30], [200, 100, 0], [0, 255, 0]]
    samples = [(rng.integers(0, 256, (8, 12, 3), dtype=np.uint8), rng.integers(0, 3, (8, 12)),
                rng.integers(0, 3, (8, 12))) for _ in range(2)]
    samples[1][1][0, 0] = 255  # ignore → black
    panel = prediction_panel(samples, palette, 3, "target", height=16)  # ×2: 16 × 24 tiles
    assert panel.shape == (PANEL_HEADER + 2 * 16 + PANEL_GAP, 3 * 24 + 2 * PANEL_GAP, 3) and panel.dtype == np.uint8
    for r, (image, label, pred) in enumerate(samples):
        y = PANEL_HEADER + r * (16 + PANEL_GAP)
        expected_image = np.asarray(Image.fromarray(image).resize((24, 16), Image.BILINEAR))
        np.testing.assert_array_equal(panel[y:y + 16, 0:24], expected_image)
        for c, mask in ((1, label), (2, pred)):
            x = c * (24 + PANEL_GAP)
            np.testing.assert_array_equal(panel[y:y + 16, x:x + 24],
                                          colorize(mask.repeat(2, 0).repeat(2, 1), palette, 3))  # nearest ×2
    assert (panel[y - PANEL_GAP:y, :] == 255).all()  # the gap between rows is background


def test_stage3_selection_scores_and_panels_reach_tensorboard(tmp_path, folder_dataset):
    """Each source-split selection evaluation: its mIoU (as in the selection record) and a panel."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from gkd.engine.runner import run_stage
    from gkd.handoff import save_handoff
    from gkd.models import build_student

    root, manifest, _ = folder_dataset
    student = build_student("vit_tiny_patch16_224", img_size=64, depth=1, embed_dim=32, num_heads=2)
    encoder = save_handoff(tmp_path / "encoder.safetensors", student, student.spec, stage=2,
                           extra={"input_norm": {"mean": [0.5] * 3, "std": [0.25] * 3}})
    out = tmp_path / "s3"
    run_stage(3, [f"encoder={encoder}", f"data.manifest={manifest}", f"data.root={root}", "data.crop_size=64",
                  "data.short_edges=null", "data.scale=[128,64]", "data.batch_size=2", "data.num_workers=0",
                  "optim.iters=4", "engine.save_every=4", "select.rule=best", "select.split=val", "select.every=2",
                  f"out_dir={out}", "engine.trackers=[tensorboard]"])
    reset_accelerate()
    (record,) = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
                 if r.get("event") == "selection"]
    tb = EventAccumulator(str(out / "gkd"), size_guidance={"images": 0})
    tb.Reload()
    got = [(e.step, e.value) for e in tb.Scalars("selection/mIoU")]
    assert [s for s, _ in got] == [s for s, _ in record["history"]] == [2, 4]
    np.testing.assert_allclose([v for _, v in got], [v for _, v in record["history"]], rtol=1e-6)
    panels = tb.Images("selection/panel")
    assert [p.step for p in panels] == [2, 4] and panels[0].height == PANEL_HEADER + 4 * 192 + 3 * PANEL_GAP
