"""The `gkd` command.

    gkd data shard SRC OUT [--shard-size N]     image folder (or --manifest split) → webdataset shards + index
    gkd data check MANIFEST --root DIR          counts, unpaired files, unmapped label values, size mismatches
    gkd eval CKPT --suite S --out DIR           domain-generalization report (results.md/.csv, metrics.json)
    gkd stageN [--config FILE] [key=value ...]  stage N in this process (multi-GPU: accelerate launch stages/stageN.py)
    gkd inspect FILE.safetensors                provenance of a handoff file
"""
from __future__ import annotations

import argparse
import json
import sys

from gkd.engine.common import setup_logging


def _cmd_data_shard(args: argparse.Namespace) -> int:
    from gkd.data import write_shards

    files = None
    if args.manifest:  # the images of a dataset split (stage 2 distils on them, without labels)
        from gkd.data import manifest_image_files

        files = manifest_image_files(args.manifest, args.split, root=args.src)
    index = write_shards(args.src, args.out, shard_size=args.shard_size, prefix=args.prefix, seed=args.seed,
                         shuffle=not args.no_shuffle, files=files)
    print(f"wrote {len(index.shards)} shard(s), {index.num_samples} samples, {index.num_skipped} skipped → {args.out}")
    return 0


def _cmd_data_check(args: argparse.Namespace) -> int:
    from gkd.data import check_dataset

    report = check_dataset(args.manifest, root=args.root, splits=args.split or None, num_workers=args.workers)
    print(report.format())
    return 0 if report.ok else 1


def _cmd_eval(args: argparse.Namespace) -> int:
    from gkd.eval import run_eval
    from gkd.eval.report import main_table

    roots = {}
    for item in args.root:
        name, sep, path = item.partition("=")
        if not sep:
            raise ValueError(f"--root takes NAME=PATH (a manifest name and its dataset root), got {item!r}")
        roots[name] = path
    results = run_eval(args.checkpoints, args.suite, args.out, roots=roots, save_predictions=args.save_predictions,
                       batch_size=args.batch_size, num_workers=args.workers, limit=args.limit)
    from accelerate import PartialState

    if PartialState().is_main_process:
        header, rows = main_table(results)
        print(" | ".join(header))
        for row in rows:
            print(" | ".join(str(c) for c in row))
        print(f"wrote {args.out}/results.md, results.csv, metrics.json")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from gkd.engine import read_metadata

    meta = read_metadata(args.file)
    print(json.dumps(meta, indent=2, sort_keys=True))
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

    for stage, what in STAGES.items():  # parsed by gkd.config, not argparse (see main)
        sub.add_parser(f"stage{stage}", help=f"run stage {stage} ({what}) in this process: [--config FILE] [key=value ...]")

    ev = sub.add_parser("eval", help="evaluate segmentor(s) on a domain-generalization suite")
    ev.add_argument("checkpoints", nargs="+", help="segmentor.safetensors file(s): one table row each")
    ev.add_argument("--suite", required=True, help="suite name (configs/suites/) or YAML path")
    ev.add_argument("--out", required=True, help="output directory for results.md / results.csv / metrics.json")
    ev.add_argument("--root", action="append", default=[], metavar="NAME=PATH", help="dataset root per manifest")
    ev.add_argument("--save-predictions", action="store_true", help="write coloured masks and overlays")
    ev.add_argument("--batch-size", type=int, default=1)
    ev.add_argument("--workers", type=int, default=2)
    ev.add_argument("--limit", type=int, help="evaluate only the first N images of each target (quick checks)")
    ev.set_defaults(func=_cmd_eval)

    inspect = sub.add_parser("inspect", help="print the metadata of encoder/segmentor .safetensors")
    inspect.add_argument("file")
    inspect.set_defaults(func=_cmd_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in {f"stage{n}" for n in STAGES}:
        from gkd.engine.stages import run_stage  # takes --config / key=value itself

        print(run_stage(int(argv[0][-1]), argv[1:]))
        return 0
    setup_logging()
    args = build_parser().parse_args(argv)
    from gkd.config import ConfigError

    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError, ValueError, KeyError) as e:
        print(f"gkd: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
