"""gkd.integrations.mmseg: the GKDEncoder backbone built through mmseg's registry gives exactly gkd's
segmentor features, stays frozen, and the shipped mmseg config parses and builds its backbone."""
from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch

pytest.importorskip("mmseg")
pytest.importorskip("mmengine")

from mmseg.registry import MODELS  # noqa: E402

import gkd.integrations.mmseg as gkd_mmseg  # noqa: E402  (registers GKDEncoder)
from gkd.handoff import save_handoff  # noqa: E402
from gkd.models import build_student  # noqa: E402
from gkd.models.segmentor import build_segmentor, load_encoder_for_segmentor  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "mmseg" / "gkd_vits_mask2former_gta5.py"
NORM = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


@pytest.fixture(autouse=True)
def _mmseg_without_compiled_ops(monkeypatch):
    """mmseg's MODELS.get first imports ``mmseg.models`` (its registry's lazy import), which needs the
    compiled ops of the full mmcv. With mmcv-lite, mark that import done: GKDEncoder is registered by
    our own import, and the test is about it, not about mmseg's models."""
    try:
        importlib.import_module("mmseg.models")
    except ImportError:
        monkeypatch.setattr(MODELS, "_imported", True)


def _encoder(tmp_path: Path, depth: int = 6) -> Path:
    torch.manual_seed(0)
    student = build_student("vit_tiny_patch16_224", img_size=64, depth=depth, embed_dim=32, num_heads=2)
    return save_handoff(tmp_path / "encoder.safetensors", student, student.spec, stage=2, extra={"input_norm": NORM})


def _reference(path: Path, x: torch.Tensor, layers=None) -> list[torch.Tensor]:
    """gkd's own stage-3 features for the normalised input x (a segmentor on the same file)."""
    student, _ = load_encoder_for_segmentor(path)
    seg = build_segmentor(student, "mlp", num_classes=3, layers=layers).eval()
    with torch.no_grad():
        return seg.extract_features(x)


def test_registry_build_equals_gkd_features(tmp_path):
    path = _encoder(tmp_path)
    backbone = MODELS.build(dict(type="GKDEncoder", checkpoint=str(path), layers=None, frozen=True))
    assert isinstance(backbone, gkd_mmseg.GKDEncoder)
    assert backbone.layers == [1, 2, 3, 5] and backbone.out_channels == [32] * 4  # default_vit_layers(6)
    torch.manual_seed(1)
    x = torch.randn(2, 3, 64, 96)  # already normalised, as mmseg's data preprocessor hands it over
    out = backbone(x)
    ref = _reference(path, x)
    assert isinstance(out, tuple) and len(out) == 4
    assert [tuple(t.shape) for t in out] == [(2, 32, 16, 24), (2, 32, 8, 12), (2, 32, 4, 6), (2, 32, 2, 3)]
    for a, b in zip(out, ref):
        assert torch.equal(a, b)
    # explicit layers go through too
    out = MODELS.build(dict(type="GKDEncoder", checkpoint=str(path), layers=[0, 1, 4, -1]))(x)
    for a, b in zip(out, _reference(path, x, layers=[0, 1, 4, 5])):
        assert torch.equal(a, b)


def test_no_normalisation_inside(tmp_path):
    """The backbone on mmseg's normalised input = gkd's segmentor on the [0, 1] image it came from."""
    path = _encoder(tmp_path)
    backbone = MODELS.build(dict(type="GKDEncoder", checkpoint=str(path)))
    torch.manual_seed(2)
    pixels = torch.randint(0, 256, (1, 3, 64, 64)).float()
    pre = gkd_mmseg.data_preprocessor_norm(path)
    assert pre["mean"] == [255 * m for m in NORM["mean"]] and pre["std"] == [255 * s for s in NORM["std"]]
    mm_in = (pixels - torch.tensor(pre["mean"]).view(1, 3, 1, 1)) / torch.tensor(pre["std"]).view(1, 3, 1, 1)
    student, _ = load_encoder_for_segmentor(path)
    seg = build_segmentor(student, "mlp", num_classes=3, mean=NORM["mean"], std=NORM["std"]).eval()
    with torch.no_grad():
        ref = seg.extract_features(seg.normalize(pixels / 255))
    for a, b in zip(backbone(mm_in), ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_frozen_by_default_and_unfrozen_on_request(tmp_path):
    path = _encoder(tmp_path)
    frozen = MODELS.build(dict(type="GKDEncoder", checkpoint=str(path)))
    frozen.train()  # what mmseg's runner does
    assert frozen.training and not frozen.segmentor.encoder.training
    assert all(not m.training for m in frozen.segmentor.encoder.modules())
    assert all(not p.requires_grad for p in frozen.parameters())
    assert not any(k.startswith("segmentor.decoder") for k in frozen.state_dict())  # no decoder weights
    x = torch.randn(1, 3, 32, 32, requires_grad=True)
    assert all(not t.requires_grad for t in frozen(x))

    free = MODELS.build(dict(type="GKDEncoder", checkpoint=str(path), frozen=False))
    free.train()
    assert free.segmentor.encoder.training
    params = list(free.parameters())
    assert params and all(p.requires_grad for p in params)
    sum(t.sum() for t in free(x)).backward()
    assert free.segmentor.encoder.encoder.blocks[0].attn.qkv.weight.grad is not None


def test_init_weights_keeps_checkpoint(tmp_path):
    path = _encoder(tmp_path)
    backbone = MODELS.build(dict(type="GKDEncoder", checkpoint=str(path)))
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    backbone.init_weights()
    assert all(torch.equal(before[k], v) for k, v in backbone.state_dict().items())


def test_bad_input_size_is_clear(tmp_path):
    backbone = MODELS.build(dict(type="GKDEncoder", checkpoint=str(_encoder(tmp_path))))
    with pytest.raises(ValueError, match="multiples of 16"):
        backbone(torch.randn(1, 3, 40, 64))


def test_config_parses_and_backbone_builds(tmp_path):
    from mmengine import Config

    cfg = Config.fromfile(str(CONFIG))  # runs custom_imports: gkd.integrations.mmseg
    assert cfg.custom_imports == dict(imports=["gkd.integrations.mmseg"], allow_failed_imports=False)
    assert cfg.model.backbone.type == "GKDEncoder" and cfg.model.backbone.frozen is True
    assert cfg.model.backbone.layers == [3, 5, 7, 11]
    assert cfg.model.decode_head.in_channels == [384] * 4 and cfg.model.decode_head.num_queries == 100
    assert cfg.model.test_cfg == dict(mode="slide", crop_size=(512, 512), stride=(341, 341))
    assert cfg.train_cfg.max_iters == 40000 and cfg.train_dataloader.batch_size == 4
    assert cfg.optim_wrapper.optimizer.lr == 1e-4
    assert cfg.train_dataloader.dataset.pipeline[2].scales == [int(512 * x * 0.1) for x in range(5, 21)]
    assert cfg.model.data_preprocessor.mean == [123.675, 116.28, 103.53]
    # the config's layers need 12 blocks: a tiny 12-block encoder stands in for the stage-2 file
    path = _encoder(tmp_path, depth=12)
    backbone_cfg = dict(cfg.model.backbone, checkpoint=str(path))
    backbone = MODELS.build(backbone_cfg)
    x = torch.randn(1, 3, 64, 64)
    for a, b in zip(backbone(x), _reference(path, x, layers=[3, 5, 7, 11])):
        assert torch.equal(a, b)
