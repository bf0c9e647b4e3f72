"""Issue 15, training state: no checkpoint called good is bad, and a resume is honest.

Each test pins what the user sees — the error (its type and message, one `gkd: error:` line at the
boundary) or the warning — and what is left on disk: which checkpoints, the config history, the rows
of metrics.jsonl. Most drive the Trainer directly on a tiny Linear → BatchNorm → Linear regression
(batch i at step i, so a resumed run must equal the uninterrupted one bit for bit); the rest run the
tiny stage 1 and stage 3 of tests/test_stage1.py and tests/test_stage3.py.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from gkd.config import DistillConfig, RunConfig, SegmentConfig, load_config, to_yaml
from gkd.engine.checkpoint import ResumeError
from gkd.engine.compute import Budget
from gkd.engine.trainer import (MetricsLog, NonFiniteLossError, NonFiniteStateError, Trainer, make_accelerator,
                                make_adamw, nonfinite_tensors)
from gkd.errors import GKDError, error_boundary
from helpers import TINY, reset_accelerate

NAN, INF = float("nan"), float("inf")
LOG = "gkd.engine.trainer"


# ---- a tiny Trainer run ----------------------------------------------------------------------------------


class Tiny(nn.Module):
    """Parameters, a float buffer (BatchNorm's running statistics) and an integer one."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.bn, self.head = nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 1)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": F.mse_loss(self.head(torch.relu(self.bn(self.lin(x)))).squeeze(-1), y)}


_g = torch.Generator().manual_seed(0)
BATCHES = [(torch.randn(8, 4, generator=_g), torch.randn(8, generator=_g)) for _ in range(12)]
# What a checkpoint of Tiny holds: its floating state-dict entries and AdamW's step, exp_avg, exp_avg_sq
# per parameter (num_batches_tracked is an integer).
TINY_TENSORS = sum(t.is_floating_point() for t in Tiny().state_dict().values()) + 3 * len(list(Tiny().parameters()))


def _cfg(out: Path, *extra: str) -> RunConfig:
    return load_config(RunConfig, [], [f"out_dir={out}", "engine.cpu=true", "engine.save_every=2", "engine.log_every=1",
                                       "optim.lr=0.01", "data.batch_size=8", *extra])


def _run(out: Path, *extra: str, steps: int = 6, hook: Callable[[int, Tiny], None] | None = None) -> dict[str, Any]:
    """Train Tiny for a `steps`-step budget (lr 0.01, a checkpoint every 2 steps); `hook(step, model)`
    runs before each forward. Returns the final weights and the Trainer's counters."""
    reset_accelerate()
    cfg = _cfg(out, *extra)
    acc = make_accelerator(cfg)
    torch.manual_seed(0)
    model = Tiny()
    optimizer = make_adamw(model, cfg.optim.lr, 0.0, (0.9, 0.999))
    model, optimizer = acc.prepare(model, optimizer)
    trainer = Trainer(cfg, acc, model, optimizer, Budget("steps", steps), desc="tiny")
    trainer.start()

    def loss_fn(batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
        if hook is not None:
            hook(trainer.step_index, acc.unwrap_model(model))
        return model(*batch)

    batches = iter(BATCHES[trainer.step_index:])
    while not trainer.done:
        trainer.step(batches, loss_fn, cfg.optim.lr, 0)
    trainer.finish()
    weights = {k: v.clone() for k, v in acc.unwrap_model(model).state_dict().items()}
    state = dict(trainer.state)
    model = optimizer = None  # noqa: F841  (see Trainer.close)
    trainer.close()
    return {"weights": weights, "state": state}


def _kill_at(step: int) -> Callable[[int, Tiny], None]:
    def hook(index: int, model: Tiny) -> None:
        if index == step:
            raise KeyboardInterrupt("simulated kill")
    return hook


def _killed(out: Path, step: int = 4) -> None:
    """A 6-step run killed during step `step` + 1: checkpoints step_2 and step_4 on disk."""
    with pytest.raises(KeyboardInterrupt):
        _run(out, hook=_kill_at(step))


def _rows(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _step_dirs(out: Path) -> list[str]:
    root = out / "checkpoints"
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


def _assert_all_finite(ckpt: Path) -> None:
    """Every tensor of the checkpoint's weights and optimizer state is finite (read independently)."""
    weights = load_file(str(ckpt / "model.safetensors"))
    opt = torch.load(ckpt / "optimizer.bin", weights_only=True)
    tensors = list(weights.items()) + [(f"{i}.{k}", v) for i, st in opt["state"].items() for k, v in st.items()]
    assert tensors
    for name, t in tensors:
        assert torch.isfinite(t).all(), name


def _boundary_line(fn: Callable[[], Any], capsys) -> str:
    """What the CLI boundary prints for `fn`'s error: exit status 2 and one `gkd: error:` line."""
    capsys.readouterr()
    assert error_boundary(fn) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("gkd: error:")]
    assert len(lines) == 1
    return lines[0]


# ---- 1. the finiteness check ------------------------------------------------------------------------------


CHECK_CASES = [
    ("nan", torch.tensor([1.0, NAN]), True),
    ("plus_inf", torch.tensor([INF, 1.0]), True),
    ("minus_inf", torch.tensor([-INF, 1.0]), True),
    ("both_infs", torch.tensor([INF, -INF]), True),
    ("huge_fp32", torch.full((4,), 3e38), False),  # finite, but its 2-norm overflows: confirmed exactly
    ("huge_fp16", torch.full((16,), 60000.0, dtype=torch.float16), False),
    ("bf16_nan", torch.tensor([0.5, NAN], dtype=torch.bfloat16), True),
    ("int", torch.tensor([1, 2]), False),  # integers are always finite
    ("empty", torch.zeros(0), False),
    ("fine", torch.randn(3, 5), False),
    ("nan_fp64_scalar", torch.tensor(NAN, dtype=torch.float64), True),
]


def test_nonfinite_tensors_names_exactly_the_bad_ones():
    assert torch.isinf(torch.linalg.vector_norm(CHECK_CASES[4][1]))  # the overflow the exact pass corrects
    acc = Accelerator(cpu=True)
    names = nonfinite_tensors(acc, [(n, t) for n, t, _ in CHECK_CASES])
    assert names == [n for n, _, bad in CHECK_CASES if bad]
    assert nonfinite_tensors(acc, [(n, t) for n, t, bad in CHECK_CASES if not bad]) == []


def test_errors_are_user_errors():
    assert issubclass(NonFiniteStateError, NonFiniteLossError)
    assert issubclass(NonFiniteLossError, GKDError) and issubclass(NonFiniteLossError, RuntimeError)
    assert issubclass(ResumeError, GKDError)


# ---- 2. non-finite state is never saved ---------------------------------------------------------------------


def _poison_running_var(at: int) -> Callable[[int, Tiny], None]:
    """BatchNorm's running variance goes infinite in step `at` + 1; in train mode BatchNorm normalises
    with the batch's statistics, so the loss stays finite."""
    def hook(index: int, model: Tiny) -> None:
        if index == at:
            with torch.no_grad():
                model.bn.running_var[0] = INF
    return hook


@pytest.mark.parametrize("steps,poisoned,refused,finite,on_disk", [
    (6, 2, 4, 2, [2]),  # a periodic checkpoint refused: step_2 stays the newest, and finite
    (5, 4, 5, 4, [2, 4]),  # the final checkpoint (Trainer.finish, before any handoff file) refused
    (2, 0, 2, None, []),  # nothing finite was ever written: start over
])
def test_infinite_batchnorm_variance_is_not_saved(tmp_path, capsys, steps, poisoned, refused, finite, on_disk):
    out = tmp_path / "run"
    newest = (f"{out}/checkpoints/step_{finite:08d}; a rerun in this out_dir resumes from it when the changed keys are "
              "also listed, e.g. engine.resume_changes=[optim.lr]") if finite else "none — the run must start over"
    message = (f"non-finite training state at step {refused} (1 of {TINY_TENSORS} tensors NaN or infinite: "
               f"bn.running_var); the step-{refused} checkpoint was not written. The loss was still finite, so an "
               f"update (or BatchNorm's running statistics) diverged. Lower optim.lr (now 0.01) or set "
               f"optim.grad_clip (e.g. 1.0). Newest finite checkpoint: {newest}")
    line = _boundary_line(lambda: _run(out, steps=steps, hook=_poison_running_var(poisoned)), capsys)
    assert line == f"gkd: error: {message}"
    assert _step_dirs(out) == [f"step_{s:08d}" for s in on_disk]
    for s in on_disk:
        _assert_all_finite(out / "checkpoints" / f"step_{s:08d}")


def _stage1(out: Path, shards: str, *extra: str) -> DistillConfig:
    return load_config(DistillConfig, [], [*TINY, f"data.train_shards={shards}", f"out_dir={out}", *extra])


HUGE = 1e6 * 8 / 512  # the peak lr of optim.lr=1e6 at the tiny runs' batch of 8


@pytest.mark.parametrize("extra,huge_from,newest", [
    (["optim.lr=1e6"], None, None),  # the reported run: the step-2 state already overflows
    ([], 2, 2),  # the recipe's lr for 2 steps, then the huge one: step_2 is finite and named
])
def test_huge_lr_in_stage1_names_a_finite_checkpoint_or_none(tmp_path, shards, monkeypatch, extra, huge_from, newest):
    """Which check fires first at these magnitudes — a NaN loss, or the state check of the next
    checkpoint — varies between runs (seen to differ with what ran before in the process); either way
    the checkpoint the error names is finite, or there is none."""
    import gkd.engine.distill as loop

    if huge_from is not None:
        real_lr_at = loop.lr_at
        monkeypatch.setattr(loop, "lr_at", lambda step, *a: HUGE if step >= huge_from else real_lr_at(step, *a))
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLossError) as info:  # or its NonFiniteStateError
        loop.train_distill(_stage1(out, shards, *extra))
    message = str(info.value)
    assert message.startswith(("non-finite loss at step ", "non-finite training state at step "))
    if isinstance(info.value, NonFiniteStateError):
        step = int(message.split()[5])
        assert "tensors NaN or infinite: " in message and f"; the step-{step} checkpoint was not written" in message
    if newest is None:
        assert message.endswith("Newest finite checkpoint: none — the run must start over")
        assert _step_dirs(out) == []
    else:
        assert message.endswith(f"Newest finite checkpoint: {out}/checkpoints/step_{newest:08d}; a rerun in this "
                                "out_dir resumes from it when the changed keys are also listed, e.g. "
                                "engine.resume_changes=[optim.lr]")
        assert _step_dirs(out) == [f"step_{newest:08d}"]
        _assert_all_finite(out / "checkpoints" / f"step_{newest:08d}")
    assert "\n" not in message and not (out / "encoder.safetensors").exists()


def test_stage3_at_lr_1e3_keeps_only_the_finite_checkpoint(tmp_path, folder_dataset):
    """The reported case: BatchNorm's running variance of the MLP decoder overflows while the loss
    stays finite; the final checkpoint is refused and no segmentor.safetensors is written."""
    from gkd.engine.segment import train_segmentor
    from gkd.handoff import save_handoff
    from gkd.models import build_student

    root, manifest, _ = folder_dataset
    torch.manual_seed(0)
    student = build_student("vit_tiny_patch16_224", img_size=64, depth=2, embed_dim=32, num_heads=2)
    encoder = save_handoff(tmp_path / "encoder.safetensors", student, student.spec, stage=2,
                           extra={"input_norm": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}})
    out = tmp_path / "s3"
    cfg = load_config(SegmentConfig, [], [
        f"encoder={encoder}", f"data.manifest={manifest}", f"data.root={root}", "data.crop_size=64",
        "data.short_edges=null", "data.scale=[128,64]", "data.batch_size=2", "data.num_workers=0", "optim.iters=6",
        "optim.lr=1e3", "engine.log_every=1", "engine.save_every=3", f"out_dir={out}", "decoder.name=mlp",
        "decoder.kwargs.channels=16"])
    with pytest.raises(NonFiniteStateError) as info:
        train_segmentor(cfg)
    message = str(info.value)
    assert message.startswith("non-finite training state at step 6 (")
    assert "tensors NaN or infinite: segmentor.decoder.head.batch_norm.running_var" in message
    assert f"Newest finite checkpoint: {out}/checkpoints/step_00000003;" in message
    assert _step_dirs(out) == ["step_00000003"] and not (out / "segmentor.safetensors").exists()
    _assert_all_finite(out / "checkpoints" / "step_00000003")


