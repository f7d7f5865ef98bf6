"""Proposal embedding throughput: the batched rotated RoI-align path against one crop at a time.

Both paths embed the same proposals on the same tiles (``--tiles`` synthetic 800 x 800 PNGs with
``--proposals`` random le90 boxes in total), with the same frozen ResNet (``--backbone``, random
weights: ``weights="none"``, which costs what ImageNet weights cost), and both start from the PNG files:

* **batched** (``mutdet.stages.embed``): tiles decoded and resized to 1024 by
  :class:`~mutdet.embedding.pipeline.TileImages`, ImageNet-normalised on the device, every crop cut by
  ``affine_grid``/``grid_sample`` and ``--batch-size`` crops per backbone pass
  (:func:`~mutdet.embedding.pipeline.embed_tiles`).
* **per crop** (what the reference code and DETReg do): each tile decoded, resized to 1024 and
  normalised with OpenCV/numpy, then for each proposal one ``cv2.warpAffine`` (bilinear, the same
  crop geometry: ``WARP_INVERSE_MAP`` with the crop-to-tile affine) to a 224 x 224 crop and one backbone
  pass on that single crop.

Reported: proposals/s, the ratio, peak memory of each path (each runs in a fresh process: peak RSS
above the RSS after building the model on CPU; peak allocated CUDA memory on GPU), and the agreement
of the two paths (max |crop difference| in normalised units, min cosine between embeddings), which
also checks the RoI-align geometry against an independent implementation.

Usage: ``python benchmarks/embeddings.py [--proposals 64] [--tiles 4] [--batch-size 32] [--device auto]``.
"""
from __future__ import annotations

import argparse
import math
import multiprocessing
import resource
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from mutdet.embedding.backbone import IMAGENET_MEAN, IMAGENET_STD, build_embedder
from mutdet.embedding.pipeline import TileImages, embed_tiles, tile_loader
from mutdet.engine.device import resolve_device

TILE = 800
INPUT = 1024
CROP = 224
CONTEXT = 1.5


