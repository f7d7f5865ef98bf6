"""Stage ``merge``: tile detections -> full-image detections (rotated NMS per image and class).

Input: a detections artefact whose ``id`` column holds tile ids (frame ``tile``) and the ``tiles``
artefacts that describe those tiles. Output: a detections artefact in frame ``image`` (``id`` = image
id, boxes in source-image pixels), ready for the evaluator or a DOTA Task1 submission.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from mutdet.boxes import le90_to_polygon
from mutdet.io.artefacts import ArtefactError, read_artefact, write_artefact
from mutdet.io.task1 import write_task1
from mutdet.stages.common import code_version, log
from mutdet.tiling import merge_detections, tile_boxes_to_image

DEFAULT_MERGE_IOU = 0.1


def merge_table(detections: pa.Table, tiles: pa.Table, iou_threshold: float = DEFAULT_MERGE_IOU) -> pa.Table:
    """Detections (frame tile) + tiles table -> detections (frame image), NMS-merged.

    Columns are handled whole (tile ids, unique in a tiles table, matched with
    ``pyarrow.compute.index_in``; image ids coded once per tile), so the cost is the rotated NMS's.
    """
    import pyarrow.compute as pc

    found = pc.index_in(detections.column("id"), value_set=tiles.column("tile_id"))
    if found.null_count:
        missing = sorted(set(pc.filter(detections.column("id"), pc.is_null(found)).to_pylist()))
        raise ArtefactError(f"{len(missing)} detection tile id(s) not in the tiles table, e.g. {missing[:3]}")
    rows = found.to_numpy(zero_copy_only=False).astype(np.int64)
    _, image_code = np.unique(np.asarray(tiles.column("image_id").to_numpy(zero_copy_only=False), dtype=object),
                              return_inverse=True)
    x = tiles.column("x").to_numpy()[rows]
    y = tiles.column("y").to_numpy()[rows]
    rate = tiles.column("rate").to_numpy()[rows]
    boxes = np.stack([detections.column(c).to_numpy() for c in ("cx", "cy", "w", "h", "theta")], axis=1)
    boxes = tile_boxes_to_image(boxes.reshape(-1, 5), x, y, rate)
    scores = detections.column("score").to_numpy()
    class_ids = detections.column("class_id").to_numpy()
    keep = merge_detections(image_code.reshape(-1)[rows], boxes, scores, class_ids, iou_threshold)
    return pa.table({
        "id": tiles.column("image_id").take(pa.array(rows[keep])),
        "class_id": class_ids[keep], "class_name": detections.column("class_name").take(pa.array(keep)),
        "score": scores[keep],
        **{c: boxes[keep, k] for k, c in enumerate(("cx", "cy", "w", "h", "theta"))},
    })


def run(detections: str | Path, tiles: list[str | Path], out: str | Path,
        iou_threshold: float = DEFAULT_MERGE_IOU, task1_dir: str | Path | None = None,
        classes: list[str] | None = None) -> pa.Table:
    """Merge tile detections to ``out``; optionally also write DOTA Task1 files (one per class of
    ``classes``, default: the classes present) to ``task1_dir``."""
    dets = read_artefact(detections, "detections")
    tiles_table = read_artefact([Path(t) for t in tiles], "tiles")
    merged = merge_table(dets, tiles_table, iou_threshold)
    write_artefact(merged, out, "detections",
                   {"frame": "image", "merge_iou": iou_threshold, "source": str(detections),
                    "code_version": code_version()})
    if task1_dir is not None:
        names = merged.column("class_name").to_pylist()
        boxes = np.stack([merged.column(c).to_numpy() for c in ("cx", "cy", "w", "h", "theta")], axis=1)
        write_task1(task1_dir, merged.column("id").to_pylist(), names, merged.column("score").to_numpy(),
                    le90_to_polygon(boxes.reshape(-1, 5)), list(classes) if classes else sorted(set(names)))
    log.info("merge: %d tile detections -> %d image detections (rotated NMS IoU %.2f) -> %s",
             dets.num_rows, merged.num_rows, iou_threshold, out)
    return merged
