"""Stage ``detect``: a fine-tuned checkpoint + images of any size -> oriented detections.

Each image is tiled on the fly (:func:`mutdet.tiling.iter_tiles`, one decoded image at a time),
tiles go through the detector in batches (evaluation transform: resize to the checkpoint's
``input_size``, ImageNet normalisation), boxes are shifted back to image pixels and merged per image
and class with rotated NMS.

Outputs in ``out_dir``: ``detections.parquet`` (``detections``, frame ``image``), ``task1/``
(DOTA Task1 files, one per class of the checkpoint), ``previews/<image>.png`` (oriented boxes with
class name and score, detections with score >= ``preview_score``), ``config.json``.

Image ids (file stems) are checked against the rule for ids (:mod:`mutdet.io.datasets`) before any
work, and each image is verified when read (:func:`mutdet.io.images.read_image`: a truncated file is
an error naming it), so a bad input fails at once rather than in the Task1 writer at the end.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import torch

from mutdet.boxes import le90_to_polygon
from mutdet.data.datasets import collate
from mutdet.data.transforms import build_transforms
from mutdet.engine.device import resolve_device
from mutdet.engine.inference import detections_table, load_detector, predict_batch
from mutdet.io.artefacts import write_artefact
from mutdet.io.atomic import write_json
from mutdet.io.datasets import check_image_id
from mutdet.io.images import read_image
from mutdet.io.task1 import write_task1
from mutdet.models import PostProcess
from mutdet.report.draw import draw_boxes
from mutdet.stages.common import code_version, log
from mutdet.stages.merge import DEFAULT_MERGE_IOU
from mutdet.tiling import TilingParams, iter_tiles, merge_detections, tile_boxes_to_image

__all__ = ["run", "detect_image", "draw_detections", "list_images"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def list_images(inputs: Sequence[str | Path]) -> list[Path]:
    """Image files from files and folders (a folder: its images with a known extension, sorted).

    Raises:
        AnnotationError: naming the file, when a file stem breaks the rule for image ids.
    """
    paths = []
    for item in inputs:
        item = Path(item)
        if item.is_dir():
            paths += sorted(p for p in item.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        elif item.is_file():
            paths.append(item)
        else:
            raise FileNotFoundError(f"detect: no image or folder {item}")
    stems = [check_image_id(p.stem, p) for p in paths]
    if len(set(stems)) != len(stems):
        raise ValueError("detect: two input images share a file stem (the image id)")
    return paths


def _batches(tiles: Iterator, transform, batch_size: int) -> Iterator[tuple[list, tuple]]:
    batch, items = [], []
    for tile in tiles:
        image = torch.from_numpy(np.ascontiguousarray(tile.pixels[:, :, ::-1].transpose(2, 0, 1)))  # BGR -> RGB (3, H, W)
        items.append(transform(image, {"boxes": torch.zeros(0, 5), "tile_id": tile.tile_id}))
        batch.append(tile)
        if len(batch) == batch_size:
            yield batch, collate(items)
            batch, items = [], []
    if batch:
        yield batch, collate(items)


@torch.no_grad()
def detect_image(model, image: np.ndarray, image_id: str, *, tiling: TilingParams, input_size: int | None,
                 device: torch.device, batch_size: int = 2, num_select: int = 300, score_threshold: float = 0.05,
                 merge_iou: float = DEFAULT_MERGE_IOU) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Detect on one ``(H, W, 3)`` uint8 BGR image of any size.

    Returns:
        ``labels (D,)``, ``scores (D,)``, ``boxes (D, 5)`` le90 in image pixels, after rotated NMS.
    """
    post = PostProcess(angle_coder=model.angle_coder, num_select=num_select)
    transform = build_transforms(train=False, input_size=input_size)
    tiles = iter_tiles(image, image_id, np.zeros((0, 8)), np.zeros(0), tiling)
    labels, scores, boxes = [], [], []
    for batch, (images, mask, targets) in _batches(tiles, transform, batch_size):
        results = predict_batch(model, post, images, mask, targets, device, device.type == "cuda", score_threshold)
        for tile, (lab, sc, bx) in zip(batch, results):
            labels.append(lab), scores.append(sc)
            boxes.append(tile_boxes_to_image(bx, tile.x, tile.y, tile.rate))
    if not labels:
        return np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros((0, 5))
    labels, scores, boxes = np.concatenate(labels), np.concatenate(scores), np.concatenate(boxes).reshape(-1, 5)
    keep = merge_detections(np.full(len(labels), image_id, dtype=object).astype(str), boxes, scores, labels, merge_iou)
    return labels[keep], scores[keep], boxes[keep]


