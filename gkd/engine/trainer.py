"""The Trainer — the optimizer-step loop every stage shares, run against a compute budget — and what it
needs: the accelerator, AdamW parameter groups, seeds, the metrics log."""
from __future__ import annotations

import gc
import itertools
import json
import logging
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator, Mapping

import torch
from accelerate import Accelerator
from torch import nn
from tqdm.auto import tqdm

from gkd.config import RunConfig
from gkd.engine.checkpoint import CheckpointManager
from gkd.engine.compute import Budget, count_flops

log = logging.getLogger(__name__)

# Embeddings and tokens: spared from weight decay under the "tokens" rule (DeiT/DINOv2 training);
# the Mask2Former query / level embeddings are also what mmseg's stage-3 recipe spares ("mmseg").
_QUERY_SUFFIXES = ("queries_embedder.weight", "queries_features.weight", "level_embed", "level_embed.weight")
_NO_DECAY_SUFFIXES = ("pos_embed", "cls_token", "mask_token", "reg_token", "register_tokens", *_QUERY_SUFFIXES)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training stopped before the bad update."""


def make_accelerator(cfg: RunConfig, find_unused_parameters: bool = False) -> Accelerator:
    """An Accelerator from a run config's `engine` section; CPU when CUDA is absent.

    find_unused_parameters: DDP's option, for models with trainable parameters that a step may
    not use (a trained encoder's mask token and final norm in stage 3).
    """
    from accelerate.utils import DistributedDataParallelKwargs

    return Accelerator(
        cpu=cfg.engine.cpu or not torch.cuda.is_available(),
        mixed_precision=cfg.engine.mixed_precision,
        log_with=list(cfg.engine.trackers) or None,
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


def check_finite(accelerator: Accelerator, nonfinite: torch.Tensor, step: int, where: str) -> None:
    """Stop every rank together when any rank saw a non-finite loss in this step."""
    if accelerator.reduce(nonfinite, "sum").item() > 0:
        raise NonFiniteLossError(f"non-finite loss at step {step}; the update was not applied. {where}")


def flat_config(d: dict, prefix: str = "") -> dict[str, Any]:
    """Flatten a nested config for trackers that only take scalars."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_config(v, key + "."))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) else json.dumps(v)
    return out


class MetricsLog:
    """Appends JSON records to metrics.jsonl (main process) and forwards them to trackers."""

    def __init__(self, path: Path, accelerator: Accelerator):
        self.path = path
        self.accelerator = accelerator

    def write(self, record: dict[str, Any]) -> None:
        if self.accelerator.is_main_process:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")

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


def reset_accelerate_state() -> None:
    """accelerate keeps process-wide singletons; call between in-process training/eval runs."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def micro_batch_size(global_batch: int, accelerator: Accelerator, accum: int) -> int:
    """Per-process micro-batch of a global batch split over processes and accumulation steps."""
    world = accelerator.num_processes
    if global_batch % (world * accum):
        raise ValueError(f"data.batch_size={global_batch} is not divisible by processes ({world}) × "
                         f"optim.grad_accum ({accum})")
    return global_batch // (world * accum)


class Trainer:
    """The optimizer-step machinery every stage loop shares, run against a compute ``Budget``.

    `start()` resumes from the latest (or a named) checkpoint and writes config.yaml;
    `count_flops()` measures the training FLOPs of one step (once per run, kept across resumes);
    each `step()` consumes `grad_accum` micro-batches (DDP all-reduces on the last only), stops
    every rank on a non-finite loss before the update, clips, steps, accounts wall-clock seconds,
    images and FLOPs, logs a metrics window every `log_every` steps and checkpoints every
    `save_every`; `done` says when the budget is spent; `finish()` logs the last window and writes
    the final checkpoint; `compute()` is the run's compute record (metrics.jsonl, handoff metadata).
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
        from gkd.config import to_container, to_yaml

        cfg, acc = self.cfg, self.accelerator
        resume = self.ckpts.latest() if cfg.resume == "auto" else (None if cfg.resume == "never" else Path(cfg.resume))
        if resume is not None:
            self.state.update(self.ckpts.load(acc, resume))
            log.info("resumed from %s at step %d", resume, self.state["step"])
        if acc.is_main_process:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "config.yaml").write_text(to_yaml(cfg))
        acc.init_trackers("gkd", config=flat_config(to_container(cfg)))
        # The bar counts whole budget units (steps, seconds, GFLOPs); tqdm drops its total when n
        # passes it, so no format may rely on the total.
        b = self.budget
        self._bar_unit, self._bar_scale = {"steps": ("it", 1), "seconds": ("s", 1), "tflops": ("GFLOP", 1000)}[b.kind]
        self._bar_n = int(b.used(self.state) * self._bar_scale)
        self.progress = tqdm(total=int(b.amount * self._bar_scale), initial=self._bar_n, desc=self.desc,
                             disable=not acc.is_local_main_process, unit=self._bar_unit)

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
        check_finite(acc, nonfinite, step, f"Last good checkpoint: {self.ckpts.latest() or 'none'}")
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
            self.ckpts.save(acc, self.state)

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
            "world_size": self.accelerator.num_processes,
        }

    def finish(self) -> dict[str, Any]:
        """Log the last partial window, write the final checkpoint and the compute record; return it."""
        self._log_window()
        self.progress.close()
        self.ckpts.save(self.accelerator, self.state)
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
