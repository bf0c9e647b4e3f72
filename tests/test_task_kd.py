"""Task-level distillation in stage 3, compute accounting, budgets, the methods table and `gkd compare`."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from gkd.config import DistillConfig, SegmentConfig, load_config
from gkd.distill import METHODS, get_method
from gkd.engine import read_metadata
from gkd.engine.compute import Budget, BudgetSpentError, count_flops
from gkd.engine.distill import train_distill
from gkd.engine.segment import poly_lr, train_segmentor
from gkd.models import build_teacher
from gkd.models.segmentor import load_encoder_for_segmentor, load_segmentor
from gkd.tools.encoders import write_student_encoder, write_teacher_encoder
from helpers import TINY, reset_accelerate

# A tiny random DINOv2-style teacher and ViT student, 3 blocks each (ViTKD needs 3), 64 px, patch 16.
TEACHER = dict(depth=3, embed_dim=48, num_heads=2)
STUDENT = dict(depth=3, embed_dim=32, num_heads=2)


@pytest.fixture(scope="module")
def kd_setup(tmp_path_factory, folder_dataset):
    """(student encoder, teacher segmentor, dataset overrides) shared by the stage-3 tests."""
    root, manifest, _ = folder_dataset
    tmp = tmp_path_factory.mktemp("kd")
    teacher_enc = write_teacher_encoder(tmp / "teacher.safetensors", "vit_small_patch14_dinov2", img_size=64,
                                        patch_size=16, random_init=True, **TEACHER)
    student_enc = write_student_encoder(tmp / "student.safetensors", "vit_tiny_patch16_224", img_size=64,
                                        patch_size=16, **STUDENT)
    data = [f"data.manifest={manifest}", f"data.root={root}", "data.crop_size=64", "data.short_edges=null", "data.scale=[128,64]",
            "data.batch_size=2", "data.num_workers=0", "optim.lr=1e-3", "engine.log_every=1",
            "engine.save_every=1000", "decoder.name=mlp", "decoder.kwargs.channels=16"]
    teacher = train_segmentor(load_config(SegmentConfig, [], [f"encoder={teacher_enc}", f"out_dir={tmp / 't'}",
                                                               "budget.amount=3", *data]))
    reset_accelerate()
    return student_enc, teacher, data, tmp


def _records(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------ FLOPs and budgets


def test_flop_counter_matches_hand_count_for_linear_and_cpu_attention():
    lin = torch.nn.Linear(5, 7)
    x = torch.randn(3, 5, requires_grad=True)
    assert count_flops(lambda: lin(x)) == 2 * 3 * 5 * 7
    # backward: grad of the input and of the weight, each another 2·B·in·out
    assert count_flops(lambda: lin(x).sum().backward()) == 3 * 2 * 3 * 5 * 7
    q, k, v = (torch.randn(2, 3, 4, 8) for _ in range(3))  # [B, heads, N, d]
    # QKᵀ and (softmax)V: 2 · B·H·N·N·d each; torch's own table misses the CPU fused kernel
    assert count_flops(lambda: F.scaled_dot_product_attention(q, k, v)) == 2 * (2 * 2 * 3 * 4 * 4 * 8)


def test_budget_arithmetic():
    b = Budget("seconds", 10.0)
    state = {"step": 3, "train_seconds": 6.0, "train_flops": 0}
    assert b.used(state) == 6.0 and b.fraction(state) == 0.6
    assert not b.done(state, step_cost=2.0)  # 6 + 2 = 8 < 10
    assert b.done({**state, "train_seconds": 9.1}, step_cost=2.0)  # another step would end 1.1 s past
    assert Budget("tflops", 2.0).used({"step": 1, "train_seconds": 0, "train_flops": 5e11}) == 0.5
    assert Budget("steps", 4).done({"step": 4, "train_seconds": 0, "train_flops": 0}, 1.0)
    with pytest.raises(BudgetSpentError, match="first optimizer step"):
        Budget("seconds", 1.0).check_first_step(1.5)
    with pytest.raises(ValueError, match="kind"):
        Budget("epochs", 1.0)
    with pytest.raises(ValueError, match="positive"):
        Budget("steps", 0)


def test_cosine_decay_is_rebased_at_the_end_of_warmup_and_ends_at_the_budget():
    from gkd.engine.trainer import Trainer
    from gkd.engine.distill import lr_at

    trainer = Trainer.__new__(Trainer)  # only the schedule bookkeeping, no run
    trainer.budget = Budget("seconds", 10.0)
    trainer.state = {"step": 0, "train_seconds": 0.0, "train_flops": 0, "warmup_fraction": 0.0}
    lrs = []
    for step in range(6):  # steps of 2 s, warmup 2 steps: warmup ends at 4 s = 40 % of the budget
        trainer.state.update(step=step, train_seconds=2.0 * step)
        lrs.append(lr_at(step, trainer.decay_progress(2), 2, 1.0, 0.1))
    cosine = [0.1 + 0.45 * (1 + math.cos(math.pi * (2.0 * s - 4.0) / 6.0)) for s in (2, 3, 4, 5)]
    assert lrs == pytest.approx([0.5, 1.0, *cosine])
    trainer.state.update(step=6, train_seconds=10.0)
    assert lr_at(6, trainer.decay_progress(2), 2, 1.0, 0.1) == pytest.approx(0.1)  # final value at the budget


class FakeClock:
    """time.perf_counter stand-in: every call advances `tick` seconds."""

    def __init__(self, tick: float) -> None:
        self.now, self.tick = 0.0, tick

    def __call__(self) -> float:
        self.now += self.tick
        return self.now


def test_seconds_budget_stops_within_a_step_and_lays_the_schedule_over_it(kd_setup, monkeypatch):
    student, _, data, tmp = kd_setup
    from gkd.engine.trainer import Trainer

    monkeypatch.setattr(Trainer, "clock", staticmethod(FakeClock(1.0)))  # each step measures 1.0 s
    out = tmp / "seconds"
    train_segmentor(load_config(SegmentConfig, [], [f"encoder={student}", f"out_dir={out}", "budget.kind=seconds",
                                                     "budget.amount=4.3", "optim.iters=1000", "optim.min_lr=1e-5",
                                                     *data]))
    records = _records(out)
    steps = [r for r in records if "loss" in r]
    end = next(r for r in records if r.get("event") == "compute")
    # 4 steps of 1 s: a 5th would end 0.7 s past 4.3 s, more than stopping 0.3 s short
    assert [r["step"] for r in steps] == [1, 2, 3, 4] and end["train_seconds"] == pytest.approx(4.0)
    assert abs(end["train_seconds"] - 4.3) <= 1.0
    # LR of step t (0-based) at budget progress t/4.3 — not t/1000 (optim.iters is ignored)
    for t, r in enumerate(steps):
        assert r["lr"] == pytest.approx((1e-3 - 1e-5) * (1 - t / 4.3) ** 0.9 + 1e-5)
    assert poly_lr(4, min(1.0, 4.3 / 4.3), 1e-3, 0.9, 1e-5, 0) == pytest.approx(1e-5)  # final value at the budget
    meta = read_metadata(out / "segmentor.safetensors")
    assert meta["gkd_compute"]["budget"] == {"kind": "seconds", "amount": 4.3, "used": pytest.approx(4.0)}
    assert meta["gkd_compute"]["steps"] == 4 and meta["gkd_compute"]["images_seen"] == 8


def test_seconds_budget_overshooting_by_half_a_step(kd_setup, monkeypatch):
    """Steps of 2 s against 5.5 s: the third step ends at 6 s (0.5 s past, as far as stopping at 4 s
    falls short), past the progress bar's total (tqdm then drops it): the run must finish."""
    from gkd.engine.trainer import Trainer

    student, _, data, tmp = kd_setup
    monkeypatch.setattr(Trainer, "clock", staticmethod(FakeClock(2.0)))
    out = tmp / "overshoot"
    train_segmentor(load_config(SegmentConfig, [], [f"encoder={student}", f"out_dir={out}", "budget.kind=seconds",
                                                     "budget.amount=5.5", *data]))
    end = next(r for r in _records(out) if r.get("event") == "compute")
    assert end["steps"] == 3 and end["train_seconds"] == pytest.approx(6.0)


