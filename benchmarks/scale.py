"""DOTA scale: time and peak memory of each stage at two sizes, and how they grow.

Generates artefacts in the project's own schemas (synthetic, seeded), runs each stage in a fresh process
through its CLI (``mutdet cluster | merge | evaluate | tile``; the pre-training dataset, which has no CLI
of its own, through a child of this script) and reports, per stage and size: wall seconds, CPU seconds
and peak RSS (``os.wait4``'s ``ru_maxrss`` of that process alone, what GNU ``time -v`` prints), then the
growth exponent ``log(b / a) / log(n_b / n_a)`` between the two sizes (1 = linear, 2 = quadratic).

Stages and sizes (``--quick``: smaller, for a check in a minute or two):

* ``cluster``: PCA + k-means (paper settings: 256 / 256, fitted on at most 200k) over N embeddings of
  ``--dim`` (2048, ResNet-50) in one shard: 100k and 1M (quick: 20k and 100k);
* ``pretrain dataset``: the pre-training dataset over N proposals (150 a tile, 256-d targets) keeping
  ``max_boxes`` 30 per tile, built into its memory-mapped cache (rank 0), then opened by a second
  process (another rank); also the anonymous (private) memory per kept proposal: 250k and 1M (quick:
  50k and 200k);
* ``merge``: N tile detections of one 8000 px image (1024 px tiles, gap 200; each object detected 5
  times, in several tiles): 12.5k and 50k (quick: 5k and 20k); ``mutdet merge`` runs ``--repeats`` times
  around one run of the pre-pruning baseline (the original dense blocked NMS, rebuilt in this file, in a
  process of its own); the two outputs must hold the same rows, and the report gives baseline / ours;
* ``evaluate``: N image detections over 500 images (60 objects each, DOTA devkit protocol, AP50 + AP75):
  250k and 1M (quick: 50k and 200k);
* ``tile``: one 8000 x 8000 and one 20000 x 4000 image (2,000 and 2,500 objects), 1024 px windows, gap
  200, one worker (quick: 4000 x 4000 and 10000 x 2000);
* ``whole``: a DIOR-R-like split, N 800 x 800 JPEGs (quality 90; crops of the real aerial image shipped
  with ``deepforest``, synthetic shading without it) tiled at 800 px, one worker, with
  ``tiling.reference_whole_images`` true (each tile points at its JPEG) and false (a PNG copy each),
  interleaved ``--repeats`` times: time, peak RSS and the disk of the tiles folder: 200 (quick: 50).

Usage: ``python benchmarks/scale.py [--quick] [--stages cluster dataset merge evaluate tile whole]
[--workdir DIR] [--dim 2048] [--kmeans-iter 100] [--repeats 2] [--json out.json]``. Generated inputs are kept in
``--workdir`` (default: a temporary folder, removed at the end) and reused by a later run there.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

LE90 = ("cx", "cy", "w", "h", "theta")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
       "MPLBACKEND": "Agg", "WANDB_MODE": "disabled"}

# Starts one command and reports its wall time, CPU time and peak RSS as JSON on stdout, from a small
# process of its own: ``RUSAGE_CHILDREN`` of that launcher is the usage of its only child (a child forked
# straight from this benchmark would inherit this benchmark's ``ru_maxrss``).
LAUNCHER = """\
import json, resource, subprocess, sys, time
t0 = time.perf_counter()
proc = subprocess.Popen(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
out, err = proc.communicate()
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"wall": time.perf_counter() - t0, "rc": proc.returncode, "cpu": ru.ru_utime + ru.ru_stime,
                  "rss_kb": ru.ru_maxrss, "stdout": out.decode()[-3000:], "stderr": err.decode(errors="replace")[-3000:]}))
