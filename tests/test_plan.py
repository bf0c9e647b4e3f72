"""`gkd pipeline PLAN.yaml`: a plan runs shard → 1 → 2 → 3 → eval under `accelerate launch`, skips
what is finished, resumes an interrupted chain to the same files, and refuses a plan that cannot run."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import pytest
import torch
import yaml
from safetensors.torch import load_file

from gkd.config import ConfigError
from gkd.tools import pipeline as pl

from helpers import TINY, recorded_cost, reset_accelerate

STUDENTLESS = [o for o in TINY if not o.startswith("student.")]


def write_plan(path: Path, shards: str, data: tuple[Path, Path, Path], processes: int = 1, **top) -> Path:
    """A tiny plan: CamVid-like source shards from `data`'s train split, ImageNet-like `shards`."""
    root, manifest, suite = data
    plan = {
        "name": "tiny", "out_dir": str(path.parent / "run"), "roots": {"shapes": str(root)},
        "launch": {"num_processes": processes, "cpu": True},
        "stages": [
            {"name": "src", "stage": "shard", "src": str(root), "manifest": str(manifest), "split": "train",
             "shard_size": 12, "expect_samples": 24},
            {"name": "s1", "stage": 1, "overrides": [*TINY, f"data.train_shards={shards}", "optim.epochs=1"]},
            {"name": "s2", "stage": 2, "shards": "src",
             "overrides": [*STUDENTLESS, "data.img_size=64", "teacher.patch_size=16", "optim.epochs=2"]},
            {"name": "s3", "stage": 3,
             "overrides": [f"data.manifest={manifest}", "decoder.name=mlp", "decoder.kwargs.channels=32",
                           "data.crop_size=64", "data.short_edges=null", "data.scale=[128,64]", "data.batch_size=4",
                           "data.num_workers=0", "optim.iters=6", "engine.save_every=3"]},
            {"name": "eval", "stage": "eval", "suite": str(suite), "num_workers": 0},
        ],
        **top,
    }
    path.write_text(yaml.safe_dump(plan, sort_keys=False))
    return path


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def _assert_same_files(a: Path, b: Path, files: Sequence[str]) -> None:
    for rel in files:
        x, y = _tensors(a / rel), _tensors(b / rel)
        assert x.keys() == y.keys(), rel
        for k in x:
            torch.testing.assert_close(y[k], x[k], rtol=0, atol=0, msg=f"{rel} {k}")


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread here and in every launched stage: float sums then come out the same in a
    stage run in this process (the kill below) as in one `accelerate launch` started."""
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def whole(tmp_path_factory, shards, folder_dataset, one_thread) -> Path:
    """The tiny plan, run once without interruption (one process)."""
    plan = write_plan(tmp_path_factory.mktemp("whole") / "plan.yaml", shards, folder_dataset)
    record = pl.run_pipeline(pl.load_plan(plan))
    assert [e["state"] for e in record["stages"]] == ["done"] * 5
    return plan.parent / "run"


@pytest.mark.slow
def test_plan_wires_the_handoffs_and_skips_what_is_finished(whole, shards, folder_dataset):
    from gkd.handoff import file_sha256, read_metadata

    run = whole
    record = json.loads((run / "tiny.pipeline.json").read_text())
    assert [(e["name"], e["stage"], e["state"]) for e in record["stages"]] == [
        ("src", "shard", "done"), ("s1", "1", "done"), ("s2", "2", "done"), ("s3", "3", "done"),
        ("eval", "eval", "done")]
    assert all(e["seconds"] > 0 for e in record["stages"])
    s2, s3 = read_metadata(run / "s2" / "encoder.safetensors"), read_metadata(run / "s3" / "segmentor.safetensors")
    assert s2["gkd_parent_sha256"] == file_sha256(run / "s1" / "encoder.safetensors")
    assert s3["gkd_parent_sha256"] == file_sha256(run / "s2" / "encoder.safetensors")
    assert s2["gkd_config"]["data"]["train_shards"] == str(run / "src")
    assert json.loads((run / "src" / "train-index.json").read_text())["num_samples"] == 24
    report = json.loads((run / "eval" / "metrics.json").read_text())
    assert report["models"][0]["name"] == "s3" and report["models"][0]["checkpoint"] == str(run / "s3" / "segmentor.safetensors")

    before = {p: p.stat().st_mtime_ns for p in run.rglob("*.safetensors")}
    again = pl.run_pipeline(pl.load_plan(run.parent / "plan.yaml"))
    assert [e["state"] for e in again["stages"]] == ["skipped"] * 5
    assert [e["seconds"] for e in again["stages"]] == [e["seconds"] for e in record["stages"]]  # when they ran
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*.safetensors")} == before

    # a finished stage of another config is refused, not mixed into the chain
    with pytest.raises(pl.PlanError, match=r"stage 's3': .*s3 holds a finished run of another config "
                                           r"\(differing keys: optim.lr\)"):
        pl.run_pipeline(pl.load_plan(run.parent / "plan.yaml", ["s3.optim.lr=0.5"]))


@pytest.mark.slow
def test_a_chain_killed_between_and_inside_stages_resumes_to_the_same_files(whole, tmp_path, shards,
                                                                          folder_dataset, monkeypatch):
    import gkd.engine.distill as loop
    from gkd.engine.runner import run_stage

    plan_file = write_plan(tmp_path / "plan.yaml", shards, folder_dataset)
    plan = yaml.safe_load(plan_file.read_text())  # the chain up to stage 2: the stages a kill can cut
    plan["stages"] = plan["stages"][:3]
    plan_file.write_text(yaml.safe_dump(plan, sort_keys=False))
    run = tmp_path / "run"
    real_run_step = pl._run_step

    def killed_before_s2(step, plan):
        if step.plan.name == "s2":
            raise KeyboardInterrupt("killed between stages")
        return real_run_step(step, plan)

    monkeypatch.setattr(pl, "_run_step", killed_before_s2)
    with pytest.raises(KeyboardInterrupt):
        pl.run_pipeline(pl.load_plan(plan_file, ["src.expect_samples=20"]))  # a wrong expectation: said, not used
    entries = json.loads((run / "tiny.pipeline.json").read_text())["stages"]
    assert [e["state"] for e in entries] == ["done", "done", "failed"]
    assert (entries[0]["samples"], entries[0]["expected_samples"]) == (24, 20)

    # stage 2 (6 steps) then killed inside, after its step-4 checkpoint: what `kill -9` leaves
    steps = pl.resolve(pl.load_plan(plan_file))
    s2 = next(s for s in steps if s.plan.name == "s2")
    real_lr_at = loop.lr_at

    def dying_lr_at(step, *a):
        if step == 5:
            raise KeyboardInterrupt("killed inside stage 2")
        return real_lr_at(step, *a)

    monkeypatch.setattr(loop, "lr_at", dying_lr_at)
    with pytest.raises(KeyboardInterrupt):
        run_stage(2, s2.argv)
    reset_accelerate()
    assert not (run / "s2" / "encoder.safetensors").exists() and (run / "s2" / "checkpoints").is_dir()

    monkeypatch.setattr(loop, "lr_at", real_lr_at)
    monkeypatch.setattr(pl, "_run_step", real_run_step)
    record = pl.run_pipeline(pl.load_plan(plan_file))
    assert [e["state"] for e in record["stages"]] == ["skipped", "skipped", "done"]
    rows = [json.loads(x) for x in (run / "s2" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r.get("event") == "resume"] == [4]
    _assert_same_files(whole, run, ("s1/encoder.safetensors", "s2/encoder.safetensors"))


def _refusal(tmp_path, shards, folder_dataset, **changes) -> str:
    plan_file = write_plan(tmp_path / "plan.yaml", shards, folder_dataset)
    plan = yaml.safe_load(plan_file.read_text())
    for name, edit in changes.items():
        edit(next(s for s in plan["stages"] if s["name"] == name) if name != "plan" else plan)
    plan_file.write_text(yaml.safe_dump(plan))
    with pytest.raises(pl.PlanError) as info:
        pl.run_pipeline(pl.load_plan(plan_file))
    assert not (tmp_path / "run").exists()  # refused before any stage started
    return str(info.value)


def test_a_plan_that_cannot_fit_together_is_refused_before_anything_runs(tmp_path, shards, folder_dataset):
    root, manifest, suite = folder_dataset
    other_suite = tmp_path / "seen.yaml"  # a target that is the training split of stage 3
    other_suite.write_text(f"name: seen\ntargets:\n  - {{name: Seen, manifest: {manifest}, split: train}}\n")
    message = _refusal(
        tmp_path, shards, folder_dataset,
        s2=lambda s: s["overrides"].append("student.name=vit_small_patch16_224"),
        s3=lambda s: s["overrides"].append("data.batch_size=3"),
        eval=lambda s: s.update(suite=str(other_suite)),
        plan=lambda p: p["launch"].update(num_processes=2))
    assert message.splitlines()[0] == "the plan cannot run:"
    assert "stage 's2': its student vit_small_patch16_224 differs from the student of its parent 's1' " \
           "(vit_tiny_patch16_224 {'depth': 1, 'embed_dim': 32, 'num_heads': 2})" in message
    assert "stage 's3': " in message and "data.batch_size=3" in message  # 3 does not split over 2 processes
    assert "stage 'eval': target Seen (shapes train) is the data stage 's3' trains on" in message
    assert "stage 'eval': target Seen (shapes train) is the data stage 'src' trains on" not in message

    message = _refusal(tmp_path, shards, folder_dataset,
                       s1=lambda s: s["overrides"].append(f"data.train_shards={tmp_path}/absent-{{000000..000001}}.tar"),
                       s3=lambda s: s.update(parent="eval"))
    assert "stage 's3': parent 'eval' is not an earlier stage of the plan" in message

    message = _refusal(tmp_path, shards, folder_dataset,
                       s1=lambda s: s["overrides"].append(f"data.train_shards={tmp_path}/absent-{{000000..000001}}.tar"))
    assert f"missing data: stage 's1': data.train_shards={tmp_path}/absent-{{000000..000001}}.tar" in message


def test_plan_overrides_reach_the_plan_and_its_stages(tmp_path, shards, folder_dataset):
    plan = pl.load_plan(write_plan(tmp_path / "plan.yaml", shards, folder_dataset),
                        ["launch.num_processes=2", "s3.optim.iters=8", f"out_dir={tmp_path / 'elsewhere'}"])
    assert plan.launch.num_processes == 2 and plan.out_dir == str(tmp_path / "elsewhere")
    steps = {s.plan.name: s for s in pl.resolve(plan)}
    assert steps["s3"].cfg.optim.iters == 8 and steps["s3"].cfg.encoder == str(tmp_path / "elsewhere" / "s2" / "encoder.safetensors")
    assert steps["s2"].cfg.init == str(tmp_path / "elsewhere" / "s1" / "encoder.safetensors")
    assert steps["s3"].cfg.data.root == str(folder_dataset[0])  # the plan's root for the manifest's name
    cmd, env = pl.launch_command(plan, ["stage3"])
    assert cmd[cmd.index("--num_processes") + 1] == "2" and "--multi_gpu" in cmd and env["ACCELERATE_USE_CPU"] == "1"
    with pytest.raises(ConfigError, match="plan file not found"):
        pl.load_plan(tmp_path / "nope.yaml")


def test_a_second_machine_launches_its_share_and_waits_for_machine_0s_files(tmp_path, shards, folder_dataset,
                                                                           monkeypatch):
    """Two machines × 2 processes: each stage is launched with the world of 4 and machine 1's rank and
    rendezvous; the batch is checked against 4 processes; machine 1 writes no shard or encoder file, it
    waits for machine 0's (shared storage)."""
    import os

    plan_file = write_plan(tmp_path / "plan.yaml", shards, folder_dataset, processes=2)
    multi = ["launch.num_machines=2", "launch.machine_rank=1", "launch.main_process_ip=10.0.0.1",
             "launch.main_process_port=29500"]
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    plan = pl.load_plan(plan_file, multi)
    cmd, _ = pl.launch_command(plan, ["stage3"])
    flags = {cmd[i]: cmd[i + 1] for i in range(len(cmd) - 1) if cmd[i].startswith("--")}
    assert (flags["--num_processes"], flags["--num_machines"], flags["--machine_rank"]) == ("4", "2", "1")
    assert (flags["--main_process_ip"], flags["--main_process_port"], flags["--num_cpu_threads_per_process"]) == \
        ("10.0.0.1", "29500", "4")
    assert "--multi_gpu" in cmd and cmd[-2:] == ["gkd.cli", "stage3"]
    one = pl.load_plan(plan_file, ["s3.data.batch_size=6"])
    pl.check_plan(one, pl.resolve(one), need_data=False)  # 6 splits over one machine's 2 processes ...
    six = pl.load_plan(plan_file, [*multi, "s3.data.batch_size=6"])
    with pytest.raises(pl.PlanError, match=r"stage 's3'.*data.batch_size=6 does not split over 4"):
        pl.check_plan(six, pl.resolve(six), need_data=False)  # ... not over 2 machines × 2 processes

    steps = {s.plan.name: s for s in pl.resolve(plan)}
    waited = []
    monkeypatch.setattr(pl, "_wait_for", waited.append)
    monkeypatch.setattr(pl, "_shard", lambda *a: pytest.fail("machine 1 must not write shards"))
    pl._run_step(steps["src"], plan)
    assert waited == [steps["src"].output] and not (steps["src"].out / pl.STEP_ARGS).exists()


