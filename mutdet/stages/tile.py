"""Stage ``tile``: one shard of one dataset split -> tile PNGs + ``tiles.parquet`` + ``objects.parquet``.

Output folder layout::

    <out>/tiles.parquet         tiles schema (mutdet.io.artefacts), rows sorted by image then window
    <out>/objects.parquet       objects schema, tile pixels
    <out>/images/<image>/<tile_id>.png   (not for a tile that is its whole image: see below)
    <out>/summary.json          counts, skipped objects/images, parameters, code version
    <out>/parts/<image>.*.parquet  per-image results; a rerun reuses them only if made with the same
                                   parameters, image and label files (size + mtime) and code version

Images are processed in parallel over ``threads`` worker processes, each holding one decoded image
(and one rescaled copy) at a time. Every file is written atomically.

A tile that is its whole source image unchanged (one window at rate 1, no padding: DIOR-R's 800x800
images with an 800 px tile) is not copied: its ``tile_path`` is the source file's absolute path
(``tiling.reference_whole_images``, default true). Readers join ``tile_path`` to the tiles folder, which
keeps an absolute path, and decode it as they decode a tile PNG (``cv2.imread(..., IMREAD_COLOR)``: BGR,
8-bit, grey expanded to 3 channels, EXIF orientation applied), the decoding this stage tiles from, so
they see the pixels a copy would hold, whatever the source format (JPEG, TIFF, 16-bit PNG). The raw
images are the tile rule's inputs, so an edited one is re-tiled; ``tiles.parquet``'s metadata holds
``images_digest``, a SHA-256 over every tile's image file (the PNG written, or the source referenced),
so the table's identity, which later stages key their results to, changes with any tile's pixels. Set
the key to false when the raw images may be moved or purged after tiling.

Every object of the label files is accounted for in ``summary.json``: it is in tiles (``objects``
counts tile rows), or skipped under ``on_bad_object: skip`` with its file, line and reason (malformed,
or entirely outside its image), or listed in ``not_tiled`` (inside the image, but no window holds an
IoF of at least ``iof_threshold`` of it: the devkit drops these silently; evaluation on full images
still counts them). Images are accepted by :func:`mutdet.io.datasets.load_image`, the rule evaluation
uses too; a skipped image (missing, unreadable, truncated, bad label file) is listed with its reason.
Label files without an image are listed by shard 0 (a split-level check) and logged as a warning.
"""
from __future__ import annotations

import dataclasses
import hashlib
import multiprocessing
import shutil
import sys
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
from tqdm import tqdm

from mutdet.config import Config
from mutdet.io.annotations import AnnotationError, ClassMap
from mutdet.io.artefacts import SCHEMAS, pyarrow_without_pandas, write_artefact
from mutdet.io.atomic import write_bytes, write_json
from mutdet.io.datasets import (LABEL_SUFFIX, find_image, labels_without_image, list_image_ids, load_image,
                                 shard_ids)
from mutdet.io.identity import file_digest
from mutdet.stages import parts
from mutdet.stages.common import code_version, log, params_hash
from mutdet.tiling import TilingParams, iter_tiles

# Lossless PNG, fast: zlib level 1 with Huffman-only coding after the Average row filter alone. On
# 800 px tiles (1 core, CPU time per tile; benchmarks/whole.py) this encodes in 19 ms (real aerial) /
# 16 ms (synthetic) at 89.9 % / 56.8 % of the raw size, where libpng's adaptive choice among all five
# filters (the previous flags) takes 31 / 28 ms for the same sizes and OpenCV's default (the DOTA
# devkit's) 19 / 19 ms for 92.5 % / 59.8 %. Lossless WebP is 6-9 % smaller but slower to encode (PIL,
# fastest method: 47 / 33 ms; OpenCV's lossless WebP about 20x slower), and TIFF/JPEG readers are not
# what the tiles' users expect, so tiles stay PNG.
PNG_FLAGS = [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_HUFFMAN_ONLY,
             cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_AVG]


@dataclasses.dataclass(frozen=True)
class _Job:
    image_id: str
    images_dir: Path
    labels_dir: Path
    extensions: tuple[str, ...]
    fmt: str
    classes: tuple[str, ...]
    aliases: dict
    on_bad_object: str
    tiling: TilingParams
    out_dir: Path
    params_hash: str
    code_version: str


