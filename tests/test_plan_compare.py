"""A plan's `compare` stage: `gkd compare` once per seed, the first seed's teacher segmentor shared,
the mean ± std table over the seeds, resume and refusals; its budget in the dry run."""
from __future__ import annotations

import json
import statistics
import subprocess
from pathlib import Path

import pytest
import yaml

from gkd.engine import read_metadata
from gkd.tools import pipeline as pl
from gkd.tools.compare import seed_summary, summary_markdown


TINY_TEACHER = {"name": "vit_small_patch14_dinov2", "random_init": True,
                "kwargs": {"depth": 1, "embed_dim": 48, "num_heads": 2}}
TINY_STUDENT = {"name": "vit_tiny_patch16_224", "kwargs": {"depth": 1, "embed_dim": 32, "num_heads": 2}}


def write_compare(folder: Path, data: tuple[Path, Path, Path], **changes) -> Path:
    """A tiny `gkd compare` plan: teacher, no distillation and KD at 2 steps each, 64 px."""
    root, manifest, suite = data
    s3 = folder / "cmp_s3.yaml"
    s3.write_text(yaml.safe_dump({
        "data": {"manifest": str(manifest), "root": str(root), "crop_size": 64, "short_edges": None,
                 "scale": [128, 64], "batch_size": 2, "num_workers": 0},
        "optim": {"lr": 1e-3}, "engine": {"log_every": 1}, "decoder": {"name": "mlp", "kwargs": {"channels": 16}}}))
    plan = {"suite": str(suite), "roots": {"shapes": str(root)}, "methods": ["teacher", "none", "kd"],
            "baseline": "none", "budget": {"kind": "steps", "amount": 2}, "img_size": 64, "patch_size": 16,
            "teacher": TINY_TEACHER, "student": TINY_STUDENT, "stage3": [str(s3)], "eval": {"num_workers": 0},
            **changes}
    path = folder / "cmp.yaml"
    path.write_text(yaml.safe_dump(plan))
    return path


def write_pipeline(folder: Path, compare: Path, seeds=(0, 1), stages=(), **stage) -> Path:
    plan = {"name": "cmp", "out_dir": str(folder / "run"), "seeds": list(seeds), "launch": {"cpu": True},
            "stages": [*stages, {"name": "table", "stage": "compare", "config": [str(compare)], **stage}]}
    path = folder / "plan.yaml"
    path.write_text(yaml.safe_dump(plan, sort_keys=False))
    return path