def test_launched_processes_share_the_cores_unless_told(tmp_path, shards, folder_dataset, monkeypatch):
    """accelerate launch alone gives each process OMP_NUM_THREADS=1; a plan passes its cores on."""
    import os

    plan_file = write_plan(tmp_path / "plan.yaml", shards, folder_dataset)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))

    def threads(overrides, sp=None):
        cmd, _ = pl.launch_command(pl.load_plan(plan_file, overrides), ["stage1"], sp)
        return int(cmd[cmd.index("--num_cpu_threads_per_process") + 1])

    assert threads([]) == 8 and threads(["launch.num_processes=2"]) == 4 and threads(["launch.num_processes=16"]) == 1
    assert threads(["launch.cpu_threads=3"]) == 3
    assert threads([], pl.StagePlan(name="s", stage="1", num_processes=4)) == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    assert threads(["launch.num_processes=2"]) == 5


@pytest.mark.slow
def test_a_two_process_plan_runs_the_whole_chain_on_cpu(tmp_path, shards, folder_dataset):
    """Every stage launched as 2 CPU processes (gloo DDP, distributed metrics); stage 3 on half of the
    labels. The frozen encoder is bit-identical in the segmentor, and the 2-process evaluation equals
    a single-process one."""
    from gkd.eval import run_eval
    from gkd.handoff import read_metadata

    root, manifest, suite = folder_dataset
    plan_file = write_plan(tmp_path / "plan.yaml", shards, folder_dataset, processes=2)
    record = pl.run_pipeline(pl.load_plan(plan_file, ["s3.data.fraction=0.5"]))
    assert [e["state"] for e in record["stages"]] == ["done"] * 5
    run = tmp_path / "run"
    for stage in ("s1", "s2", "s3"):
        rows = [json.loads(x) for x in (run / stage / "metrics.jsonl").read_text().splitlines()]
        flops = next(r for r in rows if r.get("event") == "flops")
        assert flops["flops_per_step"] == 2 * flops["flops_per_micro_batch"], stage  # two processes' micro-batches
    encoder, segmentor = _tensors(run / "s2" / "encoder.safetensors"), _tensors(run / "s3" / "segmentor.safetensors")
    for k, v in encoder.items():
        torch.testing.assert_close(segmentor[f"encoder.{k}"], v, rtol=0, atol=0, msg=k)
    subset = (run / "s3" / "train_subset.txt").read_text().split()
    assert len(subset) == 12 == len(set(subset))  # label-efficient: half of 24, recorded
    assert read_metadata(run / "s3" / "segmentor.safetensors")["gkd_config"]["data"]["fraction"] == 0.5
    two = json.loads((run / "eval" / "metrics.json").read_text())["models"][0]["datasets"]["Shapes val"]
    one = run_eval(run / "s3" / "segmentor.safetensors", suite, tmp_path / "eval1", roots={"shapes": str(root)},
                   num_workers=0)["models"][0]["datasets"]["Shapes val"]
    reset_accelerate()
    assert two["num_images"] == one["num_images"] == 6
    assert two["mIoU"] == pytest.approx(one["mIoU"]) and two["aAcc"] == pytest.approx(one["aAcc"])


