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

Part ``pooled`` (``--parts pooled``): ``embedding.mode: crop`` (the paper: one backbone pass per
proposal) against ``embedding.mode: pooled`` (one pass per tile, rotated RoI-align on C5, average pool)
and, for the choice of level, the same with the boxes aligned on C4 followed by the C5 stage
(``pool_level="c4"``, not a config value: the benchmark patches the stage's embedder builder). Each is a
whole ``mutdet embed`` process (``python -m mutdet embed --config <inline JSON>``, what the workflow
runs), timed from outside, the variants interleaved round by round in alternating order, medians and
the median of the per-round ratios. The input: ``--scene-tiles`` rendered scenes of the project's
synthetic generator (:mod:`mutdet.synthetic`, 800 px, zoom 1: DOTA-like object sizes, labelled objects)
as tiles, proposals from the graph proposer with the demo's settings, the best ``--per-tile`` of each
tile (several counts: the speed-up grows with proposals per tile). Agreement, on the largest count: the
cosine between the two embeddings of each proposal (mean, median, 5th percentile; raw and after
subtracting each path's mean vector), the same for unrelated pairs (chance level), top-1 retrieval (is a
proposal's pooled embedding the nearest to its crop embedding?); pseudo-classes: the project's PCA +
spherical k-means (:func:`mutdet.embedding.cluster.fit_cluster_model`) fitted on each path, the
adjusted mutual information between the two assignments (beside the AMI of two k-means seeds on the
same path: the clustering's own noise), and the AMI with the object class on the proposals that hit an
object (rotated IoU >= 0.5). The ResNet has random weights (no ImageNet weights can be downloaded
here): the agreement figures are indicative only.

Usage: ``python benchmarks/embeddings.py [--parts batched,pooled] [--proposals 64] [--tiles 4]
[--batch-size 32] [--device auto] [--scene-tiles 4] [--per-tile 30 100 300] [--repeats 3] [--threads 1]``.
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import resource
import shutil
import subprocess
import sys
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


def write_scene_tiles(root: Path, num_tiles: int, max_per_tile: int, seed: int = 0):
    """Rendered synthetic scenes (800 px, zoom 1) as a tiles folder, their labelled objects, and the graph
    proposer's boxes (the demo's settings, at most ``max_per_tile``, best first) per tile.

    Returns ``(tiles_dir, objects, proposals)``: ``objects[tile_id] = (boxes (G, 5) le90, classes (G,))``,
    ``proposals[tile_id]`` a :class:`mutdet.proposals.ProposalSet`.
    """
    import pyarrow as pa

    from mutdet.boxes import polygon_to_le90
    from mutdet.io.artefacts import TILES_SCHEMA, write_artefact
    from mutdet.proposals.graph import GraphProposer
    from mutdet.synthetic import render_image

    proposer = GraphProposer(k=[100, 300], min_size=20, resize=512, min_area=16, max_area_fraction=0.2,
                             max_aspect=8, nms_iou=0.7, score="fill_log_area", max_per_tile=max_per_tile)
    rows, objects, proposals = [], {}, {}
    for t in range(num_tiles):
        scene = render_image(seed + t, size=TILE)
        tile_id = f"scene{t}__1.0__0___0"
        rel = f"images/{tile_id}.png"
        (root / "images").mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / rel), scene.image)
        rows.append({"tile_id": tile_id, "image_id": f"scene{t}", "source_path": f"scene{t}.png", "tile_path": rel,
                     "rate": 1.0, "x": 0, "y": 0, "size": TILE, "valid_width": TILE, "valid_height": TILE,
                     "image_width": TILE, "image_height": TILE})
        objects[tile_id] = (polygon_to_le90(scene.polygons).reshape(-1, 5), np.array(scene.classes))
        proposals[tile_id] = proposer(scene.image)
    write_artefact(pa.Table.from_pylist(rows, schema=TILES_SCHEMA), root / "tiles.parquet", "tiles",
                   {"params": {"benchmark": "embeddings"}})
    return root, objects, proposals


def write_top_proposals(folder: Path, proposals: dict, per_tile: int) -> Path:
    """``proposals.parquet`` with the best ``per_tile`` proposals of each tile (grouped by tile)."""
    import pyarrow as pa

    from mutdet.boxes import le90_to_polygon
    from mutdet.io.artefacts import PROPOSALS_SCHEMA, write_artefact

    rows = []
    for tile_id, found in proposals.items():
        top = found.ranked(per_tile)
        for i, box in enumerate(top.boxes):
            rows.append({"tile_id": tile_id, "proposal_index": i, "cx": box[0], "cy": box[1], "w": box[2], "h": box[3],
                         "theta": box[4], "polygon": le90_to_polygon(box).tolist(), "score": float(top.score[i]),
                         "predicted_iou": None, "stability_score": None, "area": float(top.area[i]),
                         "method": "graph"})
    write_artefact(pa.Table.from_pylist(rows, schema=PROPOSALS_SCHEMA), folder / "proposals.parquet", "proposals",
                   {"params": {"method": "graph", "max_per_tile": per_tile}})
    return folder


# ``pool_level="c4"`` is not a config value: this child process patches the stage's builder, then runs the CLI.
_C4_CHILD = ("import functools, sys; import mutdet.stages.embed as e; "
             "e.build_embedder = functools.partial(e.build_embedder, pool_level='c4'); "
             "from mutdet.cli import main; sys.exit(main(sys.argv[1:]))")


def run_stage(variant: str, config: dict, tiles: Path, proposals: Path, out: Path, threads: int) -> tuple[float, float]:
    """One whole ``mutdet embed`` process; returns its wall time and the stage's own ``seconds`` (from the
    model build to the last part: no imports, no reading of the inputs, no final file) in s."""
    args = ["embed", "--config", json.dumps(config), "--tiles", str(tiles), "--proposals", str(proposals),
            "--out", str(out), "--threads", str(threads)]
    command = ([sys.executable, "-c", _C4_CHILD, *args] if variant == "pooled-c4"
               else [sys.executable, "-m", "mutdet", *args])
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{variant}: mutdet embed failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return seconds, json.loads((out / "manifest.json").read_text())["seconds"]


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)


