"""Weight-free oriented proposals: OpenCV graph-based segmentation (Felzenszwalb & Huttenlocher).

The tile is resized (longest side ``resize``; a size above the tile's upsamples, so that small
objects span enough working pixels), segmented with
``cv2.ximgproc.segmentation.createGraphSegmentation(sigma, k, min_size)`` once per scale ``k``
(several values diversify as selective search does), and every segment goes through the same
mask -> box path as SAM (largest external contour -> minimum-area rectangle -> le90; with
``grouping`` the convex hull of the region, which is the same rectangle), then back to tile pixels.

``grouping`` adds selective search's hierarchical grouping (Uijlings et al. 2013) on top of each
segmentation: adjacent regions are merged greedily by colour-histogram, size and fill similarity,
and every merged region is a proposal too. Objects made of several segments (a car's body and its
windows, a plane's wings and fuselage) then appear as one region.

Filters: regions smaller than ``min_area`` tile pixels, larger than ``max_area_fraction`` of the tile
(background, padding) or with an oriented box longer than ``max_aspect`` times its width (roads,
lines) are dropped; ``nms_iou < 1`` removes near-duplicates (rotated NMS, the same region found at
several scales or levels of the hierarchy).

Score: ``fill``: the **fill ratio** ``mask area / box area`` in ``(0, 1]`` (compact, rectangle-like
regions score high, ragged leftovers of background texture low); ``fill_log_area``: fill ratio x
``ln(mask area)`` in tile pixels, which stops tiny compact noise specks from outranking objects.
"""
from __future__ import annotations

import heapq
from collections.abc import Sequence

import cv2
import numpy as np
from scipy.ndimage import find_objects

from mutdet.boxes import points_to_le90, rotated_nms
from mutdet.proposals import ProposalSet, boxes_to_tile, check_image, mask_box, resize_longest_side

SCORES = ("fill", "fill_log_area")
HIST_BINS = 25  # per colour channel, as selective search