@pytest.mark.slow
def test_dry_run_flops_equal_what_the_stages_counted(whole, capsys):
    """The dry run of the finished tiny plan: per stage the FLOPs per step and the total its run
    recorded (metrics.jsonl's flops event and its compute record), and their sum."""
    result = pl.run_pipeline(pl.load_plan(whole.parent / "plan.yaml"), dry_run=True)
    printed = capsys.readouterr().out
    total = 0.0
    for row in result["stages"]:
        if row["stage"] not in ("1", "2", "3"):
            continue
        flops, compute = recorded_cost(whole / row["name"])
        assert row["flops_per_step"] == flops["flops_per_step"], row["name"]
        assert row["steps"] == compute["steps"], row["name"]
        assert row["train_tflops"] == pytest.approx(compute["train_tflops"], rel=1e-12), row["name"]
        total += compute["train_tflops"]
        assert f"- {row['name']} (stage {row['stage']}): " in printed
    assert result["total"]["train_tflops"] == pytest.approx(total, rel=1e-12) and result["missing"] == []
    assert f"total: {total:.4g} training TFLOPs" in printed


def test_dry_run_of_the_gta5_plan_needs_no_data(monkeypatch, capsys):
    """plans/gta5.yaml on a machine without its datasets: every stage and the totals, and which data
    is missing (stage 3's crop shrunk: its Mask2Former is counted for real on the CPU)."""
    monkeypatch.delenv("GKD_DATA_ROOT", raising=False)
    repo = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(repo)
    result = pl.run_pipeline(pl.load_plan(repo / "plans" / "gta5.yaml", ["s3.data.crop_size=64"]), dry_run=True)
    printed = capsys.readouterr().out
    s1 = next(r for r in result["stages"] if r["name"] == "s1")
    assert s1["steps"] == 100 * (1281167 // 512) and s1["images"] == s1["steps"] * 512
    assert [r["name"] for r in result["stages"]] == ["imagenet", "s1", "gta5-images", "s2", "s3", "eval"]
    assert all(r.get("train_tflops", 1) > 0 for r in result["stages"])
    missing = "\n".join(result["missing"])
    for what in ("imagenet/train", "dataset 'gta5'", "dataset 'cityscapes'", "dataset 'bdd100k'", "dataset 'mapillary'"):
        assert what in missing, what
    assert "missing data (the run would refuse to start):" in printed


def test_calibrated_dry_run_times_each_training_stage(tmp_path, shards, folder_dataset, capsys):
    plan_file = write_plan(tmp_path / "plan.yaml", shards, folder_dataset)
    result = pl.run_pipeline(pl.load_plan(plan_file), dry_run=True, calibrate=True)
    trained = [r for r in result["stages"] if r["stage"] in ("1", "2", "3")]
    assert [r["name"] for r in trained] == ["s1", "s2", "s3"]
    for r in trained:
        assert r["device"] == "cpu" and r["seconds_per_step"] > 0
    s1, s2, s3 = trained
    for r in (s1, s3):
        assert r["seconds"] == pytest.approx(r["seconds_per_step"] * r["steps"])
    # stage 2 reads shards not written yet: its steps come from the shard stage's expect_samples (24 → 3 steps of
    # 8 an epoch, 2 epochs); without it they are unknown
    assert s2["steps"] == 6 and s2["seconds"] == pytest.approx(s2["seconds_per_step"] * 6)
    assert result["total"]["seconds"] == pytest.approx(s1["seconds"] + s2["seconds"] + s3["seconds"])
    unknown = pl.run_pipeline(pl.load_plan(plan_file, ["src.expect_samples=null"]), dry_run=True)
    s2 = next(r for r in unknown["stages"] if r["name"] == "s2")
    assert s2["steps"] is None and "steps unknown" in s2["notes"][0]
    assert unknown["total"]["stages_of_unknown_length"] == ["s2"]
    assert not (tmp_path / "run").exists()  # a dry run writes nothing
    assert "total wall-clock on this machine, training stages:" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["gta5", "gta5_label_efficient", "cityscapes", "potsdam", "camvid", "smoke", "demo"])