"""


def run_measured(cmd: list) -> dict:
    """Run ``cmd`` to its end in a fresh process: wall and CPU seconds, peak RSS (MB), its stdout."""
    out = subprocess.run([sys.executable, "-c", LAUNCHER, *map(str, cmd)], env=ENV, capture_output=True, text=True,
                         check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    if res["rc"] != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} exited {res['rc']}:\n{res['stderr']}")
    return {"wall": res["wall"], "cpu": res["cpu"], "rss_mb": res["rss_kb"] / 1024, "stdout": res["stdout"]}


def baseline(module: str) -> dict:
    """A process that only imports ``module`` (torch and all): what every measured process pays before
    doing any work. Net figures subtract it."""
    return run_measured([sys.executable, "-c", f"import mutdet.cli, {module}"])


def _net(rows: list[dict], base: dict) -> list[dict]:
    for r in rows:
        r["net_cpu"] = max(r["cpu"] - base["cpu"], 1e-3)
        r["net_rss_mb"] = max(r["rss_mb"] - base["rss_mb"], 1.0)
        r["base_cpu"], r["base_rss_mb"] = base["cpu"], base["rss_mb"]
    return rows


def mutdet() -> list[str]:
    exe = Path(sys.executable).with_name("mutdet")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "mutdet.cli"]


def exponent(a: float, b: float, na: float, nb: float) -> float | None:
    if a <= 0 or b <= 0 or na == nb:
        return None
    return math.log(b / a) / math.log(nb / na)


def _done(folder: Path) -> bool:
    return (folder / ".complete").is_file()


def _mark(folder: Path, info: dict | None = None) -> None:
    (folder / ".complete").write_text(json.dumps(info or {}))


# ------------------------------------------------------------------------------------------- generators

def _tile_ids(n_rows: int, per_tile: int) -> np.ndarray:
    return np.arange(n_rows) // per_tile


def gen_embeddings(folder: Path, n: int, dim: int, seed: int = 0) -> Path:
    """One shard's ``embeddings.parquet``: ``n`` rows, 150 a tile, clustered float16 vectors (written in
    batches: the generator holds one batch)."""
    import pyarrow as pa

    from mutdet.embedding.artefacts import vector_column, write_embeddings_batches

    path = folder / "embeddings.parquet"
    if _done(folder):
        return path
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((64, dim)).astype(np.float32) * 2

    def batches(rows=32768):
        for start in range(0, n, rows):
            m = min(rows, n - start)
            tiles = _tile_ids(n, 150)[start:start + m]
            vectors = centres[rng.integers(0, len(centres), m)] + rng.standard_normal((m, dim), np.float32)
            yield pa.table({"tile_id": pa.array([f"P{t:06d}__1024__0___0" for t in tiles]),
                            "proposal_index": pa.array((np.arange(start, start + m) % 150).astype(np.int32)),
                            "embedding": vector_column(np.abs(vectors))})

    write_embeddings_batches(batches(), path, dim, {"params": {"backbone": "synthetic"}})
    _mark(folder)
    return path


def gen_pretrain_inputs(folder: Path, n: int, dim: int = 256, per_tile: int = 150, seed: int = 0) -> dict:
    """``tiles.parquet`` (tiles without image files: the dataset does not decode them when built),
    ``proposals.parquet`` and ``targets.parquet`` of ``n`` proposals, ``per_tile`` a tile, streamed."""
    import pyarrow as pa

    from mutdet.embedding.artefacts import targets_schema, vector_column
    from mutdet.io.artefacts import TILES_SCHEMA, write_artefact, write_artefact_batches, write_parquet_stream

    files = {"tiles": folder / "tiles", "proposals": folder / "proposals.parquet", "targets": folder / "targets.parquet"}
    if _done(folder):
        return files
    folder.mkdir(parents=True, exist_ok=True)
    n_tiles = -(-n // per_tile)
    ids = [f"P{t // 16:05d}__1024__{(t % 16) * 824}___0" for t in range(n_tiles)]
    tiles = pa.table({"tile_id": ids, "image_id": [i.split("__")[0] for i in ids], "source_path": ["x.png"] * n_tiles,
                      "tile_path": [f"images/{i}.png" for i in ids], "rate": np.ones(n_tiles),
                      **{c: pa.array(np.full(n_tiles, v), pa.int32()) for c, v in
                         (("x", 0), ("y", 0), ("size", 1024), ("valid_width", 1024), ("valid_height", 1024),
                          ("image_width", 4000), ("image_height", 4000))}}, schema=TILES_SCHEMA)
    write_artefact(tiles, files["tiles"] / "tiles.parquet", "tiles")
    rng = np.random.default_rng(seed)

    def rows(start, m):
        tile = _tile_ids(n, per_tile)[start:start + m]
        return pa.array([ids[t] for t in tile]), pa.array((np.arange(start, start + m) % per_tile).astype(np.int32))

    def proposals(batch=65536):
        for start in range(0, n, batch):
            m = min(batch, n - start)
            tile_id, rank = rows(start, m)
            box = np.stack([rng.uniform(0, 1024, m), rng.uniform(0, 1024, m), rng.uniform(20, 200, m),
                            rng.uniform(5, 20, m), rng.uniform(-1.5, 1.5, m)], 1)
            yield pa.table({"tile_id": tile_id, "proposal_index": rank, **{c: box[:, k] for k, c in enumerate(LE90)},
                            "polygon": pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(8 * m)), 8),
                            "score": pa.array(rng.uniform(0, 1, m), pa.float32()),
                            "predicted_iou": pa.array(rng.uniform(0, 1, m), pa.float32()),
                            "stability_score": pa.array(rng.uniform(0, 1, m), pa.float32()),
                            "area": pa.array(box[:, 2] * box[:, 3], pa.float32()), "method": ["sam"] * m})

    def targets(batch=65536):
        for start in range(0, n, batch):
            m = min(batch, n - start)
            tile_id, rank = rows(start, m)
            v = rng.standard_normal((m, dim)).astype(np.float32)
            v /= np.linalg.norm(v, axis=1, keepdims=True)
            yield pa.table({"tile_id": tile_id, "proposal_index": rank, "embedding": vector_column(v),
                            "cluster_id": pa.array(rng.integers(0, 256, m), pa.int16()),
                            "norm": pa.array(rng.uniform(0.5, 2, m), pa.float32())})

    write_artefact_batches(proposals(), files["proposals"], "proposals", {"params": {"method": "sam"}})
    meta = {b"mutdet_kind": b"targets", b"mutdet_dim": str(dim).encode(), b"mutdet_params": b'{"k": 256}'}
    write_parquet_stream(targets(), files["targets"], targets_schema(dim).with_metadata(meta),
                         row_group_rows=8192, use_dictionary=["tile_id", "proposal_index"])
    _mark(folder)
    return files


def _write_dota_image(root: Path, image_id: str, width: int, height: int, polygons: np.ndarray, names: list[str],
                      classes: list[str], texture: bool) -> None:
    import cv2

    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labelTxt").mkdir(parents=True, exist_ok=True)
    if texture:  # smooth shading and the objects drawn in: compresses like imagery, not like noise
        yy, xx = np.mgrid[0:height:8, 0:width:8]
        small = (96 + 40 * np.sin(xx / 97.0) * np.cos(yy / 131.0)).astype(np.uint8)
        image = cv2.resize(small, (width, height), interpolation=cv2.INTER_LINEAR)
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
        cv2.fillPoly(image, list(polygons.reshape(-1, 4, 2).round().astype(np.int32)), (220, 220, 220))
    else:
        image = np.zeros((height, width), np.uint8)
    cv2.imwrite(str(root / "images" / f"{image_id}.png"), image, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    lines = ["imagesource:GoogleEarth", "gsd:0.146"]
    lines += [" ".join(f"{v:.1f}" for v in p) + f" {c} 0" for p, c in zip(polygons, names)]
    (root / "labelTxt" / f"{image_id}.txt").write_text("\n".join(lines) + "\n")


def _objects(rng, n: int, width: int, height: int) -> np.ndarray:
    w = rng.uniform(15, 80, n)
    return np.stack([rng.uniform(60, width - 60, n), rng.uniform(60, height - 60, n), w, w * rng.uniform(0.3, 1, n),
                     rng.uniform(-np.pi / 2, np.pi / 2, n)], 1)


CLASSES = ["plane", "ship", "small-vehicle"]


def gen_merge(folder: Path, n: int, seed: int = 0) -> dict:
    """One 8000 px image cut in 1024 px tiles (gap 200): ``n`` tile detections, each of ``n / 10`` objects
    detected 5 times (jittered) in a tile holding it, plus as many scattered low-score boxes."""
    import pyarrow as pa

    from mutdet.boxes import le90_to_polygon
    from mutdet.io.artefacts import TILES_SCHEMA, write_artefact

    files = {"tiles": folder / "tiles", "detections": folder / "detections_tiles.parquet"}
    if _done(folder):
        return files
    rng = np.random.default_rng(seed)
    size, stride, side = 1024, 824, 8000
    starts = list(range(0, side - size, stride)) + [side - size]
    windows = [(x, y) for y in starts for x in starts]
    ids = [f"big__1.0__{x}___{y}" for x, y in windows]
    k = len(windows)
    tiles = pa.table({"tile_id": ids, "image_id": ["big"] * k, "source_path": ["big.png"] * k,
                      "tile_path": [f"images/{i}.png" for i in ids], "rate": np.ones(k),
                      "x": pa.array([x for x, _ in windows], pa.int32()), "y": pa.array([y for _, y in windows], pa.int32()),
                      **{c: pa.array(np.full(k, v), pa.int32()) for c, v in
                         (("size", size), ("valid_width", size), ("valid_height", size), ("image_width", side),
                          ("image_height", side))}}, schema=TILES_SCHEMA)
    write_artefact(tiles, files["tiles"] / "tiles.parquet", "tiles")
    objects = _objects(rng, n // 10, side, side)
    det = np.repeat(objects, 5, axis=0)
    det[:, :2] += rng.normal(0, 2, (len(det), 2))
    det[:, 2:4] *= rng.uniform(0.9, 1.1, (len(det), 2))
    det[:, 4] = np.clip(det[:, 4] + rng.normal(0, 0.05, len(det)), -np.pi / 2, np.pi / 2 - 1e-6)
    noise = _objects(rng, n - len(det), side, side)
    boxes = np.concatenate([det, noise])
    scores = np.concatenate([rng.uniform(0.3, 1, len(det)), rng.uniform(0, 0.3, len(noise))]).astype(np.float32)
    # The tile of each detection: one of the windows holding its centre, at random.
    tile_of = np.empty(len(boxes), np.int64)
    origin = np.array(windows, np.float64)
    for i, (cx, cy) in enumerate(boxes[:, :2]):
        holding = np.flatnonzero((origin[:, 0] <= cx) & (cx < origin[:, 0] + size) & (origin[:, 1] <= cy)
                                 & (cy < origin[:, 1] + size))
        tile_of[i] = rng.choice(holding)
    boxes[:, :2] -= origin[tile_of]
    classes = rng.integers(0, len(CLASSES), len(boxes))
    table = pa.table({"id": [ids[t] for t in tile_of], "class_id": pa.array(classes, pa.int16()),
                      "class_name": [CLASSES[c] for c in classes], "score": scores,
                      **{c: boxes[:, j] for j, c in enumerate(LE90)}})
    write_artefact(table, files["detections"], "detections", {"frame": "tile"})
    assert le90_to_polygon(boxes[:1]).shape == (1, 8)
    _mark(folder)
    return files


def gen_evaluate(folder: Path, n: int, images: int = 500, objects: int = 60, seed: int = 0) -> dict:
    """A DOTA split of ``images`` blank 1500 px images with ``objects`` labelled objects each, and ``n``
    image-frame detections (half near objects, half scattered), written as a detections Parquet file."""
    import pyarrow as pa

    from mutdet.boxes import le90_to_polygon
    from mutdet.io.artefacts import write_artefact

    files = {"config": folder / "config.json", "detections": folder / "detections.parquet"}
    if _done(folder):
        return files
    rng = np.random.default_rng(seed)
    root = folder / "dota"
    gt = {}
    for i in range(images):
        boxes = _objects(rng, objects, 1500, 1500)
        names = [CLASSES[c] for c in rng.integers(0, len(CLASSES), objects)]
        gt[f"P{i:04d}"] = (boxes, names)
        _write_dota_image(root, f"P{i:04d}", 1500, 1500, le90_to_polygon(boxes), names, CLASSES, texture=False)
    per = n // images
    ids, rows, names, scores = [], [], [], []
    for image_id, (boxes, cls) in gt.items():
        near = boxes[rng.integers(0, len(boxes), per // 2)].copy()
        near[:, :2] += rng.normal(0, 3, (len(near), 2))
        far = _objects(rng, per - len(near), 1500, 1500)
        ids += [image_id] * per
        rows.append(np.concatenate([near, far]))
        names += [CLASSES[c] for c in rng.integers(0, len(CLASSES), per)]
        scores.append(rng.uniform(0, 1, per))
    boxes = np.concatenate(rows)
    table = pa.table({"id": ids, "class_id": pa.array([CLASSES.index(c) for c in names], pa.int16()),
                      "class_name": names, "score": pa.array(np.concatenate(scores), pa.float32()),
                      **{c: boxes[:, j] for j, c in enumerate(LE90)}})
    write_artefact(table, files["detections"], "detections", {"frame": "image"})
    files["config"].write_text(json.dumps({"datasets": {"dotaval": {
        "root": str(root), "format": "dota", "classes": CLASSES, "splits": {"val": {}},
        "evaluation": {"protocol": "dota_devkit"}}}}))
    _mark(folder)
    return files


def gen_tiling(folder: Path, width: int, height: int, n_objects: int, seed: int = 0) -> dict:
    from mutdet.boxes import le90_to_polygon

    files = {"config": folder / "config.json"}
    if _done(folder):
        return files
    rng = np.random.default_rng(seed)
    boxes = _objects(rng, n_objects, width, height)
    names = [CLASSES[c] for c in rng.integers(0, len(CLASSES), n_objects)]
    _write_dota_image(folder / "dota", "big", width, height, le90_to_polygon(boxes), names, CLASSES, texture=True)
    files["config"].write_text(json.dumps({"datasets": {"big": {
        "root": str(folder / "dota"), "format": "dota", "classes": CLASSES, "splits": {"train": {}},
        "tiling": {"size": 1024, "gap": 200}}}}))
    _mark(folder)
    return files


# ------------------------------------------------------------------------------------------- children

def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return -1


def child_dataset(folder: str, max_boxes: int, cache: str) -> None:
    """Build (or open) the pre-training dataset; print its size and this process's private memory."""
    from mutdet.data.pretrain import ProposalTileDataset

    folder = Path(folder)
    before = _status_kb("RssAnon")
    t0 = time.perf_counter()
    ds = ProposalTileDataset([folder / "tiles"], [folder / "proposals.parquet"], [folder / "targets.parquet"],
                             max_boxes=max_boxes, cache_dir=cache)
    seconds = time.perf_counter() - t0
    np.asarray(ds.records["label"]).sum()  # touch every page once, as training eventually does
    print(json.dumps({"seconds": seconds, "kept": len(ds.records), "tiles": len(ds), "itemsize": ds.records.dtype.itemsize,
                      "file_bytes": ds.cache_file.stat().st_size, "rss_anon_kb": _status_kb("RssAnon"),
                      "rss_anon_before_kb": before, "rss_file_kb": _status_kb("RssFile")}))


