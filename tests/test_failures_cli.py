"""Issue 15's probes at the entry points: what a user sees for a mistake (one `gkd: error:` line,
exit 2) and that an internal error keeps its traceback (gkd.errors, gkd.config.check_values)."""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gkd.atomic import check_writable
from gkd.cli import main
from gkd.errors import GKDError, error_boundary, report_user_error
from gkd.handoff import save_handoff
from gkd.models import build_student
from helpers import TINY

REPO = Path(__file__).resolve().parents[1]


def _error_lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.startswith("gkd: error:")]


def _one_error(capsys) -> str:
    """The run printed exactly one error line and no traceback; return it."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = _error_lines(err)
    assert len(lines) == 1, err
    return lines[0]


# (stage, overrides, the message's fragment): each is refused before any model or dataset is built.
VALUE_PROBES = [
    (1, ["data.batch_size=0"], "data.batch_size=0: must be a positive integer"),
    (1, ["data.batch_size=-4"], "data.batch_size=-4: must be a positive integer"),  # was a budget.amount message
    (1, ["optim.grad_accum=0"], "optim.grad_accum=0: must be 1 or more"),
    (1, ["engine.save_every=0"], "engine.save_every=0: must be 1 or more"),
    (1, ["optim.warmup_epochs=-1"], "optim.warmup_epochs=-1.0: must be 0 or more"),
    (1, ["optim.lr=0"], "optim.lr=0.0: must be positive"),
    (1, ["optim.epochs=0", "optim.grad_accum=0"], "values: optim.grad_accum=0: must be 1 or more; optim.epochs=0"),
    (1, ["budget.kind=minutes"], "budget.kind='minutes': must be steps, seconds or tflops"),
    (1, ["data.batch_size=7", "optim.grad_accum=2"],
     "data.batch_size=7 does not split over 1 process(es) × optim.grad_accum=2: use a multiple of 2 "
     "(e.g. data.batch_size=8)"),
    (1, ["optim.lrr=1"], "optim.lrr"),  # a key typo: named by the schema
    (2, [], "stage 2 starts from a stage-1 encoder: pass init="),
    (3, ["optim.iters=0"], "optim.iters=0: must be positive"),
    (3, ["optim.warmup_iters=-1"], "optim.warmup_iters=-1: must be 0 or more"),
    (3, ["data.fraction=0"], "data.fraction=0.0: must be in (0, 1]"),
    (3, ["data.on_bad=ignore"], "data.on_bad='ignore': must be error or skip"),
]


@pytest.mark.parametrize("stage, overrides, message", VALUE_PROBES)
def test_bad_values_are_one_line_naming_the_key(stage, overrides, message, tmp_path, capsys):
    base = [*TINY, f"data.train_shards={tmp_path}/x.tar"] if stage < 3 else [
        f"encoder={tmp_path}/e.safetensors", f"data.manifest={tmp_path}/m.yaml"]
    assert main([f"stage{stage}", *base, f"out_dir={tmp_path / 'run'}", *overrides]) == 2
    assert message in _one_error(capsys)
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_batch_split_is_checked_against_the_launched_processes(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")  # what `accelerate launch --num_processes 3` sets in each rank
    assert main(["stage1", *TINY, f"data.train_shards={tmp_path}/x.tar", f"out_dir={tmp_path}"]) == 2
    assert ("data.batch_size=8 does not split over 3 process(es) × optim.grad_accum=1: use a multiple of 3 "
            "(e.g. data.batch_size=9)") in _one_error(capsys)


def test_stage3_encoder_whose_spec_cannot_be_rebuilt(tmp_path, capsys, folder_dataset):
    """A header edited to another width: named as that file's fault, not a CheckpointError traceback."""
    root, manifest, _ = folder_dataset
    student = build_student("vit_tiny_patch16_224", img_size=64, depth=1, embed_dim=32, num_heads=2)
    spec = {**student.spec, "kwargs": {**student.spec["kwargs"], "embed_dim": 64}}
    enc = save_handoff(tmp_path / "e.safetensors", student, spec, stage=2)
    assert main(["stage3", f"encoder={enc}", f"data.manifest={manifest}", f"data.root={root}",
                 f"out_dir={tmp_path / 'run'}", "data.num_workers=0"]) == 2
    line = _one_error(capsys)
    assert f"{enc}: the model spec in its header cannot be rebuilt" in line


def test_stage_script_exits_2_with_one_line(tmp_path):
    """`python stages/stage1.py` (what `accelerate launch` runs) under the same boundary."""
    proc = subprocess.run([sys.executable, str(REPO / "stages" / "stage1.py"), *TINY, "data.batch_size=0",
                           f"data.train_shards={tmp_path}/x.tar", f"out_dir={tmp_path}"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert _error_lines(proc.stderr) == ["gkd: error: invalid config value: data.batch_size=0: must be a positive "
                                         "integer, the global batch"]
    assert "Traceback" not in proc.stderr


def _raise(e: BaseException):
    def fn():
        raise e
    return fn


@pytest.mark.parametrize("error, line", [
    (ValueError("x.yaml: bad"), "gkd: error: x.yaml: bad"),
    (KeyError("unknown method 'foo'"), "gkd: error: unknown method 'foo'"),  # not quoted as str(KeyError) is
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "/data/x"),
     "gkd: error: [Errno 2] No such file or directory: '/data/x'"),
    (OSError(errno.ENOSPC, "No space left on device", "/runs/a/model.safetensors"),
     "gkd: error: No space left on device: /runs/a/model.safetensors (free space or use another out_dir)"),
    (OSError(errno.EROFS, "Read-only file system", "/ro/x"),
     "gkd: error: Read-only file system: /ro/x (free space or use another out_dir)"),
])
def test_boundary_turns_user_errors_into_one_line(error, line, capsys, monkeypatch):
    monkeypatch.delenv("GKD_DEBUG", raising=False)
    assert error_boundary(_raise(error)) == 2
    assert capsys.readouterr().err.splitlines() == [line]