def _summary(values: np.ndarray) -> str:
    return f"mean {values.mean():.3f}  median {np.median(values):.3f}  p5 {np.percentile(values, 5):.3f}"


def agreement(crop: np.ndarray, other: np.ndarray, rng: np.random.Generator) -> dict[str, str]:
    """Per-proposal cosine of two embeddings of the same proposals (raw and centred per path), chance
    levels (a random other proposal), top-1 retrieval."""
    perm = rng.permutation(len(crop))
    centred_a, centred_b = crop - crop.mean(0), other - other.mean(0)
    unit_a = centred_a / np.maximum(np.linalg.norm(centred_a, axis=1, keepdims=True), 1e-12)
    unit_b = centred_b / np.maximum(np.linalg.norm(centred_b, axis=1, keepdims=True), 1e-12)
    retrieval = float(((unit_a @ unit_b.T).argmax(1) == np.arange(len(crop))).mean())
    return {"cosine": _summary(_cosines(crop, other)),
            "cosine, unrelated pairs": _summary(_cosines(crop, other[perm])),
            "centred cosine": _summary(_cosines(centred_a, centred_b)),
            "centred cosine, unrelated pairs": _summary(_cosines(centred_a, centred_b[perm])),
            "top-1 retrieval (crop -> other path)": f"{retrieval:.3f} (chance {1 / len(crop):.4f})"}


def pseudo_classes(x: np.ndarray, pca_dim: int, k: int, seed: int) -> np.ndarray:
    """The project's PCA + spherical k-means fitted on ``x``, then every row assigned."""
    from mutdet.embedding.cluster import fit_cluster_model

    model = fit_cluster_model(x.astype(np.float32), pca_dim=pca_dim, k=k, seed=seed)
    return model.assign(model.project(x))[0]


def hit_classes(keys: list[tuple[str, int]], proposals: dict, objects: dict, per_tile: int, iou: float = 0.5):
    """Per embedding row: the class of the best-overlapping object at rotated IoU >= ``iou``, else None."""
    from mutdet.boxes import rotated_iou

    out = np.full(len(keys), None, dtype=object)
    for row, (tile_id, index) in enumerate(keys):
        boxes, classes = objects[tile_id]
        if len(boxes) == 0:
            continue
        overlap = np.asarray(rotated_iou(proposals[tile_id].ranked(per_tile).boxes[index:index + 1], boxes))[0]
        if overlap.max() >= iou:
            out[row] = classes[overlap.argmax()]
    return out


