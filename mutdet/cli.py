"""``mutdet <stage>``: thin argument parsing over the stages' ``run`` functions.

Every Snakemake rule calls one of these subcommands; they are equally usable by hand, e.g.
``mutdet tile --config config.yaml --dataset synthetic --split train --shard 0 --out /tmp/tiles``.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from mutdet import __version__


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="config.yaml",
                   help="config YAML/JSON file, or an inline JSON object (default: config.yaml)")


def _default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mutdet", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"mutdet {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo-data", help="generate/copy an embedded demo dataset (source synthetic | deepforest)")
    _add_config(p)
    p.add_argument("--dataset", required=True, help="dataset name in the config")

    p = sub.add_parser("tile", help="tile one shard of a dataset split (DOTA-style windows)")
    _add_config(p)
    p.add_argument("--dataset", required=True)
    p.add_argument("--split", required=True)
    p.add_argument("--shard", type=int, default=0, help="shard index k (images sorted(ids)[k::shards])")
    p.add_argument("--out", required=True, type=Path, help="output folder of this shard")
    p.add_argument("--threads", type=int, default=_default_threads(), help="worker processes")

    p = sub.add_parser("merge", help="map tile detections back to full images (rotated NMS)")
    p.add_argument("--detections", required=True, type=Path, help="detections Parquet, id = tile id")
    p.add_argument("--tiles", required=True, nargs="+", type=Path, help="tiles.parquet file(s) of those tiles")
    p.add_argument("--out", required=True, type=Path, help="output detections Parquet, id = image id")
    p.add_argument("--iou", type=float, default=0.1, help="rotated NMS IoU threshold (default 0.1)")

    p = sub.add_parser("outputs", help="list the artefacts a config's run has produced")
    _add_config(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from mutdet.stages.common import log, setup_logging

    setup_logging(args.verbose)
    from mutdet.config import ConfigError, load_config
    from mutdet.io.annotations import AnnotationError
    from mutdet.io.artefacts import ArtefactError

    try:
        if args.command == "demo-data":
            from mutdet.stages import demo_data

            demo_data.run(load_config(args.config), args.dataset)
        elif args.command == "tile":
            from mutdet.stages import tile

            tile.run(load_config(args.config), args.dataset, args.split, args.shard, args.out, args.threads)
        elif args.command == "merge":
            from mutdet.stages import merge

            merge.run(args.detections, args.tiles, args.out, args.iou)
        elif args.command == "outputs":
            from mutdet.stages import outputs

            print(outputs.describe(load_config(args.config)))
    except (ConfigError, AnnotationError, ArtefactError, FileNotFoundError) as exc:
        log.error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
