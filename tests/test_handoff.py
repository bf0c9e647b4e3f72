"""encoder.safetensors: encoder weights only, provenance in the header, refusal on spec mismatch."""
import pytest
import torch
from safetensors import safe_open
from torch import nn

from gkd.handoff import file_sha256, load_handoff, read_metadata, save_handoff

SPEC = {"name": "toy", "kind": "vit", "img_size": 224, "patch_size": 14, "grid": [16, 16], "embed_dim": 8}


def _enc(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8))


def test_roundtrip_and_metadata(tmp_path):
    parent = tmp_path / "parent.safetensors"
    parent.write_bytes(b"not really weights, but hashed all the same")
    path = save_handoff(tmp_path / "encoder.safetensors", _enc(0), SPEC, stage=1, config={"seed": 3}, parent=parent,
                        extra={"input_norm": {"mean": [0.5] * 3, "std": [0.25] * 3}})
    meta = read_metadata(path)
    assert meta["gkd_stage"] == 1 and meta["gkd_spec"] == SPEC and meta["gkd_config"] == {"seed": 3}
    assert meta["gkd_parent_sha256"] == file_sha256(parent)
    assert meta["gkd_version"] and meta["gkd_input_norm"] == {"mean": [0.5] * 3, "std": [0.25] * 3}
    other = _enc(1)
    load_handoff(path, other, dict(SPEC, grid=(16, 16)))  # tuple vs list is the same spec
    for a, b in zip(_enc(0).state_dict().values(), other.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with safe_open(str(path), framework="pt") as f:
        assert set(f.keys()) == {"0.weight", "0.bias", "1.weight", "1.bias"}
    assert not list(tmp_path.glob("*.tmp"))  # written atomically


def test_spec_mismatch_is_refused_naming_fields(tmp_path):
    path = save_handoff(tmp_path / "e.safetensors", _enc(0), SPEC, stage=1)
    with pytest.raises(ValueError, match=r"grid.*\n.*patch_size|patch_size"):
        load_handoff(path, _enc(0), dict(SPEC, patch_size=16, grid=[14, 14]))


def test_key_mismatch_lists_keys(tmp_path):
    path = save_handoff(tmp_path / "e.safetensors", _enc(0), SPEC, stage=1)
    bigger = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    with pytest.raises(KeyError, match=r"2\.weight"):
        load_handoff(path, bigger, SPEC)


def test_file_without_metadata_is_rejected(tmp_path):
    from safetensors.torch import save_file

    p = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(p))
    with pytest.raises(ValueError, match="no GKD metadata"):
        read_metadata(p)
