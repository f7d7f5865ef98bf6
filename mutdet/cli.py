"""``mutdet <stage>``: a table of commands over the stages' ``run(cfg, *, paths)`` functions.

Every Snakemake rule calls one of these commands with the resolved config file the workflow wrote
and the paths and wildcards of its job; they are equally usable by hand with a config YAML, e.g.
``mutdet tile --config config.yaml --dataset synthetic --split train --shard 0 --out /tmp/tiles``.
A command adds only its paths and wildcards: every setting comes from the config.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from mutdet import __version__


def _threads_default() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _stage(name: str):
    return importlib.import_module(f"mutdet.stages.{name}")


def _json_argument(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value


def _seed(text: str) -> int:
    """A training seed: a non-negative integer."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"a seed is a non-negative integer, got {value}")
    return value


def _tables(cfg, a):
    from mutdet.layout import FinetuneJob

    tables = _stage("tables")
    runs = [tables.RunFiles(job=FinetuneJob(**{k: r[k] for k in ("dataset", "train_split", "split", "init",
                                                                  "fraction", "epochs", "seed")}),
                            metrics=Path(r["metrics"]), detections=Path(r["detections"]))
            for r in a.inputs["runs"]]
    test_tiles = {name: [Path(d) for d in dirs] for name, dirs in a.inputs["test_tiles"].items()}
    written = tables.run(cfg, runs=runs, test_tiles=test_tiles, out_dir=a.out)
    print(f"tables and figures: {written['index']}")


def _config(cfg, a):
    import yaml

    from mutdet.io.atomic import write_text

    text = yaml.safe_dump(json.loads(json.dumps(dict(cfg.raw), default=str)), sort_keys=False)
    if a.out is None:
        print(text, end="")
    else:
        write_text(a.out, text)


def _merge(a):
    from mutdet.io.artefacts import pyarrow_without_pandas

    pyarrow_without_pandas()  # a merge process never needs a DataFrame
    cfg = None
    if a.config:  # only then: the config module imports jsonschema
        from mutdet.config import load_config

        cfg = load_config(a.config)
    classes = cfg.dataset(a.dataset).classes if cfg is not None and a.dataset else None
    iou = a.iou if a.iou is not None else cfg.finetune.merge_iou if cfg is not None else _stage("merge").DEFAULT_MERGE_IOU
    _stage("merge").run(a.detections, [Path(d) / "tiles.parquet" for d in a.tiles], a.out, iou,
                        task1_dir=a.task1_dir, classes=classes)


@dataclass(frozen=True)
class Command:
    """One subcommand: its help, its own arguments (paths, wildcards), and what it runs."""
    name: str
    help: str
    arguments: tuple = ()  # (flags, argparse keywords) pairs
    run: Callable | None = None  # (cfg, args) -> None for config commands, (args) -> None otherwise
    config: bool = True  # reads --config
    threads: str | None = None  # help of --threads, None: no such option
    torch: bool = False  # sets torch's thread count from --threads
    extra: Callable | None = field(default=None, repr=False)  # adds arguments argparse tuples cannot express


def _arg(*flags, **kwargs):
    return flags, kwargs


DATASET = _arg("--dataset", required=True, help="dataset name in the config")
SPLIT = _arg("--split", required=True, help="split name of that dataset")
SHARD = _arg("--shard", type=int, default=0, help="shard index k (images sorted(ids)[k::shards])")
TORCH_THREADS = "CPU threads for torch (the job's share of the machine; default: all cores)"


def _evaluate_source(p: argparse.ArgumentParser) -> None:
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--detections", type=Path, help="detections Parquet in the image frame (id = image id)")
    source.add_argument("--task1-dir", type=Path, help="folder of DOTA Task1_<class>.txt files")


