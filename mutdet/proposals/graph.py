"""Weight-free oriented proposals: OpenCV graph-based segmentation (Felzenszwalb & Huttenlocher).

The tile is resized (longest side ``resize``), segmented with
``cv2.ximgproc.segmentation.createGraphSegmentation(sigma, k, min_size)``, and every segment goes
through the same mask -> box path as SAM (:func:`mutdet.proposals.mask_box`: largest external
contour -> minimum-area rectangle -> le90), then back to tile pixels. Segments smaller than
``min_area`` tile pixels or larger than ``max_area_fraction`` of the tile (background, padding) are
dropped.

Score: the **fill ratio** ``mask area / box area`` in ``(0, 1]``: how well the segment fills its
oriented rectangle. Compact, rectangle-like regions (vehicles, roofs, tanks) score high; the ragged
leftovers of background texture score low.
"""
from __future__ import annotations

import cv2
import numpy as np
from scipy.ndimage import find_objects

from mutdet.proposals import ProposalSet, boxes_to_tile, check_image, mask_box, resize_longest_side


class GraphProposer:
    """Graph-based segments of one tile as oriented le90 boxes in tile pixels.

    Args:
        sigma: Gaussian smoothing before segmentation (working pixels).
        k: scale parameter; larger values give larger segments.
        min_size: minimum segment size in working pixels (OpenCV merges smaller ones).
        resize: the tile's longest side is resized to this many pixels before segmenting.
        min_area: drop segments smaller than this many tile pixels.
        max_area_fraction: drop segments covering more than this fraction of the tile.
        max_per_tile: keep at most this many proposals, best score first.
    """

    def __init__(self, *, sigma: float = 0.8, k: float = 300, min_size: int = 50, resize: int = 512,
                 min_area: float = 16, max_area_fraction: float = 0.25, max_per_tile: int = 1000):
        self.sigma = sigma
        self.k = k
        self.min_size = min_size
        self.resize = resize
        self.min_area = min_area
        self.max_area_fraction = max_area_fraction
        self.max_per_tile = max_per_tile

    def segment(self, image_bgr: np.ndarray) -> tuple[np.ndarray, float, float]:
        """Segment labels ``(H', W')`` int32 of the resized tile, plus the scale back ``(fx, fy)``."""
        small, fx, fy = resize_longest_side(image_bgr, self.resize)
        segmenter = cv2.ximgproc.segmentation.createGraphSegmentation(self.sigma, self.k, self.min_size)
        return segmenter.processImage(small), fx, fy

    def __call__(self, image_bgr: np.ndarray) -> ProposalSet:
        """Propose on one tile ``(H, W, 3)`` BGR uint8 -> :class:`ProposalSet` (tile pixels)."""
        height, width = check_image(image_bgr)
        labels, fx, fy = self.segment(image_bgr)
        pixel_area = fx * fy  # tile pixels per working pixel
        counts = np.bincount(labels.ravel())  # (L,) working pixels per segment
        area = counts * pixel_area
        keep = np.flatnonzero((area >= self.min_area) & (area <= self.max_area_fraction * height * width))
        slices = find_objects(labels + 1)  # (L,) bounding-box slices, label l at index l
        boxes, fill, areas = [], [], []
        for label in keep:
            rows, cols = slices[label]
            crop = labels[rows, cols] == label  # (h, w) bool
            box = mask_box(crop, (cols.start, rows.start))  # le90, working pixels
            boxes.append(box)
            fill.append(min(1.0, counts[label] / (box[2] * box[3])))
            areas.append(area[label])
        proposals = ProposalSet.from_lists(boxes_to_tile(np.reshape(boxes, (-1, 5)), fx, fy), fill, areas)
        return proposals.ranked(self.max_per_tile)
