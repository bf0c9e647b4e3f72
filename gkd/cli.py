"""The `gkd` command.

    gkd data shard SRC OUT [--shard-size N]     image folder → webdataset shards + index
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

    index = write_shards(args.src, args.out, shard_size=args.shard_size, prefix=args.prefix, seed=args.seed,
                         shuffle=not args.no_shuffle)
    print(f"wrote {len(index.shards)} shard(s), {index.num_samples} samples, {index.num_skipped} skipped → {args.out}")
    return 0


def _cmd_stage(args: argparse.Namespace) -> int:
    from gkd.engine.stages import run_stage

    print(run_stage(args.stage, args.rest))
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from gkd.engine import read_metadata

    meta = read_metadata(args.file)
    print(json.dumps(meta, indent=2, sort_keys=True))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gkd", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="dataset tools").add_subparsers(dest="data_command", required=True)
    shard = data.add_parser("shard", help="write a folder of images (flat or class sub-folders) as webdataset shards")
    shard.add_argument("src", help="image folder: flat, or ImageNet-style <wnid>/ sub-folders")
    shard.add_argument("out", help="output directory for <prefix>-NNNNNN.tar and the index")
    shard.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    shard.add_argument("--prefix", default="train", help="shard file-name prefix")
    shard.add_argument("--seed", type=int, default=0, help="seed of the sample order across shards")
    shard.add_argument("--no-shuffle", action="store_true", help="keep the folder's sorted order")
    shard.set_defaults(func=_cmd_data_shard)

    for stage, what in ((1, "task-agnostic distillation"), (2, "source-domain distillation")):
        p = sub.add_parser(f"stage{stage}", help=f"run stage {stage} ({what}) in this process")
        p.add_argument("rest", nargs=argparse.REMAINDER, help="--config FILE and key=value overrides")
        p.set_defaults(func=_cmd_stage, stage=stage)

    inspect = sub.add_parser("inspect", help="print the metadata of encoder/segmentor .safetensors")
    inspect.add_argument("file")
    inspect.set_defaults(func=_cmd_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
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
