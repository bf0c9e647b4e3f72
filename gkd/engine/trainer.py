"""The Trainer — the optimizer-step loop every stage shares, run against a compute budget — and what it
needs: the accelerator, AdamW parameter groups, seeds, the metrics log.

Every checkpoint the Trainer writes or resumes from has only finite tensors (model parameters and
buffers, optimizer state; `nonfinite_tensors`), so "the newest checkpoint" is always one a run can
continue from. A resume picks the newest usable checkpoint (an unreadable or non-finite one is set
aside with a warning), refuses a changed config (``gkd.engine.checkpoint.check_resume_config``) and
cuts metrics.jsonl back to what it held when that checkpoint was written."""
from __future__ import annotations

import gc
import itertools
import json
import logging
import shutil
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator, Mapping, Sequence

import torch
from accelerate import Accelerator
from torch import nn
from tqdm.auto import tqdm

from gkd.atomic import write_text_atomic
from gkd.config import RunConfig, check_world
from gkd.engine.checkpoint import (Checkpoint, CheckpointManager, ResumeError, check_resume_config, describe_changes,
                                   flatten)
from gkd.engine.compute import Budget, count_flops
from gkd.errors import GKDError
from gkd.tracking import check_trackers, start_trackers

log = logging.getLogger(__name__)

# Embeddings and tokens: spared from weight decay under the "tokens" rule (DeiT/DINOv2 training);
# the Mask2Former query / level embeddings are also what mmseg's stage-3 recipe spares ("mmseg").
_QUERY_SUFFIXES = ("queries_embedder.weight", "queries_features.weight", "level_embed", "level_embed.weight")
_NO_DECAY_SUFFIXES = ("pos_embed", "cls_token", "mask_token", "reg_token", "register_tokens", *_QUERY_SUFFIXES)


class NonFiniteLossError(GKDError, RuntimeError):
    """The loss became NaN or infinite; training stopped before the bad update."""


class NonFiniteStateError(NonFiniteLossError):
    """Parameters, buffers or optimizer state became NaN or infinite (the loss may still be finite:
    BatchNorm in train mode normalises with batch statistics); the checkpoint was not written."""


def make_accelerator(cfg: RunConfig, find_unused_parameters: bool = False) -> Accelerator:
    """An Accelerator from a run config's `engine` section; CPU when CUDA is absent.

    find_unused_parameters: DDP's option, for models with trainable parameters that a step may
    not use (a trained encoder's mask token and final norm in stage 3).
    """
    from accelerate.utils import DistributedDataParallelKwargs

    return Accelerator(
        cpu=cfg.engine.cpu or not torch.cuda.is_available(),
        mixed_precision=cfg.engine.mixed_precision,
        log_with=check_trackers(cfg.engine.trackers) or None,
        project_dir=str(Path(cfg.out_dir)),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)] if find_unused_parameters else None,
    )


def make_adamw(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
               roles: Mapping[str, nn.Module] | None = None, decay_rule: str = "timm") -> torch.optim.AdamW:
    """AdamW over ``param_groups``, fused (one kernel for all parameters) where torch has it for the
    parameters' device — CPU and CUDA in torch >= 2.4: about 8× faster than the per-parameter loop
    for a ViT-S on CPU, same update (see tests/test_fast_paths.py).

    roles: name → submodule that together hold every trainable parameter of `model`; their groups carry
    ``"role": name`` and an ``"lr_scale"`` (1.0) that ``Trainer.step`` multiplies the step's lr by, so a
    loop can hold one part still (e.g. the student while the heads warm up).
    decay_rule: which parameters get no weight decay, see ``param_groups``."""
    if roles is None:
        groups = param_groups(model, weight_decay, decay_rule)
    else:
        groups = [{**g, "role": name, "lr_scale": 1.0} for name, part in roles.items()
                  for g in param_groups(part, weight_decay, decay_rule) if g["params"]]
        covered = {id(p) for g in groups for p in g["params"]}
        stray = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in covered]
        if stray:
            raise ValueError(f"parameters outside every role: {stray[:5]}")
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)
    except (RuntimeError, ValueError):  # a device or dtype without a fused kernel
        return torch.optim.AdamW(groups, lr=lr, betas=betas)


DECAY_RULES = ("timm", "tokens", "mmseg")
_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)


