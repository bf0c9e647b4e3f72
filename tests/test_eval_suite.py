"""Suites (YAML validation) and `run_eval` on fake datasets and a fake segmentor.

The fakes stand in for the loaders that `gkd.eval.suite` imports (manifest, root, dataset,
segmentor, metadata), patched where they are used, so these tests do not depend on the data and
model packages. The fake model is a 1×1 conv with
integer weights on images whose values are multiples of 1/8: every score is exact in float32, so
an independent NumPy argmax gives the very same predictions (sliding-window averages included).
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import Dataset

from gkd.eval import suite as suite_mod
from gkd.eval.report import main_table, merge_results, read_results, write_report
from gkd.eval.suite import run_eval
from gkd.eval.targets import FROM_MANIFEST, SuiteError, load_suite

REPO = Path(__file__).resolve().parents[1]
K = 5  # class 4 is never labelled and never predicted (bias −100): IoU/Acc undefined → null
CLASSES = ["road", "wall", "tree", "sky", "boat"]
PALETTE = [[128, 64, 128], [102, 102, 156], [107, 142, 35], [70, 130, 180], [0, 0, 142]]


@dataclass
class FakeManifest:
    name: str
    classes: list = field(default_factory=lambda: list(CLASSES))
    palette: list = field(default_factory=lambda: [list(c) for c in PALETTE])
    ignore_index: int = 255
    test_resize: Any = None


class FakeDataset(Dataset):
    """Images of mixed sizes (smaller and larger than the 16-px crop) with ignore pixels."""

    def __init__(self, name: str, sizes: list[tuple[int, int]], seed: int):
        rng = np.random.default_rng(seed)
        self.items = []
        for i, (h, w) in enumerate(sizes):
            image = rng.integers(0, 9, size=(3, h, w)).astype(np.float32) / 8
            label = rng.integers(0, K - 1, size=(h, w))
            label[rng.random((h, w)) < 0.15] = 255
            self.items.append((image, label, f"/fake/{name}/img_{i:03d}.png"))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        image, label, path = self.items[i]
        return {"image": torch.from_numpy(image), "label": torch.from_numpy(label), "path": path}


class FakeSegmentor(nn.Module):
    def __init__(self, seed: int = 0, num_classes: int = K):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.num_classes = num_classes
        self.conv = nn.Conv2d(3, num_classes, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randint(-3, 4, (num_classes, 3, 1, 1), generator=g).float())
            self.conv.bias.copy_(torch.arange(num_classes).float() / 64)
            self.conv.bias[-1] = -100.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


MANIFESTS = {"fake_a": FakeManifest("fake_a"), "fake_b": FakeManifest("fake_b")}
DATASETS = {
    ("fake_a", "val"): lambda: FakeDataset("a", [(12, 14), (12, 14), (9, 20), (12, 14), (15, 15)], seed=1),
    ("fake_b", "test"): lambda: FakeDataset("b", [(40, 27), (33, 50), (40, 27)], seed=2),
}
SUITE_YAML = """\
name: fake
description: two synthetic targets
source: synthetic
mode: slide
crop: 16
stride: 11
targets:
  - name: Small
    manifest: fake_a
    split: val
    resize: null
  - {name: Big one, manifest: fake_b, split: test, resize: null}