COMMANDS = (
    Command("demo-data", "generate/copy an embedded demo dataset (source synthetic | deepforest)", (DATASET,),
            lambda cfg, a: _stage("demo_data").run(cfg, dataset=a.dataset)),
    Command("tile", "tile one shard of a dataset split (DOTA-style windows)",
            (DATASET, SPLIT, SHARD, _arg("--out", required=True, type=Path, help="output folder of this shard")),
            lambda cfg, a: _stage("tile").run(cfg, dataset=a.dataset, split=a.split, shard=a.shard, out_dir=a.out,
                                              threads=a.threads),
            threads="worker processes (default: all cores)"),
    Command("propose", "class-agnostic oriented proposals on one tiled shard (sam | selective_search | graph)",
            (DATASET, SPLIT, SHARD, _arg("--tiles", required=True, type=Path, help="tiles folder of that shard"),
             _arg("--out", required=True, type=Path, help="output folder (proposals.parquet, manifest.json)")),
            lambda cfg, a: _stage("propose").run(cfg, dataset=a.dataset, split=a.split, shard=a.shard,
                                                 tiles_dir=a.tiles, out_dir=a.out),
            threads=TORCH_THREADS, torch=True),
    Command("embed", "frozen-ResNet embeddings of every proposal of one shard",
            (_arg("--tiles", required=True, type=Path, help="tiles folder of the shard"),
             _arg("--proposals", required=True, type=Path, help="proposals folder of the shard"),
             _arg("--out", required=True, type=Path, help="output folder (embeddings.parquet, manifest.json)")),
            lambda cfg, a: _stage("embed").run(cfg, tiles_dir=a.tiles, proposals_dir=a.proposals, out_dir=a.out),
            threads=TORCH_THREADS, torch=True),
    Command("cluster", "PCA + spherical k-means over all shards' embeddings -> targets per shard",
            (_arg("--embeddings", required=True, nargs="+", type=Path, help="embeddings.parquet of every shard"),
             _arg("--targets", required=True, nargs="+", type=Path, help="targets.parquet to write, one per input"),
             _arg("--out", required=True, type=Path, help="folder of pca_kmeans.npz and manifest.json")),
            lambda cfg, a: _stage("cluster").run(cfg, embedding_files=a.embeddings, target_files=a.targets,
                                                 out_dir=a.out),
            threads=TORCH_THREADS, torch=True),
    Command("pretrain", "pre-train the oriented DETR (MutDet, DETReg or a configured variant)",
            (_arg("--variant", required=True, help="a pretrain.variants name (mutdet, detreg, an ablation variant)"),
             _arg("--tiles", required=True, nargs="+", type=Path, help="tiles folder of every shard"),
             _arg("--proposals", required=True, nargs="+", type=Path, help="proposals.parquet of the same shards"),
             _arg("--targets", required=True, nargs="+", type=Path, help="targets.parquet of the same shards"),
             _arg("--out", required=True, type=Path, help="output folder")),
            lambda cfg, a: _stage("pretrain").run(cfg, variant=a.variant, tiles_dirs=a.tiles,
                                                  proposals_files=a.proposals, targets_files=a.targets,
                                                  out_dir=a.out),
            threads=TORCH_THREADS, torch=True),
    Command("finetune", "fine-tune the oriented DETR on a split's tiles, detect on the test tiles",
            (DATASET,
             _arg("--epochs", type=int, required=True, help="schedule length (a finetune.runs[].epochs value)"),
             _arg("--tiles", required=True, nargs="+", type=Path, help="training tiles folders (every shard)"),
             _arg("--test-tiles", nargs="*", type=Path, default=[], help="tiles folders to detect on after training"),
             _arg("--image-ids", type=Path, help="list file of training image ids (a data-fraction subset)"),
             _arg("--init", default="none", help="none, or a pre-training checkpoint"),
             _arg("--seed", type=_seed, help="training seed (a finetune.runs[].seeds value; default: the config's "
                                             "top-level seed); the --image-ids subset does not change with it"),
             _arg("--out", required=True, type=Path, help="output folder")),
            lambda cfg, a: _stage("finetune").run(cfg, dataset=a.dataset, epochs=a.epochs, tiles_dirs=a.tiles,
                                                  test_tiles_dirs=a.test_tiles, image_ids_file=a.image_ids,
                                                  init=a.init, out_dir=a.out, seed=a.seed),
            threads=TORCH_THREADS, torch=True),
    Command("evaluate", "rotated VOC AP of full-image detections (protocol dota_devkit or mmrotate)",
            (DATASET, _arg("--split", required=True, help="labelled split whose ground truth is used"),
             _arg("--out", required=True, type=Path, help="output folder (metrics.json, pr_curve.png)"),
             _arg("--iou-thresholds", type=float, nargs="+", default=[0.5, 0.75], help="default: 0.5 0.75"),
             _arg("--protocol", choices=["dota_devkit", "mmrotate"],
                  help="override the dataset's evaluation.protocol"),
             _arg("--all-points", action="store_true", help="all-points AP instead of VOC07 11-point")),
            lambda cfg, a: _stage("evaluate").run(cfg, dataset=a.dataset, split=a.split, out_dir=a.out,
                                                  detections=a.detections, task1_dir=a.task1_dir,
                                                  iou_thresholds=tuple(a.iou_thresholds),
                                                  use_07_metric=not a.all_points, protocol=a.protocol),
            extra=_evaluate_source),
    Command("subset", "write a data-fraction subset of a split's image ids (METHOD.md protocol)",
            (DATASET, SPLIT, _arg("--fraction", required=True, type=float, help="fraction p in (0, 1]"),
             _arg("--out", required=True, type=Path, help="list file to write")),
            lambda cfg, a: _stage("subset").run(cfg, dataset=a.dataset, split=a.split, fraction=a.fraction,
                                                out=a.out)),
    Command("tables", "the paper's tables (md/csv/tex), AP50-vs-fraction plot, detection grid",
            (_arg("--inputs", required=True, type=_json_argument,
                  help='JSON {"runs": [{dataset, train_split, split, init, fraction, epochs, seed, metrics, detections}],'
                       ' "test_tiles": {dataset: [tiles folders]}} (the workflow writes it)'),
             _arg("--out", required=True, type=Path, help="output folder")),
            _tables),
    Command("config", "print (or write) the config with every default filled in, after validation",
            (_arg("--out", type=Path, help="YAML file to write (default: print)"),), _config),
    Command("outputs", "list the artefacts a config's run has produced",
            run=lambda cfg, a: print(_stage("outputs").describe(cfg))),
    Command("loss-curves", "plot pre-training losses of several runs (the paper's Figure 4)",
            (_arg("--run", required=True, nargs=2, action="append", metavar=("LABEL", "METRICS_JSONL"),
                  help="a run's legend label and its metrics.jsonl (repeat for each run)"),
             _arg("--out", required=True, type=Path, help="PNG to write"), _arg("--title", help="figure title")),
            lambda a: _stage("loss_curves").plot_loss_curves({label: Path(p) for label, p in a.run}, a.out,
                                                             title=a.title),
            config=False),
    Command("detect", "run a fine-tuned checkpoint on images of any size (tiled on the fly)",
            (_arg("--checkpoint", required=True, type=Path, help="checkpoint.pt written by mutdet finetune"),
             _arg("--images", required=True, nargs="+", type=Path, help="image files or folders"),
             _arg("--out", required=True, type=Path, help="detections.parquet, task1/, previews/"),
             _arg("--tile-size", type=int, default=1024), _arg("--gap", type=int, default=200),
             _arg("--rates", type=float, nargs="+", default=[1.0]), _arg("--device", default="auto"),
             _arg("--score-threshold", type=float, default=0.05),
             _arg("--no-previews", action="store_true", help="skip the PNG previews")),
            lambda a: _stage("detect").run(checkpoint=a.checkpoint, images=a.images, out_dir=a.out,
                                           tile_size=a.tile_size, gap=a.gap, rates=tuple(a.rates), device=a.device,
                                           score_threshold=a.score_threshold, previews=not a.no_previews),
            config=False, threads=TORCH_THREADS, torch=True),
    Command("merge", "map tile detections back to full images (rotated NMS)",
            (_arg("--detections", required=True, type=Path, help="detections Parquet, id = tile id"),
             _arg("--tiles", required=True, nargs="+", type=Path, help="tiles folder(s) of those tiles"),
             _arg("--out", required=True, type=Path, help="output detections Parquet, id = image id"),
             _arg("--iou", type=float, help="rotated NMS IoU threshold (default: finetune.merge_iou of --config, "
                                            "else 0.1)"),
             _arg("--task1-dir", type=Path, help="also write DOTA Task1 submission files here"),
             _arg("--config", help="take finetune.merge_iou (and with --dataset the Task1 class list) from it"),
             _arg("--dataset", help="dataset whose classes name the Task1 files (default: classes seen)")),
            _merge, config=False),
)