# ------------------------------------------------------------------------ pre-pruning merge (baseline)
# The merge as it was before spatial pruning, rebuilt here so that every run measures the speed-up against
# it on the same machine at the same time: the ORIGINAL UNPRUNED ALGORITHM, not project code. Its rotated NMS
# takes the boxes of one image and class ranked by score (ties: lower index first), and compares each block
# of 2,048 ranked boxes with every later box through torchvision's rotated IoU (``box_iou``, which imported
# torchvision and its model zoo), the greedy pass running box by box inside a block; merging looked tiles up
# in a dict and ran that NMS per image and per class.

def pre_pruning_rotated_nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float, block_size: int = 2048):
    """BASELINE (pre-pruning): dense blocked rotated NMS, O(N^2) IoUs. Kept indices, by decreasing score."""
    import torch
    from torchvision.ops import box_iou

    from mutdet.boxes import le90_to_cxcywhr

    order = np.argsort(-scores, kind="stable")
    n = len(order)
    ranked = torch.from_numpy(le90_to_cxcywhr(boxes[order]).astype(np.float32))
    keep = torch.ones(n, dtype=torch.bool)
    for start in range(0, n, block_size):
        stop = min(start + block_size, n)
        iou = box_iou(ranked[start:stop], ranked[start:], fmt="cxcywhr")  # the block x every later box
        block_keep = keep[start:stop].clone()
        inside = iou[:, : stop - start] > iou_threshold
        inside.fill_diagonal_(False)
        for i in range(stop - start):
            if block_keep[i]:
                block_keep[i + 1:] &= ~inside[i, i + 1:]
        keep[start:stop] = block_keep
        if stop < n:
            keep[stop:] &= ~(iou[block_keep, stop - start:] > iou_threshold).any(dim=0)
    return order[keep.numpy()].astype(np.int64)


