"""The levers of stages 1-2 that make a small student learn fast: a head warm-up that holds a
pretrained student still, weight selection from the teacher through the config, and a pretrained
student's own input normalisation."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from gkd.config import DistillConfig, load_config
from gkd.distill import build_objective
from gkd.distill.head_init import RidgeFit, init_heads_least_squares
from gkd.engine import read_metadata, train_distill
from gkd.engine.distill import InputRenorm, build_stage_teacher
from gkd.models import build_student
from gkd.models.weight_selection import select_weights
from gkd.tools.encoders import write_student_encoder
from helpers import TINY


def _cfg(tmp_path, shards, *extra: str) -> DistillConfig:
    return load_config(DistillConfig, [], [*TINY, f"data.train_shards={shards}", f"out_dir={tmp_path / 'run'}",
                                          *extra])


def _student_state(checkpoint_dir) -> dict[str, torch.Tensor]:
    sd = load_file(checkpoint_dir / "model.safetensors")
    return {k[len("student."):]: v for k, v in sd.items() if k.startswith("student.")}


def test_head_warmup_holds_the_student_and_trains_the_heads(tmp_path, shards):
    init = write_student_encoder(tmp_path / "init.safetensors", "vit_tiny_patch16_224", img_size=56, patch_size=14,
                                 seed=3, depth=1, embed_dim=32, num_heads=2)
    start = load_file(init)
    train_distill(_cfg(tmp_path, shards, f"student.checkpoint={init}", "optim.max_steps=4",
                       "heads.warmup_steps=2", "optim.warmup_epochs=0", "engine.save_every=1",
                       "engine.keep_last=10"))
    ckpts = tmp_path / "run" / "checkpoints"
    s1, s2, s3 = (_student_state(ckpts / f"step_{i:08d}") for i in (1, 2, 3))
    for k, v in start.items():  # steps 1 and 2 leave every student tensor exactly as initialised
        assert torch.equal(s1[k], v) and torch.equal(s2[k], v), k
    assert not torch.equal(s3["encoder.blocks.0.attn.qkv.weight"], start["encoder.blocks.0.attn.qkv.weight"])
    heads = [load_file(ckpts / f"step_{i:08d}" / "model.safetensors")["objective.fea_head.proj_q.1.weight"]
             for i in (1, 2)]
    assert not torch.equal(heads[0], heads[1])  # the heads did train during the warm-up


def _np_ridge(x: np.ndarray, y: np.ndarray, ridge: float) -> tuple[np.ndarray, np.ndarray]:
    """Ridge regression of y on LayerNorm(x) with an unpenalised bias, by lstsq on an augmented system."""
    x = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
    n, d = x.shape
    a = np.vstack([np.hstack([x, np.ones((n, 1))]), np.hstack([np.sqrt(ridge * n) * np.eye(d), np.zeros((d, 1))])])
    sol = np.linalg.lstsq(a, np.vstack([y, np.zeros((d, y.shape[1]))]), rcond=None)[0]
    return sol[:-1].T, sol[-1]


@pytest.mark.parametrize("method", ["gkd", "proteus"])
def test_least_squares_heads_are_the_ridge_solution(method):
    g = torch.Generator().manual_seed(0)
    s_cls, s_patch = torch.randn(8, 6, generator=g), torch.randn(8, 5, 6, generator=g)
    mix = torch.randn(6, 4, generator=g)
    t_cls, t_patch = torch.tanh(s_cls @ mix), torch.tanh(s_patch @ mix) + 0.1 * torch.randn(8, 5, 4, generator=g)
    obj = build_objective(method, 6, 4)
    fits = {"cls": RidgeFit(6, 4), "patch": RidgeFit(6, 4)}
    for half in (slice(0, 4), slice(4, 8)):  # two batches
        fits["cls"].update(s_cls[half], t_cls[half])
        fits["patch"].update(s_patch[half], t_patch[half])
    init_heads_least_squares(obj, fits["cls"], fits["patch"], ridge=0.1)
    w, b = _np_ridge(s_patch.reshape(-1, 6).double().numpy(), t_patch.reshape(-1, 4).double().numpy(), 0.1)
    wc, bc = _np_ridge(s_cls.double().numpy(), t_cls.double().numpy(), 0.1)
    for name, (ww, bb) in (("fea_head", (w, b)), ("patch_head", (w, b)), ("token_head", (wc, bc))):
        head = getattr(obj, name)
        value = head.proj_v if method == "gkd" else head.proj
        np.testing.assert_allclose(value[1].weight.detach().numpy(), ww, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(value[1].bias.detach().numpy(), bb, rtol=1e-4, atol=1e-5)
        if method == "gkd":  # queries: the same map, scaled like a scaled dot product
            np.testing.assert_allclose(head.proj_q[1].weight.detach().numpy(), ww / 2.0, rtol=1e-4, atol=1e-5)
    # the fitted head predicts the teacher far better than the default init
    fresh = build_objective(method, 6, 4)
    err = lambda o: (o.fea_head(s_patch, t_patch) - t_patch).square().mean().item()  # noqa: E731
    assert err(obj) < 0.6 * err(fresh)


def test_fit_on_raw_tokens_then_standardised_equals_the_fit_of_standardised_targets():
    from gkd.distill.target_norm import TargetStandardizer, TokenMoments
    from gkd.models import Tokens

    g = torch.Generator().manual_seed(5)
    s = torch.randn(6, 7, 5, generator=g)
    t = Tokens(cls=torch.randn(6, 3, generator=g) * 9 + 2, patch=(s[..., :3] * 4 + torch.randn(6, 7, 3, generator=g)) * 20,
               grid=(1, 7))
    norm = TargetStandardizer(3)
    moments = TokenMoments(3)
    moments.update(t)
    norm.set_stats(moments)
    z = norm(t)
    raw = {"cls": RidgeFit(5, 3), "patch": RidgeFit(5, 3)}
    std = {"cls": RidgeFit(5, 3), "patch": RidgeFit(5, 3)}
    raw["cls"].update(s[:, 0], t.cls)
    raw["patch"].update(s, t.patch)
    std["cls"].update(s[:, 0], z.cls)
    std["patch"].update(s, z.patch)
    a, b = build_objective("gkd", 5, 3), build_objective("gkd", 5, 3)
    init_heads_least_squares(a, raw["cls"], raw["patch"], 0.1, target_norm=norm)
    init_heads_least_squares(b, std["cls"], std["patch"], 0.1)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5, msg=name)


def test_least_squares_heads_in_a_run_are_charged_and_start_lower(tmp_path, shards):
    def first_loss(init: str, out: str) -> tuple[float, list[str]]:
        train_distill(load_config(DistillConfig, [], [*TINY, f"data.train_shards={shards}", f"out_dir={tmp_path / out}",
                                                      "optim.max_steps=1", f"heads.init={init}",
                                                      "targets.stats_batches=2"]))
        records = [json.loads(x) for x in (tmp_path / out / "metrics.jsonl").read_text().splitlines()]
        return ([r["loss_fea"] for r in records if "loss_fea" in r][0],
                [r["what"] for r in records if r.get("event") == "charged"])
    fitted, charged = first_loss("least_squares", "lsq")
    default, none = first_loss("default", "default")
    assert charged == ["calibration"] and none == []
    assert fitted < default
    with pytest.raises(ValueError, match="heads.init"):
        first_loss("magic", "bad")


def test_init_from_teacher_by_config_is_the_weight_selection(tmp_path, shards):
    cfg = _cfg(tmp_path, shards, "student.init_from_teacher=first", "optim.max_steps=1")
    teacher = build_stage_teacher(cfg)
    student = build_student("vit_tiny_patch16_224", img_size=56, grid=teacher.grid, depth=1, embed_dim=32,
                            num_heads=2)
    expected = select_weights(teacher.model, student.encoder)
    from gkd.engine.distill import _build_student

    built, record = _build_student(cfg, teacher)
    got = built.encoder.state_dict()
    assert set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in expected)
    assert record["method"] == "weight_selection" and record["teacher"] == "vit_small_patch14_dinov2"
    path = train_distill(cfg)
    assert read_metadata(path)["gkd_init"]["method"] == "weight_selection"
    with pytest.raises(ValueError, match="init_from_teacher"):
        _build_student(_cfg(tmp_path, shards, "student.init_from_teacher=first", "student.checkpoint=x.pth"), teacher)


def test_input_renorm_maps_teacher_normalised_images_to_the_students():
    g = torch.Generator().manual_seed(0)
    raw = torch.rand(2, 3, 4, 4, generator=g)
    t_mean, t_std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    s_mean, s_std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    as_teacher = (raw - torch.tensor(t_mean).view(1, 3, 1, 1)) / torch.tensor(t_std).view(1, 3, 1, 1)
    as_student = (raw - torch.tensor(s_mean).view(1, 3, 1, 1)) / torch.tensor(s_std).view(1, 3, 1, 1)
    torch.testing.assert_close(InputRenorm((t_mean, t_std), (s_mean, s_std))(as_teacher), as_student)
    same = InputRenorm((t_mean, t_std), (t_mean, t_std))
    assert same.identity and same(as_teacher) is as_teacher


def test_a_stage0_students_normalisation_is_kept_through_stage1(tmp_path, shards):
    init = write_student_encoder(tmp_path / "init.safetensors", "vit_tiny_patch16_224", img_size=56, patch_size=14,
                                 mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), depth=1, embed_dim=32, num_heads=2)
    path = train_distill(_cfg(tmp_path, shards, f"student.checkpoint={init}", "optim.max_steps=1"))
    assert read_metadata(path)["gkd_input_norm"] == {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
    with pytest.raises(ValueError, match="both student.mean and student.std"):
        train_distill(_cfg(tmp_path, shards, "student.mean=[0.5,0.5,0.5]", "optim.max_steps=1"))
