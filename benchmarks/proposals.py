"""Proposal throughput (tiles/s) and recall of the proposers, on tiles from the tile stage.

Throughput, on the first ``--num-tiles`` tiles of ``--tiles``:

* selective search and graph segmentation with the config's defaults;
* SAM with a tiny random-weight model (``build_sam_tiny`` at SAM's 1024 input, so resizing, mask
  decoding and post-processing cost what they cost with a real model) on the first ``--sam-tiles``
  tiles, thresholds 0 and box NMS 1.0 so every mask (3 per point) comes out; the time is split into
  image encoder (``predictor.set_image``), mask decoder + SAM's own post-processing (the rest of
  ``generate``) and mask -> box, against the official generator called naively
  (``output_mode="binary_mask"``, every mask converted afterwards, all masks held at once); best of
  ``--reps`` interleaved runs (the CPU may be shared);
* mask -> box alone on realistic masks (the tiles' graph segments as SAM RLE records: random-weight
  SAM masks are noise, the worst case for run-length decoding and contours), time and peak numpy
  memory (tracemalloc, a separate untimed pass) of both paths;
* SAM vit_b with random weights on one tile, only if the estimate (one encoder pass + one decoder
  batch, measured) is under ``--vit-b-budget`` seconds.

Recall, on every tile of each ``--recall`` folder (``tiles.parquet`` + ``objects.parquet``): the
fraction of ground-truth objects matched by some proposal at rotated IoU >= ``--iou`` (0.5), overall,
for non-difficult objects and per class, and the hit share (the fraction of proposals with IoU >=
``--iou`` to some object), all at the ``max_per_tile`` of ``--config`` (default ``config.yaml``): first
its configured method and settings, then selective search and graph with the schema defaults;
``--grid`` adds parameter sweeps on top of the configured settings, e.g.
``--grid "graph:k=100,300 sigma=0.5,0.8"``.

Usage: ``python benchmarks/proposals.py [--config FILE] [--num-tiles 8] [--sam-tiles 4] [--recall DIR ...]
[--grid SPEC]``.
"""
from __future__ import annotations

import argparse
import itertools
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import torch

from mutdet.boxes import mask_to_le90, rotated_iou
from mutdet.config import from_dict
from mutdet.io.artefacts import read_artefact
from mutdet.proposals import build_proposer
from mutdet.proposals.graph import GraphProposer
from mutdet.proposals.sam import SamProposer, build_sam_tiny

REPO = Path(__file__).resolve().parents[1]
DEMO_TILES = [REPO / "results" / name / "tiles" / "train" / "shard-0" for name in ("synthetic", "trees")]


def load_tiles(tiles_dir: Path, limit: int | None = None) -> list[tuple[str, np.ndarray]]:
    """``(tile_id, BGR image)`` of the first ``limit`` tiles of ``tiles_dir/tiles.parquet``."""
    rows = read_artefact(tiles_dir / "tiles.parquet", "tiles", columns=["tile_id", "tile_path"]).to_pylist()
    return [(r["tile_id"], cv2.imread(str(tiles_dir / r["tile_path"]), cv2.IMREAD_COLOR)) for r in rows[:limit]]


def timed(fn: Callable, bucket: list) -> Callable:
    """``fn`` that appends its wall time to ``bucket`` on every call."""

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        bucket.append(time.perf_counter() - start)
        return out

    return wrapper


def numpy_peak_mb(fn: Callable) -> float:
    """Peak memory traced by tracemalloc (numpy arrays, Python objects; not torch tensors) while ``fn`` runs."""
    tracemalloc.start()
    fn()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak / 2**20


def throughput(proposer: Callable, images: list[np.ndarray]) -> dict:
    start = time.perf_counter()
    counts = [len(proposer(image)) for image in images]
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "tiles_per_s": len(images) / seconds, "proposals_per_tile": float(np.mean(counts))}


