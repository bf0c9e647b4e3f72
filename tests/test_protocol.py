"""The DG protocol: source-only model selection in stage 3, `gkd eval` refusing targets a run used,
the protocol stated in results.md, and seeds reported as mean ± std."""
from __future__ import annotations

import csv
import json
import shutil
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gkd.cli import main as gkd_main
from gkd.config import SegmentConfig, load_config
from gkd.engine import read_metadata
from gkd.handoff import save_handoff
from gkd.engine.segment import train_segmentor
from gkd.engine.runner import run_stage
from gkd.eval import run_eval
from gkd.eval.protocol import ProtocolError
from gkd.eval.suite import evaluate_target, prepare_targets
from gkd.eval.targets import load_suite
from gkd.models import build_student, load_segmentor
from helpers import make_scene, reset_accelerate

MANIFEST = ("name: {name}\ntype: folder\ndefault_root: {name}\nroot: {name}\nimage_suffix: .png\nlabel_suffix: .png\n"
            "splits: [train, val, test]\nlabel_encoding: ids\nclasses: [background, box, disc]\n"
            "ignore_values: [9]\nignore_index: 255\ntest_resize: null\n")


def write_split(root: Path, split: str, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for kind in ("images", "labels"):
        (root / kind / split).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        image, label = make_scene(rng, size=48)
        Image.fromarray(image).save(root / "images" / split / f"{split}_{i:03d}.png")
        Image.fromarray(label).save(root / "labels" / split / f"{split}_{i:03d}.png")


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> dict:
    """A source dataset with train / val / test splits, a second dataset (another domain) and an encoder."""
    base = tmp_path_factory.mktemp("protocol")
    for name, splits, seed in (("src", {"train": 12, "val": 4, "test": 3}, 0), ("other", {"val": 3}, 7)):
        for k, (split, n) in enumerate(splits.items()):
            write_split(base / name, split, n, seed + k)
        (base / f"{name}.yaml").write_text(MANIFEST.format(name=name).replace(
            "[train, val, test]", "[" + ", ".join(splits) + "]"))
    torch.manual_seed(0)
    student = build_student("vit_tiny_patch16_224", img_size=48, depth=2, embed_dim=32, num_heads=2)
    encoder = save_handoff(base / "encoder.safetensors", student, student.spec, stage=2,
                           extra={"input_norm": {"mean": [0.5] * 3, "std": [0.25] * 3}})
    return {"base": base, "encoder": encoder, "manifest": base / "src.yaml", "root": base / "src"}


def stage3_args(src: dict, out: Path, *extra: str) -> list[str]:
    return [f"encoder={src['encoder']}", f"data.manifest={src['manifest']}", f"data.root={src['root']}",
            "data.crop_size=48", "data.short_edges=null", "data.scale=[64,48]", "data.batch_size=2", "data.num_workers=0",
            "decoder.name=mlp", "decoder.kwargs.channels=16", "optim.iters=4", "optim.lr=3e-3",
            "engine.log_every=1", "engine.save_every=2", f"out_dir={out}", *extra]


def suite_file(path: Path, targets: list[tuple[str, Path, str]]) -> Path:
    lines = ["name: check", "source: src (train)", "mode: slide", "crop: 48", "stride: 32", "targets:"]
    for name, manifest, split in targets:
        lines += [f"  - name: {name}", f"    manifest: {manifest}", f"    split: {split}", "    resize: null"]
    path.write_text("\n".join(lines) + "\n")
    return path


SELECT = ["select.rule=best", "select.split=val", "select.every=2"]


@pytest.fixture(scope="module")
def selected(source, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("sel") / "s3"
    path = train_segmentor(load_config(SegmentConfig, [], stage3_args(source, out, *SELECT)))
    reset_accelerate()
    return {"path": path, "out": out}


def test_best_rule_keeps_the_best_source_val_checkpoint(source, selected):
    meta = read_metadata(selected["path"])
    protocol = meta["gkd_protocol"]
    sel = protocol["selection"]
    assert protocol["source"]["split"] == "train" and protocol["source"]["num_images"] == 12
    assert protocol["source"]["root"] == str(Path(source["root"]).resolve())
    assert sel["rule"] == "best" and sel["split"] == "val" and sel["num_images"] == 4
    steps = [s for s, _ in sel["history"]]
    assert steps == [2, 4]  # every 2 steps, the last step included once
    scores = [v for _, v in sel["history"]]
    assert sel["step"] == steps[scores.index(max(scores))] and sel["score"] == max(scores)
    # the saved weights are the selected ones: they score the recorded value on the selection split
    model, _ = load_segmentor(selected["path"])
    suite = load_suite(suite_file(selected["out"] / "val_suite.yaml", [("val", source["manifest"], "val")]))
    from accelerate import PartialState

    metric, _ = evaluate_target(model, prepare_targets(suite)[0], suite, PartialState(cpu=True), num_workers=0)
    assert metric.compute()["mIoU"] == pytest.approx(sel["score"], abs=1e-9)
    reset_accelerate()


def test_selection_resumes_exactly(source, selected, tmp_path, monkeypatch):
    import gkd.engine.segment as seg

    real = seg.poly_lr

    def dying(step, *a):
        if step == 3:
            raise KeyboardInterrupt("simulated kill")
        return real(step, *a)

    out = tmp_path / "s3"
    monkeypatch.setattr(seg, "poly_lr", dying)
    with pytest.raises(KeyboardInterrupt):
        train_segmentor(load_config(SegmentConfig, [], stage3_args(source, out, *SELECT)))
    reset_accelerate()
    monkeypatch.setattr(seg, "poly_lr", real)
    path = train_segmentor(load_config(SegmentConfig, [], stage3_args(source, out, *SELECT)))
    reset_accelerate()
    resumed = read_metadata(path)["gkd_protocol"]["selection"]
    whole = read_metadata(selected["path"])["gkd_protocol"]["selection"]
    assert resumed["history"] == whole["history"] and resumed["step"] == whole["step"]


@pytest.mark.parametrize("extra,match", [
    (["select.rule=best"], "needs select.split"),
    (["select.rule=best", "select.split=train"], "training split"),
    (["select.split=val"], "read only by select.rule=best"),
    (["select.rule=oracle"], "select.rule"),
])
def test_stage3_refuses_bad_selection(source, tmp_path, extra, match):
    with pytest.raises(ValueError, match=match):
        train_segmentor(load_config(SegmentConfig, [], stage3_args(source, tmp_path / "s3", *extra)))
    reset_accelerate()


def test_selection_split_sharing_training_images_is_refused(source, tmp_path):
    manifest = tmp_path / "leaky.yaml"  # `val` lists the training folder again
    manifest.write_text(Path(source["manifest"]).read_text().replace(
        "splits: [train, val, test]", "splits:\n  train: {images: images/train, labels: labels/train}\n"
        "  val: {images: images/train, labels: labels/train, include: ['train_00*']}"))
    args = stage3_args(source, tmp_path / "s3", *SELECT)
    args[1] = f"data.manifest={manifest}"
    with pytest.raises(ValueError, match=r"shares images with data.split=train: 10 shared file\(s\): .*train_000\.png"):
        train_segmentor(load_config(SegmentConfig, [], args))
    reset_accelerate()


def test_eval_refuses_targets_the_run_used_and_states_the_protocol(source, selected, tmp_path):
    ckpt, m = selected["path"], source["manifest"]
    for split, role in (("val", "selection"), ("train", "training")):
        suite = suite_file(tmp_path / f"{split}.yaml", [("held out", m, "test"), (f"leak {split}", m, split)])
        with pytest.raises(ProtocolError, match=f"'leak {split}' .*is the {role} split `{split}` of `src`"):
            run_eval(ckpt, suite, tmp_path / "eval", num_workers=0)
        assert not (tmp_path / "eval").exists()  # refused before anything is evaluated or written
    # the same images under another manifest name are caught by their files
    alias = tmp_path / "alias.yaml"
    alias.write_text(Path(m).read_text().replace("name: src", "name: alias").replace("\nroot: src\n",
                                                                                     f"\nroot: {source['root']}\n"))
    suite = suite_file(tmp_path / "alias_suite.yaml", [("alias val", alias, "val")])
    with pytest.raises(ProtocolError, match=r"shares images with the selection split .* 4 shared file\(s\): .*val_000\.png"):
        run_eval(ckpt, suite, tmp_path / "eval", num_workers=0)
    # the CLI says why and exits 2
    assert gkd_main(["eval", str(ckpt), "--suite", str(tmp_path / "val.yaml"), "--out", str(tmp_path / "e"),
                     "--workers", "0"]) == 2

    # held-out source test split and another domain: accepted, and the report states the protocol
    suite = suite_file(tmp_path / "ok.yaml", [("Src test", m, "test"), ("Other", source["base"] / "other.yaml", "val")])
    results = run_eval(ckpt, suite, tmp_path / "eval", num_workers=0)
    reset_accelerate()
    protocol = results["models"][0]["protocol"]
    assert protocol["checked_by_files"] == ["training split `train` of `src`", "selection split `val` of `src`"]
    md = (tmp_path / "eval" / "results.md").read_text()
    sel = read_metadata(ckpt)["gkd_protocol"]["selection"]
    assert "## Protocol" in md and "single scale, no flip" in md
    assert "sliding window 48×48, stride 32×32" in md
    assert "  - Src test: `src` split `test`, 3 images, original size" in md
    assert "  - Other: `other` split `val`, 3 images, original size" in md
    assert (f"| s3 | 0 | `src` split `train`, 12 images | frozen | best mIoU on `src` split `val`, every 2 steps: step "
            f"{sel['step']} ({sel['score']:.1f}) | files: training split `train` of `src`; selection split `val` of "
            f"`src` / not recorded, so not checked: encoder's distillation data (not in its file) |") in md


def test_a_moved_dataset_is_still_refused_by_name(source, selected, tmp_path):
    """With the training data gone from this machine only names can be compared: still refused, and the
    report says the file check was impossible."""
    moved = tmp_path / "moved"
    shutil.copytree(source["root"], moved)
    manifest = tmp_path / "src.yaml"
    manifest.write_text(Path(source["manifest"]).read_text())
    meta = read_metadata(selected["path"])
    protocol = json.loads(json.dumps(meta["gkd_protocol"]))
    for rec in (protocol["source"], protocol["selection"]):
        rec["root"], rec["manifest_file"] = str(tmp_path / "gone"), str(manifest)
    model, _ = load_segmentor(selected["path"])
    from gkd.models import save_segmentor

    ckpt = save_segmentor(tmp_path / "s3" / "segmentor.safetensors", model, config=meta["gkd_config"],
                          extra={"protocol": protocol})
    with pytest.raises(ProtocolError, match="selection split `val`"):
        run_eval(ckpt, suite_file(tmp_path / "v.yaml", [("v", manifest, "val")]), tmp_path / "e", roots={"src": moved},
                 num_workers=0)
    results = run_eval(ckpt, suite_file(tmp_path / "t.yaml", [("t", manifest, "test")]), tmp_path / "e",
                       roots={"src": moved}, num_workers=0)
    reset_accelerate()
    assert results["models"][0]["protocol"]["checked_by_name_only"] == [
        "training split `train` of `src`", "selection split `val` of `src`"]
    assert "names only (data not on this machine)" in (tmp_path / "e" / "results.md").read_text()


def test_three_seeds_report_mean_and_std(source, tmp_path):
    out = tmp_path / "seeds"
    record = run_stage(3, stage3_args(source, out, "optim.iters=2", "seeds=[0,1,2]"))
    reset_accelerate()
    runs = json.loads(record.read_text())
    assert runs["seeds"] == [0, 1, 2] and [Path(r).parent.name for r in runs["runs"]] == ["seed0", "seed1", "seed2"]
    assert [read_metadata(r)["gkd_config"]["seed"] for r in runs["runs"]] == [0, 1, 2]

    suite = suite_file(tmp_path / "suite.yaml", [("Src test", source["manifest"], "test"),
                                                  ("Other", source["base"] / "other.yaml", "val")])
    assert gkd_main(["eval", str(out), "--suite", str(suite), "--out", str(tmp_path / "eval"), "--workers", "0"]) == 0
    reset_accelerate()
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    rows = {m["name"]: m for m in metrics["models"]}
    assert list(rows) == ["seeds/seed0", "seeds/seed1", "seeds/seed2"]
    assert [m["seed"] for m in rows.values()] == [0, 1, 2]
    (group,) = metrics["groups"]
    assert group["name"] == "seeds" and group["members"] == list(rows) and group["seeds"] == [0, 1, 2]
    for target in ("Src test", "Other"):
        values = [m["datasets"][target]["mIoU"] for m in rows.values()]
        stat = group["datasets"][target]["mIoU"]
        assert stat["mean"] == pytest.approx(statistics.fmean(values), abs=1e-9)
        assert stat["std"] == pytest.approx(statistics.stdev(values), abs=1e-9)  # sample std, n - 1
        assert stat["n"] == 3
    averages = [(m["datasets"]["Src test"]["mIoU"] + m["datasets"]["Other"]["mIoU"]) / 2 for m in rows.values()]
    assert group["average"]["mIoU"]["mean"] == pytest.approx(statistics.fmean(averages), abs=1e-9)
    assert group["average"]["mIoU"]["std"] == pytest.approx(statistics.stdev(averages), abs=1e-9)
    assert len(set(averages)) > 1  # the seeds really differ

    md = (tmp_path / "eval" / "results.md").read_text()
    st = group["datasets"]["Src test"]["mIoU"]
    assert f"| seeds (n=3) | {st['mean']:.1f} ± {st['std']:.1f} |" in md
    table = list(csv.reader((tmp_path / "eval" / "results.csv").open()))
    assert table[-2][0] == "seeds mean" and table[-1][0] == "seeds std"
    assert table[-1][-1] == f"{statistics.stdev(averages):.1f}"

    # the same group given as a list of runs
    files = ",".join(runs["runs"])
    assert gkd_main(["eval", f"mine={files}", "--suite", str(suite), "--out", str(tmp_path / "e2"), "--workers", "0"]) == 0
    reset_accelerate()
    again = json.loads((tmp_path / "e2" / "metrics.json").read_text())["groups"][0]
    assert again["name"] == "mine" and again["average"] == group["average"]


def test_distillation_images_of_a_target_are_refused(source, selected, tmp_path):
    """Stage-2 shards written from a dataset split record it; an encoder distilled on a target's images
    makes every segmentor built on it ineligible for that target."""
    from gkd.config import DistillConfig
    from gkd.data.wds import resolve_shards
    from gkd.engine.distill import distill_protocol

    other = source["base"] / "other.yaml"
    assert gkd_main(["data", "shard", str(source["base"] / "other"), str(tmp_path / "wds"), "--manifest", str(other),
                     "--split", "val"]) == 0
    cfg = load_config(DistillConfig, [], ["stage=2", f"data.train_shards={tmp_path / 'wds'}"])
    record = distill_protocol(cfg, resolve_shards(cfg.data.train_shards).sources)
    assert record["stage"] == 2 and record["parent"] is None
    assert [(r["manifest"], r["split"], r["num_images"], r["root"]) for r in record["images"]] == [
        ("other", "val", 3, str((source["base"] / "other").resolve()))]

    model, meta = load_segmentor(selected["path"])
    protocol = {**meta["gkd_protocol"], "encoder": record}
    from gkd.models import save_segmentor

    ckpt = save_segmentor(tmp_path / "leaky" / "segmentor.safetensors", model, config=meta["gkd_config"],
                          extra={"protocol": protocol})
    suite = suite_file(tmp_path / "suite.yaml", [("Src test", source["manifest"], "test"), ("Other", other, "val")])
    with pytest.raises(ProtocolError, match="'Other' .*is the stage-2 distillation split `val` of `other`"):
        run_eval(ckpt, suite, tmp_path / "eval", num_workers=0)
    # shards without a dataset record: nothing to check, and the report says so
    unrecorded = {**protocol, "encoder": {**record, "images": [], "parent": {"stage": 1, "images": [], "parent": None}}}
    ckpt = save_segmentor(tmp_path / "blind" / "segmentor.safetensors", model, config=meta["gkd_config"],
                          extra={"protocol": unrecorded})
    results = run_eval(ckpt, suite, tmp_path / "eval", num_workers=0)
    reset_accelerate()
    assert results["models"][0]["protocol"]["unrecorded"] == [
        "stage-2 distillation images (shards without a dataset record)",
        "stage-1 distillation images (shards without a dataset record)"]