def pre_pruning_merge(detections: Path, tiles: Path, out: Path, iou_threshold: float) -> None:
    """BASELINE (pre-pruning): ``mutdet merge`` as it was, from the artefacts to the merged artefact."""
    import pyarrow as pa

    import mutdet.cli  # noqa: F401  (what the command imported before it ran)
    import mutdet.config  # noqa: F401

    from mutdet.io.artefacts import read_artefact, write_artefact
    from mutdet.tiling import tile_boxes_to_image

    dets = read_artefact(detections, "detections")
    table = read_artefact([tiles / "tiles.parquet"], "tiles")
    index = {t: k for k, t in enumerate(table.column("tile_id").to_pylist())}
    rows = np.array([index[t] for t in dets.column("id").to_pylist()], dtype=np.int64)
    image_ids = np.asarray(table.column("image_id").to_numpy(zero_copy_only=False), dtype=object)[rows].astype(str)
    boxes = np.stack([dets.column(c).to_numpy() for c in LE90], axis=1)
    boxes = tile_boxes_to_image(boxes, table.column("x").to_numpy()[rows], table.column("y").to_numpy()[rows],
                                table.column("rate").to_numpy()[rows])
    scores = dets.column("score").to_numpy().astype(np.float64)
    class_ids = dets.column("class_id").to_numpy()
    keep = []
    _, first = np.unique(image_ids, return_index=True)
    for image in image_ids[np.sort(first)]:  # images in order of first appearance
        members = np.flatnonzero(image_ids == image)
        kept = [np.zeros(0, np.int64)]
        for c in np.unique(class_ids[members]):
            m = members[class_ids[members] == c]
            kept.append(m[pre_pruning_rotated_nms(boxes[m], scores[m], iou_threshold)])
        k = np.sort(np.concatenate(kept))
        keep.append(k[np.argsort(-scores[k], kind="stable")])
    keep = np.concatenate(keep)
    write_artefact(pa.table({"id": image_ids[keep], "class_id": class_ids[keep],
                             "class_name": dets.column("class_name").take(pa.array(keep)), "score": scores[keep],
                             **{c: boxes[keep, k] for k, c in enumerate(LE90)}}),
                   out, "detections", {"frame": "image", "merge_iou": iou_threshold, "source": str(detections)})