def test_every_shipped_plan_resolves_and_fits_together(name, monkeypatch):
    """Configs, wiring, batch splits, parents and target overlaps of plans/*.yaml (data not needed)."""
    repo = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(repo)
    plan = pl.load_plan(repo / "plans" / f"{name}.yaml")
    steps = pl.resolve(plan)
    pl.check_plan(plan, steps, need_data=False)
    kinds = [s.kind for s in steps]
    assert kinds[-1] == "eval" and "3" in kinds
    for s in steps:
        if s.kind == "3":
            assert s.cfg.encoder == str(s.parent.handoff)  # wired, not written by hand


def test_synth_and_encoder_stages_are_checked_before_anything_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    plan_file = tmp_path / "plan.yaml"
    plan_file.write_text(yaml.safe_dump({"name": "bad", "out_dir": str(tmp_path / "run"), "stages": [
        {"name": "data", "stage": "synth", "args": {"seed": 0, "sizes": 3}},
        {"name": "init", "stage": "encoder", "make": "student", "args": {"img_size": 56}},
        {"name": "t", "stage": "encoder", "make": "teacher", "args": {"name": "x", "colour": "red"}},
        {"name": "odd", "stage": "encoder", "make": "other"},
        {"name": "s1", "stage": 1, "config": ["configs/stage1/smoke.yaml"], "parent": "t"},
        {"name": "b", "stage": "encoder", "parent": "s1", "weights": "data"},
    ]}))
    with pytest.raises(pl.PlanError) as info:
        pl.run_pipeline(pl.load_plan(plan_file))
    message = str(info.value)
    assert "stage 'data': args of a synth stage: unknown sizes (it takes pool, seed, size, target, train, val)" in message
    assert "stage 'init': args of a student encoder stage: missing name" in message
    assert "stage 't': args of a teacher encoder stage: unknown colour" in message
    assert "stage 'odd': make must be one of baseline, student, teacher, not 'other'" in message
    assert "stage 's1': parent 't' must be an encoder stage with make: student" in message
    assert "stage 'b': weights 'data' is a stage synth; it must be a stage encoder" in message
    assert not (tmp_path / "run").exists()