def sam_ours(proposer: SamProposer, images: list[np.ndarray]) -> dict:
    """Our path, split: encoder (set_image) / decoder + SAM post-processing / our conversion."""
    encoder: list[float] = []
    predictor = proposer.generator.predictor
    set_image = predictor.set_image
    predictor.set_image = timed(set_image, encoder)
    generate = convert = 0.0
    boxes = []
    for image in images:
        start = time.perf_counter()
        records = proposer.generate(image)
        middle = time.perf_counter()
        boxes.append(proposer.to_proposals(records).boxes)
        generate += middle - start
        convert += time.perf_counter() - middle
    predictor.set_image = set_image
    return {"encoder": sum(encoder), "decoder": generate - sum(encoder), "convert": convert, "boxes": boxes}


def sam_naive(model, generator: dict, max_per_tile: int, images: list[np.ndarray]) -> dict:
    """The official generator as documented: binary masks out, every mask converted afterwards."""
    from segment_anything import SamAutomaticMaskGenerator

    amg = SamAutomaticMaskGenerator(model, output_mode="binary_mask", **generator)
    encoder: list[float] = []
    amg.predictor.set_image = timed(amg.predictor.set_image, encoder)
    generate = convert = 0.0
    boxes = []
    for image in images:
        start = time.perf_counter()
        records = amg.generate(cv2.cvtColor(image, cv2.COLOR_BGR2RGB))
        middle = time.perf_counter()
        converted = [(r["predicted_iou"], mask_to_le90(r["segmentation"])) for r in records]
        converted = sorted((c for c in converted if c[1] is not None), key=lambda c: -c[0])[:max_per_tile]
        boxes.append(np.reshape([c[1] for c in converted], (-1, 5)))
        generate += middle - start
        convert += time.perf_counter() - middle
    return {"encoder": sum(encoder), "decoder": generate - sum(encoder), "convert": convert, "boxes": boxes}


def print_sam_split(name: str, r: dict, n: int) -> float:
    """Print a SAM time split per tile; returns the total seconds."""
    total = r["encoder"] + r["decoder"] + r["convert"]
    print(f"  {name:<34} {n / total:7.2f} tiles/s   encoder {r['encoder'] / n:6.3f} s  "
          f"decoder+SAM post {r['decoder'] / n:6.3f} s  mask->box {r['convert'] / n:6.3f} s  (per tile)")
    return total


def bench_sam_tiny(images: list[np.ndarray], generator: dict, max_per_tile: int, reps: int) -> SamProposer:
    """Tiny SAM: official generator + conversion afterwards vs :class:`SamProposer`; returns the latter."""
    torch.manual_seed(0)
    model = build_sam_tiny(img_size=1024, embed_dim=32, depth=2)
    ours = SamProposer(model, generator=generator, max_per_tile=max_per_tile, device="cpu")
    sam_naive(model, generator, max_per_tile, images[:1])  # warm-up of both paths
    sam_ours(ours, images[:1])
    runs = {"naive": [], "ours": []}
    for _ in range(reps):  # interleaved, best of `reps`: the CPU is shared
        runs["naive"].append(sam_naive(model, generator, max_per_tile, images))
        runs["ours"].append(sam_ours(ours, images))
    naive, mine = (min(r, key=lambda x: x["encoder"] + x["decoder"] + x["convert"]) for r in runs.values())
    same = all(a.shape == b.shape and np.allclose(a, b) for a, b in zip(naive["boxes"], mine["boxes"]))
    n = len(images)
    print(f"\nSAM tiny (random weights, 1024 input, {generator['points_per_side']}^2 points, NMS "
          f"{generator['box_nms_thresh']}, CPU), {n} tiles, {np.mean([len(b) for b in mine['boxes']]):.0f} "
          f"masks/tile, best of {reps}:")
    t_naive = print_sam_split("official generate + convert after", naive, n)
    t_mine = print_sam_split("mutdet SamProposer", mine, n)
    print(f"  speed-up {t_naive / t_mine:.2f}x overall (the naive path decodes every mask inside generate); "
          f"same boxes: {same}")
    return ours