# ---- 3. a resume refuses a changed config ---------------------------------------------------------------


REFUSED = [
    (["optim.lr=0.001"], "optim.lr: 0.01 → 0.001", "optim.lr"),
    (["optim.lr=0.001", "optim.grad_clip=1.0"], "optim.grad_clip: null → 1.0; optim.lr: 0.01 → 0.001",
     "optim.grad_clip,optim.lr"),
    (["data.num_workers=2"], "data.num_workers: 8 → 2", "data.num_workers"),  # the reader's order follows the workers
    (["optim.lr=0.001", "optim.betas=[0.9,0.95]", "engine.resume_changes=[optim.lr]"],
     "optim.betas: [0.9, 0.999] → [0.9, 0.95]", "optim.betas,optim.lr"),
]


@pytest.mark.parametrize("extra,listed,keys", REFUSED)
def test_resume_with_a_changed_config_is_refused(tmp_path, capsys, extra, listed, keys):
    out = tmp_path / "run"
    _killed(out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    line = _boundary_line(lambda: _run(out, *extra), capsys)
    assert line == (f"gkd: error: cannot resume from {out}/checkpoints/step_00000004: the config differs from the one "
                    f"it was written with ({listed}), so the resumed run would not equal an uninterrupted one. To "
                    f"resume with the new values anyway pass engine.resume_changes=[{keys}]; to start over use a new "
                    "out_dir (or resume=never)")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # nothing touched


@pytest.mark.parametrize("extra,changes", [
    (["optim.lr=0.001", "engine.resume_changes=[optim.lr]"], {"optim.lr": [0.01, 0.001]}),
    (["optim.lr=0.001", "optim.grad_clip=2.0", "engine.resume_changes=[optim]"],  # a whole section
     {"optim.grad_clip": [None, 2.0], "optim.lr": [0.01, 0.001]}),
    (["engine.log_every=3", "engine.save_every=4", "engine.keep_last=3"], {}),  # harmless: no override needed
])
def test_resume_with_accepted_changes_proceeds_and_keeps_the_history(tmp_path, extra, changes):
    out = tmp_path / "run"
    _killed(out)
    original = (out / "config.yaml").read_text()
    assert (out / "checkpoints" / "step_00000004" / "config.yaml").read_text() == original
    result = _run(out, *extra)
    assert result["state"]["step"] == 6
    resumes = [r for r in _rows(out) if r.get("event") == "resume"]
    assert resumes == [{"event": "resume", "step": 4, "checkpoint": str(out / "checkpoints" / "step_00000004"),
                        "config_changes": changes, "metrics_rows_removed": 0}]
    assert sorted(p.name for p in (out / "config_history").iterdir()) == ["001_replaced_at_step_00000004.yaml"]
    assert (out / "config_history" / "001_replaced_at_step_00000004.yaml").read_text() == original
    current = (out / "config.yaml").read_text()
    assert current == to_yaml(_cfg(out, *extra)) != original
    assert (out / "checkpoints" / "step_00000006" / "config.yaml").read_text() == current


def test_resume_never_starts_over_and_sets_old_checkpoints_aside(tmp_path):
    out = tmp_path / "run"
    _killed(out)
    killed_config = (out / "config.yaml").read_text()
    uninterrupted = _run(tmp_path / "whole")
    result = _run(out, "resume=never")
    assert _step_dirs(out) == ["step_00000002.discarded", "step_00000004", "step_00000004.discarded", "step_00000006"]
    assert [r["step"] for r in _rows(out) if "loss" in r] == [1, 2, 3, 4, 5, 6]  # the killed run's rows are gone
    assert not [r for r in _rows(out) if r.get("event") == "resume"]
    for k, v in uninterrupted["weights"].items():
        torch.testing.assert_close(result["weights"][k], v, rtol=0, atol=0, msg=k)
    assert (out / "config_history" / "001_replaced_at_step_00000000.yaml").read_text() == killed_config


# ---- 4. an unreadable newest checkpoint falls back to the previous one ------------------------------------------


def _truncate(path: Path) -> str:
    size = path.stat().st_size
    path.write_bytes(path.read_bytes()[: size // 2])
    return f"{path} is {size // 2} bytes, {size} when written (truncated?)"


def _delete(path: Path) -> str:
    path.unlink()
    return f"{path} is missing"


def _corrupt_json(path: Path) -> str:
    path.write_text("{")
    try:
        json.loads("{")
    except ValueError as e:
        return f"{path} is corrupt ({e})"
    raise AssertionError


def _zero_header(path: Path) -> str:
    """Same size, damaged header: only loading finds it."""
    data = bytearray(path.read_bytes())
    data[8:40] = b"\0" * 32
    path.write_bytes(bytes(data))
    return f"{path.parent} cannot be loaded (SafetensorError: "


def _nan_weight(path: Path) -> str:
    """A valid file of the same size whose lin.weight holds a NaN (as an older version could write)."""
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    tensors["lin.weight"][0, 0] = NAN
    save_file(tensors, str(path), metadata=metadata)
    return f"{path.parent} holds 1 NaN or infinite tensor(s) (lin.weight)"


DAMAGE = [
    ("model.safetensors", _truncate),
    ("optimizer.bin", _delete),
    ("trainer_state.json", _corrupt_json),
    ("random_states_0.pkl", _truncate),  # accelerate alone would load the run without its RNG state
    ("config.yaml", _delete),
    ("model.safetensors", _zero_header),
    ("model.safetensors", _nan_weight),
]


@pytest.mark.parametrize("name,damage", DAMAGE, ids=[f"{n}-{d.__name__}" for n, d in DAMAGE])
def test_unusable_newest_checkpoint_falls_back_with_a_warning(tmp_path, caplog, name, damage):
    whole = _run(tmp_path / "whole")
    out = tmp_path / "run"
    _killed(out)
    newest, previous = out / "checkpoints" / "step_00000004", out / "checkpoints" / "step_00000002"
    reason = damage(newest / name)
    with caplog.at_level(logging.WARNING, logger=LOG):
        result = _run(out)
    warnings = [r.getMessage() for r in caplog.records if r.name == LOG and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert warnings[0].startswith(f"resuming from {previous} (step 2) instead of {newest}, which cannot be used: "
                                  f"{reason}")
    assert warnings[0].endswith(f"; it is kept as {newest}.unusable")
    assert _step_dirs(out) == ["step_00000004", "step_00000004.unusable", "step_00000006"]
    for k, v in whole["weights"].items():  # resumed at step 2, it is still the uninterrupted run
        torch.testing.assert_close(result["weights"][k], v, rtol=0, atol=0, msg=k)
    assert [r["step"] for r in _rows(out) if "loss" in r] == [1, 2, 3, 4, 5, 6]


def test_no_usable_checkpoint_is_one_error_naming_each(tmp_path, capsys):
    out = tmp_path / "run"
    _killed(out)
    ckpts = out / "checkpoints"
    reasons = [_truncate(ckpts / "step_00000004" / "model.safetensors"),
               _delete(ckpts / "step_00000002" / "optimizer.bin")]
    line = _boundary_line(lambda: _run(out), capsys)
    assert line == (f"gkd: error: no usable checkpoint in {ckpts}: {reasons[0]}; {reasons[1]}. Pass "
                    "resume=<checkpoint dir> to name one, or resume=never to start over (they are then set aside)")
    line = _boundary_line(lambda: _run(out, f"resume={ckpts / 'step_00000002'}"), capsys)
    assert line == f"gkd: error: cannot resume from {ckpts / 'step_00000002'}: {reasons[1]}"
    assert _step_dirs(out) == ["step_00000002", "step_00000004"]  # nothing set aside by a refusal


# ---- 5. metrics.jsonl after kill + resume ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def stage1_whole(shards, tmp_path_factory) -> list[dict[str, Any]]:
    from gkd.engine.distill import train_distill

    out = tmp_path_factory.mktemp("whole")
    train_distill(_stage1(out, shards))
    reset_accelerate()
    return _rows(out)


@pytest.mark.parametrize("kill_at,resumed_at", [
    (5, 4),  # mid-epoch: the step-5 row of the killed run goes
    (7, 6),  # after the epoch-0 end and its step-6 checkpoint: epoch 0's end row is kept, once
])
def test_stage1_metrics_have_each_row_once_after_kill_and_resume(tmp_path, shards, monkeypatch, stage1_whole,
                                                                  kill_at, resumed_at):
    import gkd.engine.distill as loop

    real_lr_at = loop.lr_at

    def dying_lr_at(step, *a):
        if step == kill_at:
            raise KeyboardInterrupt("simulated kill")
        return real_lr_at(step, *a)

    out = tmp_path / "cut"
    monkeypatch.setattr(loop, "lr_at", dying_lr_at)
    with pytest.raises(KeyboardInterrupt):
        loop.train_distill(_stage1(out, shards))
    reset_accelerate()
    killed = [r["step"] for r in _rows(out) if "loss" in r]
    assert killed == list(range(1, kill_at + 1))
    monkeypatch.setattr(loop, "lr_at", real_lr_at)
    loop.train_distill(_stage1(out, shards))
    rows = _rows(out)
    resumes = [r for r in rows if r.get("event") == "resume"]
    assert [(r["step"], r["metrics_rows_removed"]) for r in resumes] == [(resumed_at, kill_at - resumed_at)]
    # Every row of the uninterrupted run, once and in order, the same values (the resume is exact);
    # run-time figures differ.
    timing = {"images_per_s", "train_seconds", "run_seconds"}
    strip = [{k: v for k, v in r.items() if k not in timing} for r in rows if r.get("event") != "resume"]
    assert strip == [{k: v for k, v in r.items() if k not in timing} for r in stage1_whole]


def test_rerun_of_a_finished_run_logs_its_end_once(tmp_path):
    """A run killed after its final checkpoint (here: simply run again) resumes from that checkpoint
    and logs the end of the run again; the first end rows are cut."""
    out = tmp_path / "run"
    first = _run(out)
    again = _run(out)
    rows = _rows(out)
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["event"] for r in rows if "event" in r] == ["resume", "compute"]
    assert next(r for r in rows if r.get("event") == "resume")["metrics_rows_removed"] == 1
    for k, v in first["weights"].items():
        torch.testing.assert_close(again["weights"][k], v, rtol=0, atol=0, msg=k)


ROWS = [{"event": "flops"}, {"step": 1, "loss": 1.0}, {"step": 2, "loss": 1.0}, {"event": "epoch_end", "step": 2},
        {"step": 3, "loss": 1.0}, {"event": "probe", "step": 2}, {"event": "compute", "steps": 3}]


@pytest.mark.parametrize("offset_rows,keep_step,kept", [
    (3, True, [0, 1, 2, 3, 5]),  # a periodic step-2 checkpoint after row 3: its epoch_end and probe stay
    (3, False, [0, 1, 2]),  # a final one: everything after it is logged again
    (None, True, [0, 1, 2, 3, 5, 6]),  # an older checkpoint (no offset): rows of later steps go
    (0, False, []),  # a fresh start
])
def test_metrics_cut(tmp_path, offset_rows, keep_step, kept):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps(r) + "\n" for r in ROWS]
    path.write_text("".join(lines) + '{"step": 4, "lo')  # the torn row of a kill mid-write
    offset = None if offset_rows is None else sum(len(ln.encode()) for ln in lines[:offset_rows])
    removed = MetricsLog(path, Accelerator(cpu=True)).cut(2, offset, keep_step)
    assert path.read_text() == "".join(lines[i] for i in kept)
    assert removed == len(ROWS) + 1 - len(kept)


@pytest.mark.slow
def test_two_process_resume_falls_back_past_a_truncated_checkpoint(tmp_path, shards):
    """`accelerate launch --multi_gpu --num_processes 2` (gloo, CPU): the newest checkpoint's weights
    are cut short; the rerun's ranks agree to resume from the previous one and end bit-identical."""
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(repo / "stages" / "stage1.py"), *TINY, f"data.train_shards={shards}", f"out_dir={out}",
           "data.repeats=1"]
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    whole = load_file(out / "encoder.safetensors")
    assert _step_dirs(out) == ["step_00000010", "step_00000012"]
    _truncate(out / "checkpoints" / "step_00000012" / "model.safetensors")
    (out / "encoder.safetensors").unlink()

    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from" in again.stderr and "step_00000010 (step 10) instead of" in again.stderr
    assert (out / "checkpoints" / "step_00000012.unusable").is_dir()
    resumed = load_file(out / "encoder.safetensors")
    assert resumed.keys() == whole.keys() and all(torch.equal(resumed[k], whole[k]) for k in whole)
    steps = [r["step"] for r in _rows(out) if "loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 12  # no step logged twice