"""


def install_fakes(module, data_root: Path, calls: dict | None = None, missing: tuple[str, ...] = ()) -> dict:
    """Patch the loaders gkd.eval.suite imports; `missing` manifests get no root on disk."""
    calls = {"segmentor": [], "datasets": []} if calls is None else calls
    for name in MANIFESTS:
        if name not in missing:
            (data_root / name).mkdir(parents=True, exist_ok=True)

    def resolve_root(manifest, root=None):
        path = Path(root) if root is not None else data_root / manifest.name
        if not path.is_dir():
            raise FileNotFoundError(f"dataset root for {manifest.name!r} not found: {path}")
        return path

    def build_dataset(manifest, split, root=None, transform=None):
        assert transform is None  # evaluation resizes and normalises itself
        calls["datasets"].append((manifest.name, split, str(root)))
        return DATASETS[(manifest.name, split)]()

    def load_segmentor(path):
        calls["segmentor"].append(str(path))
        seed = 1 if "other" in str(path) else 0
        return FakeSegmentor(seed), {"gkd_spec": {"decoder": "fake"}, "gkd_config": {}}

    module.load_manifest = lambda name: MANIFESTS[name]
    module.resolve_root = resolve_root
    module.build_dataset = build_dataset
    module.load_segmentor = load_segmentor
    module.read_metadata = lambda path: {"gkd_spec": {"decoder": "fake"}, "gkd_config": {}}
    return calls


@pytest.fixture
def env(tmp_path, monkeypatch):
    for hook in ("load_manifest", "resolve_root", "build_dataset", "load_segmentor", "read_metadata"):
        monkeypatch.setattr(suite_mod, hook, getattr(suite_mod, hook))  # the real ones, restored after the test
    calls = install_fakes(suite_mod, tmp_path / "data")
    suite_file = tmp_path / "fake_suite.yaml"
    suite_file.write_text(SUITE_YAML)
    ckpt = tmp_path / "runs" / "s3" / "segmentor.safetensors"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"")
    return {"tmp": tmp_path, "calls": calls, "suite": suite_file, "ckpt": ckpt}


# --- independent reference ----------------------------------------------------------------------

def reference_predictions(model: FakeSegmentor, dataset: FakeDataset) -> list[np.ndarray]:
    w = model.conv.weight.detach().numpy()[:, :, 0, 0].astype(np.float64)
    b = model.conv.bias.detach().numpy().astype(np.float64)
    return [np.argmax(np.einsum("kc,chw->khw", w, img) + b[:, None, None], axis=0) for img, _, _ in dataset.items]


def reference_metrics(preds: list[np.ndarray], labels: list[np.ndarray]) -> dict:
    pred = np.concatenate([p.ravel() for p in preds])
    target = np.concatenate([t.ravel() for t in labels])
    valid = target != 255
    iou, acc = {}, {}
    for c, name in enumerate(CLASSES):
        tp = np.sum((pred == c) & (target == c) & valid)
        gt, pr = np.sum((target == c) & valid), np.sum((pred == c) & valid)
        iou[name] = 100.0 * tp / (gt + pr - tp) if gt + pr - tp else math.nan
        acc[name] = 100.0 * tp / gt if gt else math.nan
    correct = np.sum((pred == target) & valid)
    return {"aAcc": 100.0 * correct / valid.sum(), "mIoU": float(np.nanmean(list(iou.values()))),
            "mAcc": float(np.nanmean(list(acc.values()))), "IoU": iou, "Acc": acc}


def expected_for(target_key: tuple[str, str], seed: int = 0, limit: int | None = None) -> dict:
    ds = DATASETS[target_key]()
    ds.items = ds.items[:limit] if limit else ds.items
    return reference_metrics(reference_predictions(FakeSegmentor(seed), ds), [lab for _, lab, _ in ds.items])


def _close(got, want) -> bool:
    if want is None or (isinstance(want, float) and math.isnan(want)):
        return got is None or (isinstance(got, float) and math.isnan(got))
    return got is not None and abs(got - want) < 1e-9


def assert_entry_matches(entry: dict, want: dict) -> None:
    for key in ("aAcc", "mIoU", "mAcc"):
        assert _close(entry[key], want[key]), (key, entry[key], want[key])
    for key in ("IoU", "Acc"):
        assert list(entry[key]) == CLASSES
        for c in CLASSES:
            assert _close(entry[key][c], want[key][c]), (key, c, entry[key][c], want[key][c])


# --- suites ------------------------------------------------------------------------------------

def test_shipped_suites_load():
    g = load_suite("gta2cbm")
    assert g.source == "gta5" and g.mode == "slide" and g.crop == (512, 512) and g.stride == (341, 341)
    assert [(t.name, t.manifest, t.split) for t in g.targets] == [
        ("Cityscapes", "cityscapes", "val"), ("BDD100K", "bdd100k", "val"), ("Mapillary", "mapillary", "val")]
    assert [t.resize for t in g.targets] == [(1024, 512), (1280, 720), (1024, 512)]
    acdc = load_suite("citys2acdc")
    assert [t.split for t in acdc.targets] == ["val_night", "val_snow", "val_fog", "val_rain"]
    assert {t.manifest for t in acdc.targets} == {"acdc"}
    p = load_suite("potsdam2irrg")
    assert p.source == "potsdam_rgb" and [t.manifest for t in p.targets] == ["potsdam_irrg", "vaihingen_irrg"]
    assert load_suite("loveda_u2r").targets[0].split == "val_rural"
    assert load_suite("loveda_r2u").targets[0].split == "val_urban"
    cam = load_suite("camvid")
    assert [(t.split, t.resize) for t in cam.targets] == [("val", None), ("test", None)]
    # the same file by path gives the same suite
    assert load_suite(REPO / "configs" / "suites" / "gta2cbm.yaml").targets == g.targets


def test_user_suite_defaults(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("targets:\n  - {manifest: folder_x, split: test}\n")
    s = load_suite(path)
    assert s.name == "mine" and s.mode == "slide" and s.crop == (512, 512) and s.stride == (341, 341)
    assert s.targets[0].name == "folder_x" and s.targets[0].resize == FROM_MANIFEST
    with pytest.raises(FileNotFoundError, match="no_such_suite"):
        load_suite("no_such_suite")


@pytest.mark.parametrize("text, field", [
    ("source: x\n", "targets"),
    ("targets: []\n", "targets"),
    ("tragets:\n  - {manifest: a, split: val}\n", "tragets"),
    ("targets:\n  - {manifest: a}\n", "targets[0].split"),
    ("targets:\n  - {manifest: a, split: val}\n  - {manifest: '', split: val}\n", "targets[1].manifest"),
    ("targets:\n  - {manifest: a, split: val, size: 3}\n", "targets[0].size"),
    ("targets:\n  - {manifest: a, split: val, resize: [1, 2, 3]}\n", "targets[0].resize"),
    ("targets:\n  - {manifest: a, split: val}\n  - {manifest: a, split: test}\n", "targets[1].name"),
    ("mode: tiles\ntargets:\n  - {manifest: a, split: val}\n", "mode"),
    ("crop: 0\ntargets:\n  - {manifest: a, split: val}\n", "crop"),
    ("crop: 100\nstride: 200\ntargets:\n  - {manifest: a, split: val}\n", "stride"),
    ("- just\n- a list\n", "mapping"),
    ("targets: [unclosed\n", "not valid YAML"),
])
def test_suite_validation_errors_name_file_and_field(tmp_path, text, field):
    path = tmp_path / "bad_suite.yaml"
    path.write_text(text)
    with pytest.raises(SuiteError) as info:
        load_suite(path)
    assert str(path) in str(info.value) and field in str(info.value)


# --- run_eval ----------------------------------------------------------------------------------

def test_run_eval_writes_report_equal_to_independent_computation(env):
    out = env["tmp"] / "eval"
    results = run_eval(env["ckpt"], env["suite"], out, batch_size=2, num_workers=2, save_predictions=True)
    want = {"Small": expected_for(("fake_a", "val")), "Big one": expected_for(("fake_b", "test"))}

    metrics = json.loads((out / "metrics.json").read_text())  # strict JSON: NaN written as null
    assert metrics["suite"]["name"] == "fake" and metrics["suite"]["source"] == "synthetic"
    (model,) = metrics["models"]
    assert model["name"] == "s3" and model["checkpoint"] == str(env["ckpt"])
    assert model["spec"] == {"decoder": "fake"}
    assert list(model["datasets"]) == ["Small", "Big one"]
    for name, entry in model["datasets"].items():
        assert_entry_matches(entry, want[name])
    assert model["datasets"]["Small"]["num_images"] == 5 and model["datasets"]["Big one"]["num_images"] == 3
    assert model["datasets"]["Small"]["IoU"]["boat"] is None  # absent class → null, not in the mean
    avg = (want["Small"]["mIoU"] + want["Big one"]["mIoU"]) / 2
    assert _close(model["average"]["mIoU"], avg)
    assert _close(results["models"][0]["datasets"]["Small"]["mIoU"], want["Small"]["mIoU"])

    rows = list(csv.reader((out / "results.csv").open()))
    assert rows[0] == ["Model", "Small", "Big one", "Avg"]
    assert rows[1] == ["s3", f"{want['Small']['mIoU']:.1f}", f"{want['Big one']['mIoU']:.1f}", f"{avg:.1f}"]

    md = (out / "results.md").read_text()
    assert "| Model | Small | Big one | Avg |" in md
    assert f"| s3 | {want['Small']['mIoU']:.1f} | {want['Big one']['mIoU']:.1f} | {avg:.1f} |" in md
    assert "| Model | road | wall | tree | sky | boat |" in md  # per-class table

    # predictions: palette PNG masks hold the class ids of the independent argmax; overlays are RGB
    ds = DATASETS[("fake_b", "test")]()
    preds = reference_predictions(FakeSegmentor(0), ds)
    for i, pred in enumerate(preds):
        mask = Image.open(out / "predictions" / "Big_one" / f"img_{i:03d}_mask.png")
        assert mask.mode == "P" and np.array_equal(np.array(mask), pred)
        assert mask.getpalette()[:6] == PALETTE[0] + PALETTE[1]
        overlay = Image.open(out / "predictions" / "Big_one" / f"img_{i:03d}_overlay.png")
        assert overlay.mode == "RGB" and overlay.size == mask.size
    assert len(list((out / "predictions" / "Small").glob("*_mask.png"))) == 5


def test_missing_root_fails_before_any_model_is_loaded(env, tmp_path):
    import shutil

    shutil.rmtree(tmp_path / "data" / "fake_b")
    with pytest.raises(FileNotFoundError) as info:
        run_eval(env["ckpt"], env["suite"], tmp_path / "eval", num_workers=0)
    assert str(tmp_path / "data" / "fake_b") in str(info.value)
    assert env["calls"]["segmentor"] == [] and env["calls"]["datasets"] == []
    # an explicit --root that does not exist is named too
    bad = tmp_path / "nowhere" / "b"
    with pytest.raises(FileNotFoundError, match=str(bad)):
        run_eval(env["ckpt"], env["suite"], tmp_path / "eval", roots={"fake_b": str(bad)}, num_workers=0)
    assert env["calls"]["segmentor"] == []
    assert not (tmp_path / "eval" / "metrics.json").exists()


def test_root_overrides_and_stray_names(env, tmp_path):
    other = tmp_path / "elsewhere"
    other.mkdir()
    run_eval(env["ckpt"], env["suite"], tmp_path / "eval", roots={"fake_a": str(other)}, num_workers=0, limit=1)
    assert (("fake_a", "val", str(other)) in env["calls"]["datasets"])
    with pytest.raises(ValueError, match="cityscapes"):
        run_eval(env["ckpt"], env["suite"], tmp_path / "eval", roots={"cityscapes": str(other)}, num_workers=0)
    with pytest.raises(FileNotFoundError, match="checkpoint"):
        run_eval(tmp_path / "missing.safetensors", env["suite"], tmp_path / "eval", num_workers=0)


def test_class_count_mismatch_is_an_error(env, tmp_path, monkeypatch):
    monkeypatch.setattr(suite_mod, "load_segmentor", lambda p: (FakeSegmentor(num_classes=3), {}))
    with pytest.raises(ValueError, match="3 classes"):
        run_eval(env["ckpt"], env["suite"], tmp_path / "eval", num_workers=0)


def test_several_checkpoints_make_rows_and_reports_merge(env, tmp_path):
    other = tmp_path / "runs" / "other.safetensors"
    other.write_bytes(b"")
    out = tmp_path / "eval"
    results = run_eval([env["ckpt"], other], env["suite"], out, num_workers=0, limit=2)
    header, rows = main_table(results)
    assert header == ["Model", "Small", "Big one", "Avg"] and [r[0] for r in rows] == ["s3", "other"]
    for model, seed in zip(results["models"], (0, 1)):
        assert model["datasets"]["Small"]["num_images"] == 2
        assert_entry_matches(model["datasets"]["Small"], expected_for(("fake_a", "val"), seed=seed, limit=2))
        assert_entry_matches(model["datasets"]["Big one"], expected_for(("fake_b", "test"), seed=seed, limit=2))
    # row-oriented: read back (null → NaN), split into single-model results and merge again
    back = read_results(out)
    assert math.isnan(back["models"][0]["datasets"]["Small"]["IoU"]["boat"])
    singles = [dict(back, models=[m]) for m in back["models"]]
    merged = merge_results(singles)
    assert main_table(merged) == main_table(results)
    write_report(merged, tmp_path / "merged")
    assert (tmp_path / "merged" / "results.csv").read_text() == (out / "results.csv").read_text()
    with pytest.raises(ValueError, match="different targets"):
        merge_results([results, dict(results, suite=dict(results["suite"], targets=[]))])


@pytest.mark.slow
def test_two_processes_reduce_to_the_single_process_numbers(env, tmp_path):
    """torchrun (gloo, CPU) with 2 ranks: rank r scores images r::2, confusion matrices are summed."""
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import test_eval_suite as t
        from pathlib import Path
        from gkd.eval import suite as s
        t.install_fakes(s, Path({str(tmp_path / 'data')!r}))
        seen = []
        get = t.FakeDataset.__getitem__
        t.FakeDataset.__getitem__ = lambda self, i: seen.append(self.items[i][2]) or get(self, i)
        s.run_eval({str(env['ckpt'])!r}, {str(env['suite'])!r}, {str(tmp_path / 'ddp')!r}, num_workers=0,
                   save_predictions=True)
        from accelerate import Accelerator
        s.run_eval({str(env['ckpt'])!r}, {str(env['suite'])!r}, {str(tmp_path / 'ddp_acc')!r}, num_workers=0,
                   accelerator=Accelerator(cpu=True))
        import json, os
        from accelerate import PartialState
        state = PartialState()
        Path({str(tmp_path)!r}, f"rank{{state.process_index}}.json").write_text(
            json.dumps({{"world": state.num_processes, "seen": seen}}))
    """))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
           "--nproc_per_node", "2", str(script)]
    envv = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=envv)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    first_run = [r["seen"][: len(r["seen"]) // 2] for r in ranks]  # each rank ran run_eval twice
    assert not set(first_run[0]) & set(first_run[1])  # disjoint shares ...
    assert len(first_run[0]) + len(first_run[1]) == 8  # ... covering all 5 + 3 images

    single = run_eval(env["ckpt"], env["suite"], tmp_path / "single", num_workers=0)
    for out in ("ddp", "ddp_acc"):
        model = json.loads((tmp_path / out / "metrics.json").read_text())["models"][0]
        for name, entry in single["models"][0]["datasets"].items():
            assert entry["num_images"] == model["datasets"][name]["num_images"]
            for key in ("aAcc", "mIoU", "mAcc"):
                assert _close(model["datasets"][name][key], entry[key]), (out, name, key)
            for c in CLASSES:
                assert _close(model["datasets"][name]["IoU"][c], entry["IoU"][c])
    # both ranks wrote their own share of the predictions: together, every image once
    assert len(list((tmp_path / "ddp" / "predictions" / "Small").glob("*_mask.png"))) == 5
    assert len(list((tmp_path / "ddp" / "predictions" / "Big_one").glob("*_mask.png"))) == 3


def test_trackers_get_the_report_scores_and_a_panel_per_target(env, monkeypatch):
    """`run_eval(trackers=...)` (`gkd eval --tracker`): TensorBoard and MLflow hold the report's
    numbers per target and on average, and TensorBoard a panel drawn from the independent argmax."""
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from gkd.eval.visualize import prediction_panel, to_uint8_image

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = env["tmp"] / "eval"
    run_eval(env["ckpt"], env["suite"], out, num_workers=0, trackers=["tensorboard", "mlflow"])
    model = json.loads((out / "metrics.json").read_text())["models"][0]
    expected = {f"eval/s3/{slug}/{k}": numbers[k] for slug, numbers in
                (("Small", model["datasets"]["Small"]), ("Big_one", model["datasets"]["Big one"]),
                 ("average", model["average"])) for k in ("mIoU", "mAcc", "aAcc")}

    tb = EventAccumulator(str(out / "gkd-eval"), size_guidance={"images": 0})
    tb.Reload()
    assert {t for t in tb.Tags()["scalars"] if t.startswith("eval/")} == set(expected)
    for tag, value in expected.items():
        assert tb.Scalars(tag)[0].value == pytest.approx(value, rel=1e-6), tag
    run_id = json.loads((out / "trackers.json").read_text())["mlflow"]
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    assert client.get_run(run_id).data.metrics == pytest.approx(expected)
    assert {a.path for a in client.list_artifacts(run_id)} >= {"metrics.json", "results.md", "results.csv"}

    ds = DATASETS[("fake_b", "test")]()
    samples = [(to_uint8_image(torch.from_numpy(img)), lab, pred) for (img, lab, _), pred in
               zip(ds.items, reference_predictions(FakeSegmentor(0), ds))]
    want = prediction_panel(samples, PALETTE, K, "Big one")
    (image,) = tb.Images("eval/s3/Big_one/panel")
    got = np.array(Image.open(io.BytesIO(image.encoded_image_string)).convert("RGB"))
    np.testing.assert_array_equal(got, want)


def test_panels_per_target_show_image_label_and_each_models_prediction(env, tmp_path):
    """`run_eval(panels=2)` (`gkd eval --panels 2`): `out/panels/<target slug>.png` holds, per row, the
    image, the coloured label and each model's coloured argmax, drawn here independently; Small's first
    two images share a size (native tiles), Big one's differ (the second row is scaled to the first's)."""
    from gkd.eval.visualize import PANEL_GAP, PANEL_HEADER, colorize

    other = tmp_path / "runs" / "other.safetensors"
    other.write_bytes(b"")
    out = tmp_path / "eval"
    run_eval([env["ckpt"], other], env["suite"], out, num_workers=0, batch_size=2, panels=2)
    assert sorted(p.name for p in (out / "panels").iterdir()) == ["Big_one.png", "Small.png"]
    models = [FakeSegmentor(0), FakeSegmentor(1)]  # load_segmentor's fakes for s3 and other
    for slug, key in (("Small", ("fake_a", "val")), ("Big_one", ("fake_b", "test"))):
        panel = np.array(Image.open(out / "panels" / f"{slug}.png"))
        items = DATASETS[key]().items[:2]
        h, w = items[0][0].shape[1:]
        assert panel.shape == (PANEL_HEADER + 2 * h + PANEL_GAP, 4 * w + 3 * PANEL_GAP, 3), slug
        for r, (img, label, _) in enumerate(items):
            x = torch.from_numpy(img)[None]
            with torch.no_grad():
                preds = [m(x).argmax(1)[0].numpy() for m in models]
            tiles = [np.round(img.transpose(1, 2, 0) * 255).astype(np.uint8),
                     colorize(label, PALETTE, K), *(colorize(p, PALETTE, K) for p in preds)]
            if tiles[0].shape[:2] != (h, w):  # another size: scaled to the first image's
                tiles = [np.asarray(Image.fromarray(t).resize((w, h), Image.BILINEAR if c == 0 else Image.NEAREST))
                         for c, t in enumerate(tiles)]
            y = PANEL_HEADER + r * (h + PANEL_GAP)
            for c, tile in enumerate(tiles):
                np.testing.assert_array_equal(panel[y:y + h, c * (w + PANEL_GAP):c * (w + PANEL_GAP) + w], tile,
                                              err_msg=f"{slug} row {r} column {c}")
        assert (panel[:PANEL_HEADER] != 255).any()  # the column titles are drawn
        assert (panel[PANEL_HEADER + h:PANEL_HEADER + h + PANEL_GAP] == 255).all()  # gap between the rows
    # the two models differ somewhere, so the prediction columns are not one column twice
    assert not np.array_equal(panel[PANEL_HEADER:, 2 * (w + PANEL_GAP):3 * (w + PANEL_GAP) - PANEL_GAP],
                              panel[PANEL_HEADER:, 3 * (w + PANEL_GAP):])

    run_eval(env["ckpt"], env["suite"], tmp_path / "plain", num_workers=0, limit=1)
    assert (tmp_path / "plain" / "metrics.json").exists() and not (tmp_path / "plain" / "panels").exists()
    with pytest.raises(ValueError, match="panels"):
        run_eval(env["ckpt"], env["suite"], tmp_path / "bad", num_workers=0, panels=-1)


def test_models_panel_native_size_and_prediction_panel_is_one_model_of_it():
    from gkd.eval.visualize import PANEL_GAP, PANEL_HEADER, colorize, models_panel, prediction_panel

    rng = np.random.default_rng(3)
    samples = [(rng.integers(0, 256, (6, 9, 3), dtype=np.uint8), rng.integers(0, K, (6, 9))) for _ in range(3)]
    preds = [[rng.integers(0, K, (6, 9)) for _ in samples] for _ in range(2)]
    panel = models_panel(samples, preds, PALETTE, K, ["t", "ground truth", "a", "b"])
    assert panel.shape == (PANEL_HEADER + 3 * 6 + 2 * PANEL_GAP, 4 * 9 + 3 * PANEL_GAP, 3)
    for r, (image, label) in enumerate(samples):
        y = PANEL_HEADER + r * (6 + PANEL_GAP)
        for c, tile in enumerate([image, colorize(label, PALETTE, K), *(colorize(p[r], PALETTE, K) for p in preds)]):
            np.testing.assert_array_equal(panel[y:y + 6, c * (9 + PANEL_GAP):c * (9 + PANEL_GAP) + 9], tile)
    triples = [(image, label, pred) for (image, label), pred in zip(samples, preds[0])]
    np.testing.assert_array_equal(prediction_panel(triples, PALETTE, K, "t", height=12),
                                  models_panel(samples, preds[:1], PALETTE, K, ["t", "ground truth", "prediction"],
                                               height=12))
    with pytest.raises(ValueError, match="titles"):
        models_panel(samples, preds, PALETTE, K, ["t", "ground truth", "a"])


def test_cli_panels_option(capsys):
    from gkd.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["eval", "c.safetensors", "--suite", "s", "--out", "o"]).panels == 0
    assert parser.parse_args(["eval", "c.safetensors", "--suite", "s", "--out", "o", "--panels", "3"]).panels == 3
    for bad in ("-1", "two"):
        with pytest.raises(SystemExit):
            parser.parse_args(["eval", "c.safetensors", "--suite", "s", "--out", "o", "--panels", bad])
        assert "argument --panels" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser.parse_args(["eval", "c.safetensors", "--suite", "s", "--out", "o", "--panels", "-2"])
    assert "0 or more, got -2" in capsys.readouterr().err