class OutputBusyError(RuntimeError):
    """Another mutdet process is writing the same output (two runs sharing one results folder)."""


@contextlib.contextmanager
def exclusive_output(out: Path):
    """Hold an exclusive lock on ``out`` (a hidden ``.<name>.lock`` file beside it) while a command
    writes it. Snakemake's own lock is per working directory, so two runs started from different
    folders on one results folder would otherwise run the same job at once and interleave its files."""
    import fcntl

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = out.parent / f".{out.name}.lock"
    with open(lock, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            raise OutputBusyError(f"{out} is being written by {holder}: two runs share this results folder; "
                                  f"wait for it or stop it") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"mutdet pid {os.getpid()} on {socket.gethostname()} (working directory {os.getcwd()})\n")
        fh.flush()
        try:
            yield
        finally:
            fh.seek(0)
            fh.truncate()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mutdet", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"mutdet {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        p = sub.add_parser(command.name, help=command.help)
        if command.config:
            p.add_argument("--config", default="config.yaml",
                           help="config YAML/JSON file, or an inline JSON object (default: config.yaml)")
        for flags, kwargs in command.arguments:
            p.add_argument(*flags, **kwargs)
        if command.extra is not None:
            command.extra(p)
        if command.threads is not None:
            p.add_argument("--threads", type=int, default=_threads_default(), help=command.threads)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = next(c for c in COMMANDS if c.name == args.command)
    from mutdet.stages.common import log, setup_logging

    setup_logging(args.verbose)
    if command.torch:
        import torch

        torch.set_num_threads(max(1, args.threads))  # oversubscribed cores slow torch down many times
    try:
        out = getattr(args, "out", None)
        leader = os.environ.get("RANK", "0") == "0"  # under torchrun every rank runs this command
        with exclusive_output(out) if out is not None and leader else contextlib.nullcontext():
            if command.config:
                from mutdet.config import load_config

                command.run(load_config(args.config), args)
            else:
                command.run(args)
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