def _part_paths(out_dir: Path, image_id: str) -> tuple[Path, Path]:
    return out_dir / "parts" / f"{image_id}.objects.parquet", out_dir / "parts" / f"{image_id}.tiles.parquet"


def _stat_identity(path: Path) -> list[int] | None:
    """``[size, mtime_ns]`` of a file (None if absent). Raw images are large and many, so their parts are
    keyed to this cheap identity, not a content hash: any edit (or a touch) re-tiles that image only."""
    try:
        st = Path(path).stat()
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def _raw_identity(job: "_Job") -> dict:
    """What one image's part is made from besides the parameters: its image and label files and the code."""
    try:
        image = _stat_identity(find_image(job.images_dir, job.image_id, job.extensions))
    except FileNotFoundError:
        image = None
    label = _stat_identity(Path(job.labels_dir) / f"{job.image_id}{LABEL_SUFFIX[job.fmt]}")
    return {"image": image, "label": label, "code_version": job.code_version}


def _tile_one(job: _Job) -> tuple[_Job, list[dict], list[dict], dict]:
    """Tile one image and write its PNGs (in a worker). Returns the job, the image's object and tile rows
    and its part metadata, which :func:`_commit` writes (in the main process: a worker never builds an
    Arrow table, whose first one imports pandas)."""
    cv2.setNumThreads(1)
    skipped_objects, skipped_image, not_tiled, digests = [], None, [], []
    inputs = _raw_identity(job)  # before reading: an edit during the run makes the part stale, not current
    class_map = ClassMap(job.classes, job.aliases)
    tile_rows, object_rows = [], []
    try:
        loaded = load_image(job.fmt, job.images_dir, job.labels_dir, job.image_id, job.extensions, class_map,
                            job.on_bad_object)
    except (AnnotationError, FileNotFoundError) as exc:
        if job.on_bad_object == "error":
            raise
        skipped_image = {"image_id": job.image_id, "reason": str(exc)}
    if skipped_image is None:
        source, image, ann = loaded.path, loaded.pixels, loaded.annotations
        del loaded  # one reference to the pixels: freed below
        polygons = ann.polygons if ann is not None else np.zeros((0, 8))
        labels = ann.labels if ann is not None else np.zeros(0, dtype=np.int64)
        difficult = ann.difficult if ann is not None else np.zeros(0, dtype=np.int8)
        skipped_objects = [s.to_dict() for s in ann.skipped] if ann is not None else []
        image_dir = job.out_dir / "images" / job.image_id
        # The image's old part goes first: a kill below must not leave a part that looks current while
        # the PNGs it lists are gone or of other parameters.
        for part in _part_paths(job.out_dir, job.image_id):
            part.unlink(missing_ok=True)
        shutil.rmtree(image_dir, ignore_errors=True)  # stale tiles of earlier parameters
        height, width = image.shape[:2]
        tiled = np.zeros(len(labels), dtype=bool)
        for tile in iter_tiles(image, job.image_id, polygons, difficult, job.tiling):
            if job.tiling.reference_whole_images and _whole_image(tile, width, height):
                # The source file itself: readers decode it as they decode a PNG tile (cv2.imread, BGR,
                # 8-bit, EXIF orientation applied), the decoding this stage used, so the pixels are the ones
                # a copy would hold. Absolute: readers join tile_path to the tiles folder, which keeps it.
                rel = Path(source).resolve()
                digests.append(file_digest(rel))
            else:
                rel = Path("images") / job.image_id / f"{tile.tile_id}.png"
                ok, buf = cv2.imencode(".png", tile.pixels, PNG_FLAGS)
                if not ok:
                    raise RuntimeError(f"PNG encoding failed for tile {tile.tile_id}")
                write_bytes(job.out_dir / rel, buf.tobytes())
                digests.append(hashlib.sha256(buf).hexdigest())
            tile_rows.append({
                "tile_id": tile.tile_id, "image_id": job.image_id, "source_path": str(source),
                "tile_path": str(rel), "rate": tile.rate, "x": tile.x, "y": tile.y, "size": tile.size,
                "valid_width": tile.valid_width, "valid_height": tile.valid_height,
                "image_width": width, "image_height": height,
            })
            tiled[tile.object_indices] = True
            for k, idx in enumerate(tile.object_indices):
                cx, cy, w, h, theta = tile.boxes[k]
                object_rows.append({
                    "tile_id": tile.tile_id, "object_index": int(idx),
                    "cx": cx, "cy": cy, "w": w, "h": h, "theta": theta,
                    "polygon": tile.polygons[k].tolist(),
                    "class_id": int(labels[idx]), "class_name": job.classes[labels[idx]],
                    "difficult": int(tile.difficult[k]), "iof": float(tile.iof[k]),
                })
        del image
        not_tiled = [{"image_id": job.image_id, "object_index": int(i), "file": ann.file, "line": ann.line(i)}
                     for i in np.flatnonzero(~tiled)]
    meta = {"inputs": inputs, "skipped_objects": skipped_objects, "skipped_image": skipped_image,
            "not_tiled": not_tiled, "image_digests": digests}
    return job, object_rows, tile_rows, meta