def bench_conversion(proposer: SamProposer, images: list[np.ndarray]) -> None:
    """Mask -> box alone on realistic masks: the graph segments of the tiles, encoded as SAM's RLE records.

    Official: ``rle_to_mask`` on every record (what ``output_mode="binary_mask"`` holds), then the
    full-frame contour of each mask; mutdet: :meth:`SamProposer.to_proposals` (one mask at a time).
    """
    from segment_anything.utils.amg import batched_mask_to_box, box_xyxy_to_xywh, mask_to_rle_pytorch, rle_to_mask

    tiles = []  # per tile: its mask records
    for image in images:
        labels = GraphProposer(resize=max(image.shape[:2])).segment(image)[0]
        area = np.bincount(labels.ravel())
        keep = np.flatnonzero((area >= 16) & (area <= 0.25 * labels.size))
        masks = torch.from_numpy(labels[None] == keep[:, None, None])  # (M, H, W)
        boxes = batched_mask_to_box(masks)  # (M, 4) XYXY
        tiles.append([{"segmentation": rle, "bbox": box_xyxy_to_xywh(box).tolist(), "area": float(a),
                       "predicted_iou": 1.0, "stability_score": 1.0}
                      for rle, box, a in zip(mask_to_rle_pytorch(masks), boxes, area[keep])])

    def official():
        out = []
        for records in tiles:
            masks = [rle_to_mask(r["segmentation"]) for r in records]  # (M, H, W) held, as binary_mask mode
            out.append(np.stack([mask_to_le90(m) for m in masks]))
        return np.concatenate(out)

    def mine():
        return np.concatenate([proposer.to_proposals(records).boxes for records in tiles])

    start = time.perf_counter()
    boxes_official = official()
    t_official = time.perf_counter() - start
    start = time.perf_counter()
    boxes_mine = mine()
    t_mine = time.perf_counter() - start
    same = boxes_mine.shape == boxes_official.shape and np.allclose(boxes_mine, boxes_official, atol=1e-3)
    peak_official, peak_mine = numpy_peak_mb(official), numpy_peak_mb(mine)
    n = len(boxes_official)
    print(f"  mask -> box alone, {n} realistic masks of {len(tiles)} tiles (graph segments as SAM RLE records), "
          f"peak memory per tile:\n"
          f"    official rle_to_mask for all, then full-frame contours: {t_official / n * 1e3:.2f} ms/mask, "
          f"peak {peak_official:.0f} MB\n"
          f"    mutdet (one mask at a time, vectorised RLE, crop):      {t_mine / n * 1e3:.2f} ms/mask, "
          f"peak {peak_mine:.0f} MB  ({t_official / t_mine:.1f}x faster); same boxes: {same}")


def bench_vit_b(image: np.ndarray, generator: dict, max_per_tile: int, budget_s: float) -> None:
    """vit_b's architecture with random weights on one tile, if the measured estimate fits ``budget_s``."""
    from segment_anything import sam_model_registry

    torch.manual_seed(0)
    proposer = SamProposer(sam_model_registry["vit_b"](), generator=generator, max_per_tile=max_per_tile, device="cpu")
    predictor = proposer.generator.predictor
    start = time.perf_counter()
    predictor.set_image(cv2.cvtColor(image, cv2.COLOR_BGR2RGB))
    encoder = time.perf_counter() - start
    points = proposer.generator.point_grids[0][: proposer.generator.points_per_batch] * np.array(image.shape[1::-1])
    start = time.perf_counter()  # one batch of the generator's own per-batch step (a private method)
    proposer.generator._process_batch(points, image.shape[:2], [0, 0, image.shape[1], image.shape[0]], image.shape[:2])
    batch = time.perf_counter() - start
    predictor.reset_image()
    batches = int(np.ceil(len(proposer.generator.point_grids[0]) / proposer.generator.points_per_batch))
    estimate = encoder + batches * batch
    if estimate > budget_s:
        print(f"SAM vit_b (random weights, CPU): skipped: one encoder pass {encoder:.1f} s + {batches} decoder "
              f"batch(es) x {batch:.1f} s = {estimate:.0f} s estimated for one tile, over the {budget_s:.0f} s budget")
        return
    r = sam_ours(proposer, [image])
    print(f"SAM vit_b (random weights, CPU), 1 tile, {len(r['boxes'][0])} boxes:")
    print_sam_split("mutdet SamProposer", r, 1)


