"""Config schema: defaults ← YAML overlays ← key=value, with errors that name the key."""
from pathlib import Path

import pytest

from gkd.config import ConfigError, DistillConfig, SegmentConfig, load_config, parse_cli

REPO = Path(__file__).resolve().parents[1]


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "exp.yaml"
    p.write_text(text)
    return p


def test_precedence_defaults_yaml_cli(tmp_path):
    y = _write(tmp_path, "optim:\n  lr: 1.0e-3\n  epochs: 7\ndata:\n  train_shards: a.tar\n")
    cfg = load_config(DistillConfig, [y], ["optim.lr=2e-3", "student.kwargs.depth=2"])
    assert cfg.optim.lr == pytest.approx(2e-3)  # CLI beats YAML
    assert cfg.optim.epochs == 7  # YAML beats defaults
    assert cfg.optim.weight_decay == pytest.approx(0.05)  # default kept
    assert cfg.student.kwargs.depth == 2  # free-form kwargs accept new keys


@pytest.mark.parametrize(
    "override, key",
    [("optim.lrr=1", "lrr"), ("data.batch_size=abc", "data.batch_size"), ("teacher.nme=x", "nme")],
)
def test_bad_override_names_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(DistillConfig, [], ["data.train_shards=a.tar", override])


def test_unknown_key_in_yaml_names_key_and_file(tmp_path):
    y = _write(tmp_path, "engine:\n  save_evry: 3\n")
    with pytest.raises(ConfigError, match=r"save_evry.*exp\.yaml"):
        load_config(DistillConfig, [y], [])


def test_missing_required_value_is_an_error():
    with pytest.raises(ConfigError, match="data.train_shards"):
        load_config(DistillConfig, [], [])


def test_parse_cli_and_readonly():
    cfg = parse_cli(DistillConfig, ["--config", str(REPO / "configs/stage1/smoke.yaml"), "optim.epochs=3"])
    assert cfg.optim.epochs == 3
    with pytest.raises(Exception):
        cfg.optim.epochs = 4  # resolved configs are frozen


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("stage[12]/*.yaml")), ids=lambda p: p.name)
def test_shipped_distill_configs_fit_the_schema(path):
    cfg = load_config(DistillConfig, [path], ["data.train_shards=x.tar"])
    assert cfg.stage == int(path.parent.name[-1])


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("stage3/*.yaml")), ids=lambda p: p.name)
def test_shipped_segment_configs_fit_the_schema(path):
    load_config(SegmentConfig, [path], ["encoder=e.safetensors"])