def _region_hulls(labels: np.ndarray) -> list[np.ndarray]:
    """Convex hull ``(K, 2)`` int32 (x, y) of every label's largest external contour, index = label."""
    hulls = []
    for label, (rows, cols) in enumerate(find_objects(labels + 1)):
        crop = (labels[rows, cols] == label).astype(np.uint8)
        contours, _ = cv2.findContours(crop, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        largest = max(contours, key=lambda c: (cv2.contourArea(c), len(c))).reshape(-1, 2)
        hulls.append(cv2.convexHull(largest + np.array([cols.start, rows.start], np.int32)).reshape(-1, 2))
    return hulls


def hierarchical_grouping(image: np.ndarray, labels: np.ndarray, max_size: float) -> tuple[np.ndarray, list[np.ndarray]]:
    """Selective search's greedy grouping of the regions of ``labels``.

    Args:
        image: ``(H, W, 3)`` uint8, the segmented image.
        labels: ``(H, W)`` int32 region labels ``0..L-1``.
        max_size: regions are not merged beyond this many pixels (larger ones are never proposals).
    Returns:
        ``(sizes, hulls)``: pixel count ``(R,)`` and convex hull ``(K, 2)`` of every region, the ``L``
        initial ones first, then each merged region in merge order.
    """
    height, width = labels.shape
    n = int(labels.max()) + 1
    flat = labels.ravel()
    size = np.bincount(flat, minlength=n).astype(np.float64)
    quantised = image.reshape(-1, 3).astype(np.int64) * HIST_BINS // 256  # (P, 3)
    hist = np.concatenate([np.bincount(flat * HIST_BINS + quantised[:, c], minlength=n * HIST_BINS)
                           .reshape(n, HIST_BINS) for c in range(3)], axis=1) / (3 * size[:, None])  # (L, 75), rows sum to 1
    ys, xs = np.divmod(np.arange(flat.size), width)
    bbox = np.empty((n, 4))  # x0, y0, x1, y1 (inclusive)
    for column, (values, reduce) in enumerate(((xs, np.minimum), (ys, np.minimum), (xs, np.maximum), (ys, np.maximum))):
        out = np.full(n, width + height if reduce is np.minimum else -1, np.int64)
        reduce.at(out, flat, values)
        bbox[:, column] = out
    hulls = _region_hulls(labels)
    a = np.concatenate([labels[:, :-1].ravel(), labels[:-1, :].ravel()])
    b = np.concatenate([labels[:, 1:].ravel(), labels[1:, :].ravel()])
    differ = a != b
    pairs = np.unique(np.stack([np.minimum(a[differ], b[differ]), np.maximum(a[differ], b[differ])], axis=1), axis=0)
    total = float(height * width)
    sizes, hists, boxes = list(size), list(hist), list(bbox)
    neighbours = [set() for _ in range(n)]
    for i, j in pairs.tolist():
        neighbours[i].add(j)
        neighbours[j].add(i)

    def similarity(i: int, j: int) -> float:  # colour + size + fill, each in [0, 1]
        bi, bj = boxes[i], boxes[j]
        box_area = (max(bi[2], bj[2]) - min(bi[0], bj[0]) + 1) * (max(bi[3], bj[3]) - min(bi[1], bj[1]) + 1)
        return (np.minimum(hists[i], hists[j]).sum() + 1 - (sizes[i] + sizes[j]) / total
                + 1 - (box_area - sizes[i] - sizes[j]) / total)

    heap = [(-similarity(i, j), i, j) for i, j in pairs.tolist() if sizes[i] + sizes[j] <= max_size]
    heapq.heapify(heap)
    alive = [True] * n
    while heap:
        _, i, j = heapq.heappop(heap)
        if not (alive[i] and alive[j]):
            continue
        new = len(sizes)
        alive[i] = alive[j] = False
        alive.append(True)
        sizes.append(sizes[i] + sizes[j])
        hists.append((hists[i] * sizes[i] + hists[j] * sizes[j]) / sizes[new])
        bi, bj = boxes[i], boxes[j]
        boxes.append(np.array([min(bi[0], bj[0]), min(bi[1], bj[1]), max(bi[2], bj[2]), max(bi[3], bj[3])]))
        hulls.append(cv2.convexHull(np.concatenate([hulls[i], hulls[j]])).reshape(-1, 2))
        around = (neighbours[i] | neighbours[j]) - {i, j}
        neighbours.append(around)
        for t in around:
            neighbours[t].discard(i)
            neighbours[t].discard(j)
            neighbours[t].add(new)
            if sizes[t] + sizes[new] <= max_size:
                heapq.heappush(heap, (-similarity(t, new), t, new))
    return np.asarray(sizes), hulls


class GraphProposer:
    """Graph-based segments of one tile (optionally grouped hierarchically) as oriented le90 boxes.

    Args:
        sigma: Gaussian smoothing before segmentation (working pixels).
        k: scale parameter, or several (one segmentation each); larger values give larger segments.
        min_size: minimum segment size in working pixels (OpenCV merges smaller ones).
        resize: the tile's longest side is resized to this many pixels before segmenting.
        min_area: drop segments smaller than this many tile pixels.
        max_area_fraction: drop segments covering more than this fraction of the tile.
        max_per_tile: keep at most this many proposals, best score first.
        grouping: add selective search's hierarchical grouping of each segmentation's regions.
        max_aspect: drop boxes with ``w > max_aspect * h`` (``None``: no limit).
        nms_iou: rotated NMS among the proposals at this IoU (``>= 1``: none).
        score: ``fill`` or ``fill_log_area`` (see the module docstring).
    """

    def __init__(self, *, sigma: float = 0.8, k: float | Sequence[float] = 300, min_size: int = 50,
                 resize: int = 512, min_area: float = 16, max_area_fraction: float = 0.25, max_per_tile: int = 1000,
                 grouping: bool = False, max_aspect: float | None = None, nms_iou: float = 1.0,
                 score: str = "fill"):
        if score not in SCORES:
            raise ValueError(f"GraphProposer: score must be one of {SCORES}, got {score!r}")
        self.sigma = sigma
        self.ks = tuple(float(v) for v in (k if isinstance(k, (list, tuple)) else [k]))
        if not self.ks:
            raise ValueError("GraphProposer: k must name at least one scale")
        self.k = k
        self.min_size = min_size
        self.resize = resize
        self.min_area = min_area
        self.max_area_fraction = max_area_fraction
        self.max_per_tile = max_per_tile
        self.grouping = grouping
        self.max_aspect = max_aspect
        self.nms_iou = nms_iou
        self.score = score

    def segment(self, image_bgr: np.ndarray, k: float | None = None) -> tuple[np.ndarray, float, float]:
        """Segment labels ``(H', W')`` int32 of the resized tile at scale ``k`` (default: the first),
        plus the scale back ``(fx, fy)``."""
        small, fx, fy = resize_longest_side(image_bgr, self.resize)
        return self._segment(small, self.ks[0] if k is None else k), fx, fy

    def _segment(self, small: np.ndarray, k: float) -> np.ndarray:
        segmenter = cv2.ximgproc.segmentation.createGraphSegmentation(self.sigma, float(k), self.min_size)
        return segmenter.processImage(small)

    def _regions(self, small: np.ndarray, labels: np.ndarray, max_pixels: float, min_pixels: float):
        """Boxes ``(M, 5)`` (working pixels) and pixel counts ``(M,)`` of the kept regions of one segmentation."""
        if self.grouping:
            counts, hulls = hierarchical_grouping(small, labels, max_pixels)
            keep = np.flatnonzero((counts >= min_pixels) & (counts <= max_pixels))
            boxes = np.reshape([points_to_le90(hulls[r]) for r in keep], (-1, 5))
            boxes[:, 2:4] += 1.0  # pixels covered, as mask_box
            return boxes, counts[keep]
        counts = np.bincount(labels.ravel()).astype(np.float64)  # (L,) working pixels per segment
        keep = np.flatnonzero((counts >= min_pixels) & (counts <= max_pixels))
        slices = find_objects(labels + 1)  # (L,) bounding-box slices, label l at index l
        boxes = []
        for label in keep:
            rows, cols = slices[label]
            boxes.append(mask_box(labels[rows, cols] == label, (cols.start, rows.start)))  # le90, working pixels
        return np.reshape(boxes, (-1, 5)), counts[keep]

    def __call__(self, image_bgr: np.ndarray) -> ProposalSet:
        """Propose on one tile ``(H, W, 3)`` BGR uint8 -> :class:`ProposalSet` (tile pixels)."""
        height, width = check_image(image_bgr)
        small, fx, fy = resize_longest_side(image_bgr, self.resize)
        pixel_area = fx * fy  # tile pixels per working pixel
        min_pixels = self.min_area / pixel_area
        max_pixels = self.max_area_fraction * height * width / pixel_area
        all_boxes, all_fill, all_area = [], [], []
        for k in self.ks:
            boxes, counts = self._regions(small, self._segment(small, k), max_pixels, min_pixels)
            all_fill.append(np.minimum(1.0, counts / np.maximum(boxes[:, 2] * boxes[:, 3], 1e-9)))
            all_boxes.append(boxes_to_tile(boxes, fx, fy))
            all_area.append(counts * pixel_area)
        boxes, fill, area = (np.concatenate(v) for v in (all_boxes, all_fill, all_area))
        if self.max_aspect is not None:
            ok = boxes[:, 2] <= self.max_aspect * boxes[:, 3]
            boxes, fill, area = boxes[ok], fill[ok], area[ok]
        score = fill if self.score == "fill" else fill * np.log(np.maximum(area, 1.0))
        if self.nms_iou < 1 and len(boxes):
            keep = rotated_nms(boxes, score, self.nms_iou)
            boxes, score, area = boxes[keep], score[keep], area[keep]
        return ProposalSet.from_lists(boxes, score, area).ranked(self.max_per_tile)