def recall(tiles_dir: Path, proposer: Callable, iou_threshold: float) -> dict:
    """Recall of ``proposer`` on every tile of ``tiles_dir`` at rotated IoU >= ``iou_threshold``: overall,
    non-difficult and per class, plus the share of proposals that hit some object at that IoU."""
    objects = read_artefact(tiles_dir / "objects.parquet", "objects",
                            columns=["tile_id", "cx", "cy", "w", "h", "theta", "difficult", "class_name"]).to_pydict()
    gt_by_tile: dict[str, list[int]] = {}
    for i, tile_id in enumerate(objects["tile_id"]):
        gt_by_tile.setdefault(tile_id, []).append(i)
    boxes = np.stack([objects[k] for k in ("cx", "cy", "w", "h", "theta")], axis=-1).reshape(-1, 5)
    difficult = np.asarray(objects["difficult"])
    classes = np.asarray(objects["class_name"], dtype=object)
    hit = np.zeros(len(boxes), bool)
    counts, hits = [], 0
    tiles = load_tiles(tiles_dir)
    start = time.perf_counter()
    for tile_id, image in tiles:
        proposals = proposer(image)
        counts.append(len(proposals))
        idx = gt_by_tile.get(tile_id, [])
        if idx and len(proposals):
            iou = rotated_iou(boxes[idx], proposals.boxes)  # (G, N)
            hit[idx] = iou.max(axis=1) >= iou_threshold
            hits += int((iou.max(axis=0) >= iou_threshold).sum())
    seconds = time.perf_counter() - start
    easy = difficult == 0
    return {"recall": hit.mean() if len(hit) else float("nan"),
            "recall_easy": hit[easy].mean() if easy.any() else float("nan"), "objects": len(hit),
            "per_class": {c: (float(hit[classes == c].mean()), int((classes == c).sum())) for c in sorted(set(classes))},
            "hit_share": hits / max(sum(counts), 1), "proposals_per_tile": float(np.mean(counts)) if counts else 0.0,
            "tiles_per_s": len(tiles) / seconds if seconds else float("nan"),
            "proposals_per_s": sum(counts) / seconds if seconds else float("nan")}


def print_recall(label: str, r: dict) -> None:
    print(f"    {label:<48} recall {r['recall']:.3f} / {r['recall_easy']:.3f}  of {r['objects']} objects  "
          f"hit share {r['hit_share']:.3f}  {r['proposals_per_tile']:6.1f} per tile  {r['tiles_per_s']:5.1f} tiles/s  "
          f"{r['proposals_per_s']:6.0f} proposals/s", flush=True)
    print("      per class: " + ", ".join(f"{c} {v:.3f} (n={n})" for c, (v, n) in r["per_class"].items()), flush=True)


def load_config_section(path: str) -> dict:
    """The ``proposals`` section of a YAML config, without ``datasets`` (the benchmark reads folders)."""
    import yaml

    with open(path) as f:
        section = dict((yaml.safe_load(f) or {}).get("proposals", {}))
    section.pop("datasets", None)
    return section


def parse_grid(spec: str) -> tuple[str, list[dict]]:
    """``"graph:k=100,300 sigma=0.5,0.8"`` -> ``("graph", [{k: 100, sigma: 0.5}, ...])``."""
    method, _, body = spec.partition(":")
    keys, values = [], []
    for item in body.split():
        key, _, vals = item.partition("=")
        keys.append(key)
        values.append([float(v) if "." in v else int(v) for v in vals.split(",")])
    return method, [dict(zip(keys, combo)) for combo in itertools.product(*values)]