def draw_detections(image: np.ndarray, labels, scores, boxes, classes: Sequence[str],
                    min_score: float = 0.3) -> np.ndarray:
    """A copy of the BGR ``image`` with the oriented boxes (score >= ``min_score``) and ``class score``
    (:func:`mutdet.report.draw.draw_boxes`, lines about 1 pixel per 800 of the image's longer side)."""
    scores = np.asarray(scores, np.float64).reshape(-1)
    keep = scores >= min_score
    names = [classes[int(label)] for label in np.asarray(labels).reshape(-1)[keep]]
    return draw_boxes(image, np.asarray(boxes).reshape(-1, 5)[keep], names, classes, scores=scores[keep],
                      thickness=max(1, round(max(image.shape[:2]) / 800)))


def run(*, checkpoint: Path, images: Sequence[Path], out_dir: Path, tile_size: int = 1024, gap: int = 200,
        rates: Sequence[float] = (1.0,), device: str = "auto", batch_size: int = 2, num_select: int = 300,
        score_threshold: float = 0.05, merge_iou: float = DEFAULT_MERGE_IOU, previews: bool = True,
        preview_score: float = 0.3) -> pa.Table:
    """Detect on ``images`` (files or folders) with the detector of ``checkpoint``; see the module docstring.

    Args:
        tile_size, gap, rates: on-the-fly tiling (as the ``tile`` stage: windows of ``tile_size``,
            stride ``tile_size - gap``, per rescaling rate).
        num_select, score_threshold: per tile, before merging; merge_iou: rotated NMS IoU.
        previews, preview_score: write PNG previews with the detections scoring at least ``preview_score``.
    Returns:
        the merged detections table (frame image).
    """
    out_dir = Path(out_dir)
    torch_device = resolve_device(device, "detect.device")
    model, config = load_detector(checkpoint, torch_device)
    classes, input_size = list(config["classes"]), config.get("input_size")
    tiling = TilingParams(size=tile_size, gap=gap, rates=tuple(rates))
    paths = list_images(images)
    tables = []
    for path in paths:
        image = read_image(path)
        labels, scores, boxes = detect_image(model, image, path.stem, tiling=tiling, input_size=input_size,
                                             device=torch_device, batch_size=batch_size, num_select=num_select,
                                             score_threshold=score_threshold, merge_iou=merge_iou)
        tables.append(detections_table([path.stem] * len(labels), labels, scores, boxes, classes))
        if previews:
            preview = draw_detections(image, labels, scores, boxes, classes, preview_score)
            (out_dir / "previews").mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(out_dir / "previews" / f"{path.stem}.png"), preview)
        log.info("detect: %s: %d detections", path.name, len(labels))
    merged = pa.concat_tables(tables) if tables else detections_table([], [], [], np.zeros((0, 5)), classes)
    write_artefact(merged, out_dir / "detections.parquet", "detections",
                   {"frame": "image", "checkpoint": str(checkpoint), "code_version": code_version()})
    boxes = np.stack([merged.column(c).to_numpy() for c in ("cx", "cy", "w", "h", "theta")], 1).reshape(-1, 5)
    write_task1(out_dir / "task1", merged.column("id").to_pylist(), merged.column("class_name").to_pylist(),
                merged.column("score").to_numpy(), le90_to_polygon(boxes), classes)
    write_json(out_dir / "config.json", {"checkpoint": str(checkpoint), "images": [str(p) for p in paths],
                                         "tile_size": tile_size, "gap": gap, "rates": list(rates),
                                         "input_size": input_size, "num_select": num_select,
                                         "score_threshold": score_threshold, "merge_iou": merge_iou,
                                         "code_version": code_version()})
    return merged