def _same_rows(a: Path, b: Path) -> bool:
    """Two detections files hold the same rows in the same order (metadata aside)."""
    import pyarrow.parquet as pq

    return pq.read_table(a).equals(pq.read_table(b))


# ------------------------------------------------------------------------------------------- stages

def bench_cluster(work: Path, sizes, dim: int, kmeans_iter: int) -> list[dict]:
    out = []
    for n in sizes:
        folder = work / f"cluster-{n}-{dim}"
        t0 = time.perf_counter()
        emb = gen_embeddings(folder / "embed", n, dim)
        gen_s = time.perf_counter() - t0
        config = folder / "config.json"
        config.write_text(json.dumps({"cluster": {"pca_dim": 256, "k": 256, "max_fit_samples": 200000,
                                                  "max_iter": kmeans_iter}}))
        r = run_measured(mutdet() + ["cluster", "--config", config, "--threads", "1", "--embeddings", emb,
                                     "--targets", folder / "targets.parquet", "--out", folder / "model"])
        out.append({"stage": "cluster", "n": n, "unit": "proposals", **r, "generate_s": gen_s,
                    "input_mb": emb.stat().st_size / 2**20})
    return _net(out, baseline("mutdet.stages.cluster"))


def bench_dataset(work: Path, sizes) -> list[dict]:
    out = []
    for n in sizes:
        folder = work / f"pretrain-{n}"
        t0 = time.perf_counter()
        gen_pretrain_inputs(folder, n)
        gen_s = time.perf_counter() - t0
        cache = folder / "cache"
        for path in cache.glob("*"):
            path.unlink()
        me = [sys.executable, __file__, "--child-dataset", folder, "30", cache]
        build = run_measured(me)
        opened = run_measured(me)  # another rank: maps the file rank 0 wrote
        info, info2 = json.loads(build["stdout"].strip().splitlines()[-1]), json.loads(opened["stdout"].strip().splitlines()[-1])
        kept = info["kept"]
        out.append({"stage": "pretrain dataset (build, rank 0)", "n": n, "unit": "proposals", **build,
                    "generate_s": gen_s, "kept": kept, "array_bytes_per_kept": info["file_bytes"] / kept,
                    "anon_bytes_per_kept": (info["rss_anon_kb"] - info["rss_anon_before_kb"]) * 1024 / kept})
        out.append({"stage": "pretrain dataset (open, other rank)", "n": n, "unit": "proposals", **opened,
                    "kept": kept, "anon_bytes_per_kept": (info2["rss_anon_kb"] - info2["rss_anon_before_kb"]) * 1024 / kept,
                    "file_backed_mb": info2["rss_file_kb"] / 1024})
    return _net(out, baseline("mutdet.data.pretrain"))


