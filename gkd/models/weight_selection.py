"""Initialise a smaller ViT student from its (larger) teacher by weight selection.

Xu et al., "Initializing Models with Larger Ones", ICLR 2024 (arXiv 2311.18823): the student's block i
takes teacher block i (first-N layers; ``layers="uniform"`` or an index list for experiments), and
every dimension keeps evenly spaced indices, the *same* indices wherever a dimension is shared, so the
residual stream keeps the same channels in every tensor that reads or writes it.

Beyond the paper (whose code selects along each flattened dimension, splitting heads): attention keeps
whole, evenly spaced teacher heads when the head sizes agree; a teacher LayerScale is folded exactly
into the preceding projection when the student has none (a student LayerScale the teacher lacks is
1); the position table and patch kernel are resampled to the student's grid and patch size as the
student loader does. A student of the teacher's exact size reproduces it; a smaller one is an
approximation (a LayerNorm over the kept channels normalises with their statistics only).
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from timm.layers import Mlp
from timm.models.vision_transformer import Attention, Block, VisionTransformer
from torch import Tensor, nn

from .weights import strict_load
from .resample import infer_pos_grid, resample_abs_pos_embed, resample_patch_embed
from .student import ViTStudent
from .teacher import Teacher, jsonable

_log = logging.getLogger(__name__)

__all__ = [
    "WeightSelectionError",
    "evenly_spaced",
    "SelectionPlan",
    "plan_selection",
    "select_weights",
    "init_student_from_teacher",
]

PAPER = "Xu et al., Initializing Models with Larger Ones, ICLR 2024 (arXiv 2311.18823)"

# Teacher parts that produce no tokens (classifier / pooling): not mapped, reported in one log line.
_HEAD_PREFIXES = ("head.", "attn_pool.", "head_drop.")
# Top-level modules whose parameters are vectors over the residual channels.
_RESIDUAL_NORMS = ("patch_embed.norm.", "norm_pre.", "norm.", "fc_norm.")
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")


def _generic(key: str) -> str:
    """``blocks.3.attn.qkv.bias`` -> ``blocks.*.attn.qkv.bias`` (one log line per rule, not per block)."""
    return re.sub(r"^blocks\.\d+\.", "blocks.*.", key)


class WeightSelectionError(ValueError):
    """Teacher and student cannot be mapped onto each other (the message names the key / dimension)."""


def evenly_spaced(total: int, keep: int, what: str = "dimension") -> Tensor:
    """``keep`` evenly spaced indices into ``range(total)`` (int64 [keep]), starting at 0.

    ``arange(keep) * total / keep`` when ``keep`` divides ``total`` (the official code's rule), else
    ``round(i * (total - 1) / (keep - 1))``: first and last kept, distinct because the step is >= 1.
    The rounding is done in exact integer arithmetic with ties upwards (the official code rounds a
    float ``linspace``), so the indices never depend on float error.
    """
    if keep < 1 or keep > total:
        raise WeightSelectionError(f"{what}: student size {keep} exceeds teacher size {total}" if keep > total
                                   else f"{what}: student size must be positive, got {keep}")
    i = torch.arange(keep, dtype=torch.long)
    if total % keep == 0:
        return i * (total // keep)
    return (2 * i * (total - 1) + (keep - 1)) // (2 * (keep - 1))  # floor(i (T-1)/(S-1) + 1/2)


@dataclass(frozen=True)
class SelectionPlan:
    """The indices a selection uses; all index tensors are int64 into the teacher's dimension.

    embed [Cs] (residual channels, used everywhere), attn [As] (channels of the q/k/v/proj
    attention width), heads [hs] and head_channels [ds] (None in ``"channels"`` mode), mlp [Hs].
    """

    teacher_layers: tuple[int, ...]
    embed: Tensor
    attn: Tensor
    heads: Tensor | None
    head_channels: Tensor | None
    attention_mode: str  # "whole_heads" | "heads_and_channels" | "channels"
    mlp: Tensor
    dims: dict[str, Any] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        """JSON-able summary (layer indices, channel counts) for provenance."""
        return {
            "teacher_layers": list(self.teacher_layers),
            "attention_mode": self.attention_mode,
            "heads": None if self.heads is None else self.heads.tolist(),
            **self.dims,
        }


def _check_same_type(t: nn.Module, s: nn.Module, where: str) -> None:
    if type(t) is not type(s):
        raise WeightSelectionError(f"{where}: teacher has {type(t).__name__}, student {type(s).__name__}")


def _check_block_pair(tb: nn.Module, sb: nn.Module, where: str) -> None:
    """Same block / attention / MLP / norm / activation types, and ones this module knows how to map."""
    _check_same_type(tb, sb, where)
    if type(tb) is not Block:
        raise WeightSelectionError(f"{where}: only timm's pre-norm Block is supported, got {type(tb).__name__}")
    _check_same_type(tb.attn, sb.attn, f"{where}.attn")
    if type(tb.attn) is not Attention:
        raise WeightSelectionError(f"{where}.attn: only timm Attention is supported, got {type(tb.attn).__name__}")
    _check_same_type(tb.mlp, sb.mlp, f"{where}.mlp")
    if type(tb.mlp) is not Mlp:  # GluMlp / SwiGLU pack or split fc1: another mapping
        raise WeightSelectionError(f"{where}.mlp: only the plain timm Mlp is supported, got {type(tb.mlp).__name__}")
    _check_same_type(tb.mlp.act, sb.mlp.act, f"{where}.mlp.act")
    for name in ("norm1", "norm2"):
        _check_same_type(getattr(tb, name), getattr(sb, name), f"{where}.{name}")
    for name in ("q_norm", "k_norm", "norm"):
        _check_same_type(getattr(tb.attn, name), getattr(sb.attn, name), f"{where}.attn.{name}")
    _check_same_type(tb.mlp.norm, sb.mlp.norm, f"{where}.mlp.norm")
    if (getattr(tb.attn, "gate", None) is None) != (getattr(sb.attn, "gate", None) is None):
        raise WeightSelectionError(f"{where}.attn.gate: gated attention in only one of teacher / student")


def _block_dims(b: nn.Module) -> tuple[int, int, int, int]:
    """(num_heads, head_dim, attn_dim, mlp hidden) of a timm Block."""
    heads, head_dim = int(b.attn.num_heads), int(b.attn.head_dim)
    return heads, head_dim, heads * head_dim, int(b.mlp.fc1.out_features)


def _uniform_dims(blocks: nn.Module, who: str) -> tuple[int, int, int, int]:
    dims = {_block_dims(b) for b in blocks}
    if len(dims) != 1:
        raise WeightSelectionError(f"{who}: blocks differ in (heads, head_dim, attn_dim, mlp hidden): {sorted(dims)}")
    return dims.pop()


def _layer_indices(layers: str | Sequence[int], t_depth: int, s_depth: int) -> tuple[int, ...]:
    if s_depth > t_depth:
        raise WeightSelectionError(f"depth: student has {s_depth} blocks, more than the teacher's {t_depth}")
    if layers == "first":
        return tuple(range(s_depth))
    if layers == "uniform":
        return tuple(int(i) for i in evenly_spaced(t_depth, s_depth, "depth"))
    if isinstance(layers, str):
        raise ValueError(f"layers must be 'first', 'uniform' or a list of teacher block indices, got {layers!r}")
    idx = tuple(int(i) for i in layers)
    if len(idx) != s_depth or len(set(idx)) != s_depth or not all(0 <= i < t_depth for i in idx):
        raise WeightSelectionError(
            f"layers {list(idx)}: need {s_depth} distinct teacher block indices in [0, {t_depth})"
        )
    return idx


def plan_selection(teacher: nn.Module, student: nn.Module, layers: str | Sequence[int] = "first") -> SelectionPlan:
    """Check compatibility of two timm ViTs and choose the indices (see module docstring).

    layers: ``"first"`` (the paper's first-N), ``"uniform"`` (evenly spaced blocks) or explicit
    teacher block indices, one per student block.
    """
    for who, m in (("teacher", teacher), ("student", student)):
        if not isinstance(m, VisionTransformer):
            raise WeightSelectionError(f"weight selection needs timm VisionTransformer models; {who} is {type(m).__name__}")
    _check_same_type(teacher, student, "model class")
    for name in ("norm_pre", "norm", "fc_norm"):
        _check_same_type(getattr(teacher, name), getattr(student, name), name)
    _check_same_type(teacher.patch_embed.norm, student.patch_embed.norm, "patch_embed.norm")
    if teacher.patch_embed.proj.in_channels != student.patch_embed.proj.in_channels:
        raise WeightSelectionError(
            f"patch_embed.proj: input channels {teacher.patch_embed.proj.in_channels} (teacher) vs "
            f"{student.patch_embed.proj.in_channels} (student)"
        )
    idx = _layer_indices(layers, len(teacher.blocks), len(student.blocks))
    for i, j in enumerate(idx):
        _check_block_pair(teacher.blocks[j], student.blocks[i], f"blocks.{i} (teacher blocks.{j})")

    t_eps, s_eps = getattr(teacher.blocks[0].norm1, "eps", None), getattr(student.blocks[0].norm1, "eps", None)
    if t_eps != s_eps:  # not a weights matter, but the student then normalises differently
        _log.warning("weight selection: norm eps differs (teacher %s, student %s)", t_eps, s_eps)
    ct, cs = int(teacher.embed_dim), int(student.embed_dim)
    embed = evenly_spaced(ct, cs, "embed_dim")
    ht, dt, at, mt = _uniform_dims(teacher.blocks, "teacher")
    hs, ds, as_, ms = _uniform_dims(student.blocks, "student")
    mlp = evenly_spaced(mt, ms, "mlp hidden (fc1 out)")
    heads = head_channels = None
    if hs <= ht and ds <= dt:
        heads = evenly_spaced(ht, hs, "num_heads")
        head_channels = evenly_spaced(dt, ds, "head_dim")
        attn = (heads[:, None] * dt + head_channels[None, :]).reshape(-1)  # head-major, as timm reshapes qkv
        mode = "whole_heads" if ds == dt else "heads_and_channels"
    else:
        # More student heads than teacher heads: no head-to-head map; plain evenly spaced channels.
        attn = evenly_spaced(at, as_, "attention width (num_heads * head_dim)")
        mode = "channels"
        if not isinstance(student.blocks[0].attn.q_norm, nn.Identity):
            raise WeightSelectionError(
                f"attn.q_norm/k_norm: qk-norm needs one channel set per head, but the student has more heads "
                f"({hs}) than the teacher ({ht})"
            )
    dims = {
        "embed_dim": [ct, cs],
        "depth": [len(teacher.blocks), len(student.blocks)],
        "num_heads": [ht, hs],
        "head_dim": [dt, ds],
        "mlp_hidden": [mt, ms],
        "patch_size": [list(teacher.patch_embed.proj.kernel_size), list(student.patch_embed.proj.kernel_size)],
        "pos_grid": [list(teacher.patch_embed.grid_size), list(student.patch_embed.grid_size)],
    }
    return SelectionPlan(idx, embed, attn, heads, head_channels, mode, mlp, dims)


class _Selector:
    """Builds the student state dict from the teacher's, recording which teacher keys it used."""

    def __init__(self, teacher: nn.Module, student: nn.Module, plan: SelectionPlan) -> None:
        self.t, self.s, self.plan = teacher, student, plan
        self.tsd = {k: v.detach() for k, v in teacher.state_dict().items()}
        self.ssd = student.state_dict()
        self.used: set[str] = set()
        self.notes: list[str] = []
        self._kinds: set[str] = set()

    def note(self, msg: str) -> None:
        self.notes.append(msg)
        _log.info("weight selection: %s", msg)

    def note_once(self, kind: str, msg: str) -> None:
        """``note`` for a rule that applies to many keys (every block): logged once."""
        if kind not in self._kinds:
            self._kinds.add(kind)
            self.note(msg)

    def get(self, key: str) -> Tensor:
        self.used.add(key)
        return self.tsd[key]

    # ---- building blocks ------------------------------------------------------------------------

    def vector(self, skey: str, tkey: str, idx: Tensor) -> Tensor:
        """A 1-D parameter over an indexed dimension (norm weight/bias, bias, gamma)."""
        if tkey not in self.tsd:
            if tkey.endswith(".bias"):
                self.note_once(_generic(skey), f"{_generic(skey)}: the teacher has no such bias; zeros (exact)")
                return torch.zeros_like(self.ssd[skey])
            raise WeightSelectionError(f"{skey}: no teacher key {tkey} to select from")
        return self.get(tkey)[idx]

    def linear(self, skey: str, tkey: str, rows: Tensor, cols: Tensor | None, gamma: Tensor | None = None) -> Tensor:
        """weight [out, in] -> [rows, cols] or bias [out] -> [rows], with LayerScale gamma [out] folded in."""
        if skey.endswith(".bias"):
            if tkey not in self.tsd:
                self.note_once(_generic(skey), f"{_generic(skey)}: the teacher has no such bias; zeros (exact)")
                return torch.zeros_like(self.ssd[skey])
            b = self.get(tkey)
            b = b * gamma if gamma is not None else b
            return b[rows]
        if tkey not in self.tsd:
            raise WeightSelectionError(f"{skey}: no teacher key {tkey} to select from")
        w = self.get(tkey)
        w = w * gamma[:, None] if gamma is not None else w  # gamma * (W x + b) = (gamma W) x + gamma b
        return w[rows][:, cols]

    # ---- the keys ---------------------------------------------------------------------------------

    def block_key(self, skey: str, i: int, rest: str) -> Tensor:
        plan = self.plan
        j = plan.teacher_layers[i]
        tp = f"blocks.{j}."
        r, a, m = plan.embed, plan.attn, plan.mlp
        if rest.startswith(("norm1.", "norm2.")):
            return self.vector(skey, tp + rest, r)
        if rest in ("attn.qkv.weight", "attn.qkv.bias"):
            at = _block_dims(self.t.blocks[j])[2]
            if rest.endswith(".bias"):
                if tp + rest not in self.tsd:
                    self.note_once(_generic(skey), f"{_generic(skey)}: the teacher has no qkv bias; zeros (exact)")
                    return torch.zeros_like(self.ssd[skey])
                return self.get(tp + rest).reshape(3, at)[:, a].reshape(-1)
            w = self.get(tp + rest).reshape(3, at, -1)  # rows: q, k, v, each [attn_dim] head-major
            return w[:, a][:, :, r].reshape(3 * len(a), len(r))
        if rest.startswith(("attn.q_norm.", "attn.k_norm.")):
            return self.vector(skey, tp + rest, plan.head_channels)
        if rest.startswith("attn.norm."):
            return self.vector(skey, tp + rest, a)
        if rest in ("attn.gate.weight", "attn.gate.bias"):
            return self.linear(skey, tp + rest, a, r)
        if rest in ("attn.proj.weight", "attn.proj.bias"):
            return self.linear(skey, tp + rest, r, a, self.fold_gamma(i, j, "ls1"))
        if rest in ("mlp.fc1.weight", "mlp.fc1.bias"):
            return self.linear(skey, tp + rest, m, r)
        if rest.startswith("mlp.norm."):
            return self.vector(skey, tp + rest, m)
        if rest in ("mlp.fc2.weight", "mlp.fc2.bias"):
            return self.linear(skey, tp + rest, r, m, self.fold_gamma(i, j, "ls2"))
        if rest in ("ls1.gamma", "ls2.gamma"):
            if tp + rest not in self.tsd:
                self.note_once("ls_ones", "blocks.*.ls1/ls2.gamma: the teacher has no LayerScale; gamma = 1 (exact)")
                return torch.ones_like(self.ssd[skey])
            return self.get(tp + rest)[r]
        raise WeightSelectionError(f"{skey}: no rule maps this student key onto the teacher (teacher blocks.{j})")

    def fold_gamma(self, i: int, j: int, ls: str) -> Tensor | None:
        """The teacher's gamma to fold into the projection when the student has no LayerScale there."""
        tkey, skey = f"blocks.{j}.{ls}.gamma", f"blocks.{i}.{ls}.gamma"
        if tkey in self.tsd and skey not in self.ssd:
            self.note_once("ls_fold", "teacher LayerScale gamma folded into attn.proj / mlp.fc2 rows and bias "
                           "(the student has no LayerScale; exact)")
            return self.get(tkey)
        return None

    def prefix_and_pos(self, out: dict[str, Tensor]) -> None:
        """cls_token, reg_token and pos_embed (channel-selected; patch grid resampled)."""
        t, s, r = self.t, self.s, self.plan.embed
        t_pos_prefix = 0 if t.no_embed_class or t.pos_embed is None else int(t.num_prefix_tokens)
        s_pos_prefix = 0 if s.no_embed_class or s.pos_embed is None else int(s.num_prefix_tokens)
        # Prefix tokens in timm's order [cls, registers...]; position entries follow the same order.
        t_tokens = (["cls"] if t.cls_token is not None else []) + [f"reg{k}" for k in range(int(t.num_reg_tokens))]
        s_tokens = (["cls"] if s.cls_token is not None else []) + [f"reg{k}" for k in range(int(s.num_reg_tokens))]
        if "cls" in t_tokens and "cls" not in s_tokens:
            raise WeightSelectionError("cls_token: the teacher has a class token, the student has none")
        nt_reg, ns_reg = int(t.num_reg_tokens), int(s.num_reg_tokens)
        if nt_reg and nt_reg != ns_reg:
            raise WeightSelectionError(f"reg_token: teacher has {nt_reg} register tokens, student {ns_reg}")
        if (t.pos_embed is None) != (s.pos_embed is None):
            raise WeightSelectionError(
                f"pos_embed: {'teacher' if t.pos_embed is None else 'student'} has no absolute position table"
            )

        def token(sd: dict[str, Tensor], names: list[str], name: str) -> Tensor:
            """The prefix token ``name`` of a state dict: [1, 1, C]."""
            if name == "cls":
                return sd["cls_token"]
            k = names.index(name) - ("cls" in names)
            return sd["reg_token"][:, k:k + 1]

        s_tok: dict[str, Tensor] = {}
        s_entry: dict[str, Tensor] = {}
        for k, name in enumerate(s_tokens):
            kind = "cls_token" if name == "cls" else "reg_token"
            if name not in t_tokens:  # a token the teacher lacks: the student's own values, logged
                self.note_once(kind + "_own", f"{kind}: the teacher has none; the student keeps its own initialisation "
                               f"(and its position entry)")
                s_tok[name] = token(self.ssd, s_tokens, name)
                if s_pos_prefix:
                    s_entry[name] = self.ssd["pos_embed"][:, k:k + 1]
                continue
            self.used.add(kind)
            tok = token(self.tsd, t_tokens, name)[..., r]
            entry = None
            if t_pos_prefix:
                self.used.add("pos_embed")
                kt = t_tokens.index(name)
                entry = self.tsd["pos_embed"][:, kt:kt + 1, r]
            if s_pos_prefix:
                if entry is None:
                    self.note_once(kind + "_zero_pos", f"pos_embed: the teacher has no position entry for its {kind} "
                                   f"(no_embed_class); zeros (exact)")
                s_tok[name] = tok
                s_entry[name] = entry if entry is not None else torch.zeros_like(tok)
            else:
                if entry is not None:
                    self.note_once(kind + "_fold_pos", f"{kind}: the teacher's position entry is added to the token "
                                   f"(the student has no_embed_class; exact)")
                s_tok[name] = tok + entry if entry is not None else tok
        if "cls" in s_tokens:
            out["cls_token"] = s_tok["cls"]
        if ns_reg:
            out["reg_token"] = torch.cat([s_tok[f"reg{k}"] for k in range(ns_reg)], dim=1)
        if t.pos_embed is None:
            return
        patch = self.get("pos_embed")[:, t_pos_prefix:, r]  # [1, Nt, Cs]
        t_grid = tuple(int(g) for g in t.patch_embed.grid_size)
        if t_grid[0] * t_grid[1] != patch.shape[1]:
            _, side = infer_pos_grid(patch.shape[1], max_prefix=0)
            t_grid = (side, side)
        s_grid = tuple(int(g) for g in s.patch_embed.grid_size)
        if s_grid != t_grid:
            self.note(f"pos_embed: patch grid resampled {t_grid} -> {s_grid} (timm rule: bicubic, antialias)")
            patch = resample_abs_pos_embed(patch, new_size=list(s_grid), old_size=list(t_grid), num_prefix_tokens=0)
        entries = [s_entry[n] for n in s_tokens] if s_pos_prefix else []
        out["pos_embed"] = torch.cat(entries + [patch], dim=1)

    def patch_embed(self, out: dict[str, Tensor]) -> None:
        r = self.plan.embed
        w = self.get("patch_embed.proj.weight")[r]  # [Cs, 3, p, p]; per-channel resize commutes with selection
        new = list(self.s.patch_embed.proj.kernel_size)
        if list(w.shape[-2:]) != new:
            self.note(f"patch_embed.proj.weight: kernel resampled {tuple(w.shape[-2:])} -> {tuple(new)} (PI-resize)")
            w = resample_patch_embed(w, new)
        out["patch_embed.proj.weight"] = w
        if "patch_embed.proj.bias" in self.ssd:
            out["patch_embed.proj.bias"] = self.vector("patch_embed.proj.bias", "patch_embed.proj.bias", r)

    def run(self) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        self.prefix_and_pos(out)
        self.patch_embed(out)
        for skey in self.ssd:
            if skey in out:
                continue
            mb = _BLOCK_KEY.match(skey)
            if mb:
                out[skey] = self.block_key(skey, int(mb.group(1)), mb.group(2))
            elif skey.startswith(_RESIDUAL_NORMS):
                out[skey] = self.vector(skey, skey, self.plan.embed)
            else:
                raise WeightSelectionError(f"{skey}: no rule maps this student key onto the teacher")
        self.check_unused()
        res: dict[str, Tensor] = {}
        for k, own in self.ssd.items():
            v = out[k]
            if tuple(v.shape) != tuple(own.shape):  # a bug here, not a user error
                raise RuntimeError(f"{k}: selected {tuple(v.shape)}, student has {tuple(own.shape)}")
            res[k] = v.detach().to(device=own.device, dtype=own.dtype).clone()
        return res

    def check_unused(self) -> None:
        """Every teacher tensor of the selected blocks and of the embedding / final norm must be used."""
        kept = {f"blocks.{j}." for j in self.plan.teacher_layers}
        heads = sorted(k for k in self.tsd if k.startswith(_HEAD_PREFIXES))
        if heads:
            self.note(f"teacher classifier / pooling keys not used (no tokens): {', '.join(heads)}")
        left = []
        for k in self.tsd:
            if k in self.used or k.startswith(_HEAD_PREFIXES):
                continue
            mb = _BLOCK_KEY.match(k)
            if mb and f"blocks.{mb.group(1)}." not in kept:
                continue  # a block the layer selection leaves out
            left.append(k)
        if left:
            raise WeightSelectionError(
                "teacher tensors without a student counterpart (architectures differ): " + ", ".join(sorted(left))
            )


def _select(
    teacher: nn.Module, student: nn.Module, layers: str | Sequence[int]
) -> tuple[dict[str, Tensor], SelectionPlan, list[str]]:
    plan = plan_selection(teacher, student, layers)
    with torch.no_grad():
        sel = _Selector(teacher, student, plan)
        sd = sel.run()
    return sd, plan, sel.notes


def select_weights(teacher: nn.Module, student: nn.Module, layers: str | Sequence[int] = "first") -> dict[str, Tensor]:
    """A state dict for ``student`` (every key of ``student.state_dict()``, exact shapes and dtypes)
    selected from ``teacher``; both are timm ``VisionTransformer`` of the same family.

    layers: ``"first"`` (default, the paper's first-N), ``"uniform"`` or explicit teacher block indices.
    Raises ``WeightSelectionError`` (a ValueError) naming the key / dimension when a student
    dimension exceeds the teacher's, the architectures differ, or a key cannot be mapped.
    """
    return _select(teacher, student, layers)[0]


def init_student_from_teacher(
    student: ViTStudent, teacher: Teacher, layers: str | Sequence[int] = "first"
) -> dict[str, Any]:
    """Load weights selected from ``teacher.model`` strictly into ``student.encoder`` (its
    ``mask_token`` is left as is). Returns a JSON-able provenance record: teacher name, teacher
    block indices, attention mode, (teacher, student) sizes, and the logged notes."""
    if not isinstance(student, ViTStudent):
        raise WeightSelectionError(f"weight selection initialises ViT students; got {type(student).__name__}")
    model = getattr(teacher, "model", None)
    if not isinstance(model, VisionTransformer):
        raise WeightSelectionError(f"weight selection needs a timm VisionTransformer teacher; got {type(model).__name__}")
    spec = getattr(teacher, "spec", None) or {}
    name = spec.get("name", type(model).__name__)
    sd, plan, notes = _select(model, student.encoder, layers)
    strict_load(student.encoder, sd, f"student {student.name} (weight selection from {name})")
    record = {
        "method": "weight_selection",
        "paper": PAPER,
        "teacher": name,
        "layers": layers if isinstance(layers, str) else "explicit",
        **plan.record(),
        "notes": notes,
    }
    _log.info("student %s: initialised by weight selection from %s, teacher blocks %s, %s",
              student.name, name, list(plan.teacher_layers), plan.attention_mode)
    return jsonable(record)
