"""DETReg's proposals: OpenCV (contrib ``ximgproc``) selective search on a downsized tile.

As DETReg (``datasets/selfdet.py``): the tile is resized to ``resize`` pixels a side (128), selective
search runs in fast mode, and the first ``max_boxes`` (30) boxes of OpenCV's output order are kept,
scaled back to tile pixels. Two deliberate differences, both written down here:

* the tile goes in as BGR, the channel order OpenCV's colour-space strategies assume (DETReg passes
  a PIL RGB array);
* OpenCV ranks the hierarchy's regions with C ``rand()``, so the output order depends on whatever
  drew from it before; we reseed it with ``seed`` before every tile, so a tile's proposals are
  reproducible and independent of the tiles processed before it.
"""
from __future__ import annotations

import ctypes

import cv2
import numpy as np

from mutdet.boxes import normalize_le90
from mutdet.proposals import ProposalSet, boxes_to_tile, check_image, resize_longest_side

MODES = ("fast", "quality", "single")

_LIBC = ctypes.CDLL(None)  # the C library of this process, which OpenCV's rand() draws from


class SelectiveSearchProposer:
    """Selective search boxes of one tile, axis-aligned le90 in tile pixels.

    Args:
        mode: ``fast`` | ``quality`` | ``single`` (OpenCV's strategy switches).
        resize: the tile's longest side is resized to this many pixels before the search.
        max_boxes: keep the first this many boxes of OpenCV's output.
        max_per_tile: cap on the returned proposals (applied after ``max_boxes``).
        seed: seed of C ``rand()`` before each tile (see the module docstring).

    Score: a rank score ``(max_boxes - rank) / max_boxes`` in ``(0, 1]``, decreasing with the position
    in OpenCV's output. ``area`` is the box area; ``predicted_iou`` and ``stability_score`` are NaN.
    """

    def __init__(self, *, mode: str = "fast", resize: int = 128, max_boxes: int = 30, max_per_tile: int = 1000,
                 seed: int = 0):
        if mode not in MODES:
            raise ValueError(f"proposals.selective_search.mode: {mode!r} is not one of {MODES}")
        self.mode = mode
        self.resize = resize
        self.max_boxes = max_boxes
        self.max_per_tile = max_per_tile
        self.seed = seed

    def __call__(self, image_bgr: np.ndarray) -> ProposalSet:
        """Propose on one tile ``(H, W, 3)`` BGR uint8 -> :class:`ProposalSet` (tile pixels)."""
        check_image(image_bgr)
        small, fx, fy = resize_longest_side(image_bgr, self.resize)
        search = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
        search.setBaseImage(small)
        {"fast": search.switchToSelectiveSearchFast, "quality": search.switchToSelectiveSearchQuality,
         "single": search.switchToSingleStrategy}[self.mode]()
        _LIBC.srand(self.seed)
        rects = search.process()[: self.max_boxes].astype(np.float64).reshape(-1, 4)  # (N, 4) x, y, w, h
        # A rect covers working pixels x .. x + w - 1: centre x + (w - 1) / 2 with integer pixel centres.
        x, y, w, h = rects.T
        work = normalize_le90(np.stack([x + (w - 1) / 2, y + (h - 1) / 2, w, h, np.zeros_like(x)], axis=-1))
        boxes = boxes_to_tile(work, fx, fy)
        rank = np.arange(len(boxes))
        score = (self.max_boxes - rank) / self.max_boxes
        area = boxes[:, 2] * boxes[:, 3]
        return ProposalSet.from_lists(boxes, score, area).ranked(self.max_per_tile)