def bench_merge(work: Path, sizes, repeats: int = 2) -> list[dict]:
    """``mutdet merge`` and the pre-pruning baseline (``--child-merge-baseline``) on the same inputs, ours run
    before and after the baseline (the median is reported); the two outputs must be identical."""
    ours_rows, base_rows = [], []
    for n in sizes:
        folder = work / f"merge-{n}"
        files = gen_merge(folder, n)
        cmd = mutdet() + ["merge", "--detections", files["detections"], "--tiles", files["tiles"],
                          "--out", folder / "merged.parquet", "--iou", "0.1"]
        runs = [run_measured(cmd)]
        base = run_measured([sys.executable, __file__, "--child-merge-baseline", files["detections"], files["tiles"],
                             folder / "merged_baseline.parquet", "0.1"])
        runs += [run_measured(cmd) for _ in range(max(repeats - 1, 1))]
        ours = {k: float(np.median([r[k] for r in runs])) for k in ("wall", "cpu", "rss_mb")}
        same = _same_rows(folder / "merged.parquet", folder / "merged_baseline.parquet")
        ours_rows.append({"stage": "merge (one image)", "group": "merge", "n": n, "unit": "detections", **ours,
                          "stdout": runs[-1]["stdout"], "runs": len(runs), "vs_baseline_wall": base["wall"] / ours["wall"],
                          "vs_baseline_cpu": base["cpu"] / ours["cpu"], "identical": same})
        base_rows.append({"stage": "merge pre-pruning baseline", "group": "merge", "n": n, "unit": "detections", **base})
        if not same:
            raise RuntimeError(f"merge of {n} detections: ours and the pre-pruning baseline keep different rows")
    return _net(ours_rows, baseline("mutdet.stages.merge")) + _net(base_rows, baseline("mutdet.stages.merge, torchvision.ops"))


def bench_evaluate(work: Path, sizes) -> list[dict]:
    out = []
    for n in sizes:
        folder = work / f"evaluate-{n}"
        files = gen_evaluate(folder, n)
        r = run_measured(mutdet() + ["evaluate", "--config", files["config"], "--dataset", "dotaval", "--split", "val",
                                     "--detections", files["detections"], "--out", folder / "metrics"])
        out.append({"stage": "evaluate", "n": n, "unit": "detections", **r})
    return _net(out, baseline("mutdet.stages.evaluate"))


