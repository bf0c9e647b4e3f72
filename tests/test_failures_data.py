"""Issue 15, data side: every bad shard or image ends in one message naming it, and every file or
sample left out is counted where the user looks (the CLI line, the index, metrics.jsonl, the
segmentor's protocol record). Expected messages are built here from tarfile's own member offsets and
the files written, not from the code under test."""
from __future__ import annotations

import io
import json
import logging
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from gkd.cli import main
from gkd.data import build_dataset, write_shards
from gkd.data.wds import ShardReadError, build_shard_loader, resolve_shards
from gkd.errors import GKDError
from helpers import SHAPES_MANIFEST, TINY, make_images, make_scene

HINT = "`gkd data verify` checks every shard"


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Path:
    """24 generated images (3 classes) as 2 shards of 12 plus their index."""
    root = tmp_path_factory.mktemp("failures")
    write_shards(make_images(root / "imgs", 24), root / "wds", shard_size=12)
    return root / "wds"


@pytest.fixture
def wds_dir(written, tmp_path) -> Path:
    """A private copy of the shards (tests cut and delete them)."""
    return Path(shutil.copytree(written, tmp_path / "wds"))


def members(tar_path: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(tar_path) as tar:
        return tar.getmembers()


def cut(tar_path: Path, where: str, k: int) -> list[tarfile.TarInfo]:
    """Truncate a shard inside sample k (members cls, jpg per sample): in its jpg's data or in its
    cls header; returns the members of the whole shard."""
    ms = members(tar_path)
    assert [m.name.rsplit(".", 1)[1] for m in ms[:2]] == ["cls", "jpg"]  # the writer's member order
    at = ms[2 * k + 1].offset_data + 10 if where == "data" else ms[2 * k].offset + 100
    tar_path.write_bytes(tar_path.read_bytes()[:at])
    return ms


def read_all(spec, num_workers: int, **kw) -> None:
    for _ in build_shard_loader(spec, None, 4, num_workers=num_workers, **kw):
        pass


def one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert isinstance(err.value, GKDError) and "\n" not in text and "Traceback" not in text
    return text


def error_lines(stderr: str) -> list[str]:
    """The `gkd: error:` lines of stderr (an open progress bar may share the line: tqdm writes no newline)."""
    return ["gkd: error:" + line.split("gkd: error:", 1)[1] for line in stderr.splitlines() if "gkd: error:" in line]


def raw_shard(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    with wds.TarWriter(str(path)) as w:
        for key, fields in samples:
            w.write({"__key__": key, **fields})
    return path


def jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


# ----------------------------------------------------------------------------- truncated shards

@pytest.mark.parametrize("num_workers", [0, 1])
@pytest.mark.parametrize("where", ["data", "header"])
def test_truncated_shard_is_one_error_naming_it(wds_dir, where, num_workers):
    victim = wds_dir / "train-000001.tar"
    cut(victim, where, 3)
    expected = {  # data: tarfile meets the end inside a member; header: it ends quietly, the index count catches it
        "data": f"cannot read shard {victim} after 3 samples (truncated or corrupt tar?): ReadError: unexpected end "
                f"of data; {HINT}",
        "header": f"shard {victim} holds 3 samples but its index says 12 (truncated or replaced shard? {HINT})",
    }[where]
    with pytest.raises(ShardReadError) as err:
        read_all(wds_dir, num_workers)
    assert one_line(err) == expected


@pytest.mark.parametrize("num_workers", [0, 1])
def test_truncated_shard_without_index(wds_dir, num_workers):
    """No index: counting the tar headers up front finds the cut (tarfile alone would not); with a
    declared num_samples (nothing counted up front) the reader checks the headers after the shard."""
    victim = wds_dir / "train-000001.tar"
    ms = cut(victim, "header", 3)
    (wds_dir / "train-index.json").unlink()
    expected = (f"shard {victim}: truncated or corrupt after 3 samples (no end-of-archive block after member "
                f"{ms[5].name}); {HINT}")
    with pytest.raises(ShardReadError) as err:
        resolve_shards(wds_dir)
    assert one_line(err) == expected
    with pytest.raises(ShardReadError) as err:
        read_all(wds_dir, num_workers, num_samples=24)
    assert one_line(err) == expected


def test_truncated_shard_in_stage1_prints_one_line(wds_dir, tmp_path, capsys, monkeypatch):
    """What `gkd stage1` prints when a DataLoader worker meets the cut shard: one `gkd: error:` line
    (torch alone would re-raise it with the worker's traceback inside the message)."""
    monkeypatch.delenv("GKD_DEBUG", raising=False)
    victim = wds_dir / "train-000000.tar"
    cut(victim, "header", 5)
    rc = main(["stage1", *TINY, f"data.train_shards={wds_dir}", f"out_dir={tmp_path / 'run'}", "data.num_workers=1",
               "data.repeats=1", "optim.epochs=1"])
    err = capsys.readouterr().err
    assert rc == 2
    assert error_lines(err) == [
        f"gkd: error: shard {victim} holds 5 samples but its index says 12 (truncated or replaced shard? {HINT})"]
    assert "Traceback" not in err


# ----------------------------------------------------------------------------- missing shards

def test_missing_shards_are_named_up_front(wds_dir):
    pattern = str(wds_dir / "train-{000000..000003}.tar")
    cases = [  # spec, message
        (pattern, f"2 of 4 shards do not exist: {wds_dir}/train-000002.tar, {wds_dir}/train-000003.tar"),
        (str(wds_dir / "*.tar"), f"1 of 1 shards do not exist: {wds_dir}/*.tar (wildcards are not expanded: give a "
                                 "brace pattern, a folder or an index JSON)"),
        (str(wds_dir / "other-index.json"), f"shard index not found: {wds_dir}/other-index.json"),
    ]
    for spec, message in cases:
        with pytest.raises(FileNotFoundError) as err:
            build_shard_loader(spec, None, 4)
        assert str(err.value) == message, spec
    (wds_dir / "train-000001.tar").unlink()  # listed by the index
    with pytest.raises(FileNotFoundError) as err:
        build_shard_loader(wds_dir, None, 4)
    assert str(err.value) == f"1 of 2 shards do not exist: {wds_dir}/train-000001.tar"


def test_missing_shards_in_stage1_print_one_line(wds_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("GKD_DEBUG", raising=False)
    rc = main(["stage1", *TINY, f"data.train_shards={wds_dir}/train-{{000000..000002}}.tar",
               f"out_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert rc == 2 and error_lines(err) == [f"gkd: error: 1 of 3 shards do not exist: {wds_dir}/train-000002.tar"]


@pytest.mark.parametrize("num_workers", [0, 1])
def test_shard_deleted_after_the_start(wds_dir, num_workers):
    loader = build_shard_loader(wds_dir, None, 4, num_workers=num_workers, shuffle_buffer=1)
    victim = wds_dir / "train-000001.tar"
    victim.unlink()
    with pytest.raises(ShardReadError) as err:
        for _ in loader:
            pass
    assert one_line(err) == f"shard {victim} does not exist (moved or deleted after the run started?)"


# ----------------------------------------------------------------------------- gkd data verify

def _verify(capsys, *args: str) -> tuple[int, list[str]]:
    rc = main(["data", "verify", *map(str, args)])
    return rc, capsys.readouterr().out.splitlines()


def test_data_verify_good_cut_and_miscounted(wds_dir, capsys):
    s0, s1 = wds_dir / "train-000000.tar", wds_dir / "train-000001.tar"
    assert _verify(capsys, wds_dir) == (0, ["2 shards, 24 samples, 0 bad"])
    assert _verify(capsys, wds_dir / "train-index.json") == (0, ["2 shards, 24 samples, 0 bad"])
    assert _verify(capsys, wds_dir / "train-{000000..000001}.tar", "--workers", "2") == (
        0, ["2 shards, 24 samples, 0 bad"])

    index = json.loads((wds_dir / "train-index.json").read_text())
    index["counts"] = [13, 12]  # miscounted
    (wds_dir / "train-index.json").write_text(json.dumps(index))
    assert _verify(capsys, wds_dir) == (1, [f"bad shard {s0}: 12 samples, its index says 13",
                                            "2 shards, 24 samples, 1 bad"])
    cut(s1, "data", 4)
    data_cut = (f"bad shard {s1}: unreadable after 4 samples (truncated or not a tar?): ReadError: unexpected end of "
                "data; 4 samples, its index says 12")
    assert _verify(capsys, wds_dir) == (1, [f"bad shard {s0}: 12 samples, its index says 13", data_cut,
                                            "2 shards, 16 samples, 2 bad"])
    shutil.copy(s0, s1)  # a complete tar again (12 samples), then cut inside a header: tarfile ends quietly
    ms = cut(s1, "header", 2)
    assert _verify(capsys, wds_dir / "train-{000000..000002}.tar") == (1, [  # pattern: the index's counts too
        f"bad shard {s0}: 12 samples, its index says 13",
        f"bad shard {s1}: truncated or corrupt after 2 samples (no end-of-archive block after member {ms[3].name}); "
        "2 samples, its index says 12",
        f"bad shard {wds_dir / 'train-000002.tar'}: does not exist",
        "3 shards, 14 samples, 3 bad"])


def test_data_verify_image_fields_and_decode(tmp_path, capsys):
    shard = raw_shard(tmp_path / "x.tar", [("a", {"jpg": jpeg(0), "cls": b"1"}), ("b", {"cls": b"2"}),
                                           ("c", {"jpg": b"not a jpeg"}), ("d", {"png": jpeg(1)})])
    assert _verify(capsys, shard) == (1, [f"bad shard {shard}: 1 sample without an image field (e.g. b)",
                                          "1 shards, 4 samples, 1 bad"])
    assert _verify(capsys, shard, "--decode") == (1, [
        f"bad shard {shard}: 1 sample without an image field (e.g. b); 1 undecodable image (e.g. c: "
        "UnidentifiedImageError: cannot identify image file)", "1 shards, 4 samples, 1 bad"])
    good = raw_shard(tmp_path / "good.tar", [("a", {"jpg": jpeg(0)}), ("d", {"png": jpeg(1)})])
    assert _verify(capsys, good, "--decode") == (0, ["1 shards, 2 samples, 0 bad"])


def test_data_verify_of_nothing_is_a_user_error(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("GKD_DEBUG", raising=False)
    (tmp_path / "empty").mkdir()
    assert main(["data", "verify", str(tmp_path / "empty")]) == 2
    assert error_lines(capsys.readouterr().err) == [
        f"gkd: error: no *.tar shards and no *-index.json in {tmp_path / 'empty'}"]


# ----------------------------------------------------------------------------- gkd data shard

def _image(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(jpeg(seed))


@pytest.mark.parametrize("layout, files, taken, ignored", [
    ("class_folders", ["a/1.jpg", "a/deep/2.jpg", "a/notes.txt", "b/3.jpg", "b/4.png", "loose.jpg", ".hid/5.jpg"],
     3, {"nested": ["a/deep/2.jpg"], "not_image": ["a/notes.txt"], "outside_classes": ["loose.jpg"],
         "hidden": [".hid/"]}),
    ("flat", ["1.jpg", "2.jpg", "sub/deeper/3.jpg", "sub/4.jpg.txt", ".DS_Store"],
     2, {"nested": ["sub/deeper/3.jpg"], "not_image": ["sub/4.jpg.txt"], "hidden": [".DS_Store"]}),
])
def test_data_shard_counts_every_file_not_taken(tmp_path, capsys, caplog, layout, files, taken, ignored):
    src, out = tmp_path / "src", tmp_path / "out"
    for i, f in enumerate(files):
        if f.endswith((".jpg", ".png")):
            _image(src / f, i)
        else:
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            (src / f).write_text("x")
    with caplog.at_level(logging.WARNING, logger="gkd.data.shards"):
        assert main(["data", "shard", str(src), str(out)]) == 0
    labels = {"nested": "nested too deep", "not_image": "not an image", "outside_classes": "outside the class folders",
              "hidden": "hidden"}
    detail = ", ".join(f"{len(v)} {labels[k]}" for k, v in ignored.items())
    n = sum(len(v) for v in ignored.values())
    assert capsys.readouterr().out.splitlines() == [
        f"wrote 1 shard(s), {taken} samples, 0 skipped (unreadable), {n} not taken ({detail}) → {out}"]
    index = json.loads((out / "train-index.json").read_text())
    assert index["layout"] == layout and index["num_samples"] == taken
    assert index["ignored"] == ignored and index["num_ignored"] == {k: len(v) for k, v in ignored.items()}
    warning = [r.getMessage() for r in caplog.records if "not taken" in r.getMessage()]
    parts = [f"{len(v)} {labels[k]}{' for the ' + layout + ' layout' if k == 'nested' else ''} (e.g. {v[0]})"
             for k, v in ignored.items()]
    assert warning == [f"{src}: {n} file(s) not taken: {'; '.join(parts)} (listed in the index under 'ignored')"]


def test_data_shard_broken_link_is_unreadable_and_deep_images_are_pointed_at(tmp_path, capsys):
    src = tmp_path / "src"
    _image(src / "a" / "1.jpg", 0)
    (src / "a" / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    assert main(["data", "shard", str(src), str(tmp_path / "out")]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"wrote 1 shard(s), 1 samples, 1 skipped (unreadable), 0 not taken → {tmp_path / 'out'}"]
    index = json.loads((tmp_path / "out" / "train-index.json").read_text())
    assert index["skipped"] == ["a/gone.jpg"] and index["num_skipped"] == 1 and index["ignored"] == {}
    deep = tmp_path / "deep"
    _image(deep / "train" / "n01" / "x.jpg", 1)
    with pytest.raises(ValueError) as err:  # images only two levels down: no layout takes them
        write_shards(deep, tmp_path / "o2")
    assert str(err.value).endswith("; 1 images lie deeper (e.g. train/n01/x.jpg): pass the folder that holds them "
                                   "directly or in class sub-folders")


# ----------------------------------------------------------------------------- stage 3: counted skips

@pytest.fixture
def skip_dataset(tmp_path) -> tuple[Path, Path, list[Path]]:
    """8 train scenes in the folder layout, 3 of them bad in different ways (the bad images, in the
    order the dataset meets them: the missing label at listing, then the pairs in name order)."""
    root = tmp_path / "shapes"
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("val", 2)):
        for i in range(n):
            image, label = make_scene(rng)
            for kind, arr in (("images", image), ("labels", label)):
                (root / kind / split).mkdir(parents=True, exist_ok=True)
                Image.fromarray(arr).save(root / kind / split / f"{split}_{i:03d}.png")
    img = root / "images" / "train"
    truncated = img / "train_001.png"  # header fine, data cut: only a full decode finds it
    truncated.write_bytes(truncated.read_bytes()[:200])
    label4 = root / "labels" / "train" / "train_004.png"
    arr = np.asarray(Image.open(label4)).copy()
    arr[5, 5] = 7  # a value outside the manifest's map
    Image.fromarray(arr).save(label4)
    (root / "labels" / "train" / "train_006.png").unlink()
    manifest = root / "shapes.yaml"
    manifest.write_text(SHAPES_MANIFEST)
    return root, manifest, [img / "train_006.png", truncated, img / "train_004.png"]


def test_validate_split_over_processes_drops_the_same_samples(skip_dataset):
    root, manifest, bad = skip_dataset
    whole = build_dataset(manifest, "train", root=root, on_bad="skip")
    whole.validate(decode_images=True)
    assert whole.skipped_images == [str(p) for p in bad] and len(whole) == 5
    header_only = build_dataset(manifest, "train", root=root, on_bad="skip")
    header_only.validate()
    assert header_only.skipped_images == [str(p) for p in bad if p.name != "train_001.png"]

    shares = {}
    for rank in (1, 0):  # rank 1 first, so rank 0's gather can return both shares
        ds = build_dataset(manifest, "train", root=root, on_bad="skip")
        ds.validate(decode_images=True, rank=rank, world_size=2,
                    gather=lambda mine, rank=rank: shares.setdefault(rank, mine) + (shares[1] if rank == 0 else []))
    assert ds.samples == whole.samples and ds.skipped_images == whole.skipped_images


def test_stage3_on_bad_skip_counts_skipped_images(skip_dataset, tmp_path):
    from gkd.config import SegmentConfig, load_config
    from gkd.engine import read_metadata
    from gkd.engine.segment import train_segmentor
    from gkd.handoff import save_handoff
    from gkd.models import build_student

    root, manifest, bad = skip_dataset
    student = build_student("vit_tiny_patch16_224", img_size=64, depth=1, embed_dim=32, num_heads=2)
    encoder = save_handoff(tmp_path / "encoder.safetensors", student, student.spec, stage=2,
                           extra={"input_norm": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}})
    out = tmp_path / "s3"
    cfg = load_config(SegmentConfig, [], [
        f"encoder={encoder}", f"data.manifest={manifest}", f"data.root={root}", "data.crop_size=64",
        "data.short_edges=null", "data.scale=[128,64]", "data.batch_size=2", "data.num_workers=1", "data.on_bad=skip",
        "decoder.name=mlp", "decoder.kwargs.channels=16", "optim.iters=2", "engine.log_every=1",
        "engine.save_every=100", f"out_dir={out}"])
    path = train_segmentor(cfg)
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r for r in records if r.get("event") == "skipped"] == [
        {"event": "skipped", "images": 3, "files": [str(p) for p in bad]}]
    source = read_metadata(path)["gkd_protocol"]["source"]
    assert source["num_images"] == 8 - 3 and source["skipped_images"] == 3