def test_the_demo_plan_needs_no_data_and_takes_stage_field_overrides(tmp_path, monkeypatch):
    """Its data is what its synth stage generates (no root is missing before it runs); `<stage>.args.k=v`
    merges into the stage's args; its config files are found from any working directory."""
    monkeypatch.chdir(tmp_path)
    plan = pl.load_plan("demo", [f"out_dir={tmp_path / 'run'}", "data.args.seed=3", "init.args.kwargs.depth=2"])
    steps = {s.plan.name: s for s in pl.resolve(plan)}
    assert pl.check_plan(plan, list(steps.values()), need_data=True) == []
    assert dict(steps["data"].plan.args) == {"seed": 3, "size": 128, "train": 400, "val": 80, "target": 100, "pool": 1200}
    assert dict(steps["init"].plan.args.kwargs) == {"depth": 2}
    repo = Path(__file__).resolve().parents[1]
    assert steps["stage1"].plan.config == [str(repo / "configs/demo/distill.yaml"), str(repo / "configs/demo/stage1.yaml")]
    data = str(tmp_path / "run" / "data")
    assert steps["stage1"].cfg.student.checkpoint == str(tmp_path / "run" / "init" / "encoder.safetensors")
    assert steps["stage1"].cfg.probe.root == data and steps["stage3"].cfg.data.root == data
    assert steps["baseline"].parent is steps["stage2"] and steps["baseline"].weights is steps["init"]
    assert steps["teacher-stage3"].cfg.encoder == str(tmp_path / "run" / "teacher" / "encoder.safetensors")
    assert steps["init"].seeds == steps["teacher"].seeds == []  # one file for every seed
    # a shard of a folder that no stage generates is still missing
    other = pl.load_plan("demo", [f"out_dir={tmp_path / 'run'}", f"pool-wds.src={tmp_path / 'absent'}"])
    with pytest.raises(pl.PlanError, match=r"missing data: stage 'pool-wds': shard src .*absent is not a folder"):
        pl.check_plan(other, pl.resolve(other), need_data=True)