def gen_whole(folder: Path, n: int, seed: int = 0) -> dict:
    """``n`` 800 x 800 JPEGs with a few labelled objects each (DOTA-format labels) and a config per mode."""
    import importlib.util

    import cv2

    from mutdet.boxes import le90_to_polygon

    files = {"copy": folder / "config-copy.json", "reference": folder / "config-reference.json"}
    if _done(folder):
        return {**files, **json.loads((folder / ".complete").read_text())}
    rng = np.random.default_rng(seed)
    spec = importlib.util.find_spec("deepforest")
    real = None
    if spec is not None and spec.submodule_search_locations:
        path = Path(spec.submodule_search_locations[0]) / "data" / "2019_YELL_2_528000_4978000_image_crop2.png"
        real = cv2.imread(str(path), cv2.IMREAD_COLOR) if path.is_file() else None
    root = folder / "dior"
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labelTxt").mkdir(parents=True, exist_ok=True)
    ids = [f"{i:05d}" for i in range(n)]
    for image_id in ids:
        if real is not None:  # a crop of real aerial imagery, flipped / turned at random
            y, x = rng.integers(0, real.shape[0] - 800), rng.integers(0, real.shape[1] - 800)
            image = np.rot90(real[y:y + 800, x:x + 800], int(rng.integers(0, 4)))
            image = np.ascontiguousarray(image[:, ::-1] if rng.uniform() < 0.5 else image)
        else:
            yy, xx = np.mgrid[0:800, 0:800]
            shade = 96 + 40 * np.sin(xx / rng.uniform(50, 150)) * np.cos(yy / rng.uniform(50, 150))
            image = np.clip(shade[..., None] + rng.normal(0, 12, (800, 800, 3)), 0, 255).astype(np.uint8)
        cv2.imwrite(str(root / "images" / f"{image_id}.jpg"), image, [cv2.IMWRITE_JPEG_QUALITY, 90])
        boxes = _objects(rng, 8, 800, 800)
        lines = [" ".join(f"{v:.1f}" for v in p) + f" {CLASSES[k % 3]} 0" for k, p in enumerate(le90_to_polygon(boxes))]
        (root / "labelTxt" / f"{image_id}.txt").write_text("\n".join(lines) + "\n")
    for mode, path in files.items():
        path.write_text(json.dumps({"datasets": {"dior": {
            "root": str(root), "format": "dota", "classes": CLASSES, "splits": {"train": {}},
            "tiling": {"size": 800, "gap": 200, "reference_whole_images": mode == "reference"}}}}))
    info = {"source": "deepforest aerial crops" if real is not None else "synthetic shading (deepforest missing)"}
    _mark(folder, info)
    return {**files, **info}


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def bench_whole(work: Path, n: int, repeats: int = 2) -> list[dict]:
    """``mutdet tile`` of a DIOR-R-like split with references and with copies, interleaved."""
    import shutil

    folder = work / f"whole-{n}"
    files = gen_whole(folder, n)
    runs = {"copy": [], "reference": []}
    for r in range(max(repeats, 1)):
        for mode in ("copy", "reference"):
            out = folder / f"tiles-{mode}"
            shutil.rmtree(out, ignore_errors=True)
            res = run_measured(mutdet() + ["tile", "--config", files[mode], "--dataset", "dior", "--split", "train",
                                           "--threads", "1", "--out", out])
            runs[mode].append({**res, "disk": _folder_bytes(out)})
    source_mb = _folder_bytes(folder / "dior" / "images") / 2**20
    rows = []
    for mode, results in runs.items():
        med = {k: float(np.median([x[k] for x in results])) for k in ("wall", "cpu", "rss_mb", "disk")}
        rows.append({"stage": f"whole-image tiles, {mode}", "group": "whole", "n": n, "unit": "img",
                     "wall": med["wall"], "cpu": med["cpu"], "rss_mb": med["rss_mb"], "runs": len(results),
                     "tiles_mb": med["disk"] / 2**20, "source_mb": source_mb, "shape": files["source"]})
    copy, ref = rows
    ref["vs_copy_wall"], ref["vs_copy_cpu"] = copy["wall"] / ref["wall"], copy["cpu"] / ref["cpu"]
    ref["disk_saved_mb"] = copy["tiles_mb"] - ref["tiles_mb"]
    return _net(rows, baseline("mutdet.stages.tile"))


def bench_tile(work: Path, shapes) -> list[dict]:
    out = []
    for width, height, objects in shapes:
        folder = work / f"tile-{width}x{height}"
        files = gen_tiling(folder, width, height, objects)
        r = run_measured(mutdet() + ["tile", "--config", files["config"], "--dataset", "big", "--split", "train",
                                     "--threads", "1", "--out", folder / "tiles"])
        size = sum(p.stat().st_size for p in (folder / "tiles").rglob("*.png"))
        out.append({"stage": f"tile", "n": width * height, "unit": "pixels", "shape": f"{width}x{height}", **r,
                    "tiles_mb": size / 2**20, "source_mb": (folder / "dota" / "images" / "big.png").stat().st_size / 2**20})
    return _net(out, baseline("mutdet.stages.tile"))


