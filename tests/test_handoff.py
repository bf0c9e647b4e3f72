"""encoder.safetensors: encoder weights only, provenance in the header, refusal on spec mismatch; the
content digest is checked once per file version (the failure probes: test_failures_handoff.py)."""
import logging
import os

import pytest
import torch
from safetensors import safe_open
from torch import nn

from gkd.errors import HandoffError
from gkd.handoff import file_sha256, load_handoff, load_tensors, read_metadata, save_handoff, write_safetensors

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


def test_a_file_is_hashed_once_per_process_however_often_it_is_read(tmp_path, monkeypatch):
    import gkd.handoff as handoff

    path = save_handoff(tmp_path / "e.safetensors", _enc(0), SPEC, stage=1)
    calls = []
    real = handoff._digest
    monkeypatch.setattr(handoff, "_digest", lambda header, data: calls.append(1) or real(header, data))
    read_metadata(path)
    load_handoff(path, _enc(1), SPEC)
    read_metadata(path)
    assert len(calls) == 1
    path.write_bytes(path.read_bytes())  # a new version of the file (new mtime): checked again
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1))
    read_metadata(path)
    assert len(calls) == 2
    read_metadata(path, verify=False)  # the header alone
    assert len(calls) == 2


def test_load_tensors_reads_plain_weights_and_checks_handoffs(tmp_path, caplog):
    from safetensors.torch import save_file

    plain = tmp_path / "weights.safetensors"
    save_file({"w": torch.arange(4.0)}, str(plain))
    with caplog.at_level(logging.WARNING, logger="gkd.handoff"):
        assert torch.equal(load_tensors(plain)["w"], torch.arange(4.0))
    assert not caplog.records  # a plain weights file has no digest to miss
    path = save_handoff(tmp_path / "e.safetensors", _enc(0), SPEC, stage=1)
    assert torch.equal(load_tensors(path)["0.weight"], _enc(0).state_dict()["0.weight"])
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 1  # the last byte of the data section
    path.write_bytes(bytes(raw))
    with pytest.raises(HandoffError, match=f"{path}: its contents changed after it was written"):
        load_tensors(path)


def test_metadata_must_be_strings(tmp_path):
    with pytest.raises(TypeError, match="metadata"):
        write_safetensors(tmp_path / "x.safetensors", {"w": torch.zeros(1)}, {"n": 3})
    assert not list(tmp_path.iterdir())