def recall_study(folders: list[Path], grids: list[str], iou_threshold: float, configured: dict) -> None:
    """Print the recall of the configured method (``configured``: the ``proposals`` section of the
    config, its ``max_per_tile`` included), selective search and graph with the schema defaults, then
    each ``--grid`` setting (on top of the configured section), per folder."""
    max_per_tile = from_dict({"proposals": configured}).proposals.max_per_tile
    settings = [("configured", configured), ("selective_search", {"method": "selective_search", "max_per_tile": max_per_tile}),
                ("graph (defaults)", {"method": "graph", "max_per_tile": max_per_tile})]
    for spec in grids:
        method, combos = parse_grid(spec)
        base = dict(configured.get(method, {})) if configured.get("method") == method else {}
        settings += [(f"{method} {' '.join(f'{k}={v}' for k, v in combo.items())}",
                      {"method": method, "max_per_tile": max_per_tile, method: {**base, **combo}}) for combo in combos]
    print(f"\nRecall at rotated IoU >= {iou_threshold} (all objects / difficult 0 only), share of proposals with "
          f"IoU >= {iou_threshold} to some object (hit share), at max_per_tile {max_per_tile}:")
    for folder in folders:
        print(f"  {folder.relative_to(REPO) if folder.is_relative_to(REPO) else folder}:")
        for label, section in settings:
            cfg = from_dict({"proposals": section}).proposals
            if label == "configured":
                label = f"configured: {cfg.method} " + " ".join(f"{k}={v}" for k, v in cfg.method_params().items()
                                                                if k not in ("method", "max_per_tile"))
            print_recall(label, recall(folder, build_proposer(cfg), iou_threshold))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=Path, default=DEMO_TILES[0], help="tile-stage output folder (throughput)")
    parser.add_argument("--num-tiles", type=int, default=8)
    parser.add_argument("--sam-tiles", type=int, default=4, help="tiles for the SAM timings (the first ones)")
    parser.add_argument("--points-per-side", type=int, default=8, help="SAM point grid (all 3 masks per point kept)")
    parser.add_argument("--reps", type=int, default=2, help="SAM timings: best of this many interleaved runs")
    parser.add_argument("--vit-b-budget", type=float, default=60.0, help="seconds; vit_b runs only under it")
    parser.add_argument("--recall", type=Path, nargs="*", default=DEMO_TILES, help="tile folders with objects.parquet")
    parser.add_argument("--grid", action="append", default=[], help='sweep, e.g. "graph:k=100,300 sigma=0.5,0.8"')
    parser.add_argument("--iou", type=float, default=0.5)
    parser.add_argument("--config", default=str(REPO / "config.yaml"),
                        help="config whose proposals section (method, its settings, max_per_tile) is measured first")
    args = parser.parse_args()
    configured = dict(load_config_section(args.config))
    defaults = from_dict({}).proposals
    images = [image for _, image in load_tiles(args.tiles, args.num_tiles)]
    print(f"{len(images)} tiles of {images[0].shape[1]} x {images[0].shape[0]} from {args.tiles}, "
          f"{torch.get_num_threads()} torch threads:")
    for method, section in (("selective_search", {"method": "selective_search"}), ("graph", {"method": "graph"}),
                            ("configured " + configured.get("method", "sam"), configured)):
        if section.get("method", "sam") == "sam":
            continue  # SAM is timed below with a tiny model
        cfg = from_dict({"proposals": section}).proposals
        r = throughput(build_proposer(cfg), images)
        print(f"  {method:<17} {r['tiles_per_s']:7.2f} tiles/s  {r['proposals_per_tile']:6.1f} proposals/tile  "
              f"{r['tiles_per_s'] * r['proposals_per_tile']:7.0f} proposals/s")
    generator = {"points_per_side": args.points_per_side, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0,
                 "box_nms_thresh": 1.0}
    sam_images = images[: args.sam_tiles]
    proposer = bench_sam_tiny(sam_images, generator, defaults.max_per_tile, args.reps)
    bench_conversion(proposer, sam_images)
    bench_vit_b(images[0], generator, defaults.max_per_tile, args.vit_b_budget)
    if args.recall:
        recall_study(args.recall, args.grid, args.iou, configured)


if __name__ == "__main__":
    main()