def test_step_and_flop_budgets_and_a_budget_spent_by_the_first_step(kd_setup):
    student, _, data, tmp = kd_setup
    out = tmp / "steps"
    train_segmentor(load_config(SegmentConfig, [], [f"encoder={student}", f"out_dir={out}", "budget.amount=3",
                                                     "optim.iters=1000", *data]))
    reset_accelerate()
    steps = [r for r in _records(out) if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert [r["lr"] for r in steps] == pytest.approx([1e-3 * (1 - t / 3) ** 0.9 for t in range(3)])
    flops = next(r for r in _records(out) if r.get("event") == "flops")["flops_per_step"]
    assert flops > 0 and steps[-1]["train_tflops"] == pytest.approx(3 * flops / 1e12)

    out = tmp / "tflops"  # 2.4 steps' worth: stop after 2 (a 3rd would end 0.6 step past)
    train_segmentor(load_config(SegmentConfig, [], [f"encoder={student}", f"out_dir={out}", "budget.kind=tflops",
                                                     f"budget.amount={2.4 * flops / 1e12}", *data]))
    reset_accelerate()
    assert [r["step"] for r in _records(out) if "loss" in r] == [1, 2]

    with pytest.raises(BudgetSpentError, match="first optimizer step"):
        train_segmentor(load_config(SegmentConfig, [], [f"encoder={student}", f"out_dir={tmp / 'spent'}",
                                                         "budget.kind=tflops", f"budget.amount={0.5 * flops / 1e12}",
                                                         *data]))


def test_stage1_records_compute_and_sums_it_over_the_lineage(tmp_path, shards):
    s1 = train_distill(load_config(DistillConfig, [], [*TINY, f"out_dir={tmp_path / 's1'}",
                                                        f"data.train_shards={shards}", "budget.amount=3"]))
    reset_accelerate()
    meta = read_metadata(s1)
    assert meta["gkd_compute"]["steps"] == 3 and meta["gkd_compute_total"]["runs"] == 1
    flops = meta["gkd_compute"]["flops_per_step"]
    assert flops > 0 and meta["gkd_compute"]["train_tflops"] == pytest.approx(3 * flops / 1e12)
    s2 = train_distill(load_config(DistillConfig, [], [*TINY, "stage=2", f"init={s1}", "student.name=null",
                                                        "student.kwargs={}", f"out_dir={tmp_path / 's2'}",
                                                        f"data.train_shards={shards}", "budget.amount=2"]))
    total = read_metadata(s2)["gkd_compute_total"]
    assert total["runs"] == 2 and total["steps"] == 5 and total["images_seen"] == 5 * 8
    assert total["train_seconds"] == pytest.approx(meta["gkd_compute"]["train_seconds"]
                                                   + read_metadata(s2)["gkd_compute"]["train_seconds"], abs=2e-3)


# ------------------------------------------------------------------ task-level distillation


@pytest.mark.parametrize("method", sorted(m for m, v in METHODS.items() if v.level == "task"))
def test_task_level_method_trains_the_student_and_never_the_teacher(kd_setup, method):
    student, teacher, data, tmp = kd_setup
    before = load_file(str(teacher))
    out = tmp / method
    path = train_segmentor(load_config(SegmentConfig, [], [f"encoder={student}", f"out_dir={out}",
                                                            f"method.name={method}", f"teacher={teacher}",
                                                            "budget.amount=2", *data]))
    steps = [r for r in _records(out) if "loss" in r]
    assert len(steps) == 2
    for r in steps:  # the total is the segmentation loss plus the method's
        # (LFD's script divides the segmentation loss by its own detached value: it enters as 1)
        seg_term = 1.0 if method == "lfd" else r["loss_seg"]
        assert r["loss"] == pytest.approx(seg_term + r["loss_distill"], rel=1e-5, abs=1e-6)
    seg, meta = load_segmentor(path)
    init = load_file(str(student))
    changed = [k for k, v in seg.encoder.state_dict().items() if not torch.equal(v, init[k])]
    assert changed, "the student encoder did not train"
    assert meta["gkd_method"]["name"] == method and meta["gkd_method"]["encoder_trained"] is True
    after = load_file(str(teacher))
    assert all(torch.equal(before[k], after[k]) for k in before)  # the teacher file is untouched
    assert not any(k.startswith("kd.") for k in load_file(str(path)))  # the method's own layers are dropped


def test_bckd_temperature_is_checkpointed_and_resumed(kd_setup):
    """BCKD's τ is loss-module state: the stage-3 checkpoint holds it and a resumed run continues from
    it. With tau_range=0 every training forward grows τ, so step t runs at τ = 1.05^(t−1)."""
    student, teacher, data, tmp = kd_setup
    out = tmp / "bckd_resume"
    args = [f"encoder={student}", f"out_dir={out}", "method.name=bckd", f"teacher={teacher}",
            "method.options.tau_range=0", "method.options.channels=16", *data]
    train_segmentor(load_config(SegmentConfig, [], [*args, "budget.amount=2"]))
    reset_accelerate()
    saved = load_file(str(out / "checkpoints" / "step_00000002" / "model.safetensors"))
    assert float(saved["kd.tau"]) == pytest.approx(1.05**2)
    # resumes at step 2; a longer budget changes the schedule, so the resume must accept it
    train_segmentor(load_config(SegmentConfig, [], [*args, "budget.amount=4", "engine.resume_changes=[budget.amount]"]))
    reset_accelerate()
    steps = [r for r in _records(out) if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert [r["bckd_tau"] for r in steps] == pytest.approx([1.05**t for t in range(4)], rel=1e-6)


@pytest.mark.slow
def test_two_process_ddp_task_kd_with_a_seconds_budget(kd_setup):
    """`accelerate launch --multi_gpu --num_processes 2` on CPU: a trained encoder (unused mask token
    and final norm) under DDP, and both ranks stopping at the same step of a wall-clock budget."""
    import os
    import subprocess
    import sys

    student, teacher, data, tmp = kd_setup
    out = tmp / "ddp"
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    repo = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(repo / "stages" / "stage3.py"), f"encoder={student}", f"out_dir={out}", "method.name=cwd",
           f"teacher={teacher}", "budget.kind=seconds", "budget.amount=4", *data]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    end = next(r for r in _records(out) if r.get("event") == "compute")
    assert end["world_size"] == 2 and end["steps"] >= 1 and end["images_seen"] == 2 * end["steps"]
    seconds = [r["train_seconds"] for r in _records(out) if "loss" in r]  # after each step (log_every=1)
    step = max(seconds[-1] - seconds[-2], seconds[-1] / len(seconds))  # the last step, or the mean one
    assert seconds[-2] < 4 and abs(seconds[-1] - 4) <= step  # it stopped within a step of the budget
    seg, meta = load_segmentor(out / "segmentor.safetensors")
    assert meta["gkd_method"]["name"] == "cwd"


def test_the_teacher_segmentor_gets_no_gradient(kd_setup):
    from gkd.distill import build_task_loss
    from gkd.engine.segment import SegTrainStep, encoder_info, load_teacher_segmentor
    from gkd.models import build_segmentor

    student, teacher_path, _, _ = kd_setup
    teacher = load_teacher_segmentor(teacher_path, ["background", "box", "disc"])
    enc, _ = load_encoder_for_segmentor(student)
    seg = build_segmentor(enc, "mlp", 3, channels=16, train_encoder=True)
    for name in ("kd", "vitkd", "lfd", "bckd"):
        kd = build_task_loss(name, encoder_info(seg), encoder_info(teacher), 3)
        images, labels = torch.rand(2, 3, 64, 64), torch.randint(0, 3, (2, 64, 64))
        _, t_out = teacher.distill_outputs(images, None, kd.blocks(kd.teacher_info, "teacher"))  # autograd on
        assert not t_out.logits.requires_grad and not t_out.last.requires_grad
        SegTrainStep(seg, kd)(images, labels, t_out, 0.0)["loss"].backward()
        assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
        assert any(p.grad is not None for p in seg.encoder.parameters())
        seg.zero_grad(set_to_none=True)


def test_bad_method_input_is_refused_with_what_is_missing(kd_setup, tmp_path):
    student, teacher, data, _ = kd_setup

    def run(*extra):
        return train_segmentor(load_config(SegmentConfig, [], [f"encoder={student}", f"out_dir={tmp_path}",
                                                                "budget.amount=1", *data, *extra]))

    with pytest.raises(ValueError) as e:
        run("method.name=vanilla-kd")
    assert all(n in str(e.value) for n in METHODS)  # every available method is listed
    with pytest.raises(ValueError, match="teacher segmentor's logits.*teacher=<segmentor.safetensors>"):
        run("method.name=kd")
    with pytest.raises(ValueError, match="representation-level.*stage 3"):
        run("method.name=gkd", f"teacher={teacher}")
    with pytest.raises(ValueError, match="task-level.*stages 1-2"):
        get_method("cwd", "representation")


def test_teacher_encoder_equals_the_teacher_at_its_native_geometry(tmp_path):
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch14_dinov2", img_size=56, num_classes=0, **TEACHER)
    save_file(model.state_dict(), str(tmp_path / "t.safetensors"))
    teacher = build_teacher("vit_small_patch14_dinov2", str(tmp_path / "t.safetensors"), img_size=56, **TEACHER)
    path = write_teacher_encoder(tmp_path / "enc.safetensors", "vit_small_patch14_dinov2",
                                 str(tmp_path / "t.safetensors"), img_size=56, patch_size=14, **TEACHER)
    encoder, norm = load_encoder_for_segmentor(path)
    assert norm == {"mean": list(teacher.mean), "std": list(teacher.std)}
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(encoder(x).patch, teacher(x).patch, rtol=0, atol=1e-5)
    assert read_metadata(path)["gkd_teacher"]["name"] == "vit_small_patch14_dinov2"


# ------------------------------------------------------------------ gkd compare


def test_compare_runs_every_row_at_one_budget_and_writes_table_and_plot(tmp_path, folder_dataset, shards):
    from omegaconf import OmegaConf

    from gkd.cli import main
    from gkd.eval.report import read_results
    from gkd.tools.compare import load_plan, run_compare

    root, manifest, suite = folder_dataset

    def overlay(name: str, dotlist: list[str]) -> str:
        path = tmp_path / f"{name}.yaml"
        path.write_text(OmegaConf.to_yaml(OmegaConf.from_dotlist(dotlist)))
        return str(path)

    s1 = overlay("s1", [*TINY, f"data.train_shards={shards}"])
    s2 = overlay("s2", [x for x in TINY if not x.startswith("student.")] + [f"data.train_shards={shards}"])
    s3 = overlay("s3", [f"data.manifest={manifest}", f"data.root={root}", "data.crop_size=64", "data.short_edges=null", "data.scale=[128,64]",
                        "data.batch_size=2", "data.num_workers=0", "optim.lr=1e-3", "engine.log_every=1",
                        "decoder.name=mlp", "decoder.kwargs.channels=16"])
    plan = overlay("plan", [
        f"out_dir={tmp_path / 'cmp'}", f"suite={suite}", f"roots.shapes={root}", "methods=[none,teacher,gkd,kd]",
        "budget.kind=steps", "budget.amount=4", "img_size=64", "patch_size=16",
        "teacher.name=vit_small_patch14_dinov2", "teacher.random_init=true", "teacher.kwargs.depth=3",
        "teacher.kwargs.embed_dim=48", "teacher.kwargs.num_heads=2", "student.name=vit_tiny_patch16_224",
        "student.kwargs.depth=3", "student.kwargs.embed_dim=32", "student.kwargs.num_heads=2",
        f"stage3=[{s3}]", f"representation.stage1=[{s1}]", f"representation.stage2=[{s2}]",
        "representation.shares=[0.5,0.25,0.25]", "eval.num_workers=0"])
    table = run_compare(load_plan(plan))
    rows = {r["method"]: r for r in table["rows"]}
    assert list(rows) == ["none", "teacher", "gkd", "kd"]
    # every row spent the same budget, GKD's split over its three stages (2 + 1 + 1 steps)
    assert all(r["budget_kind"] == "steps" and r["budget_amount"] == 4 and r["steps"] == 4 for r in rows.values())
    assert rows["gkd"]["stages"] == 3 and rows["kd"]["stages"] == 1
    assert rows["gkd"]["train_tflops"] > 0 and rows["kd"]["images_seen"] == 4 * 2
    results = read_results(tmp_path / "cmp" / "eval")
    for model in results["models"]:  # the table's mIoU is the evaluation's, the gain is against `none`
        assert rows[model["name"]]["mean"] == pytest.approx(model["datasets"]["Shapes val"]["mIoU"])
        assert rows[model["name"]]["gain"] == pytest.approx(rows[model["name"]]["mean"] - rows["none"]["mean"])
    out = tmp_path / "cmp"
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "compare.json").read_text())["rows"][0]["method"] == "none"
    assert (out / "compare.csv").read_text().splitlines()[0].startswith("method,kind,budget_kind")
    assert "| gkd | representation-level |" in (out / "compare.md").read_text()

    with pytest.raises(ValueError, match="trained on a budget of 4.0 steps, the plan asks for 5 steps"):
        run_compare(load_plan(plan, ["budget.amount=5"]))  # finished rows are reused only at the same budget
    with pytest.raises(ValueError, match="row 'none' needs student.name"):
        run_compare(load_plan(plan, ["student.name=null", f"out_dir={tmp_path / 'other'}", "methods=[none]"]))

    # finished runs, read back through the CLI
    runs = [f"{m}={out / m / 's3' / 'segmentor.safetensors'}" for m in ("none", "gkd")]
    assert main(["compare", "--runs", *runs, "--suite", str(suite), "--root", f"shapes={root}",
                 "--out", str(tmp_path / "read"), "--workers", "0"]) == 0
    again = json.loads((tmp_path / "read" / "compare.json").read_text())
    assert [r["steps"] for r in again["rows"]] == [4, 4] and again["rows"][1]["gain"] == pytest.approx(rows["gkd"]["gain"])


def test_compare_refuses_unknown_methods_and_a_missing_baseline():
    from gkd.tools.compare import check_methods

    with pytest.raises(ValueError, match="unknown distillation method 'kdd'.*cwd"):
        check_methods(["none", "kdd"], "none")
    with pytest.raises(ValueError, match="baseline 'none' is not among"):
        check_methods(["kd", "teacher"], "none")


def test_encoder_writers_on_the_command_line(tmp_path, capsys):
    from gkd.cli import main

    out = tmp_path / "student.safetensors"
    assert main(["student-encoder", "vit_tiny_patch16_224", str(out), "--img-size", "64", "--patch-size", "16",
                 "--seed", "3"]) == 0
    meta = read_metadata(out)
    assert meta["gkd_spec"]["patch_size"] == 16 and meta["gkd_spec"]["img_size"] == [64, 64]
    assert meta["gkd_config"]["student_encoder"]["init"] == "random (seed 3)"
    assert main(["teacher-encoder", "vit_small_patch14_dinov2", str(tmp_path / "t.safetensors")]) == 2
    assert "has no weights" in capsys.readouterr().err
    assert main(["compare"]) == 2
    assert "either --plan" in capsys.readouterr().err
