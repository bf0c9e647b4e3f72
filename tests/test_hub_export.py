"""gkd export --format timm|hf and gkd push (gkd.tools.hub): reloaded models equal the gkd student, the
model card carries the run's metadata, and the upload goes through a patched HfApi (never the network)."""
from __future__ import annotations

import inspect
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from gkd.handoff import save_handoff
from gkd.models import build_student
from gkd.tools import hub

NORM = {"mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6]}


def _perturb(student: torch.nn.Module) -> None:
    """Random weights everywhere (LayerScale, norms, mask token too), so a wrong key mapping shows."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))


def _encoder(tmp_path: Path, name: str, extra: dict[str, Any] | None = None, config: dict | None = None,
             **kw: Any) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    student = build_student(name, **kw)
    _perturb(student)
    path = save_handoff(tmp_path / f"{name}.safetensors", student, student.spec, stage=2, config=config,
                        extra={"input_norm": NORM, **(extra or {})})
    return path, student.eval()


VITS = [
    # a DINOv2-style ViT at another patch and image size than timm's default (14 px, 518 px)
    ("vit_small_patch14_dinov2", dict(img_size=56, patch_size=8, depth=2, embed_dim=32, num_heads=2)),
    # a plain ViT (no LayerScale) with a non-square input
    ("vit_tiny_patch16_224", dict(img_size=(48, 64), depth=2, embed_dim=32, num_heads=2)),
    # an EVA-02-style ViT (RoPE, SwiGLU): timm rebuilds its rotary table for the exported size
    ("eva02_tiny_patch14_224", dict(img_size=56, depth=2)),
]


@pytest.mark.parametrize("name,kw", VITS)
def test_timm_export_rebuilds_the_vit_student(tmp_path, name, kw):
    enc, student = _encoder(tmp_path, name, **kw)
    result = hub.export_timm(enc, tmp_path / "timm")
    assert result.max_abs_diff == 0.0
    cfg = json.loads((tmp_path / "timm" / "config.json").read_text())
    h, w = student.img_size
    assert cfg["architecture"] == name
    assert cfg["model_args"]["img_size"] == [h, w]
    assert cfg["model_args"]["patch_size"] == student.patch_size
    assert cfg["model_args"]["depth"] == 2 and cfg["model_args"].get("embed_dim", 192) == student.embed_dim
    pcfg = cfg["pretrained_cfg"]
    assert pcfg["input_size"] == [3, h, w] and pcfg["mean"] == NORM["mean"] and pcfg["std"] == NORM["std"]
    assert pcfg["num_classes"] == 0 and cfg["num_classes"] == 0
    assert not {"tag", "license", "hf_hub_id", "url"} & set(pcfg)  # the default weights' record is not ours
    # weights: the student's encoder.* keys with the prefix stripped, nothing else
    weights = load_file(str(tmp_path / "timm" / "model.safetensors"))
    own = {k[len("encoder."):]: v for k, v in student.state_dict().items() if k.startswith("encoder.")}
    assert set(weights) == set(own) and all(torch.equal(weights[k], own[k]) for k in own)
    assert torch.equal(load_file(str(tmp_path / "timm" / hub.EXTRAS_FILE))["mask_token"], student.mask_token)

    model = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True).eval()
    assert model.patch_embed.patch_size == (student.patch_size,) * 2
    x = torch.randn(2, 3, h, w)
    with torch.no_grad():
        feats, tokens = model.forward_features(x), student(x)
        if isinstance(model.norm, torch.nn.Identity):  # EVA-02 averages first, its LayerNorm is fc_norm
            feats = model.fc_norm(feats)
    assert torch.equal(feats[:, 0], tokens.cls)
    assert torch.equal(feats[:, model.num_prefix_tokens:], tokens.patch)


def test_timm_export_of_a_cnn_student_and_its_adapter(tmp_path):
    enc, student = _encoder(tmp_path, "resnet18", img_size=64)
    hub.export_timm(enc, tmp_path / "timm")
    cfg = json.loads((tmp_path / "timm" / "config.json").read_text())
    assert cfg["architecture"] == "resnet18" and "patch_size" not in cfg["model_args"]
    assert cfg["pretrained_cfg"]["input_size"] == [3, 64, 64]
    model = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True).eval()
    extras = load_file(str(tmp_path / "timm" / hub.EXTRAS_FILE))
    assert set(extras) == {"mask_token", "token_norm.weight", "token_norm.bias"}
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        fmap = model.forward_features(x)
        tokens = student(x)
        assert torch.equal(fmap, student.encoder.forward_features(x))
    # the adapter as gkd.models.student documents it, on the exported map and LayerNorm
    patch = F.interpolate(fmap, size=student.grid, mode="bilinear", align_corners=False).flatten(2).transpose(1, 2)
    seq = torch.cat([fmap.mean(dim=(2, 3)).unsqueeze(1), patch], dim=1)
    seq = F.layer_norm(seq, (seq.shape[-1],), extras["token_norm.weight"], extras["token_norm.bias"], eps=1e-6)
    torch.testing.assert_close(seq[:, 0], tokens.cls, atol=1e-6, rtol=0)
    torch.testing.assert_close(seq[:, 1:], tokens.patch, atol=1e-6, rtol=0)


def test_timm_export_refuses_segmentors_and_full_folders(tmp_path):
    seg = save_handoff(tmp_path / "segmentor.safetensors", torch.nn.Linear(2, 2),
                       {"encoder": {"name": "x"}, "decoder": {"name": "mlp"}}, stage=3)
    with pytest.raises(ValueError, match="stage-3 segmentor.*--format onnx"):
        hub.export_timm(seg, tmp_path / "out")
    enc, _ = _encoder(tmp_path, "resnet18", img_size=64)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(FileExistsError, match="not an empty folder"):
        hub.export_timm(enc, tmp_path / "full")


def test_hf_export_gives_a_dinov2_model_with_equal_outputs(tmp_path):
    from transformers import AutoImageProcessor, AutoModel

    enc, student = _encoder(tmp_path, *VITS[0][:1], **VITS[0][1])
    result = hub.export_hf(enc, tmp_path / "hf")
    assert result.max_abs_diff <= 1e-5
    model, info = AutoModel.from_pretrained(str(tmp_path / "hf"), output_loading_info=True)
    assert type(model).__name__ == "Dinov2Model"
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert model.config.patch_size == 8 and model.config.image_size == 56 and model.config.num_hidden_layers == 2
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        out, tokens = model.eval()(pixel_values=x), student(x)
    torch.testing.assert_close(out.last_hidden_state[:, 0], tokens.cls, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.last_hidden_state[:, 1:], tokens.patch, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.pooler_output, tokens.cls, atol=1e-5, rtol=0)
    # the mask token travels too, and the query rows are the first third of timm's fused qkv
    assert torch.equal(model.embeddings.mask_token.detach(), student.mask_token.detach())
    qkv = student.encoder.blocks[1].attn.qkv.weight.detach()
    sd = model.state_dict()
    q = next(v for k, v in sd.items() if k.startswith("encoder.layer.1.") and ("q_proj.weight" in k or "query.weight" in k))
    assert torch.equal(q, qkv[:32])
    proc = AutoImageProcessor.from_pretrained(str(tmp_path / "hf"))
    assert list(proc.image_mean) == NORM["mean"] and list(proc.image_std) == NORM["std"]
    assert proc.size == {"height": 56, "width": 56}


def test_hf_export_refuses_a_mapping_that_changes_the_outputs(tmp_path, monkeypatch):
    enc, _ = _encoder(tmp_path, *VITS[0][:1], **VITS[0][1])
    real = hub.dinov2_hf_state_dict

    def swapped(*a: Any, **kw: Any) -> dict:  # a bug that swaps the query and key rows of block 0
        sd = real(*a, **kw)
        q = next(k for k in sd if k.startswith("encoder.layer.0.") and ("q_proj.weight" in k or "query.weight" in k))
        k_ = q.replace("q_proj", "k_proj").replace("query", "key")
        sd[q], sd[k_] = sd[k_], sd[q]
        return sd

    monkeypatch.setattr(hub, "dinov2_hf_state_dict", swapped)
    with pytest.raises(RuntimeError, match="reloaded transformers model differs"):
        hub.export_hf(enc, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_dinov2_key_mapping_names_both_layouts():
    sd = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, img_size=28, depth=1,
                           embed_dim=16, num_heads=2).state_dict()
    legacy = hub.dinov2_hf_state_dict(sd, depth=1)
    assert "encoder.layer.0.attention.attention.key.bias" in legacy  # the Hub's facebook/dinov2-* names
    assert torch.equal(legacy["encoder.layer.0.attention.attention.key.bias"], sd["blocks.0.attn.qkv.bias"][16:32])
    assert torch.equal(legacy["encoder.layer.0.layer_scale2.lambda1"], sd["blocks.0.ls2.gamma"])
    assert torch.equal(legacy["embeddings.mask_token"], torch.zeros(1, 16))
    v5 = hub.dinov2_hf_state_dict(sd, depth=1, attention_v5=True)
    assert torch.equal(v5["encoder.layer.0.attention.o_proj.weight"], sd["blocks.0.attn.proj.weight"])
    assert len(v5) == len(legacy)


@pytest.mark.parametrize("name,kw", [("vit_small_patch14_reg4_dinov2", dict(img_size=28, depth=1, embed_dim=16,
                                                                               num_heads=2)),
                                     ("resnet18", dict(img_size=64))])
def test_hf_export_refuses_other_students(tmp_path, name, kw):
    enc, _ = _encoder(tmp_path, name, **kw)
    with pytest.raises(ValueError, match="--format hf supports DINOv2-style timm ViT students"):
        hub.export_hf(enc, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


# ------------------------------------------------------------------------------------------------
# push


class FakeHfApi:
    """Records create_repo / upload_folder and copies the uploaded folder away."""

    calls: list[tuple[str, dict]] = []
    store: Path

    def __init__(self, **kw: Any) -> None:
        self.calls.append(("init", kw))

    def create_repo(self, repo_id: str, **kw: Any) -> Any:
        self.calls.append(("create_repo", {"repo_id": repo_id, **kw}))
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def upload_folder(self, *, repo_id: str, folder_path: str, **kw: Any) -> Any:
        self.calls.append(("upload_folder", {"repo_id": repo_id, **kw}))
        shutil.copytree(folder_path, self.store)
        return type("CommitInfo", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/abc"})()


RESULTS_TABLE = "| model | Cityscapes | BDD | Mapillary | Avg |\n|---|---|---|---|---|\n| gkd-s | 51.2 | 44.0 | 55.5 | 50.2 |"
RESULTS_MD = (f"# gta5-to-real\n\ngta5 → cityscapes, bdd, mapillary. mIoU (%)\n\n{RESULTS_TABLE}\n\n## Protocol\n\n"
              "- Inference: sliding window\n\n## cityscapes\n\n### IoU per class (%)\n\n| Model | road |\n")


def _run_metadata() -> dict[str, Any]:
    stage1 = {"stage": 1, "images": [{"manifest": "imagenet1k", "split": "train"}], "parent": None}
    return {
        "protocol": {"stage": 2, "images": [{"manifest": "gta5", "split": "train"}], "parent": stage1},
        "compute": {"train_seconds": 12.5, "train_tflops": 3.25, "steps": 40, "images_seen": 5120},
        "compute_total": {"train_seconds": 112.5, "train_tflops": 30.5, "steps": 140, "images_seen": 25600, "runs": 2,
                          "unrecorded": []},
    }


def test_push_uploads_the_timm_folder_with_a_model_card(tmp_path, monkeypatch):
    config = {"stage": 2, "teacher": {"name": "vit_base_patch14_dinov2", "checkpoint": "/home/me/weights/dinov2_vitb14.pth"},
              "method": {"name": "gkd"}}
    enc, _ = _encoder(tmp_path, "resnet18", extra=_run_metadata(), config=config, img_size=64)
    report = tmp_path / "eval"
    report.mkdir()
    (report / "results.md").write_text(RESULTS_MD)
    FakeHfApi.calls, FakeHfApi.store = [], tmp_path / "uploaded"
    monkeypatch.setattr(hub, "HfApi", FakeHfApi)
    folder, url = hub.push(enc, "me/gkd-r18", private=True, eval_report=report, token="t0k")
    assert folder is None and url == "https://huggingface.co/me/gkd-r18/commit/abc"
    assert [c[0] for c in FakeHfApi.calls] == ["init", "create_repo", "upload_folder"]
    assert FakeHfApi.calls[0][1]["token"] == "t0k" and FakeHfApi.calls[0][1]["library_name"] == "gkd"
    # every recorded call fits the real client's signature
    from huggingface_hub import HfApi

    inspect.signature(HfApi.__init__).bind(None, **FakeHfApi.calls[0][1])
    inspect.signature(HfApi.create_repo).bind(None, **FakeHfApi.calls[1][1])
    inspect.signature(HfApi.upload_folder).bind(None, folder_path="x", **FakeHfApi.calls[2][1])
    assert FakeHfApi.calls[1][1] == {"repo_id": "me/gkd-r18", "private": True, "exist_ok": True, "repo_type": "model"}
    up = FakeHfApi.store
    assert {p.name for p in up.iterdir()} == {"config.json", "model.safetensors", hub.EXTRAS_FILE, "README.md", "eval"}
    assert (up / "eval" / "results.md").read_text() == RESULTS_MD
    card = (up / "README.md").read_text()
    licence = timm.models.get_pretrained_cfg("vit_base_patch14_dinov2").license
    assert "| teacher | vit_base_patch14_dinov2 |" in card and "| teacher weights | `dinov2_vitb14.pth` |" in card
    assert "/home/me" not in card
    assert f"| teacher licence | {licence} (timm's record for timm/vit_base_patch14_dinov2.lvd142m)" in card
    assert "| student | resnet18 (cnn, embed dim 512) |" in card
    assert "| 1 | imagenet1k / train |  |" in card and "| 2 | gta5 / train |  |" in card
    assert "| this run | 12.5 | 3.25 | 40 | 5120 |" in card
    assert "| whole lineage | 112.5 | 30.5 | 140 | 25600 |" in card
    assert RESULTS_TABLE in card and "### gta5-to-real" in card and "#### Protocol" in card
    assert "IoU per class" not in card and "`eval/results.md`" in card  # per-class tables stay in eval/
    assert 'timm.create_model("hf-hub:me/gkd-r18", pretrained=True)' in card
    assert f"mean {NORM['mean']}, std {NORM['std']}" in card


def test_push_dry_run_of_a_segmentor_through_the_cli(tmp_path, monkeypatch):
    from gkd.cli import main

    meta = _run_metadata()
    source = {"manifest": "gta5", "split": "train", "root": "/secret/data/gta5", "num_images": 24966}
    selection = {"rule": "best", "manifest": "cityscapes", "split": "val", "root": "/secret/cs", "num_images": 500}
    meta["protocol"] = {"source": source, "selection": selection, "encoder": meta["protocol"]}
    seg = save_handoff(tmp_path / "segmentor.safetensors", torch.nn.Linear(2, 2),
                       {"encoder": build_student("resnet18", img_size=64).spec, "decoder": {"name": "mlp"},
                        "num_classes": 19}, stage=3, config={"method": {"name": "none"}}, extra=meta)
    monkeypatch.setattr(hub, "HfApi", None)  # a dry run never touches the Hub client
    assert main(["push", str(seg), "me/seg", "--dry-run", "--out", str(tmp_path / "stage")]) == 0
    out = tmp_path / "stage"
    assert (out / hub.SEGMENTOR_FILE).read_bytes() == seg.read_bytes()
    card = (out / "README.md").read_text()
    assert "stage-3 segmentor" in card and "| decoder | mlp (19 classes) |" in card
    assert "| teacher | not recorded in this file |" in card
    assert "| 1 | imagenet1k / train |  |" in card and "| 2 | gta5 / train |  |" in card
    assert "| 3 | gta5 / train (24966 images) | model selection: best on cityscapes / val (500 images) |" in card
    assert "/secret" not in card  # local dataset roots stay out of a public card
    assert "| whole lineage | 112.5 | 30.5 | 140 | 25600 |" in card
    assert main(["push", str(seg), "me/seg", "--dry-run"]) == 2  # a dry run needs --out


def test_cli_export_timm_and_onnx_only_options(tmp_path, capsys):
    from gkd.cli import main

    enc, _ = _encoder(tmp_path, "resnet18", img_size=64)
    assert main(["export", str(enc), "--format", "timm"]) == 0
    assert (tmp_path / "resnet18_timm" / "model.safetensors").is_file()  # default --out next to the file
    assert "local-dir:" in capsys.readouterr().out
    assert main(["export", str(enc), "--format", "hf", "--out", str(tmp_path / "hf")]) == 2
    assert "--format hf supports" in capsys.readouterr().err
    assert main(["export", str(enc), "--format", "timm", "--height", "32", "--out", str(tmp_path / "t2")]) == 2
