"""Teacher fidelity: tokens vs an independent plain-torch DINOv2 forward on official-layout weights."""
from __future__ import annotations

import logging
import math
import re

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.layers import resample_patch_embed

from gkd.models import CheckpointError, Teacher, Tokens, build_teacher

DIM, DEPTH, HEADS, PATCH = 32, 2, 2, 14
TINY = dict(embed_dim=DIM, depth=DEPTH, num_heads=HEADS)


# ------------------------------------------------------------------------------------------------
# independent reference: the official DINOv2 forward written directly on an official state dict


def make_official_sd(
    m: int = 37, regs: int = 0, swiglu_hidden: int | None = None, chunks: int = 0, seed: int = 0
) -> dict[str, torch.Tensor]:
    """A random state dict in the official DINOv2 key layout (native grid m×m, patch 14)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, scale: float = 0.05, mean: float = 0.0) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale + mean

    sd = {
        "cls_token": rnd(1, 1, DIM, scale=0.5),
        "pos_embed": rnd(1, 1 + m * m, DIM, scale=0.5),
        "mask_token": rnd(1, DIM),
        "patch_embed.proj.weight": rnd(DIM, 3, PATCH, PATCH, scale=0.02),
        "patch_embed.proj.bias": rnd(DIM),
        "norm.weight": rnd(DIM, scale=0.1, mean=1.0),
        "norm.bias": rnd(DIM, scale=0.1),
    }
    if regs:
        sd["register_tokens"] = rnd(1, regs, DIM, scale=0.5)
    chunk = DEPTH // chunks if chunks else None
    for i in range(DEPTH):
        b = f"blocks.{i // chunk}.{i}." if chunk else f"blocks.{i}."
        sd |= {
            b + "norm1.weight": rnd(DIM, scale=0.1, mean=1.0),
            b + "norm1.bias": rnd(DIM, scale=0.1),
            b + "attn.qkv.weight": rnd(3 * DIM, DIM, scale=0.2),
            b + "attn.qkv.bias": rnd(3 * DIM),
            b + "attn.proj.weight": rnd(DIM, DIM, scale=0.2),
            b + "attn.proj.bias": rnd(DIM),
            b + "ls1.gamma": rnd(DIM, scale=0.2, mean=0.5),
            b + "norm2.weight": rnd(DIM, scale=0.1, mean=1.0),
            b + "norm2.bias": rnd(DIM, scale=0.1),
            b + "ls2.gamma": rnd(DIM, scale=0.2, mean=0.5),
        }
        if swiglu_hidden:
            sd |= {
                b + "mlp.w12.weight": rnd(2 * swiglu_hidden, DIM, scale=0.2),
                b + "mlp.w12.bias": rnd(2 * swiglu_hidden),
                b + "mlp.w3.weight": rnd(DIM, swiglu_hidden, scale=0.2),
                b + "mlp.w3.bias": rnd(DIM),
            }
        else:
            sd |= {
                b + "mlp.fc1.weight": rnd(4 * DIM, DIM, scale=0.2),
                b + "mlp.fc1.bias": rnd(4 * DIM),
                b + "mlp.fc2.weight": rnd(DIM, 4 * DIM, scale=0.2),
                b + "mlp.fc2.bias": rnd(DIM),
            }
    return sd


def _block_prefixes(sd: dict[str, torch.Tensor]) -> list[str]:
    """'blocks.N.' or 'blocks.C.N.' prefixes ordered by the global block index N."""
    found: dict[int, str] = {}
    for k in sd:
        m = re.match(r"^(blocks\.(?:\d+\.)?(\d+)\.)norm1\.weight$", k)
        if m:
            found[int(m.group(2))] = m.group(1)
    return [found[i] for i in sorted(found)]


def reference_forward(
    sd: dict[str, torch.Tensor],
    x: torch.Tensor,
    offset: float = 0.1,
    antialias: bool = False,
    patch: int = PATCH,
    num_blocks: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Official DINOv2 forward (prepare_tokens_with_masks -> blocks -> norm) in plain torch ops."""
    bsz, _, H, W = x.shape
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch)
    h0, w0 = t.shape[-2:]
    t = t.flatten(2).transpose(1, 2)
    pos = sd["pos_embed"]
    M = int(math.sqrt(pos.shape[1] - 1))
    if h0 * w0 == M * M and H == W:
        p = pos
    else:
        grid = pos[:, 1:].reshape(1, M, M, DIM).permute(0, 3, 1, 2)
        if offset:
            grid = F.interpolate(grid, scale_factor=((h0 + offset) / M, (w0 + offset) / M), mode="bicubic", antialias=antialias)
        else:
            grid = F.interpolate(grid, size=(h0, w0), mode="bicubic", antialias=antialias)
        assert grid.shape[-2:] == (h0, w0)
        p = torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, h0 * w0, DIM)], dim=1)
    t = torch.cat([sd["cls_token"].expand(bsz, -1, -1), t], dim=1) + p
    regs = sd.get("register_tokens")
    nreg = 0 if regs is None else regs.shape[1]
    if nreg:
        t = torch.cat([t[:, :1], regs.expand(bsz, -1, -1), t[:, 1:]], dim=1)

    def ln(z: torch.Tensor, pre: str) -> torch.Tensor:
        return F.layer_norm(z, (DIM,), sd[pre + "weight"], sd[pre + "bias"], eps=1e-6)

    prefixes = _block_prefixes(sd)[:num_blocks]
    for b in prefixes:
        y = ln(t, b + "norm1.")
        n = y.shape[1]
        qkv = (y @ sd[b + "attn.qkv.weight"].T + sd[b + "attn.qkv.bias"]).reshape(bsz, n, 3, HEADS, DIM // HEADS)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        a = torch.softmax((q @ k.transpose(-1, -2)) * (DIM // HEADS) ** -0.5, dim=-1)
        y = (a @ v).transpose(1, 2).reshape(bsz, n, DIM)
        y = y @ sd[b + "attn.proj.weight"].T + sd[b + "attn.proj.bias"]
        t = t + sd[b + "ls1.gamma"] * y
        y = ln(t, b + "norm2.")
        if b + "mlp.w12.weight" in sd:
            x1, x2 = (y @ sd[b + "mlp.w12.weight"].T + sd[b + "mlp.w12.bias"]).chunk(2, dim=-1)
            y = (F.silu(x1) * x2) @ sd[b + "mlp.w3.weight"].T + sd[b + "mlp.w3.bias"]
        else:
            y = F.gelu(y @ sd[b + "mlp.fc1.weight"].T + sd[b + "mlp.fc1.bias"])
            y = y @ sd[b + "mlp.fc2.weight"].T + sd[b + "mlp.fc2.bias"]
        t = t + sd[b + "ls2.gamma"] * y
    t = ln(t, "norm.")
    return t[:, 0], t[:, 1 + nreg:]


def _close(tokens: Tokens, ref: tuple[torch.Tensor, torch.Tensor], atol: float = 2e-5) -> None:
    torch.testing.assert_close(tokens.cls, ref[0], atol=atol, rtol=0)
    torch.testing.assert_close(tokens.patch, ref[1], atol=atol, rtol=0)


def _max_diff(tokens: Tokens, ref: tuple[torch.Tensor, torch.Tensor]) -> float:
    return (tokens.patch - ref[1]).abs().max().item()


@pytest.fixture(scope="module")
def models_plain_ckpt(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str]:
    sd = make_official_sd()
    path = tmp_path_factory.mktemp("ckpt") / "dinov2_tiny.pth"
    torch.save(sd, path)
    return sd, str(path)


def _images(h: int, w: int, b: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------
# official DINOv2 layout


def test_plain_matches_official_rule_native_and_224(models_plain_ckpt: tuple[dict, str]) -> None:
    sd, path = models_plain_ckpt
    teacher = build_teacher("vit_small_patch14_dinov2", checkpoint=path, **TINY)
    assert teacher.spec["native_grid"] == [37, 37] and teacher.spec["pos_interp"] == "official"
    for h, w in [(518, 518), (224, 224), (224, 308)]:
        x = _images(h, w)
        out = teacher(x)
        assert out.grid == (h // 14, w // 14) and out.patch.shape == (2, (h // 14) * (w // 14), DIM)
        _close(out, reference_forward(sd, x))


def test_timm_rule_differs_at_224_but_not_at_native(models_plain_ckpt: tuple[dict, str]) -> None:
    sd, path = models_plain_ckpt
    timm_rule = build_teacher("vit_small_patch14_dinov2", checkpoint=path, pos_interp="timm", **TINY)
    x518, x224 = _images(518, 518), _images(224, 224)
    _close(timm_rule(x518), reference_forward(sd, x518))  # same table at the native grid
    assert _max_diff(timm_rule(x224), reference_forward(sd, x224)) > 1e-2

    # timm's own load-time resampling (model created at 224 px) gives those "timm" tokens too.
    from timm.models.vision_transformer import checkpoint_filter_fn

    model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, img_size=224, **TINY)
    model.load_state_dict(checkpoint_filter_fn(dict(sd), model), strict=True)
    with torch.no_grad():
        native_timm = model.eval().forward_features(x224)
    torch.testing.assert_close(timm_rule(x224).patch, native_timm[:, 1:], atol=2e-5, rtol=0)
    assert (native_timm[:, 1:] - reference_forward(sd, x224)[1]).abs().max() > 1e-2


def test_registers_variant(tmp_path) -> None:
    sd = make_official_sd(regs=4, seed=2)
    torch.save(sd, tmp_path / "reg.pth")
    teacher = build_teacher("vit_small_patch14_reg4_dinov2", checkpoint=tmp_path / "reg.pth", **TINY)
    assert teacher.spec["interpolate_offset"] == 0.0 and teacher.spec["interpolate_antialias"] is True
    for s in (518, 224):
        x = _images(s, s)
        out = teacher(x)
        assert out.patch.shape[1] == (s // 14) ** 2  # registers are not patches
        _close(out, reference_forward(sd, x, offset=0.0, antialias=True))
    # The plain models' rule would give other tokens: the comparison above can tell the rules apart.
    plain_rule = build_teacher(
        "vit_small_patch14_reg4_dinov2", checkpoint=tmp_path / "reg.pth", interpolate_offset=0.1,
        interpolate_antialias=False, **TINY,
    )
    x = _images(224, 224)
    assert _max_diff(plain_rule(x), reference_forward(sd, x, offset=0.0, antialias=True)) > 1e-2


def test_chunked_blocks_and_swiglu_giant(tmp_path) -> None:
    sd = make_official_sd(chunks=2, seed=3)
    assert "blocks.1.1.norm1.weight" in sd
    torch.save(sd, tmp_path / "chunked.pth")
    teacher = build_teacher("vit_small_patch14_dinov2", checkpoint=tmp_path / "chunked.pth", **TINY)
    x = _images(224, 224)
    _close(teacher(x), reference_forward(sd, x))

    hidden = (int(4 * DIM * 2 / 3) + 7) // 8 * 8  # the official SwiGLUFFNFused hidden size
    sd = make_official_sd(swiglu_hidden=hidden, seed=4)
    torch.save(sd, tmp_path / "giant.pth")
    teacher = build_teacher(
        "vit_giant_patch14_dinov2", checkpoint=tmp_path / "giant.pth", mlp_ratio=2 * hidden / DIM, **TINY
    )
    _close(teacher(x), reference_forward(sd, x))


def test_native_grid_is_read_from_checkpoint(tmp_path) -> None:
    sd = make_official_sd(m=20, seed=5)  # a 280-px native grid
    torch.save(sd, tmp_path / "m20.pth")
    teacher = build_teacher("vit_small_patch14_dinov2", checkpoint=tmp_path / "m20.pth", **TINY)
    assert teacher.spec["native_grid"] == [20, 20]
    x = _images(224, 224)
    _close(teacher(x), reference_forward(sd, x))


def test_patch_size_resample_and_out_index(models_plain_ckpt: tuple[dict, str]) -> None:
    sd, path = models_plain_ckpt
    x = _images(224, 224)
    # Default: the authors' rule, a bicubic F.interpolate of the kernel itself (no antialias, no rescaling).
    teacher = build_teacher("vit_small_patch14_dinov2", checkpoint=path, patch_size=16, img_size=224, **TINY)
    assert teacher.patch_size == 16 and teacher.grid == (14, 14) and teacher.spec["patch_resample"] == "bicubic"
    w14 = sd["patch_embed.proj.weight"]
    kernel = F.interpolate(w14, size=(16, 16), mode="bicubic", align_corners=False, antialias=False)
    torch.testing.assert_close(teacher.model.patch_embed.proj.weight, kernel, atol=0, rtol=0)
    torch.testing.assert_close(teacher.model.patch_embed.proj.bias, sd["patch_embed.proj.bias"], atol=0, rtol=0)
    _close(teacher(x), reference_forward(dict(sd, **{"patch_embed.proj.weight": kernel}), x, patch=16))
    # A smooth kernel interpolated this way sums over (16/14)^2 as many pixels: about 1.31x the response.
    ratio = kernel.sum(dim=(1, 2, 3)).norm() / w14.sum(dim=(1, 2, 3)).norm()
    assert abs(ratio - (16 / 14) ** 2) < 0.05

    # pinv: timm's FlexiViT pseudo-inverse resize, unchanged.
    pinv = build_teacher("vit_small_patch14_dinov2", checkpoint=path, patch_size=16, img_size=224,
                         patch_resample="pinv", **TINY)
    assert pinv.spec["patch_resample"] == "pinv"
    kernel = resample_patch_embed(w14, [16, 16])
    torch.testing.assert_close(pinv.model.patch_embed.proj.weight, kernel)
    sd16 = dict(sd, **{"patch_embed.proj.weight": kernel})
    _close(pinv(x), reference_forward(sd16, x, patch=16))  # official rule on the 14×14 token grid

    native = build_teacher("vit_small_patch14_dinov2", checkpoint=path, **TINY)
    assert native.spec["patch_resample"] is None  # no resampling, nothing to record
    with pytest.raises(ValueError, match="patch_resample"):
        build_teacher("vit_small_patch14_dinov2", checkpoint=path, patch_size=16, patch_resample="nearest", **TINY)

    first = build_teacher("vit_small_patch14_dinov2", checkpoint=path, out_index=0, **TINY)
    assert len(first.model.blocks) == 1 and first.spec["num_blocks"] == 1
    _close(first(x), reference_forward(sd, x, num_blocks=1))


def test_stage2_authors_position_rule_is_size_based_bicubic(models_plain_ckpt: tuple[dict, str]) -> None:
    """The authors' stage-2 teacher: table 37×37 -> 32×32 by F.interpolate(size=...), bicubic, no antialias."""
    sd, path = models_plain_ckpt
    teacher = build_teacher("vit_small_patch14_dinov2", checkpoint=path, patch_size=16, img_size=512,
                            interpolate_offset=0.0, interpolate_antialias=False, **TINY)
    kernel = F.interpolate(sd["patch_embed.proj.weight"], size=(16, 16), mode="bicubic", align_corners=False)
    grid = sd["pos_embed"][:, 1:].reshape(1, 37, 37, DIM).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(32, 32), mode="bicubic", align_corners=False, antialias=False)
    pos = torch.cat([sd["pos_embed"][:, :1], grid.permute(0, 2, 3, 1).reshape(1, 32 * 32, DIM)], dim=1)
    # reference_forward at 32×32 with the interpolated table: its early-out uses the table as given.
    x = _images(512, 512, b=1)
    ref = reference_forward(dict(sd, **{"patch_embed.proj.weight": kernel, "pos_embed": pos}), x, patch=16)
    _close(teacher(x), ref, atol=5e-5)


def test_strict_loading_lists_keys(models_plain_ckpt: tuple[dict, str], tmp_path) -> None:
    sd, _ = models_plain_ckpt
    bad = dict(sd)
    del bad["blocks.1.norm2.bias"]
    bad["blocks.0.attn.extra"] = torch.zeros(1)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError) as err:
        build_teacher("vit_small_patch14_dinov2", checkpoint=tmp_path / "bad.pth", **TINY)
    assert "blocks.1.norm2.bias" in str(err.value) and "blocks.0.attn.extra" in str(err.value)

    shaped = dict(sd, **{"norm.weight": torch.ones(DIM + 1)})
    torch.save(shaped, tmp_path / "shape.pth")
    with pytest.raises(CheckpointError, match="norm.weight"):
        build_teacher("vit_small_patch14_dinov2", checkpoint=tmp_path / "shape.pth", **TINY)

    no_mask = {k: v for k, v in sd.items() if k != "mask_token"}  # e.g. weights exported without it
    torch.save(no_mask, tmp_path / "nomask.pth")
    build_teacher("vit_small_patch14_dinov2", checkpoint=tmp_path / "nomask.pth", **TINY)


def test_timm_state_dict_and_safetensors_round_trip(models_plain_ckpt, tmp_path, caplog) -> None:
    sd, path = models_plain_ckpt
    teacher = build_teacher("vit_small_patch14_dinov2", checkpoint=path, **TINY)
    timm_sd = {k: v.clone() for k, v in teacher.model.state_dict().items()}
    timm_sd |= {"head.weight": torch.zeros(10, DIM), "head.bias": torch.zeros(10)}  # a classifier checkpoint
    torch.save({"model": timm_sd}, tmp_path / "timm.pth")
    save_file(timm_sd, str(tmp_path / "timm.safetensors"))
    x = _images(224, 224)
    ref = reference_forward(sd, x)
    with caplog.at_level(logging.INFO, logger="gkd.models.weights"):
        for f in ("timm.pth", "timm.safetensors"):
            other = build_teacher("vit_small_patch14_dinov2", checkpoint=tmp_path / f, **TINY)
            assert other.spec["checkpoint_layout"] == "timm"
            _close(other(x), ref)
    assert "head.weight" in caplog.text  # the dropped classifier is logged, not silent


# ------------------------------------------------------------------------------------------------
# frozen behaviour


def test_frozen_eval_no_grad(models_plain_ckpt: tuple[dict, str]) -> None:
    _, path = models_plain_ckpt
    teacher = build_teacher("vit_small_patch14_dinov2", checkpoint=path, **TINY)
    assert isinstance(teacher, Teacher)
    assert not any(p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.training and not any(m.training for m in teacher.modules())
    x = _images(224, 224).requires_grad_(True)
    with torch.enable_grad():
        out = teacher(x)
    assert out.patch.grad_fn is None and out.cls.grad_fn is None and not out.patch.requires_grad
    # usable as a regression target in a graph
    pred = torch.zeros_like(out.patch, requires_grad=True)
    F.mse_loss(pred, out.patch).backward()
    assert pred.grad is not None
    with pytest.raises(ValueError):
        teacher(_images(225, 224))


# ------------------------------------------------------------------------------------------------
# other teachers


def test_eva02_uses_timm_dynamic_forward(tmp_path) -> None:
    kw = dict(embed_dim=32, depth=2, num_heads=2)
    ref = timm.create_model("eva02_tiny_patch14_224", pretrained=False, num_classes=0, dynamic_img_size=True, **kw)
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "eva.safetensors"))
    teacher = build_teacher("eva02_tiny_patch14_224", checkpoint=tmp_path / "eva.safetensors", **kw)
    assert teacher.spec["pos_interp"] == "timm"
    ref.eval()
    for s in (224, 280):
        x = _images(s, s)
        with torch.no_grad():
            feats = ref.fc_norm(ref.forward_features(x))  # timm's default EVA pooling keeps its LayerNorm in fc_norm
        out = teacher(x)
        torch.testing.assert_close(out.cls, feats[:, 0], atol=1e-5, rtol=0)
        torch.testing.assert_close(out.patch, feats[:, 1:], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="official"):
        build_teacher("eva02_tiny_patch14_224", pos_interp="official", **kw)


