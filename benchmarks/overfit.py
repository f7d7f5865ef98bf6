"""Benchmark: a small oriented DETR overfits a handful of synthetic tiles ("it learns").

Reads a tiled split (``tiles.parquet`` + ``objects.parquet``, e.g. the demo's
``results/synthetic/tiles/train/shard-0``; read only), picks ``--num-tiles`` tiles (round-robin over
source images, in tile-id order, among tiles with ``--min-objects``..``--max-objects`` non-difficult
objects; or ``--tile-ids``), resizes them to ``--size`` px and trains a small config of
:func:`mutdet.models.build_detector` with :func:`mutdet.losses.build_criterion` on all of them at
every step (no augmentation). Every ``--eval-every`` iterations it runs inference on the same tiles
and reports AP50 (VOC07 11-point, difficult objects ignored) from
:func:`mutdet.evaluation.evaluate_detections`, in tile pixels.

    .venv/bin/python benchmarks/overfit.py [--iterations 250] [--eval-every 25] [--size 384]

Tiles are 512 px; 384 keeps the small vehicles (about 11 x 5 px at 512) at about 8 x 4 px.

Prints one line per evaluation (iteration, wall seconds, weighted loss, AP50 mean and per class), then
the curve as JSON. Exits 1 if the last AP50 is below ``--target`` (0.9). Training is seeded, but CPU
thread scheduling makes runs differ slightly. One torch thread by default: on a shared 2-core machine,
two threads against another busy process made steps 10-20x slower than one.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np
import torch

from mutdet.evaluation import evaluate_detections
from mutdet.io.annotations import ImageAnnotations
from mutdet.io.artefacts import read_artefact
from mutdet.losses import build_criterion
from mutdet.models import PostProcess, build_detector
from mutdet.models.backbone import IMAGENET_MEAN, IMAGENET_STD



def select_tiles(objects: dict, min_objects: int, max_objects: int, num_tiles: int) -> list[str]:
    """Round-robin over source images (tile-id order) among tiles with a usable number of objects."""
    counts = defaultdict(int)
    for tile_id, difficult in zip(objects["tile_id"], objects["difficult"]):
        counts[tile_id] += int(difficult == 0)
    per_image = defaultdict(list)
    for tile_id in sorted(counts):
        if min_objects <= counts[tile_id] <= max_objects:
            per_image[tile_id.split("__")[0]].append(tile_id)
    chosen, rank = [], 0
    while len(chosen) < num_tiles and any(rank < len(v) for v in per_image.values()):
        chosen += [v[rank] for _, v in sorted(per_image.items()) if rank < len(v)]
        rank += 1
    return chosen[:num_tiles]


def load(folder: Path, tile_ids: list[str] | None, args) -> tuple:
    """Images ``(N, 3, S, S)`` (ImageNet-normalised), targets (le90 in resized pixels), ground truth
    (tile pixels), the class names and the resize factor."""
    tiles = read_artefact(folder / "tiles.parquet", "tiles").to_pydict()
    objects = {k: np.asarray(v) for k, v in read_artefact(folder / "objects.parquet", "objects").to_pydict().items()}
    names = {int(i): str(n) for i, n in zip(objects["class_id"], objects["class_name"])}
    classes = [names.get(i, f"class{i}") for i in range(max(names) + 1)]
    tile_ids = [str(t) for t in tile_ids or select_tiles(objects, args.min_objects, args.max_objects, args.num_tiles)]
    path_of = dict(zip(tiles["tile_id"], tiles["tile_path"]))
    size_of = dict(zip(tiles["tile_id"], tiles["size"]))
    images, targets, gt = [], [], {}
    for tile_id in tile_ids:
        image = cv2.imread(str(folder / path_of[tile_id]), cv2.IMREAD_COLOR)
        if image is None:
            raise FileNotFoundError(f"cannot read tile image {folder / path_of[tile_id]}")
        factor = args.size / float(size_of[tile_id])
        image = cv2.resize(image, (args.size, args.size), interpolation=cv2.INTER_AREA)
        rgb = (image[:, :, ::-1] / 255.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
        images.append(torch.from_numpy(rgb.transpose(2, 0, 1).copy()).float())
        rows = objects["tile_id"] == tile_id
        boxes = np.stack([objects[k][rows] for k in ("cx", "cy", "w", "h", "theta")], 1)
        boxes[:, :4] *= factor  # isotropic resize: the angle is unchanged
        targets.append({"labels": torch.from_numpy(objects["class_id"][rows].astype(np.int64)),
                        "boxes": torch.from_numpy(boxes).float(), "size": torch.tensor([args.size, args.size])})
        gt[tile_id] = ImageAnnotations(tile_id, np.stack(objects["polygon"][rows]).reshape(-1, 8),
                                       objects["class_id"][rows].astype(np.int64), objects["difficult"][rows])
    return torch.stack(images), targets, gt, tile_ids, classes, factor


@torch.no_grad()
def evaluate(model, postprocess, images, tile_ids, gt, classes, factor) -> dict:
    model.eval()
    outputs = model(images)
    model.train()
    sizes = torch.tensor([images.shape[-2:]] * len(images))
    detections = {name: {"image_ids": [], "scores": [], "boxes": []} for name in classes}
    for tile_id, result in zip(tile_ids, postprocess(outputs, sizes)):
        boxes = result["boxes"].double().numpy()
        boxes[:, :4] /= factor  # back to tile pixels
        for label, score, box in zip(result["labels"].tolist(), result["scores"].tolist(), boxes):
            det = detections[classes[label]]
            det["image_ids"].append(tile_id)
            det["scores"].append(score)
            det["boxes"].append(box)
    detections = {k: {"image_ids": np.asarray(v["image_ids"], dtype=object), "scores": np.asarray(v["scores"]),
                      "boxes": np.asarray(v["boxes"]).reshape(-1, 5)} for k, v in detections.items()}
    return evaluate_detections(gt, detections, classes, iou_thresholds=(0.5,))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiles-dir", default="results/synthetic/tiles/train/shard-0")
    p.add_argument("--tile-ids", nargs="*", default=None)
    p.add_argument("--num-tiles", type=int, default=6)
    p.add_argument("--min-objects", type=int, default=3)
    p.add_argument("--max-objects", type=int, default=12)
    p.add_argument("--size", type=int, default=384)
    p.add_argument("--iterations", type=int, default=250)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--backbone", default="light")
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--encoder-layers", type=int, default=1)
    p.add_argument("--decoder-layers", type=int, default=3)
    p.add_argument("--queries", type=int, default=100)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--target", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads; more than the idle cores is very slow")
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)

    images, targets, gt, tile_ids, classes, factor = load(Path(args.tiles_dir), args.tile_ids, args)
    counts = {t: int((a.difficult == 0).sum()) for t, a in gt.items()}
    print(f"tiles ({args.size} px, non-difficult objects): {counts}", flush=True)
    model = build_detector(num_classes=len(classes), backbone=args.backbone, frozen_stages=-1, frozen_bn=False,
                           embed_dim=args.width, num_heads=8, num_levels=4, num_points=4,
                           num_encoder_layers=args.encoder_layers, num_decoder_layers=args.decoder_layers,
                           ffn_dim=4 * args.width, dropout=args.dropout, num_queries=args.queries)
    criterion = build_criterion(num_classes=len(classes), num_decoder_layers=args.decoder_layers)
    postprocess = PostProcess(angle_coder=model.angle_coder, num_select=args.queries)
    params = [q for q in model.parameters() if q.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-4)

    curve, start, recent = [], time.time(), []
    model.train()
    for iteration in range(1, args.iterations + 1):
        losses = criterion(model(images, targets), targets)
        loss = sum(losses[k] * criterion.weight_dict[k] for k in losses)
        if not torch.isfinite(loss):
            print(f"non-finite loss at iteration {iteration}: {dict((k, float(v)) for k, v in losses.items())}")
            return 2
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 35.0)
        optimizer.step()
        recent.append(float(loss.detach()))
        if iteration % args.eval_every == 0 or iteration == args.iterations:
            metrics = evaluate(model, postprocess, images, tile_ids, gt, classes, factor)
            ap50 = metrics["mean"]["AP50"]
            per_class = {n: round(c["AP50"], 3) for n, c in metrics["classes"].items() if c["AP50"] is not None}
            curve.append({"iteration": iteration, "seconds": round(time.time() - start, 1),
                          "loss": round(float(np.mean(recent)), 3), "AP50": round(ap50, 4)})
            recent = []
            print(f"iter {iteration:4d}  {curve[-1]['seconds']:7.1f} s  loss {curve[-1]['loss']:8.3f}  "
                  f"AP50 {ap50:.4f}  {per_class}", flush=True)
    print(json.dumps({"args": vars(args), "tiles": tile_ids, "curve": curve}))
    return 0 if curve[-1]["AP50"] >= args.target else 1


if __name__ == "__main__":
    sys.exit(main())
