"""``mutdet <stage>``: thin argument parsing over the stages' ``run`` functions.

Every Snakemake rule calls one of these subcommands; they are equally usable by hand, e.g.
``mutdet tile --config config.yaml --dataset synthetic --split train --shard 0 --out /tmp/tiles``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from mutdet import __version__


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="config.yaml",
                   help="config YAML/JSON file, or an inline JSON object (default: config.yaml)")


def _default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _add_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=_default_threads(),
                   help="CPU threads for torch (the job's share of the machine; default: all cores)")


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

    p = sub.add_parser("propose", help="class-agnostic oriented proposals on one tiled shard (sam | selective_search | graph)")
    _add_config(p)
    p.add_argument("--dataset", required=True)
    p.add_argument("--split", required=True)
    p.add_argument("--shard", type=int, default=0)
    p.add_argument("--tiles", required=True, type=Path, help="tiles folder of that shard (tiles.parquet + images)")
    p.add_argument("--out", required=True, type=Path, help="output folder (proposals.parquet, manifest.json)")
    _add_threads(p)

    p = sub.add_parser("embed", help="frozen-ResNet embeddings of every proposal of one shard")
    _add_config(p)
    p.add_argument("--tiles", required=True, type=Path, help="tiles folder of the shard")
    p.add_argument("--proposals", required=True, type=Path, help="proposals folder of the shard")
    p.add_argument("--out", required=True, type=Path, help="output folder (embeddings.parquet, manifest.json)")
    p.add_argument("--device", help="override embedding.device")
    p.add_argument("--workers", type=int, help="override embedding.workers")
    _add_threads(p)

    p = sub.add_parser("cluster", help="PCA + spherical k-means over all shards' embeddings -> targets per shard")
    _add_config(p)
    p.add_argument("--embeddings", required=True, nargs="+", type=Path, help="embeddings.parquet of every shard")
    p.add_argument("--targets", required=True, nargs="+", type=Path, help="targets.parquet to write, one per input")
    p.add_argument("--out", required=True, type=Path, help="folder of pca_kmeans.npz and manifest.json")
    _add_threads(p)

    p = sub.add_parser("pretrain", help="pre-train the oriented DETR (MutDet, DETReg or a configured variant)")
    _add_config(p)
    p.add_argument("--method", required=True, help="a pretrain.variants name (mutdet, detreg, an ablation variant)")
    p.add_argument("--tiles", required=True, nargs="+", type=Path, help="tiles folder of every shard")
    p.add_argument("--proposals", required=True, nargs="+", type=Path, help="proposals.parquet of the same shards")
    p.add_argument("--targets", required=True, nargs="+", type=Path, help="targets.parquet of the same shards")
    p.add_argument("--out", required=True, type=Path)
    _add_threads(p)

    p = sub.add_parser("loss-curves", help="plot pre-training losses of several runs (the paper's Figure 4)")
    p.add_argument("--run", required=True, nargs=2, action="append", metavar=("LABEL", "METRICS_JSONL"),
                   help="a run's legend label and its metrics.jsonl (repeat for each run)")
    p.add_argument("--out", required=True, type=Path, help="PNG to write")
    p.add_argument("--title", help="figure title")

    p = sub.add_parser("tables", help="the paper's tables (md/csv/tex), AP50-vs-fraction plot, detection grid")
    _add_config(p)
    p.add_argument("--metrics", required=True, nargs="+", type=Path, help="metrics.json of every fine-tuning run")
    p.add_argument("--out", required=True, type=Path, help="output folder")

    p = sub.add_parser("finetune", help="fine-tune the oriented DETR on a split's tiles, detect on the test tiles")
    _add_config(p)
    p.add_argument("--dataset", required=True)
    p.add_argument("--tiles", required=True, nargs="+", type=Path, help="training tiles folders (every shard)")
    p.add_argument("--test-tiles", nargs="+", type=Path, help="tiles folders to detect on after training")
    p.add_argument("--image-ids", type=Path, help="list file of training image ids (a data-fraction subset)")
    p.add_argument("--init", default="none", help="none, or a pre-training checkpoint")
    p.add_argument("--epochs", type=int, required=True)
    p.add_argument("--out", required=True, type=Path)
    _add_threads(p)

    p = sub.add_parser("detect", help="run a fine-tuned checkpoint on images of any size (tiled on the fly)")
    p.add_argument("--checkpoint", required=True, type=Path, help="checkpoint.pt written by mutdet finetune")
    p.add_argument("--images", required=True, nargs="+", type=Path, help="image files or folders")
    p.add_argument("--out", required=True, type=Path, help="detections.parquet, task1/, previews/")
    p.add_argument("--tile-size", type=int, default=1024)
    p.add_argument("--gap", type=int, default=200)
    p.add_argument("--rates", type=float, nargs="+", default=[1.0])
    p.add_argument("--device", default="auto")
    p.add_argument("--score-threshold", type=float, default=0.05)
    p.add_argument("--no-previews", action="store_true", help="skip the PNG previews")
    _add_threads(p)

    p = sub.add_parser("merge", help="map tile detections back to full images (rotated NMS)")
    p.add_argument("--detections", required=True, type=Path, help="detections Parquet, id = tile id")
    p.add_argument("--tiles", required=True, nargs="+", type=Path, help="tiles.parquet file(s) of those tiles")
    p.add_argument("--out", required=True, type=Path, help="output detections Parquet, id = image id")
    p.add_argument("--iou", type=float, default=0.1, help="rotated NMS IoU threshold (default 0.1)")
    p.add_argument("--task1-dir", type=Path, help="also write DOTA Task1 submission files here")
    p.add_argument("--config", help="with --dataset: take the Task1 class list from this config")
    p.add_argument("--dataset", help="dataset whose classes name the Task1 files (default: classes seen)")

    p = sub.add_parser("evaluate", help="rotated VOC AP (DOTA devkit semantics) of full-image detections")
    _add_config(p)
    p.add_argument("--dataset", required=True)
    p.add_argument("--split", required=True, help="labelled split whose ground truth is used")
    p.add_argument("--out", required=True, type=Path, help="output folder (metrics.json, pr_curve.png)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--detections", type=Path, help="detections Parquet in the image frame (id = image id)")
    source.add_argument("--task1-dir", type=Path, help="folder of DOTA Task1_<class>.txt files")
    p.add_argument("--iou-thresholds", type=float, nargs="+", default=[0.5, 0.75], help="default: 0.5 0.75")
    p.add_argument("--all-points", action="store_true", help="all-points AP instead of VOC07 11-point")

    p = sub.add_parser("subset", help="write a data-fraction subset of a split's image ids (METHOD.md protocol)")
    _add_config(p)
    p.add_argument("--dataset", required=True)
    p.add_argument("--split", required=True)
    p.add_argument("--fraction", required=True, type=float, help="fraction p in (0, 1]")
    p.add_argument("--out", required=True, type=Path, help="list file to write")
    p.add_argument("--seed", type=int, help="default: the config's seed")
    p.add_argument("--nested", action="store_true", help="prefixes of one permutation (see mutdet.data.fractions)")

    p = sub.add_parser("config", help="print (or write) the config with every default filled in, after validation")
    _add_config(p)
    p.add_argument("--out", type=Path, help="YAML file to write (default: print)")

    p = sub.add_parser("outputs", help="list the artefacts a config's run has produced")
    _add_config(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from mutdet.stages.common import log, setup_logging

    setup_logging(args.verbose)
    from mutdet.config import load_config

    if getattr(args, "threads", None) and args.command in ("propose", "embed", "cluster", "pretrain", "finetune", "detect"):
        import torch

        torch.set_num_threads(max(1, args.threads))  # oversubscribed cores slow torch down many times
    try:
        if args.command == "demo-data":
            from mutdet.stages import demo_data

            demo_data.run(load_config(args.config), args.dataset)
        elif args.command == "tile":
            from mutdet.stages import tile

            tile.run(load_config(args.config), args.dataset, args.split, args.shard, args.out, args.threads)
        elif args.command == "propose":
            from mutdet.stages import propose

            propose.run(load_config(args.config), args.dataset, args.split, args.shard, args.tiles, args.out)
        elif args.command == "embed":
            import dataclasses

            from mutdet.stages import embed

            params = dataclasses.asdict(load_config(args.config).embedding)
            params.update({k: v for k, v in (("device", args.device), ("workers", args.workers)) if v is not None})
            embed.run(tiles_dir=args.tiles, proposals_dir=args.proposals, out_dir=args.out, **params)
        elif args.command == "cluster":
            import dataclasses

            from mutdet.stages import cluster

            cfg = load_config(args.config)
            cluster.run(embedding_files=args.embeddings, target_files=args.targets, out_dir=args.out,
                        seed=cfg.seed, **dataclasses.asdict(cfg.cluster))
        elif args.command == "pretrain":
            from mutdet.stages import pretrain

            cfg = load_config(args.config)
            pt = cfg.pretrain
            if args.method not in pt.variants:
                raise ValueError(f"--method {args.method!r}: not a pretrain.variants name (have {sorted(pt.variants)})")
            pretrain.run(
                variant=pt.variants[args.method], tiles_dirs=args.tiles, proposals_files=args.proposals,
                targets_files=args.targets, out_dir=args.out, model_kwargs=dict(cfg.finetune.model),
                train_kwargs=pt.train_kwargs(), seed=cfg.seed, input_size=pt.input_size,
                flip_probability=pt.flip_probability, max_boxes=pt.max_boxes, enhancement=dict(pt.enhancement),
                encoder_head_hidden=pt.encoder_head_hidden, freeze_backbone=pt.freeze_backbone,
                temperature=pt.temperature, align_weight=pt.align_weight, loss_kwargs=dict(pt.loss),
                device=pt.device, wandb_mode=pt.wandb_mode)
        elif args.command == "loss-curves":
            from mutdet.stages.loss_curves import plot_loss_curves

            plot_loss_curves({label: Path(path) for label, path in args.run}, args.out, title=args.title)
        elif args.command == "tables":
            from mutdet.stages import tables

            cfg = load_config(args.config)
            written = tables.run(metrics=args.metrics, out_dir=args.out, **tables.kwargs_from_config(cfg))
            print(f"tables and figures: {written['index']}")
        elif args.command == "finetune":
            from mutdet.io.datasets import list_image_ids
            from mutdet.stages import finetune

            cfg = load_config(args.config)
            ft, ds = cfg.finetune, cfg.dataset(args.dataset)
            finetune.run(
                tiles_dirs=args.tiles, test_tiles_dirs=args.test_tiles, out_dir=args.out,
                model_kwargs=dict(ft.model), train_kwargs=ft.train_kwargs(args.epochs),
                image_ids=None if args.image_ids is None else list_image_ids(Path(), args.image_ids, ds.image_extensions),
                init=args.init, seed=cfg.seed, classes=list(ds.classes), input_size=ft.input_size,
                flip_probability=ft.flip_probability, loss_kwargs=dict(ft.loss), device=ft.device,
                wandb_mode=ft.wandb_mode, merge_iou=ft.merge_iou, num_select=ft.num_select,
                score_threshold=ft.score_threshold, eval_batch_size=ft.eval_batch_size)
        elif args.command == "detect":
            from mutdet.stages import detect

            detect.run(checkpoint=args.checkpoint, images=args.images, out_dir=args.out, tile_size=args.tile_size,
                       gap=args.gap, rates=tuple(args.rates), device=args.device,
                       score_threshold=args.score_threshold, previews=not args.no_previews)
        elif args.command == "merge":
            from mutdet.stages import merge

            classes = load_config(args.config).dataset(args.dataset).classes if args.dataset else None
            merge.run(args.detections, args.tiles, args.out, args.iou, task1_dir=args.task1_dir, classes=classes)
        elif args.command == "evaluate":
            from mutdet.stages import evaluate

            cfg = load_config(args.config)
            evaluate.run(dataset=cfg.dataset(args.dataset), split=args.split, out_dir=args.out,
                         detections=args.detections, task1_dir=args.task1_dir,
                         iou_thresholds=tuple(args.iou_thresholds), use_07_metric=not args.all_points,
                         on_bad_object=cfg.on_bad_object)
        elif args.command == "subset":
            from mutdet.stages import subset

            cfg = load_config(args.config)
            subset.run(cfg, args.dataset, args.split, args.fraction, args.out,
                       seed=cfg.seed if args.seed is None else args.seed, nested=args.nested)
        elif args.command == "config":
            import yaml

            from mutdet.io.atomic import write_text

            text = yaml.safe_dump(json.loads(json.dumps(dict(load_config(args.config).raw), default=str)),
                                  sort_keys=False)
            if args.out is None:
                print(text, end="")
            else:
                write_text(args.out, text)
        elif args.command == "outputs":
            from mutdet.stages import outputs

            print(outputs.describe(load_config(args.config)))
    except Exception as exc:
        # mutdet's own errors (bad config, labels, artefacts, weights, tiles) and bad values/paths are
        # the user's to fix: one clear line (the traceback with --verbose). Anything else is a bug.
        if not (type(exc).__module__.startswith("mutdet") or isinstance(exc, (ValueError, FileNotFoundError))):
            raise
        log.error("%s: %s", type(exc).__name__, exc, exc_info=args.verbose)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