def param_groups(model: nn.Module, weight_decay: float, rule: str = "timm") -> list[dict[str, Any]]:
    """AdamW groups [decay, no decay] over the trainable parameters of `model`. Spared from decay:

    * ``"timm"`` (stages 1-2, the authors' ``create_optimizer(args, model)``; their MetaArch defines no
      ``no_weight_decay``): 1-D parameters (biases, norm weights, LayerScale gammas) and ``*.bias``, so
      ``pos_embed``, ``cls_token`` and ``mask_token`` are decayed like every matrix;
    * ``"tokens"``: also tokens, position tables and query / level embeddings (``_NO_DECAY_SUFFIXES``);
    * ``"mmseg"`` (stage 3, the authors' task_learning configs: ``norm_decay_mult=0`` and decay_mult 0
      for ``norm``, ``query_embed``, ``query_feat``, ``level_embed``): parameters of norm layers or
      with "norm" in their name, and the Mask2Former query / level embeddings; biases are decayed.
    """
    if rule not in DECAY_RULES:
        raise ValueError(f"weight-decay rule must be one of {DECAY_RULES}, got {rule!r}")
    in_norm = {f"{m}.{n}" if m else n for m, mod in model.named_modules() if isinstance(mod, _NORMS)
               for n, _ in mod.named_parameters(recurse=False)} if rule == "mmseg" else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if rule == "mmseg":
            spared = name in in_norm or "norm" in name or name.endswith(_QUERY_SUFFIXES)
        else:
            spared = p.ndim <= 1 or name.endswith(".bias") or (rule == "tokens" and name.endswith(_NO_DECAY_SUFFIXES))
        (no_decay if spared else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def step_seed(seed: int, step: int, rank: int, micro: int = 0) -> int:
    """A distinct, reproducible seed per (run seed, optimizer step, rank, micro-batch)."""
    return (seed * 1_000_003 + step * 4099 + rank * 131 + micro) % (2**63 - 1)


@torch.no_grad()
def param_checksum(model: nn.Module) -> torch.Tensor:
    """Sum of all parameters in float64: equal across ranks iff DDP kept them in sync (in practice)."""
    return sum((p.detach().double().sum() for p in model.parameters()), torch.zeros((), dtype=torch.float64))


def sync_on_last(accelerator: Accelerator, model: nn.Module, micro: int, accum: int) -> ContextManager:
    """Gradient accumulation: skip DDP's all-reduce on every micro-batch but the last of a step."""
    return nullcontext() if micro == accum - 1 else accelerator.no_sync(model)


def check_finite(accelerator: Accelerator, nonfinite: torch.Tensor, step: int, where: str | Callable[[], str]) -> None:
    """Stop every rank together when any rank saw a non-finite loss in this step; `where` (or what it
    returns, built only then) ends the message."""
    if accelerator.reduce(nonfinite, "sum").item() > 0:
        raise NonFiniteLossError(f"non-finite loss at step {step}; the update was not applied. "
                                 f"{where() if callable(where) else where}")


@torch.no_grad()
def nonfinite_tensors(accelerator: Accelerator, tensors: Sequence[tuple[str, torch.Tensor]]) -> list[str]:
    """Names of the `tensors` that hold a NaN or an infinity on any rank (every rank gets the same list).

    One fused 2-norm per (device, dtype) group (NaN and ±inf propagate into it), one all-reduce of the
    per-tensor flags and one read-back. A norm can overflow for a huge but finite tensor (beyond the
    dtype's range), so flagged tensors are confirmed exactly (a second all-reduce, only then).
    Every rank must pass the same number of tensors in the same order (as DDP replicas do).
    """
    floats = [(n, t.detach()) for n, t in tensors if (t.is_floating_point() or t.is_complex()) and t.numel()]
    if not floats:
        return []
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, (_, t) in enumerate(floats):
        groups.setdefault((t.device, t.dtype), []).append(i)
    dev = accelerator.device
    order = [i for idx in groups.values() for i in idx]
    flags = torch.cat([(~torch.isfinite(torch.stack(torch._foreach_norm([floats[i][1] for i in idx])))).to(dev)
                       for idx in groups.values()]).float()
    flags = accelerator.reduce(flags, "sum")
    suspects = [order[j] for j in flags.nonzero().flatten().tolist()]  # the check's one read-back
    if not suspects:
        return []
    suspects.sort()
    exact = torch.stack([~torch.isfinite(floats[i][1]).all() for i in suspects]).to(dev).float()
    exact = accelerator.reduce(exact, "sum").tolist()
    return [floats[i][0] for i, bad in zip(suspects, exact) if bad]


def flat_config(d: dict, prefix: str = "") -> dict[str, Any]:
    """Flatten a nested config for trackers that only take scalars (other values as JSON)."""
    return {k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v) for k, v in flatten(d, prefix).items()}