def test_eva02_inputs_use_imagenet_mean_std() -> None:
    """timm's EVA-02 pretrained_cfg says CLIP's mean/std; the authors normalise with ImageNet's."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, OPENAI_CLIP_MEAN

    kw = dict(embed_dim=32, depth=1, num_heads=2)
    for name in ("eva02_tiny_patch14_224", "eva02_base_patch14_224.mim_in22k"):
        teacher = build_teacher(name, **kw)
        assert tuple(teacher.model.pretrained_cfg["mean"]) == OPENAI_CLIP_MEAN  # what timm would pick
        assert teacher.mean == IMAGENET_DEFAULT_MEAN and teacher.std == IMAGENET_DEFAULT_STD
        assert teacher.spec["norm_source"].startswith("imagenet")
    dino = build_teacher("vit_small_patch14_dinov2", **TINY)
    assert dino.mean == IMAGENET_DEFAULT_MEAN and dino.spec["norm_source"] == "pretrained_cfg"
    own = build_teacher("eva02_tiny_patch14_224", mean=[0.5] * 3, std=[0.25] * 3, **kw)
    assert own.mean == (0.5,) * 3 and own.std == (0.25,) * 3 and own.spec["norm_source"] == "explicit"
    with pytest.raises(ValueError, match="both mean and std"):
        build_teacher("eva02_tiny_patch14_224", mean=[0.5] * 3, **kw)


def _tiny_hf(tmp_path, registers: bool):
    from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    cfg_cls, model_cls = (
        (Dinov2WithRegistersConfig, Dinov2WithRegistersModel) if registers else (Dinov2Config, Dinov2Model)
    )
    torch.manual_seed(0)
    cfg = cfg_cls(hidden_size=DIM, num_hidden_layers=DEPTH, num_attention_heads=HEADS, image_size=518, patch_size=14)
    model = model_cls(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = tmp_path / ("hf_reg" if registers else "hf")
    model.save_pretrained(path)
    return model, str(path)


@pytest.mark.parametrize("registers", [False, True])
def test_hf_teacher_slices_last_hidden_state(tmp_path, registers: bool) -> None:
    model, path = _tiny_hf(tmp_path, registers)
    teacher = build_teacher("hf:" + path)
    nreg = 4 if registers else 0
    assert teacher.embed_dim == DIM and teacher.spec["num_register_tokens"] == nreg
    x = _images(224, 224)
    with torch.no_grad():
        hidden = model(pixel_values=x).last_hidden_state
        # last_hidden_state is already after the final layernorm: re-applying it changes it.
        assert (model.layernorm(hidden) - hidden).abs().max() > 1e-3
    out = teacher(x)
    torch.testing.assert_close(out.cls, hidden[:, 0], atol=1e-6, rtol=0)
    torch.testing.assert_close(out.patch, hidden[:, 1 + nreg:], atol=1e-6, rtol=0)
    assert not any(p.requires_grad for p in teacher.parameters())


def test_hf_dinov3_teacher_skips_registers(tmp_path) -> None:
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    torch.manual_seed(0)
    cfg = DINOv3ViTConfig(hidden_size=DIM, num_hidden_layers=1, num_attention_heads=HEADS, intermediate_size=2 * DIM,
                          patch_size=16, image_size=64, num_register_tokens=4)
    model = DINOv3ViTModel(cfg).eval()
    model.save_pretrained(tmp_path / "dinov3")
    teacher = build_teacher("hf:" + str(tmp_path / "dinov3"), img_size=64)
    x = _images(64, 96)
    with torch.no_grad():
        hidden = model(pixel_values=x).last_hidden_state  # [B, 1 + 4 + 4*6, C]
    out = teacher(x)
    assert out.grid == (4, 6) and hidden.shape[1] == 1 + 4 + 24
    torch.testing.assert_close(out.cls, hidden[:, 0], atol=1e-6, rtol=0)
    torch.testing.assert_close(out.patch, hidden[:, 5:], atol=1e-6, rtol=0)


def test_hf_weights_with_official_rule(tmp_path) -> None:
    model, path = _tiny_hf(tmp_path, registers=False)
    official = build_teacher("hf:" + path, pos_interp="official")
    assert official.spec["source"] == "hf->timm" and official.spec["checkpoint_layout"] == "hf_dinov2"
    x518 = _images(518, 518)
    with torch.no_grad():
        hidden = model(pixel_values=x518).last_hidden_state
    _close(official(x518), (hidden[:, 0], hidden[:, 1:]))  # same weights, same tokens at the native grid
    # transformers' Dinov2 interpolates without the +0.1 offset: at 224 it is not the official rule.
    x224 = _images(224, 224)
    with torch.no_grad():
        hidden = model(pixel_values=x224).last_hidden_state
    assert (official(x224).patch - hidden[:, 1:]).abs().max() > 1e-3
    # and the same weights as a .safetensors checkpoint of a timm name load to the same teacher
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "hf.safetensors"))
    via_ckpt = build_teacher("vit_small_patch14_dinov2", checkpoint=tmp_path / "hf.safetensors", **TINY)
    torch.testing.assert_close(via_ckpt(x224).patch, official(x224).patch, atol=0, rtol=0)
