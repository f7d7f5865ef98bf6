"""What the pre-trained weights have learned before fine-tuning: class-agnostic detection on labelled tiles.

Pre-training teaches a detector to find its pseudo-boxes (DETReg: objectness; MutDet: k pseudo-classes).
If those boxes and embeddings carry object information, the pre-trained detector, before any
fine-tuning, should already find objects better than the same architecture at random initialisation
(DETReg reports this class-agnostic probe too). This runs each pre-training checkpoint of a results
folder as it is (the transferred part: backbone, neck, encoder, decoder, box and angle branches, with
its own pre-training classifier), scores each query by its best class probability, and compares the
top ``--top`` boxes per tile with the labelled objects of the tiles of a split (labels that
pre-training never read):

* class-agnostic AP50 and AP75 (mmrotate rules: rotated IoU ``>=`` the threshold, VOC07 11 points;
  every class mapped to one);
* recall at IoU 0.5 of the top ``--top`` boxes per tile;
* mean IoU of each object with its best box.

The baseline row is the same detector architecture at random initialisation (``--random-seeds``
seeds, the fine-tuning ``none`` init), so the difference is what pre-training put into the weights.

Usage::

    python benchmarks/transfer_probe.py --results results-lowdata --dataset synthetic --split test

No training; about a minute per checkpoint for a thousand 256 px tiles on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from mutdet.boxes import le90_to_polygon, rotated_iou
from mutdet.data.datasets import TileDataset, collate
from mutdet.data.transforms import build_transforms
from mutdet.engine.checkpoint import load_checkpoint
from mutdet.evaluation.rotated_ap import evaluate_detections
from mutdet.io.annotations import ImageAnnotations
from mutdet.models import build_detector
from mutdet.models.postprocess import PostProcess
from mutdet.stages.pretrain import build_pretrain_model
from mutdet.variants import PretrainVariant


def load_pretrained_detector(checkpoint: Path) -> tuple[torch.nn.Module, dict]:
    """The detector inside a pre-training checkpoint, with its pre-training classifier, in eval mode."""
    config = json.loads((checkpoint.parent / "config.json").read_text())
    variant = PretrainVariant(**config["variant"]).validate()
    model_kwargs = {**config["model"], "backbone_weights": "none"}
    model, _ = build_pretrain_model(variant=variant, num_classes=config["num_classes"], model_kwargs=model_kwargs,
                                    enhancement=config["enhancement"],
                                    encoder_head_hidden=config["encoder_head_hidden"],
                                    freeze_backbone=config["freeze_backbone"], loss=config["loss"])
    model.load_state_dict(load_checkpoint(checkpoint)["model"])
    return model.detector.eval(), config


def random_detector(model_kwargs: dict, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_detector(num_classes=1, **{**model_kwargs, "backbone_weights": "none"}).eval()


@torch.no_grad()
def agnostic_detections(detector: torch.nn.Module, dataset: TileDataset, top: int, batch_size: int = 8):
    """Per tile: ``(scores (k,), le90 boxes (k, 5))`` in tile pixels, one box per query, best ``top``."""
    post = PostProcess(angle_coder=detector.angle_coder, num_select=top)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)
    out = {}
    for images, mask, targets in loader:
        outputs = detector(images, padding_mask=mask)
        logits = outputs["pred_logits"].float().max(dim=-1, keepdim=True).values  # best class per query
        outputs = {"pred_logits": logits, "pred_boxes": outputs["pred_boxes"].float(),
                   "pred_angle_logits": outputs["pred_angle_logits"].float()}
        sizes = torch.stack([t["size"] for t in targets])
        for target, result in zip(targets, post(outputs, sizes)):
            boxes = result["boxes"].double().numpy()
            boxes[:, :4] /= float(target["scale"][0])  # model input -> tile pixels
            out[target["tile_id"]] = (result["scores"].numpy(), boxes)
    return out


def score(dets: dict, dataset: TileDataset, top: int) -> dict:
    gt, recalled, best_ious = {}, 0, []
    ids, scores, boxes = [], [], []
    for tile_id in dataset.tile_ids:
        obj = dataset._objects[tile_id]
        gt_boxes = np.stack([obj[k] for k in ("cx", "cy", "w", "h", "theta")], 1).reshape(-1, 5).astype(np.float64)
        gt[tile_id] = ImageAnnotations(image_id=tile_id, polygons=le90_to_polygon(gt_boxes).reshape(-1, 8),
                                       labels=np.zeros(len(gt_boxes), np.int64),
                                       difficult=np.zeros(len(gt_boxes), np.int8))
        s, b = dets[tile_id]
        ids += [tile_id] * len(s)
        scores.append(s), boxes.append(b)
        if len(gt_boxes) and len(b):
            iou = np.asarray(rotated_iou(gt_boxes, b[:top])).max(axis=1)
            recalled += int((iou >= 0.5).sum())
            best_ious.append(iou)
        elif len(gt_boxes):
            best_ious.append(np.zeros(len(gt_boxes)))
    detections = {"object": {"image_ids": np.asarray(ids), "scores": np.concatenate(scores),
                             "boxes": np.concatenate(boxes)}}
    ap = evaluate_detections(gt, detections, ["object"], protocol="mmrotate")["mean"]
    num_gt = sum(len(g.labels) for g in gt.values())
    return {"AP50": 100 * ap["AP50"], "AP75": 100 * ap["AP75"], "recall50": recalled / max(num_gt, 1),
            "mean_best_iou": float(np.concatenate(best_ious).mean()) if best_ious else 0.0, "num_objects": num_gt}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=Path("results"))
    parser.add_argument("--dataset", default="synthetic")
    parser.add_argument("--split", default="test")
    parser.add_argument("--top", type=int, default=100, help="boxes kept per tile (one per query)")
    parser.add_argument("--random-seeds", type=int, default=3)
    parser.add_argument("--max-tiles", type=int, default=None, help="only the first N tiles (a quick check)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()
    torch.set_grad_enabled(False)

    checkpoints = sorted(args.results.glob("pretrain/*/*/*/checkpoint.pt"))
    if not checkpoints:
        raise SystemExit(f"no pre-training checkpoint under {args.results}/pretrain/*/*/*/")
    tiles_dirs = sorted((args.results / args.dataset / "tiles" / args.split).glob("shard-*"))
    if not tiles_dirs:
        raise SystemExit(f"no tiles under {args.results}/{args.dataset}/tiles/{args.split}/shard-*")
    rows = []
    dataset = None
    for checkpoint in checkpoints:
        detector, config = load_pretrained_detector(checkpoint)
        if dataset is None:
            dataset = TileDataset(tiles_dirs, transform=build_transforms(train=False, input_size=config["input_size"]))
            if args.max_tiles is not None:
                keep = dataset.tile_ids[:args.max_tiles]
                dataset.tile_ids, dataset._paths = keep, dataset._paths[:args.max_tiles]
            model_kwargs = config["model"]
            for seed in range(args.random_seeds):
                r = score(agnostic_detections(random_detector(model_kwargs, seed), dataset, args.top), dataset,
                          args.top)
                rows.append({"weights": f"random init (seed {seed})", **r})
                print(rows[-1], flush=True)
        r = score(agnostic_detections(detector, dataset, args.top), dataset, args.top)
        rows.append({"weights": f"pre-trained {config['variant']['name']} ({checkpoint.parent.relative_to(args.results)})",
                     **r})
        print(rows[-1], flush=True)

    print(f"\nclass-agnostic probe of the pre-trained detectors on {args.dataset}/{args.split} "
          f"({rows[0]['num_objects']} objects, {len(dataset)} tiles; top {args.top} boxes per tile)\n")
    print("| weights | AP50 | AP75 | recall@IoU0.5 | mean best IoU |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['weights']} | {r['AP50']:.2f} | {r['AP75']:.2f} | {r['recall50']:.3f} | {r['mean_best_iou']:.3f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