def _whole_image(tile, width: int, height: int) -> bool:
    """Whether a tile is its source image unchanged: rate 1, origin 0, no padding, the whole image."""
    return (tile.rate == 1.0 and tile.x == 0 and tile.y == 0 and tile.size == tile.valid_width == width
            and tile.size == tile.valid_height == height)


def _images_digest(tiles: pa.Table, metas: list[dict], out_dir: Path) -> str:
    """SHA-256 over every tile's id, path and image-file digest, in table order: the tiles table's metadata
    holds it, so the table's own identity (what later stages key their results to) changes whenever a
    tile's pixels do, a PNG rewritten or a referenced source image edited and re-tiled."""
    ids, paths = tiles.column("tile_id").to_pylist(), tiles.column("tile_path").to_pylist()
    digests = [d for meta in metas for d in meta.get("image_digests") or []]
    if len(digests) != len(ids):  # parts written before digests were recorded: hash the files
        digests = [file_digest(out_dir / p) for p in paths]
    h = hashlib.sha256()
    for row in zip(ids, paths, digests):
        h.update("\t".join(row).encode() + b"\n")
    return h.hexdigest()


def _commit(result: tuple[_Job, list[dict], list[dict], dict]) -> None:
    """Write one tiled image's parts (after its PNGs: a part never lists tiles that are not there)."""
    job, object_rows, tile_rows, meta = result
    objects_part, tiles_part = _part_paths(job.out_dir, job.image_id)
    parts.write(_table(object_rows, "objects"), objects_part, "objects", job.params_hash, **meta)
    parts.write(_table(tile_rows, "tiles"), tiles_part, "tiles", job.params_hash, **meta)


def _table(rows: list[dict], kind: str) -> pa.Table:
    schema = SCHEMAS[kind]
    if not rows:
        return schema.empty_table()
    return pa.Table.from_pylist(rows, schema=schema)


def _pool(processes: int):
    """A pool of worker processes that start cheaply: forked where that is safe (Linux), so a worker
    inherits the imported modules instead of importing them again (about 0.5 s each under forkserver
    or spawn); elsewhere (macOS, Windows) forkserver / spawn."""
    method = "fork" if sys.platform.startswith("linux") else None
    ctx = multiprocessing.get_context(method)
    return ctx.Pool(processes)


def _largest_first(jobs: list[_Job]) -> list[_Job]:
    """Jobs by decreasing image file size (a cheap stand-in for pixels), stable on ties."""
    def size(job):
        try:
            return find_image(job.images_dir, job.image_id, job.extensions).stat().st_size
        except (FileNotFoundError, OSError):
            return 0

    return sorted(jobs, key=size, reverse=True)