def report(rows: list[dict]) -> list[str]:
    lines = [f"{'stage':37s} {'size':>14s} {'wall s':>7s} {'CPU s':>7s} {'net CPU':>8s} {'peak RSS MB':>11s} "
             f"{'net MB':>7s}  notes"]
    for r in rows:
        notes = []
        for key, fmt in (("shape", "{}"), ("input_mb", "input {:.0f} MB"), ("kept", "{} kept"),
                         ("array_bytes_per_kept", "array {:.0f} B/kept"), ("anon_bytes_per_kept", "private {:.0f} B/kept"),
                         ("file_backed_mb", "file-backed pages {:.0f} MB"), ("tiles_mb", "tiles {:.0f} MB"),
                         ("source_mb", "source {:.0f} MB"), ("generate_s", "generated in {:.0f} s"),
                         ("runs", "median of {} runs"), ("vs_baseline_wall", "pre-pruning baseline / ours: wall {:.1f}x"),
                         ("vs_baseline_cpu", "CPU {:.1f}x"), ("identical", "same rows kept: {}"),
                         ("vs_copy_wall", "copies / references: wall {:.1f}x"), ("vs_copy_cpu", "CPU {:.1f}x"),
                         ("disk_saved_mb", "disk saved {:.0f} MB")):
            if key in r:
                notes.append(fmt.format(r[key]))
        lines.append(f"{r['stage']:37s} {r['n']:>10,d} {r['unit'][:3]:3s} {r['wall']:7.1f} {r['cpu']:7.1f} "
                     f"{r['net_cpu']:8.1f} {r['rss_mb']:11.0f} {r['net_rss_mb']:7.0f}  {', '.join(notes)}")
    bases = {r["stage"] if "group" in r else r["stage"].split()[0]: (r["base_cpu"], r["base_rss_mb"]) for r in rows}
    lines.append("net = minus a process that only imports the stage's module: "
                 + ", ".join(f"{k} {c:.1f} CPU s / {m:.0f} MB" for k, (c, m) in bases.items()))
    lines.append("growth exponents between the two sizes (log ratio / log size ratio; 1 = linear, 2 = quadratic):")
    stages = dict.fromkeys(r["stage"] for r in rows)
    for stage in stages:
        mine = [r for r in rows if r["stage"] == stage]
        if len(mine) < 2:
            continue
        a, b = mine[0], mine[-1]
        fmt = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
        values = {k: fmt(exponent(a[k], b[k], a["n"], b["n"])) for k in ("wall", "cpu", "net_cpu", "rss_mb", "net_rss_mb")}
        lines.append(f"  {stage:35s} {a['n']:,} -> {b['n']:,} {a['unit']}: CPU {values['cpu']} (net {values['net_cpu']}),"
                     f" wall {values['wall']}, peak RSS {values['rss_mb']} (net {values['net_rss_mb']})")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (a check, not the figures)")
    parser.add_argument("--stages", nargs="+", default=["cluster", "dataset", "merge", "evaluate", "tile", "whole"],
                        choices=["cluster", "dataset", "merge", "evaluate", "tile", "whole"])
    parser.add_argument("--workdir", type=Path, help="keep (and reuse) the generated inputs here")
    parser.add_argument("--dim", type=int, default=2048, help="embedding dimension for cluster (2048: ResNet-50)")
    parser.add_argument("--kmeans-iter", type=int, default=100, help="cluster.max_iter (the config default: 100)")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    parser.add_argument("--repeats", type=int, default=2,
                        help="runs of `mutdet merge` around its baseline's one; rounds of the whole-image tiling")
    parser.add_argument("--child-dataset", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--child-merge-baseline", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_merge_baseline:
        detections, tiles, out, iou = args.child_merge_baseline
        pre_pruning_merge(Path(detections), Path(tiles), Path(out), float(iou))
        return 0
    if args.child_dataset:
        folder, max_boxes, cache = args.child_dataset
        child_dataset(folder, int(max_boxes), cache)
        return 0
    q = args.quick
    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="mutdet-scale-")
        work = Path(tmp.name)
    else:
        work = args.workdir
        work.mkdir(parents=True, exist_ok=True)
    plan = {
        "cluster": lambda: bench_cluster(work, (20_000, 100_000) if q else (100_000, 1_000_000), args.dim, args.kmeans_iter),
        "dataset": lambda: bench_dataset(work, (50_000, 200_000) if q else (250_000, 1_000_000)),
        "merge": lambda: bench_merge(work, (5_000, 20_000) if q else (12_500, 50_000), args.repeats),
        "evaluate": lambda: bench_evaluate(work, (50_000, 200_000) if q else (250_000, 1_000_000)),
        "tile": lambda: bench_tile(work, ((4000, 4000, 500), (10000, 2000, 625)) if q
                                   else ((8000, 8000, 2000), (20000, 4000, 2500))),
        "whole": lambda: bench_whole(work, 50 if q else 200, args.repeats),
    }
    rows, failed = [], []
    for stage in args.stages:
        t0 = time.perf_counter()
        try:
            rows += plan[stage]()
        except (RuntimeError, subprocess.CalledProcessError) as exc:  # one stage failing leaves the others
            failed.append(stage)
            print(f"[{stage}: FAILED: {str(exc)[-2000:]}]", file=sys.stderr, flush=True)
            continue
        print(f"[{stage}: {time.perf_counter() - t0:.0f} s with generation]", file=sys.stderr, flush=True)
        for line in report([r for r in rows if r.get("group", r["stage"].split()[0]) == stage.replace("dataset", "pretrain")]):
            print(line, file=sys.stderr, flush=True)
    print(f"mutdet scale benchmark ({'quick' if q else 'full'} sizes; {os.cpu_count()} CPUs, one thread per process)")
    print("\n".join(report(rows)))
    if args.json:
        args.json.write_text(json.dumps([{k: v for k, v in r.items() if k != "stdout"} for r in rows], indent=2))
    if failed:
        print(f"failed stages: {', '.join(failed)} (see the messages above)")
    if tmp is not None:
        tmp.cleanup()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