@pytest.mark.parametrize("error", [RuntimeError("internal"), TypeError("internal"), OSError(errno.EIO, "I/O error"),
                                   ZeroDivisionError("internal")])
def test_boundary_keeps_internal_errors(error, monkeypatch):
    monkeypatch.delenv("GKD_DEBUG", raising=False)
    with pytest.raises(type(error)):
        error_boundary(_raise(error))


def test_gkd_debug_keeps_the_traceback_of_user_errors(monkeypatch):
    monkeypatch.setenv("GKD_DEBUG", "1")
    with pytest.raises(ValueError, match="bad value"):
        error_boundary(_raise(ValueError("bad value")))


def test_launched_ranks_print_a_shared_message_once(tmp_path, capsys, monkeypatch):
    """Two local ranks of one launch (same parent) failing alike print one line; each writes its
    launcher error file, which torchrun's failure summary shows."""
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    monkeypatch.setenv("MASTER_PORT", "29511")
    for rank in (0, 1):
        monkeypatch.setenv("LOCAL_RANK", str(rank))
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(tmp_path / f"error{rank}.json"))
        report_user_error(ValueError("data.batch_size=7 does not split"))
    assert capsys.readouterr().err.splitlines() == ["gkd: error: data.batch_size=7 does not split"]
    for rank in (0, 1):
        assert json.loads((tmp_path / f"error{rank}.json").read_text())["message"] == \
            "gkd: error: data.batch_size=7 does not split"
    report_user_error(ValueError("another message"))  # a different error is printed, with its rank
    assert capsys.readouterr().err.splitlines() == ["gkd: error: another message (rank 1)"]


@pytest.mark.slow
def test_indivisible_batch_under_ddp_is_one_message(tmp_path, shards):
    """`accelerate launch --multi_gpu --num_processes 2` with a global batch of 7: refused before any
    model is built; our line appears once (the launcher's own summary follows it, quoting it)."""
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(REPO / "stages" / "stage1.py"), *TINY, f"data.train_shards={shards}", "data.batch_size=7",
           f"out_dir={tmp_path / 'run'}"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    lines = _error_lines(proc.stderr)
    assert len(lines) == 1 and "data.batch_size=7 does not split over 2 process(es)" in lines[0], proc.stderr[-3000:]
    assert not (tmp_path / "run").exists()


def _read_only(monkeypatch):
    """Make every folder read-only as a read-only mount does (the tests run as root, which chmod
    does not stop)."""
    def refuse(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr("gkd.atomic.tempfile.TemporaryDirectory", refuse)


def test_check_writable_creates_nothing_and_names_the_folder(tmp_path, monkeypatch):
    target = tmp_path / "a" / "b"
    assert check_writable(target) == target and not (tmp_path / "a").exists()
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "f").write_text("x")
    with pytest.raises(GKDError, match=f"cannot write to the output folder {tmp_path}/f/out: {tmp_path}/f is a file"):
        check_writable(tmp_path / "f" / "out")
    _read_only(monkeypatch)
    with pytest.raises(GKDError, match=f"cannot write to out_dir {target}: Read-only file system; choose another one"):
        check_writable(target, "out_dir")


def test_read_only_report_folder_is_refused_before_the_evaluation(tmp_path, capsys, monkeypatch):
    _read_only(monkeypatch)
    # the checkpoint does not even exist: the folder is checked first, before any file is read
    assert main(["eval", str(tmp_path / "seg.safetensors"), "--suite", "camvid", "--out", str(tmp_path / "ev")]) == 2
    assert _one_error(capsys) == (f"gkd: error: cannot write to the report folder {tmp_path / 'ev'}: Read-only file "
                                  "system; choose another one")


def test_stage_refuses_an_out_dir_without_room_for_its_checkpoints(tmp_path, shards, capsys, monkeypatch):
    import shutil

    import gkd.engine.trainer as trainer

    monkeypatch.setattr(trainer.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 2**20, 2**20))
    assert main(["stage1", *TINY, f"data.train_shards={shards}", f"out_dir={tmp_path / 'run'}"]) == 2
    line = _one_error(capsys)
    assert line.startswith(f"gkd: error: out_dir {tmp_path / 'run'} has 1 MiB free; the run keeps about ")
    assert line.endswith("MiB of checkpoints (engine.keep_last=2): free space, lower engine.keep_last or use another "
                         "out_dir")
    assert not (tmp_path / "run" / "checkpoints").exists()