def run(cfg: Config, *, dataset: str, split: str, shard: int, out_dir: str | Path, threads: int = 1) -> dict:
    """Tile shard ``shard`` of ``dataset``/``split`` into ``out_dir``; returns the summary dict."""
    pyarrow_without_pandas()
    ds = cfg.dataset(dataset)
    sp = ds.split(split)
    out_dir = Path(out_dir)
    tiling = TilingParams(**dataclasses.asdict(ds.tiling))
    params = {
        "dataset": dataset, "split": split, "shard": shard, "num_shards": ds.shards, "format": ds.format,
        "classes": list(ds.classes), "class_aliases": dict(ds.class_aliases),
        "on_bad_object": cfg.on_bad_object, "tiling": dataclasses.asdict(tiling),
        "images": str(sp.images), "labels": str(sp.labels),
    }
    phash = params_hash(params)
    ids = shard_ids(list_image_ids(sp.images, sp.list, ds.image_extensions), shard, ds.shards)
    if not sp.labels.is_dir():
        log.warning("%s/%s: label folder %s not found: tiling without ground truth", dataset, split, sp.labels)
    orphans = []  # a split-level check: shard 0 reports it
    if shard == 0:
        orphans = [str(p) for p in labels_without_image(ds.format, sp.images, sp.labels, ds.image_extensions)]
    if orphans:
        log.warning("%s/%s: %d label file(s) without an image in %s, their objects are in no tile: %s",
                    dataset, split, len(orphans), sp.images, ", ".join(orphans))
    jobs = [
        _Job(image_id=i, images_dir=sp.images, labels_dir=sp.labels, extensions=ds.image_extensions,
             fmt=ds.format, classes=ds.classes, aliases=dict(ds.class_aliases), on_bad_object=cfg.on_bad_object,
             tiling=tiling, out_dir=out_dir, params_hash=phash, code_version=code_version())
        for i in ids
    ]
    paths = [_part_paths(out_dir, i) for i in ids]  # (objects, tiles) of each image
    todo = [jobs[k] for k in parts.todo(paths, phash, [{"inputs": _raw_identity(j)} for j in jobs])]
    log.info("tile %s/%s shard %d/%d: %d images (%d already done), %d worker(s)",
             dataset, split, shard, ds.shards, len(jobs), len(jobs) - len(todo), threads)
    # Workers are forked before the progress bar starts its thread; largest images first, so that the
    # last one to finish is a small one.
    pool = _pool(min(threads, len(todo))) if threads > 1 and len(todo) > 1 else None
    todo = _largest_first(todo)
    progress = tqdm(total=len(todo), desc=f"tile {dataset}/{split}/{shard}", unit="img", mininterval=1.0)
    try:
        for result in (pool.imap_unordered(_tile_one, todo) if pool is not None else map(_tile_one, todo)):
            _commit(result)
            progress.update()
    except BaseException:
        if pool is not None:
            pool.terminate()
        raise
    else:
        if pool is not None:
            pool.close()
    finally:
        progress.close()
        if pool is not None:  # never left behind: every worker has exited when the stage returns
            pool.join()

    objects, _ = parts.read([p[0] for p in paths], "objects")
    tiles, metas = parts.read([p[1] for p in paths], "tiles")
    skipped_objects = [s for meta in metas for s in meta["skipped_objects"]]
    skipped_images = [meta["skipped_image"] for meta in metas if meta["skipped_image"]]
    not_tiled = [t for meta in metas for t in meta["not_tiled"]]
    summary = {
        "dataset": dataset, "split": split, "shard": shard, "images": len(ids),
        "images_reused": len(jobs) - len(todo), "tiles": tiles.num_rows,
        "tiles_referencing_source": sum(Path(t).is_absolute() for t in tiles.column("tile_path").to_pylist()),
        "objects": objects.num_rows,
        "objects_per_class": dict(sorted(Counter(objects.column("class_name").to_pylist()).items())),
        "skipped_objects": len(skipped_objects), "skipped_images": len(skipped_images),
        "labels_without_image": len(orphans),
        "skipped": {"objects": skipped_objects, "images": skipped_images, "labels_without_image": orphans},
        "objects_in_no_tile": len(not_tiled), "not_tiled": not_tiled,
        "params": params, "code_version": code_version(),
    }
    meta = {"params": params, "code_version": code_version()}
    write_artefact(objects, out_dir / "objects.parquet", "objects", meta)
    write_artefact(tiles, out_dir / "tiles.parquet", "tiles",
                   {**meta, "images_digest": _images_digest(tiles, metas, out_dir)})
    write_json(out_dir / "summary.json", summary)
    log.info("tile %s/%s shard %d: %d images -> %d tiles, %d objects -> %s", dataset, split, shard,
             len(ids), tiles.num_rows, objects.num_rows, out_dir)
    if not_tiled:
        log.info("%d object(s) inside their image are in no tile (IoF below %s in every window); listed in %s",
                 len(not_tiled), tiling.iof_threshold, out_dir / "summary.json")
    if skipped_objects or skipped_images:
        log.warning("skipped %d bad object(s) and %d image(s) (on_bad_object: skip); listed in %s",
                    len(skipped_objects), len(skipped_images), out_dir / "summary.json")
    return summary