def pooled_part(args) -> None:
    """The ``pooled`` part: whole ``mutdet embed`` processes per mode, then agreement and pseudo-classes."""
    from sklearn.metrics import adjusted_mutual_info_score

    from mutdet.embedding.artefacts import read_embeddings, vector_matrix

    counts = sorted(args.per_tile)
    variants = ["crop", "pooled", "pooled-c4"]
    base = {"backbone": args.backbone, "weights": "none", "input_size": INPUT, "crop_size": CROP, "context": CONTEXT,
            "batch_size": args.batch_size, "workers": 0, "device": args.device, "checkpoint_every": 1000}
    configs = {v: {"embedding": {**base, "mode": "crop" if v == "crop" else "pooled"}} for v in variants}
    times = {(v, n): [] for v in variants for n in counts}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        tiles_dir, objects, found = write_scene_tiles(tmp / "tiles", args.scene_tiles, max(counts))
        proposal_dirs = {n: write_top_proposals(tmp / f"proposals-{n}", found, n) for n in counts}
        totals = {n: sum(min(n, len(p)) for p in found.values()) for n in counts}
        print(f"## pooled vs crop: {args.scene_tiles} synthetic scenes of {TILE} px as tiles (resized to {INPUT}), "
              f"graph proposals (best per tile; {', '.join(f'{n}: {totals[n]} in all' for n in counts)}); "
              f"{args.backbone} with RANDOM weights (no ImageNet weights here: agreement figures are indicative only), "
              f"crop {CROP}, context {CONTEXT}, batch_size {args.batch_size}, device {args.device}, "
              f"--threads {args.threads}; inputs made in {time.perf_counter() - t0:.0f} s")
        for r in range(args.repeats):
            order = variants if r % 2 == 0 else variants[::-1]
            for n in counts:
                for v in order:
                    out = tmp / "out" / f"{v}-{n}-{r}"
                    times[(v, n)].append(run_stage(v, configs[v], tiles_dir, proposal_dirs[n], out, args.threads))
                    if r < args.repeats - 1 or n != counts[-1]:
                        shutil.rmtree(out)
                    wall, stage = times[(v, n)][-1]
                    print(f"  round {r} {v:9s} {n:4d}/tile: {wall:7.1f} s whole process, {stage:7.1f} s in the stage",
                          flush=True)
        for k, what in ((0, "whole `mutdet embed` processes (start-up, model build, I/O included)"),
                        (1, "inside the stage (manifest `seconds`: model build, tile decoding, embedding)")):
            print(f"{what}: median time (proposals/s), ratio = median over rounds of crop / x:")
            for n in counts:
                cells = []
                for v in variants:
                    these = np.array([t[k] for t in times[(v, n)]])
                    med = float(np.median(these))
                    ratio = float(np.median(np.array([t[k] for t in times[("crop", n)]]) / these))
                    cells.append(f"{v} {med:6.1f} s ({totals[n] / med:7.2f}/s, {ratio:5.2f}x)")
                print(f"  {n:4d} proposals/tile: " + "; ".join(cells))

        n = counts[-1]
        tables = {v: read_embeddings(tmp / "out" / f"{v}-{n}-{args.repeats - 1}" / "embeddings.parquet")
                  for v in variants}
        keys = list(zip(tables["crop"].column("tile_id").to_pylist(),
                        tables["crop"].column("proposal_index").to_pylist()))
        vectors = {v: vector_matrix(t.column("embedding")).astype(np.float32) for v, t in tables.items()}
    rng = np.random.default_rng(0)
    print(f"agreement with the crop path on the {len(keys)} proposals at {n}/tile:")
    for v in variants[1:]:
        for name, text in agreement(vectors["crop"], vectors[v], rng).items():
            print(f"  {v:9s} {name:38s} {text}")
    # By size: the context-enlarged box's long side in C5 cells (stride 32 of the tile resized to INPUT).
    cells = np.array([found[t].ranked(n).boxes[i, 2] for t, i in keys]) * CONTEXT * INPUT / TILE / 32
    edges = [0, 1, 2, 4, np.inf]
    print("  centred cosine with the crop path by the enlarged box's long side on C5 (median, proposals):")
    for v in variants[1:]:
        centred = _cosines(vectors["crop"] - vectors["crop"].mean(0), vectors[v] - vectors[v].mean(0))
        groups = [(lo, hi, centred[(cells >= lo) & (cells < hi)]) for lo, hi in zip(edges[:-1], edges[1:])]
        print(f"  {v:9s} " + "; ".join(f"[{lo}, {hi}) cells: {np.median(c):.3f} ({len(c)})" for lo, hi, c in groups
                                       if len(c)))
    cls = hit_classes(keys, found, objects, n)
    hit = np.array([c is not None for c in cls])
    print(f"pseudo-classes: PCA {args.pca_dim} + spherical k-means k={args.k} (mutdet.embedding.cluster), seed 0; "
          f"{int(hit.sum())} proposals hit an object (rotated IoU >= 0.5): "
          + ", ".join(f"{c} {m}" for c, m in zip(*np.unique(cls[hit].astype(str), return_counts=True))))
    labels = {v: pseudo_classes(vectors[v], args.pca_dim, args.k, seed=0) for v in variants}
    reseeded = pseudo_classes(vectors["crop"], args.pca_dim, args.k, seed=1)
    print(f"  AMI(crop, crop with k-means seed 1)  {adjusted_mutual_info_score(labels['crop'], reseeded):.3f}"
          "  (the clustering's own noise)")
    for v in variants[1:]:
        print(f"  AMI(crop, {v:9s})             {adjusted_mutual_info_score(labels['crop'], labels[v]):.3f}")
    for v in variants:
        ami = adjusted_mutual_info_score(cls[hit].astype(str), labels[v][hit])
        print(f"  AMI({v:9s} pseudo-class, object class) on hits {ami:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default="batched,pooled", help="comma-separated: batched, pooled")
    parser.add_argument("--proposals", type=int, default=64)
    parser.add_argument("--tiles", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers of the batched path")
    parser.add_argument("--scene-tiles", type=int, default=4, help="pooled part: rendered 800 px scenes")
    parser.add_argument("--per-tile", type=int, nargs="+", default=[30, 100, 300],
                        help="pooled part: proposals per tile (the best of the graph proposer's)")
    parser.add_argument("--repeats", type=int, default=3, help="pooled part: interleaved rounds")
    parser.add_argument("--threads", type=int, default=1, help="pooled part: mutdet embed --threads")
    parser.add_argument("--pca-dim", type=int, default=64)
    parser.add_argument("--k", type=int, default=16)
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    if "pooled" in parts:
        pooled_part(args)
    if "batched" not in parts:
        return
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