def make_tiles(folder: Path, num_tiles: int, num_proposals: int, seed: int = 0) -> list[tuple[Path, np.ndarray]]:
    """Synthetic tiles (noise + filled rotated rectangles) as PNGs, and random le90 proposals per tile."""
    rng = np.random.default_rng(seed)
    per_tile = np.full(num_tiles, num_proposals // num_tiles)
    per_tile[: num_proposals % num_tiles] += 1
    tiles = []
    for t in range(num_tiles):
        image = np.clip(rng.normal(100, 30, (TILE, TILE, 3)), 0, 255).astype(np.uint8)
        boxes = np.stack([rng.uniform(50, TILE - 50, per_tile[t]), rng.uniform(50, TILE - 50, per_tile[t]),
                          rng.uniform(20, 200, per_tile[t]), rng.uniform(8, 60, per_tile[t]),
                          rng.uniform(-math.pi / 2, math.pi / 2, per_tile[t])], axis=-1)
        for cx, cy, w, h, theta in boxes:
            rect = ((cx, cy), (w, h), math.degrees(theta))
            cv2.fillPoly(image, [cv2.boxPoints(rect).round().astype(np.int32)], rng.integers(0, 255, 3).tolist())
        path = folder / f"tile{t}.png"
        cv2.imwrite(str(path), image)
        tiles.append((path, boxes))
    return tiles


def warp_matrix(box: np.ndarray, scale: float) -> np.ndarray:
    """``(2, 3)`` crop-pixel -> resized-image-pixel affine of one le90 box (tile pixels), for
    ``cv2.warpAffine(..., WARP_INVERSE_MAP)``: crop pixel ``(j, i)`` samples ``ctr + a u + b v`` with
    ``a = ((2 j + 1) / CROP - 1) * CONTEXT * w / 2`` (the geometry of mutdet.embedding.rotated_crop)."""
    cx, cy, w, h, t = box
    cx, cy = (cx + 0.5) * scale - 0.5, (cy + 0.5) * scale - 0.5  # pixel centres through an edge-to-edge resize
    half_w, half_h = CONTEXT * w * scale / 2, CONTEXT * h * scale / 2
    cos, sin = math.cos(t), math.sin(t)
    # a = (2 / CROP) j + (1 / CROP - 1), likewise b with i.
    ax, ay = 2 * half_w * cos / CROP, 2 * half_w * sin / CROP
    bx, by = -2 * half_h * sin / CROP, 2 * half_h * cos / CROP
    offset = 1 / CROP - 1
    return np.array([[ax, bx, cx + offset * (ax * CROP / 2 + bx * CROP / 2)],
                     [ay, by, cy + offset * (ay * CROP / 2 + by * CROP / 2)]])


def per_crop_crops(path: Path, boxes: np.ndarray):
    """Yield one normalised ``(1, 3, CROP, CROP)`` float32 crop per proposal, OpenCV only."""
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    scale = INPUT / max(bgr.shape[:2])
    bgr = cv2.resize(bgr, (round(bgr.shape[1] * scale), round(bgr.shape[0] * scale)), interpolation=cv2.INTER_LINEAR)
    rgb = (bgr[:, :, ::-1].astype(np.float32) - np.float32(IMAGENET_MEAN) * 255) / (np.float32(IMAGENET_STD) * 255)
    for box in boxes:
        crop = cv2.warpAffine(rgb, warp_matrix(box, scale), (CROP, CROP), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                              borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        yield torch.from_numpy(crop.transpose(2, 0, 1).copy())[None]


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / 2**20


def _measure(method: str, tiles: list, backbone: str, batch_size: int, device_name: str, workers: int) -> dict:
    """Run one path in this (fresh) process: time, peak memory, embeddings."""
    torch.set_num_threads(torch.get_num_threads())
    device = resolve_device(device_name, "--device")
    embedder = build_embedder(backbone=backbone, weights="none", crop_size=CROP, context=CONTEXT).to(device)
    with torch.inference_mode():  # warm-up (allocator, kernels) outside the timing
        embedder(torch.zeros((2, 3, CROP, CROP), device=device))
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base_rss = _rss_mb()
    start = time.perf_counter()
    if method == "batched":
        dataset = TileImages([p for p, _ in tiles], [p.stem for p, _ in tiles], [b for _, b in tiles], INPUT)
        out = [e for _, e in embed_tiles(embedder, tile_loader(dataset, workers=workers, device=device),
                                         batch_size=batch_size)]
    else:
        out = []
        with torch.inference_mode():
            for path, boxes in tiles:
                for crop in per_crop_crops(path, boxes):
                    out.append(embedder(crop.to(device)).float().cpu().numpy())
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base_rss)
    return {"seconds": seconds, "peak_mb": peak, "embeddings": np.concatenate(out), "device": str(device)}


def crop_agreement(tiles: list) -> float:
    """Max |difference| between the two paths' crops of the first tile (ImageNet-normalised units)."""
    path, boxes = tiles[0]
    embedder = build_embedder(backbone="resnet18", weights="none", crop_size=CROP, context=CONTEXT)
    item = TileImages([path], [path.stem], [boxes], INPUT)[0]
    image = embedder.normalize(item["image"])
    ours = embedder.crops([image], item["boxes"], torch.zeros(len(boxes), dtype=torch.int64), [item["frame_size"]])
    theirs = torch.cat(list(per_crop_crops(path, boxes)))
    return float((ours - theirs).abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--proposals", type=int, default=64)
    parser.add_argument("--tiles", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers of the batched path")
    args = parser.parse_args()
    ctx = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        tiles = make_tiles(Path(tmp), args.tiles, args.proposals)
        results = {}
        for method in ("batched", "per_crop"):
            with ctx.Pool(1) as pool:  # a fresh process per path: independent peak memory
                results[method] = pool.apply(_measure, (method, tiles, args.backbone, args.batch_size, args.device,
                                                        args.workers))
        max_crop_diff = crop_agreement(tiles)
    a, b = results["batched"]["embeddings"], results["per_crop"]["embeddings"]
    cosine = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    n = len(a)
    print(f"{n} proposals on {args.tiles} tiles of {TILE} px (resized to {INPUT}), {args.backbone} random weights, "
          f"{CROP} px crops, context {CONTEXT}, device {results['batched']['device']}, "
          f"{torch.get_num_threads()} torch threads")
    for method, label in (("batched", f"batched RoI-align, batch {args.batch_size}"),
                          ("per_crop", "cv2.warpAffine + backbone per crop")):
        r = results[method]
        print(f"  {label:40s} {r['seconds']:7.2f} s  {n / r['seconds']:8.2f} proposals/s  "
              f"peak {'CUDA allocated' if r['device'].startswith('cuda') else 'RSS above model'} {r['peak_mb']:8.1f} MB")
    print(f"  speed-up batched / per crop: {results['per_crop']['seconds'] / results['batched']['seconds']:.2f}x")
    print(f"  agreement: max |crop difference| {max_crop_diff:.4f} (normalised units), "
          f"min cosine between embeddings {cosine.min():.5f}")


if __name__ == "__main__":
    main()