@pytest.mark.slow
def test_a_compare_stage_runs_each_seed_shares_the_teacher_and_summarises(tmp_path, folder_dataset, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    plan_file = write_pipeline(tmp_path, write_compare(tmp_path, folder_dataset))
    record = pl.run_pipeline(pl.load_plan(plan_file))
    assert [e["state"] for e in record["stages"]] == ["done"]
    out = tmp_path / "run" / "table"
    teacher = out / "seed0" / "teacher" / "s3" / "segmentor.safetensors"
    assert teacher.is_file() and not (out / "seed1" / "teacher").exists()  # trained once
    kd1 = read_metadata(out / "seed1" / "kd" / "s3" / "segmentor.safetensors")["gkd_config"]
    assert kd1["teacher"] == str(teacher) and kd1["seed"] == 1
    assert read_metadata(out / "seed1" / "none" / "s3" / "segmentor.safetensors")["gkd_config"]["seed"] == 1

    tables = [json.loads((out / f"seed{s}" / "compare.json").read_text()) for s in (0, 1)]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seeds"] == ["seed0", "seed1"] and summary["targets"] == ["Shapes val"]
    rows = {r["method"]: r for r in summary["rows"]}
    assert rows["teacher"]["seeds"] == ["seed0"] and rows["kd"]["seeds"] == ["seed0", "seed1"]
    assert tables[1]["rows"][0]["segmentor"] == str(teacher)  # seed 1 reports the shared teacher
    for method in ("none", "kd"):
        per_seed = [next(r for r in t["rows"] if r["method"] == method)["mean"] for t in tables]
        assert rows[method]["mean"]["mean"] == pytest.approx(statistics.fmean(per_seed))
        assert rows[method]["mean"]["std"] == pytest.approx(statistics.stdev(per_seed))
    assert rows["kd"]["gain"] == pytest.approx(rows["kd"]["mean"]["mean"] - rows["none"]["mean"]["mean"])
    assert (out / "summary.md").read_text() == summary_markdown(summary)

    def no_process(*args, **kwargs):
        raise AssertionError(f"a finished compare stage started {args}")

    monkeypatch.setattr(subprocess, "run", no_process)
    again = pl.run_pipeline(pl.load_plan(plan_file))
    assert [e["state"] for e in again["stages"]] == ["skipped"]

    # a third seed: the two finished comparisons are kept, only seed 2 runs, the summary covers all three
    monkeypatch.undo()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    calls = []
    real_run = subprocess.run

    def counted(cmd, **kwargs):
        calls.append(cmd)
        return real_run(cmd, **kwargs)

    monkeypatch.setattr(subprocess, "run", counted)
    pl.run_pipeline(pl.load_plan(plan_file, ["seeds=[0,1,2]"]))
    assert len(calls) == 1 and f"out_dir={out / 'seed2'}" in calls[0]
    assert json.loads((out / "summary.json").read_text())["seeds"] == ["seed0", "seed1", "seed2"]

    with pytest.raises(pl.PlanError, match=r"holds a comparison of another plan .*seed0.plan\.yaml differs"):
        pl.run_pipeline(pl.load_plan(plan_file, ["table.budget.amount=3"]))  # before anything runs
    assert len(calls) == 1


def test_dry_run_prices_a_compare_stage_by_its_budget(tmp_path, folder_dataset, capsys):
    compare = write_compare(tmp_path, folder_dataset, budget={"kind": "tflops", "amount": 0.5})
    plan = pl.load_plan(write_pipeline(tmp_path, compare, seeds=(0, 1, 2)))
    report = pl.run_pipeline(plan, dry_run=True)
    row = report["stages"][0]
    # seed 0 trains teacher, none and kd; seeds 1 and 2 reuse its teacher: 3 + 2 + 2 rows of 0.5 TFLOPs
    assert row["rows_trained"] == 7 and row["train_tflops"] == pytest.approx(3.5)
    assert report["total"]["train_tflops"] == pytest.approx(3.5)
    assert "7 rows trained over 3 runs (teacher, none, kd) at 0.5 tflops each: 3.5 TFLOPs" in capsys.readouterr().out

    plan = pl.load_plan(write_pipeline(tmp_path, write_compare(tmp_path, folder_dataset,
                                                               budget={"kind": "seconds", "amount": 30}),
                                       seeds=(0, 1), share_teacher=False))
    steps = pl.resolve(plan)
    assert all(cfg.teacher_segmentor is None for _, _, cfg in steps[0].compare)  # every seed trains its teacher
    report = pl.run_pipeline(plan, dry_run=True)
    assert report["total"]["budget_seconds"] == 6 * 30 and report["total"]["stages_of_unknown_length"] == ["table"]
    assert not (tmp_path / "run").exists()


def test_a_compare_stage_that_cannot_run_is_refused_before_anything_runs(tmp_path, folder_dataset, shards):
    root, manifest, _ = folder_dataset
    seen = tmp_path / "seen.yaml"  # a target that is the split stage 3 trains on
    seen.write_text(f"name: seen\ntargets:\n  - {{name: Seen, manifest: {manifest}, split: train}}\n")
    s1 = tmp_path / "s1.yaml"
    s1.write_text(yaml.safe_dump({"data": {"train_shards": str(tmp_path / "absent-{000000..000001}.tar")}}))
    compare = write_compare(tmp_path, folder_dataset, suite=str(seen), methods=["none", "gkd"],
                            teacher_segmentor=str(tmp_path / "no-teacher.safetensors"),
                            representation={"stage1": [str(s1)], "stage2": [str(s1)]})
    with pytest.raises(pl.PlanError) as info:
        pl.run_pipeline(pl.load_plan(write_pipeline(tmp_path, compare)))
    message = str(info.value)
    assert "stage 'table': target Seen (shapes train) is the data stage 'table' trains on" in message
    assert f"missing data: stage 'table': stage1 data.train_shards={tmp_path}/absent-{{000000..000001}}.tar" in message
    assert f"missing data: stage 'table': teacher_segmentor={tmp_path}/no-teacher.safetensors" in message
    assert not (tmp_path / "run").exists()

    # shards a shard stage of the plan writes are not missing
    s1.write_text(yaml.safe_dump({"data": {"train_shards": str(tmp_path / "run" / "src" / "train-000000.tar")}}))
    compare = write_compare(tmp_path, folder_dataset, methods=["none", "gkd"],
                            teacher_segmentor=str(tmp_path / "no-teacher.safetensors"),
                            representation={"stage1": [str(s1)], "stage2": [str(s1)]})
    shard = {"name": "src", "stage": "shard", "src": str(Path(shards).parent.parent / "train")}
    plan = pl.load_plan(write_pipeline(tmp_path, compare, stages=[shard]))
    missing = pl.check_plan(plan, pl.resolve(plan), need_data=False)
    assert missing == [f"stage 'table': teacher_segmentor={tmp_path}/no-teacher.safetensors"]

    with pytest.raises(pl.PlanError, match=r"takes config: \[one gkd compare plan file\]"):
        pl.resolve(pl.load_plan(write_pipeline(tmp_path, compare, config=[str(compare), str(compare)])))
    with pytest.raises(pl.PlanError, match="unknown distillation method 'nope'"):
        pl.resolve(pl.load_plan(write_pipeline(tmp_path, write_compare(tmp_path, folder_dataset, methods=["nope"]))))


def test_seed_summary_is_the_mean_and_sample_std_and_counts_a_shared_row_once():
    def table(seed: int, none: float, kd: float) -> dict:
        def row(method, mean, segmentor):
            return {"method": method, "kind": method, "train_seconds": 10.0 + seed, "steps": 4, "mIoU": {"A": mean},
                    "mean": mean, "segmentor": segmentor}

        return {"suite": "s", "targets": ["A"], "baseline": "none",
                "rows": [row("teacher", 50.0, "seed0/teacher"), row("none", none, f"seed{seed}/none"),
                         row("kd", kd, f"seed{seed}/kd")]}

    summary = seed_summary({"seed0": table(0, 20.0, 24.0), "seed1": table(1, 22.0, 30.0), "seed2": table(2, 24.0, 27.0)})
    rows = {r["method"]: r for r in summary["rows"]}
    assert rows["teacher"]["seeds"] == ["seed0"] and rows["teacher"]["mean"] == {"mean": 50.0, "std": None, "n": 1}
    assert rows["none"]["mean"] == {"mean": 22.0, "std": 2.0, "n": 3}
    assert rows["kd"]["mIoU"]["A"] == {"mean": 27.0, "std": 3.0, "n": 3}
    assert rows["kd"]["gain"] == 5.0 and rows["none"]["train_seconds"] == 11.0
    md = summary_markdown(summary)
    assert "| teacher | teacher | 1 | 10 | 4 | 50.0 | 50.0 | +28.0 |" in md
    assert "| kd | kd | 3 | 11 | 4 | 27.0 ± 3.0 | 27.0 ± 3.0 | +5.0 |" in md
    # a run without a score (NaN: a class-less target) is left out of its cell, and the cell says so
    gappy = table(2, float("nan"), 27.0)
    summary = seed_summary({"seed0": table(0, 20.0, 24.0), "seed1": table(1, 22.0, 30.0), "seed2": gappy})
    none = next(r for r in summary["rows"] if r["method"] == "none")
    assert none["mean"] == {"mean": 21.0, "std": pytest.approx(2 ** 0.5), "n": 2}
    assert "| none | none | 3 | 11 | 4 | 21.0 ± 1.4 (of 2 runs) |" in summary_markdown(summary)
    with pytest.raises(ValueError, match="targets"):
        seed_summary({"seed0": table(0, 1, 2), "seed1": {**table(1, 1, 2), "targets": ["B"]}})


@pytest.mark.parametrize("name, seconds", [("camvid_f2l", (6 + 5 + 5) * 600), ("camvid_compare", 10 * 360)])
def test_the_shipped_compare_plans_resolve_and_price_their_budget(name, seconds, monkeypatch, capsys):
    repo = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(repo)
    plan = pl.load_plan(name)
    steps = pl.resolve(plan)
    pl.check_plan(plan, steps, need_data=False)
    assert [s.kind for s in steps] == ["shard", "shard", "compare"]
    assert pl.describe(plan, steps, [])["total"]["budget_seconds"] == seconds