class MetricsLog:
    """Appends JSON records to metrics.jsonl (main process) and forwards them to trackers.

    Two kinds of rows: a metrics window ``{"step", "epoch", "lr", "loss", ...}`` every `log_every`
    steps, and events ``{"event": ..., ...}`` (flops, charged, epoch_end, probe, resume, compute,
    selection, end), most with the step they describe."""

    def __init__(self, path: Path, accelerator: Accelerator):
        self.path = path
        self.accelerator = accelerator

    def write(self, record: dict[str, Any]) -> None:
        if self.accelerator.is_main_process:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def offset(self) -> int:
        """The file's size now (main process; 0 elsewhere): where a resume from here cuts it back to."""
        if not self.accelerator.is_main_process or not self.path.is_file():
            return 0
        return self.path.stat().st_size

    def cut(self, step: int, offset: int | None, keep_step: bool) -> int:
        """Cut the file back to a resume at `step` (main process, atomically); return the rows removed.

        offset: its size when the checkpoint was written: everything after it was logged by the run
        that is being replaced, except (`keep_step`, a periodic checkpoint) the rows about `step` itself
        (its epoch_end, probe), which the resumed run does not log again. offset None (a checkpoint of an
        older version): the rows with a step after `step` go. A fresh start (step 0, offset 0) empties it.
        """
        if not self.accelerator.is_main_process or not self.path.is_file():
            return 0
        data = self.path.read_bytes()
        head, tail = (b"", data) if offset is None else (data[:offset], data[offset:])

        def replaced(row: dict[str, Any]) -> bool:
            if offset is None:
                return isinstance(row.get("step"), (int, float)) and row["step"] > step
            return not (keep_step and row.get("step") == step)

        kept, removed = [head], 0
        for line in tail.splitlines(keepends=True):
            row = _row(line)  # a torn line (a kill mid-write) is dropped
            if row is None or replaced(row):
                removed += 1
            else:
                kept.append(line if line.endswith(b"\n") else line + b"\n")
        if removed:
            write_text_atomic(self.path, b"".join(kept).decode("utf-8", "replace"))
        return removed

    def write_window(self, window: dict[str, float], state: dict[str, Any], epoch: int, lr: float,
                     elapsed: float, global_batch: int) -> dict[str, Any]:
        """Average the window's loss terms over steps and ranks; log and return the record."""
        steps = window.pop("steps")
        names = sorted(window)
        dev = self.accelerator.device
        means = torch.stack([torch.as_tensor(window[k], dtype=torch.float32, device=dev) / steps for k in names])
        means = self.accelerator.reduce(means, "mean").tolist()  # the window's one read-back of the losses
        record = {"step": state["step"], "epoch": epoch, "lr": lr, **dict(zip(names, means)),
                  "images_per_s": steps * global_batch / max(elapsed, 1e-9),
                  "images_seen": state["images_seen"], "train_seconds": round(state["train_seconds"], 3),
                  "train_tflops": state["train_flops"] / 1e12}
        self.write(record)
        self.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=state["step"])
        return record


def _names(names: Sequence[str], first: int = 5) -> str:
    """The first few of `names` for a message: "a, b, c, d, e, …"."""
    return ", ".join(names[:first]) + (", …" if len(names) > first else "")


def _row(line: bytes) -> dict[str, Any] | None:
    try:
        row = json.loads(line)
    except ValueError:
        return None
    return row if isinstance(row, dict) else None


def reset_accelerate_state() -> None:
    """accelerate keeps process-wide singletons; call between in-process training/eval runs."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def micro_batch_size(cfg: RunConfig, accelerator: Accelerator) -> int:
    """Per-process micro-batch of the global `data.batch_size` split over processes and
    `optim.grad_accum` steps (``gkd.config.check_world`` refuses a batch that does not split)."""
    world, accum = accelerator.num_processes, cfg.optim.grad_accum
    check_world(cfg, world)
    return cfg.data.batch_size // (world * accum)


class Trainer:
    """The optimizer-step machinery every stage loop shares, run against a compute ``Budget``.

    `start()` resumes from the newest usable (or a named) checkpoint and writes config.yaml;
    `count_flops()` measures the training FLOPs of one step (once per run, kept across resumes);
    each `step()` consumes `grad_accum` micro-batches (DDP all-reduces on the last only), stops
    every rank on a non-finite loss before the update, clips, steps, accounts wall-clock seconds,
    images and FLOPs, logs a metrics window every `log_every` steps and checkpoints every
    `save_every`; `done` says when the budget is spent; `finish()` logs the last window and writes
    the final checkpoint; `compute()` is the run's compute record (metrics.jsonl, handoff metadata).
    Every checkpoint write first checks that the whole state is finite (`NonFiniteStateError`): the
    stage loops write their handoff file only after `finish()`, so a non-finite model is never handed on.
    """

    clock = staticmethod(time.perf_counter)  # what step seconds are measured with (tests inject a fake one)

    def __init__(self, cfg: RunConfig, accelerator: Accelerator, model: nn.Module, optimizer: torch.optim.Optimizer,
                 budget: Budget, desc: str):
        self.cfg, self.accelerator, self.model, self.optimizer = cfg, accelerator, model, optimizer
        self.budget, self.desc = budget, desc
        self.out_dir = Path(cfg.out_dir)
        self.ckpts = CheckpointManager(self.out_dir, cfg.engine.keep_last)
        self.metrics = MetricsLog(self.out_dir / "metrics.jsonl", accelerator)
        self.state: dict[str, Any] = {"step": 0, "images_seen": 0, "train_seconds": 0.0, "train_flops": 0,
                                      "flops_per_step": None, "warmup_fraction": 0.0}
        self._window: dict[str, float] = {}
        self._window_seconds = 0.0
        self._run_start = time.perf_counter()
        self._config_yaml = ""
        self._counts: dict[str, torch.Tensor] = {}  # since the last tally, on this rank (see count)
        self._last_good: Path | None = None  # the newest checkpoint known finite: resumed from or written

    @property
    def step_index(self) -> int:
        return self.state["step"]

    @property
    def fraction(self) -> float:
        """Budget used before the next step, in [0, 1]: the LR schedules' progress."""
        return self.budget.fraction(self.state)

    @property
    def step_cost(self) -> float:
        """What one optimizer step costs in budget units (seconds: the mean so far)."""
        s = self.state
        if self.budget.kind == "steps":
            return 1.0
        if self.budget.kind == "tflops":
            return (s["flops_per_step"] or 0) / 1e12
        return s["train_seconds"] / s["step"] if s["step"] else 0.0

    @property
    def done(self) -> bool:
        return self.budget.done(self.state, self.step_cost)

    def decay_progress(self, warmup: int) -> float:
        """Progress of a schedule's decay after `warmup` steps: the budget fraction, rebased to 0 where
        warmup ended (for a step budget of T steps: (step - warmup) / (T - warmup))."""
        if warmup and self.state["step"] == warmup:
            self.state["warmup_fraction"] = self.fraction
        wf = self.state["warmup_fraction"]
        return min(1.0, max(0.0, (self.fraction - wf) / max(1e-12, 1.0 - wf)))

    def start(self) -> None:
        """Resume (`_resume`), cut metrics.jsonl back to the checkpoint, write config.yaml (a different
        previous one moves to config_history/), start the trackers and the progress bar."""
        from gkd.config import to_container, to_yaml

        cfg, acc = self.cfg, self.accelerator
        self._config_yaml = to_yaml(cfg)
        if acc.is_main_process:
            self._check_space()
        ckpt, changes = self._resume()
        if acc.is_main_process:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            step = self.state["step"]
            # Where metrics.jsonl stood at the checkpoint; None (an older checkpoint, or one of another run
            # directory, whose offset is into its own file): cut by step instead.
            own = ckpt is not None and ckpt.path.resolve().parent == self.ckpts.root.resolve()
            offset = 0 if ckpt is None else ckpt.meta.get("metrics_offset") if own else None
            removed = self.metrics.cut(step, offset, keep_step=ckpt is not None and not ckpt.meta.get("final"))
            if removed:
                log.info("metrics.jsonl: removed %d row(s) logged after the step-%d checkpoint", removed, step)
            self._write_config(step)
            if ckpt is not None:
                self.metrics.write({"event": "resume", "step": step, "checkpoint": str(ckpt.path),
                                    "config_changes": changes, "metrics_rows_removed": removed})
        acc.wait_for_everyone()  # the checkpoint folder is settled before any rank goes on
        start_trackers(acc, "gkd", flat_config(to_container(cfg)), self.out_dir,
                       resumed_at=None if ckpt is None else self.state["step"])
        # The bar counts whole budget units (steps, seconds, GFLOPs); tqdm drops its total when n
        # passes it, so no format may rely on the total.
        b = self.budget
        self._bar_unit, self._bar_scale = {"steps": ("it", 1), "seconds": ("s", 1), "tflops": ("GFLOP", 1000)}[b.kind]
        self._bar_n = int(b.used(self.state) * self._bar_scale)
        self.progress = tqdm(total=int(b.amount * self._bar_scale), initial=self._bar_n, desc=self.desc,
                             disable=not acc.is_local_main_process, unit=self._bar_unit)

    def _check_space(self) -> None:
        """Refuse to start when out_dir cannot hold the checkpoints the run keeps (each: the model's
        state and AdamW's two moments of every trainable parameter), as found before the first step."""
        model = self.accelerator.unwrap_model(self.model)
        state = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        moments = sum(2 * p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
        need = (state + moments) * (self.cfg.engine.keep_last + 1)  # one more while the newest is written
        self.out_dir.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.out_dir).free
        if free < need:
            raise GKDError(f"out_dir {self.out_dir} has {free / 2**20:.0f} MiB free; the run keeps about "
                           f"{need / 2**20:.0f} MiB of checkpoints (engine.keep_last={self.cfg.engine.keep_last}): "
                           "free space, lower engine.keep_last or use another out_dir")

    def _write_config(self, step: int) -> None:
        """config.yaml is the current config; the one it replaces (if different) is kept in
        config_history/NNN_replaced_at_step_XXXXXXXX.yaml, as it was. Each checkpoint has its own too."""
        path = self.out_dir / "config.yaml"
        if path.is_file() and path.read_text(encoding="utf-8") != self._config_yaml:
            history = self.out_dir / "config_history"
            history.mkdir(exist_ok=True)
            n = 1 + max((int(p.name[:3]) for p in history.glob("[0-9][0-9][0-9]_*.yaml")), default=0)
            kept = write_text_atomic(history / f"{n:03d}_replaced_at_step_{step:08d}.yaml",
                                     path.read_text(encoding="utf-8"))
            log.info("config.yaml changed; the previous one is kept as %s", kept)
        write_text_atomic(path, self._config_yaml)

    def _resume(self) -> tuple[Checkpoint | None, dict[str, Any]]:
        """Restore the checkpoint `cfg.resume` names (auto: the newest usable one; never: none) into
        the model, optimizer and counters; return it (None: a fresh start) and the accepted config changes.

        auto skips, with a warning, a checkpoint that is unreadable (missing or truncated files, a
        corrupt record), that accelerate cannot load or that holds non-finite tensors, and resumes from
        the previous one; none usable is an error. A named one must be usable. Checkpoints of this run
        newer than the resumed step belong to the replaced future: they are set aside (renamed
        ``.unusable`` / ``.discarded``) so that they are never resumed from or pruned in place of good ones.
        """
        cfg = self.cfg
        explicit = cfg.resume not in ("auto", "never")
        candidates = [Path(cfg.resume)] if explicit else [] if cfg.resume == "never" else self.ckpts.complete()
        unusable: dict[Path, str] = {}
        ckpt, changes = None, {}
        for path in candidates:
            ckpt, changes, problem = self._try_resume(path)
            if problem is None:
                break
            if explicit:
                raise ResumeError(f"cannot resume from {path}: {problem}")
            unusable[path] = problem
            ckpt = None
        if ckpt is None and unusable:
            raise ResumeError(
                f"no usable checkpoint in {self.ckpts.root}: " + "; ".join(unusable.values())
                + ". Pass resume=<checkpoint dir> to name one, or resume=never to start over (they are then set aside)")
        step = ckpt.step if ckpt is not None else 0
        stale = [p for p in self.ckpts.complete() if int(p.name[len("step_"):]) > step]
        if self.accelerator.is_main_process:
            for p in stale:
                moved = self.ckpts.set_aside(p, ".unusable" if p in unusable else ".discarded")
                if p in unusable:
                    log.warning("resuming from %s (step %d) instead of %s, which cannot be used: %s; it is kept as %s",
                                ckpt.path, step, p, unusable[p], moved)
                else:
                    log.warning("%s is newer than the step-%d start of this run; set aside as %s (delete it to free "
                                "the space)", p, step, moved)
            if changes:
                log.warning("resuming from %s with config changes accepted by engine.resume_changes: %s", ckpt.path,
                            describe_changes(changes))
        if ckpt is not None:
            self.state.update(ckpt.state)
            self._last_good = ckpt.path
            log.info("resumed from %s at step %d", ckpt.path, step)
        return ckpt, changes

    def _try_resume(self, path: Path) -> tuple[Checkpoint | None, dict[str, Any], str | None]:
        """Read, compare (a refused config change raises) and restore `path`, then check that what was
        loaded is finite; the problem that makes it unusable, agreed by every rank, or None."""
        from omegaconf import OmegaConf

        acc = self.accelerator
        ckpt, problem = None, None
        try:
            ckpt = self.ckpts.read(path)
        except ResumeError as e:
            problem = str(e)
        if (problem := self._agreed(problem)) is not None:
            return None, {}, problem
        config = OmegaConf.to_container(OmegaConf.create(self._config_yaml))  # as the checkpoint's went through YAML
        config["launch"] = {"num_processes": acc.num_processes, "mixed_precision": str(acc.mixed_precision)}
        changes = check_resume_config(ckpt, config, list(self.cfg.engine.resume_changes))
        try:
            self.ckpts.restore(acc, ckpt)
        except ResumeError as e:
            problem = str(e)
        if (problem := self._agreed(problem)) is not None:
            return None, {}, problem
        bad = nonfinite_tensors(acc, self._state_tensors())
        if bad:
            return None, {}, f"{path} holds {len(bad)} NaN or infinite tensor(s) ({_names(bad)})"
        return ckpt, changes, None

    def _agreed(self, problem: str | None) -> str | None:
        """Every rank takes a checkpoint as unusable when any rank found it so (one all-reduce)."""
        acc = self.accelerator
        if acc.num_processes == 1:
            return problem
        failed = acc.reduce(torch.tensor(float(problem is not None), device=acc.device), "sum").item()
        return (problem or "unusable on another rank (see its log)") if failed else None

    def _state_tensors(self) -> list[tuple[str, torch.Tensor]]:
        """What a checkpoint holds: the model's state dict (parameters, persistent buffers) and the
        optimizer's state tensors, named ``optimizer.<parameter>.<entry>``; the same order on every rank."""
        model = self.accelerator.unwrap_model(self.model)
        tensors = list(model.state_dict().items())
        names = {id(p): n for n, p in model.named_parameters()}
        opt = getattr(self.optimizer, "optimizer", self.optimizer)  # accelerate's wrapper holds the torch one
        for group in opt.param_groups:
            for p in group["params"]:
                for k, v in opt.state.get(p, {}).items():
                    if torch.is_tensor(v):
                        tensors.append((f"optimizer.{names.get(id(p), '?')}.{k}", v))
        return tensors

    def _advice(self) -> str:
        """What to change after a divergence, and which checkpoint a rerun continues from."""
        o = self.cfg.optim
        tips = [f"lower optim.lr (now {o.lr:g})",
                f"lower optim.grad_clip (now {o.grad_clip:g})" if o.grad_clip else "set optim.grad_clip (e.g. 1.0)"]
        if self.accelerator.mixed_precision == "fp16":
            tips.append("use engine.mixed_precision=bf16")
        advice = ", ".join(tips[:-1]) + " or " + tips[-1]
        advice = advice[0].upper() + advice[1:]
        if self._last_good is None:
            return f"{advice}. Newest finite checkpoint: none — the run must start over"
        return (f"{advice}. Newest finite checkpoint: {self._last_good}; a rerun in this out_dir resumes "
                "from it when the changed keys are also listed, e.g. engine.resume_changes=[optim.lr]")

    def count_flops(self, batches: Iterator[Any], loss_fn: Callable[[Any], dict[str, torch.Tensor]]) -> Iterator[Any]:
        """Count one optimizer step's training FLOPs on the next micro-batch (forward + backward).

        The batch is handed back (the returned iterator yields it first), gradients are zeroed and
        buffers (BatchNorm statistics) restored, so training proceeds exactly as without counting.
        Refuses a FLOP budget the first step would spend. A resumed run keeps its recorded count.
        """
        if self.state["flops_per_step"] is None:
            acc = self.accelerator
            batch = next(batches)
            buffers = {k: v.clone() for k, v in self.model.named_buffers()}
            torch.manual_seed(step_seed(self.cfg.seed, self.state["step"], acc.process_index))

            def sample_step() -> None:
                with acc.no_sync(self.model), acc.autocast():
                    loss_fn(batch)["loss"].backward()

            micro = count_flops(sample_step)
            self.optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                for k, v in self.model.named_buffers():
                    v.copy_(buffers[k])
            self.state["flops_per_step"] = micro * self.cfg.optim.grad_accum * acc.num_processes
            self.metrics.write({"event": "flops", "flops_per_step": self.state["flops_per_step"],
                                "flops_per_micro_batch": micro, "counter": "torch.utils.flop_counter"})
            batches = itertools.chain([batch], batches)
        if self.budget.kind == "tflops" and self.state["step"] == 0:
            self.budget.check_first_step(self.step_cost)
        return batches

    def step(self, batches: Iterator[Any], loss_fn: Callable[[Any], dict[str, torch.Tensor]], lr: float,
             epoch: int) -> None:
        """One optimizer step at `lr` over the next `grad_accum` batches; `loss_fn(batch)` → {'loss', ...}."""
        try:
            self._step(batches, loss_fn, lr, epoch)
        except BaseException:
            self.progress.close()  # so that the error's one line starts on a line of its own, not after the bar
            raise

    def _step(self, batches: Iterator[Any], loss_fn: Callable[[Any], dict[str, torch.Tensor]], lr: float,
              epoch: int) -> None:
        cfg, acc, step = self.cfg, self.accelerator, self.state["step"]
        started = self.clock()
        accum = cfg.optim.grad_accum
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        nonfinite = torch.zeros((), device=acc.device)
        for micro in range(accum):
            batch = next(batches)
            torch.manual_seed(step_seed(cfg.seed, step, acc.process_index, micro))  # masks, drop path, sampling
            with sync_on_last(acc, self.model, micro, accum), acc.autocast():
                out = loss_fn(batch)
                acc.backward(out["loss"] / accum)
            nonfinite += (~torch.isfinite(out["loss"].detach())).float()
            for k, v in out.items():  # summed on the device; read back once per log window
                self._window[k] = self._window.get(k, 0.0) + v.detach().float() / accum
        check_finite(acc, nonfinite, step, self._advice)
        if cfg.optim.grad_clip:
            acc.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._account(self.clock() - started)
        step = self.state["step"]
        if step == 1 and self.budget.kind == "seconds":
            self.budget.check_first_step(self.state["train_seconds"])
        self._window["steps"] = self._window.get("steps", 0) + 1
        self._window_meta = (epoch, lr)
        if step % cfg.engine.log_every == 0:
            self._log_window()
        if step % cfg.engine.save_every == 0 and not self.done:
            self._save()

    def _save(self, final: bool = False) -> None:
        """Write a checkpoint of the current step, if every tensor of the state is finite on every rank;
        else `NonFiniteStateError`, and the newest checkpoint stays the newest finite one."""
        tensors = self._state_tensors()
        bad = nonfinite_tensors(self.accelerator, tensors)
        step = self.state["step"]
        if bad:
            total = sum(1 for _, t in tensors if (t.is_floating_point() or t.is_complex()) and t.numel())
            raise NonFiniteStateError(
                f"non-finite training state at step {step} ({len(bad)} of {total} tensors NaN or infinite: "
                f"{_names(bad)}); the step-{step} checkpoint was not written. The loss was still finite, so an "
                f"update (or BatchNorm's running statistics) diverged. {self._advice()}")
        self.tally()  # the saved totals are exact up to this step, so a resume continues them
        self._last_good = self.ckpts.save(self.accelerator, self.state, self._config_yaml, final=final,
                                          metrics_offset=self.metrics.offset())

    def count(self, name: str, n: torch.Tensor) -> None:
        """Add `n` (a device tensor, e.g. the corrupt images a batch replaced) to counter `name`;
        summed over ranks into ``state["counts"]`` at each checkpoint and by ``tally()``."""
        self._counts[name] = self._counts.get(name, 0) + n.detach()

    def tally(self) -> dict[str, int]:
        """The counters' run totals (collective: every rank must call it)."""
        totals = self.state.setdefault("counts", {})
        if self._counts:
            names = sorted(self._counts)
            acc = self.accelerator
            sums = acc.reduce(torch.stack([torch.as_tensor(self._counts[k], device=acc.device).long()
                                           for k in names]), "sum").tolist()
            for k, v in zip(names, sums):
                totals[k] = totals.get(k, 0) + int(v)
            self._counts = {}
        return dict(totals)

    def charge(self, seconds: float, what: str) -> None:
        """Charge work done outside the optimizer steps (e.g. estimating target statistics) to the
        training seconds, so that a wall-clock budget pays for it; logged in metrics.jsonl."""
        acc = self.accelerator
        if acc.num_processes > 1:
            seconds = float(acc.reduce(torch.tensor(seconds, device=acc.device), "max"))
        self.state["train_seconds"] += seconds
        self.metrics.write({"event": "charged", "what": what, "seconds": round(seconds, 3), "step": self.state["step"]})

    def _account(self, seconds: float) -> None:
        """Count one finished step: steps, images, FLOPs and seconds (ranks agree on the slowest)."""
        s, acc = self.state, self.accelerator
        if self.budget.kind == "seconds" and acc.num_processes > 1:  # every rank must stop at the same step
            seconds = float(acc.reduce(torch.tensor(seconds, device=acc.device), "max"))
        s["step"] += 1
        s["images_seen"] += self.cfg.data.batch_size
        s["train_seconds"] += seconds
        s["train_flops"] += s["flops_per_step"] or 0
        self._window_seconds += seconds
        shown = int(self.budget.used(s) * self._bar_scale)
        self.progress.update(shown - self._bar_n)
        self._bar_n = shown

    def _log_window(self) -> None:
        if not self._window.get("steps"):
            return
        epoch, lr = self._window_meta
        record = self.metrics.write_window(self._window, self.state, epoch, lr, self._window_seconds,
                                           self.cfg.data.batch_size)
        self.progress.set_postfix(loss=f"{record['loss']:.4f}")
        self._window, self._window_seconds = {}, 0.0

    def compute(self) -> dict[str, Any]:
        """This run's compute: budget, optimizer steps, images, training seconds and FLOPs."""
        s = self.state
        return {
            "budget": {"kind": self.budget.kind, "amount": self.budget.amount, "used": self.budget.used(s)},
            "steps": s["step"], "images_seen": s["images_seen"], "train_seconds": round(s["train_seconds"], 3),
            "flops_per_step": s["flops_per_step"], "train_tflops": s["train_flops"] / 1e12,
            "world_size": self.accelerator.num_processes, **self.tally(),
        }

    def finish(self) -> dict[str, Any]:
        """Log the last partial window, write the final checkpoint and the compute record; return it."""
        self._log_window()
        self.progress.close()
        self._save(final=True)
        compute = self.compute()
        self.metrics.write({"event": "compute", **compute,
                            "run_seconds": round(time.perf_counter() - self._run_start, 3)})
        return compute

    def close(self) -> None:
        """Release DDP and the process group while every rank is still alive.

        A DDP reducer destroyed after a peer has exited can block forever in gloo's destructor (seen
        with 2 CPU processes under load), so the wrapped model is freed here, between barriers,
        before the process group is destroyed. Callers drop their own references first.
        """
        acc = self.accelerator
        acc.wait_for_everyone()
        self.model = self.optimizer = None
        acc.free_memory()  # accelerate's own references to the prepared model and optimizer
        gc.collect()
        acc.wait_for_everyone()
        acc.end_training()
