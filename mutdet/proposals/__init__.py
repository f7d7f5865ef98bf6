"""Class-agnostic oriented proposals: one tile in, ranked le90 boxes out (METHOD.md step 2).

Three proposers, each a small class called on one tile:

* :class:`mutdet.proposals.sam.SamProposer`: segment-anything's automatic mask generator (the paper's
  method; needs a checkpoint);
* :class:`mutdet.proposals.selective_search.SelectiveSearchProposer`: DETReg's OpenCV selective search
  (axis-aligned boxes, no weights);
* :class:`mutdet.proposals.graph.GraphProposer`: OpenCV graph-based segmentation through the same
  mask -> box path as SAM (oriented boxes, no weights).

Every proposer takes a tile as a BGR ``uint8`` array ``(H, W, 3)`` (what ``cv2.imread`` returns) and
returns a :class:`ProposalSet` in **tile pixels**, le90 (see :mod:`mutdet.boxes`: pixel centres at
integer coordinates, ``theta`` in ``[-pi/2, pi/2)``, ``w >= h``), best first. :func:`build_proposer`
is the only function here that reads the config.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np

from mutdet.boxes import le90_to_polygon, mask_to_le90, polygon_to_le90
from mutdet.config import ProposalsConfig

__all__ = ["ProposalSet", "Proposer", "build_proposer", "check_image", "mask_box", "resize_longest_side",
           "boxes_to_tile"]


@dataclass(frozen=True)
class ProposalSet:
    """The proposals of one tile, best first.

    Attributes:
        boxes: ``(N, 5)`` float64 le90 boxes in tile pixels.
        score: ``(N,)`` float32 ranking score, non-increasing (SAM: predicted IoU; selective search:
            rank score; graph: fill ratio, or fill ratio x log area).
        predicted_iou: ``(N,)`` float32 SAM's predicted mask IoU, NaN for the other methods.
        stability_score: ``(N,)`` float32 SAM's stability score, NaN for the other methods.
        area: ``(N,)`` float32 mask area in tile pixels (box area for box-only methods).
    """

    boxes: np.ndarray
    score: np.ndarray
    predicted_iou: np.ndarray
    stability_score: np.ndarray
    area: np.ndarray

    def __post_init__(self):
        n = len(self.boxes)
        assert self.boxes.shape == (n, 5), self.boxes.shape
        for name in ("score", "predicted_iou", "stability_score", "area"):
            assert getattr(self, name).shape == (n,), (name, getattr(self, name).shape, n)

    def __len__(self) -> int:
        return len(self.boxes)

    @classmethod
    def from_lists(cls, boxes, score, area, predicted_iou=None, stability_score=None) -> ProposalSet:
        """Build from per-proposal sequences (boxes ``(N, 5)``); missing SAM scores become NaN."""
        n = len(score)

        def column(values) -> np.ndarray:  # (N,) float32, NaN when absent
            return np.full(n, np.nan, np.float32) if values is None else np.asarray(values, np.float32).reshape(n)

        return cls(boxes=np.asarray(boxes, dtype=np.float64).reshape(n, 5), score=column(score),
                   predicted_iou=column(predicted_iou), stability_score=column(stability_score), area=column(area))

    def ranked(self, limit: int) -> ProposalSet:
        """The ``limit`` best proposals by decreasing score (ties keep their current order)."""
        order = np.argsort(-self.score, kind="stable")[:limit]
        return ProposalSet(self.boxes[order], self.score[order], self.predicted_iou[order],
                           self.stability_score[order], self.area[order])


Proposer = Callable[[np.ndarray], ProposalSet]


def check_image(image: np.ndarray) -> tuple[int, int]:
    """Check a tile is BGR ``uint8`` ``(H, W, 3)``; returns ``(H, W)``."""
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        got = (image.shape, image.dtype) if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"proposers take a BGR uint8 image of shape (H, W, 3), got {got}")
    return image.shape[0], image.shape[1]


def resize_longest_side(image: np.ndarray, side: int) -> tuple[np.ndarray, float, float]:
    """Resize ``image`` ``(H, W, C)`` so that its longest side is ``side`` pixels (aspect kept).

    Returns:
        ``(resized, fx, fy)`` where ``fx = W / W'`` and ``fy = H / H'`` map working pixels back to tile
        pixels (see :func:`boxes_to_tile`). For a square tile this is DETReg's ``side x side`` resize.
    """
    h, w = image.shape[:2]
    scale = side / max(h, w)
    new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    resized = cv2.resize(image, (new_w, new_h), interpolation=interpolation)
    return resized, w / new_w, h / new_h


def boxes_to_tile(boxes, fx: float, fy: float) -> np.ndarray:
    """le90 boxes ``(N, 5)`` in working pixels -> le90 ``(N, 5)`` in tile pixels.

    Working pixel ``i`` covers tile pixels ``[i * f, (i + 1) * f)``; with pixel centres at integer
    coordinates a working coordinate ``u`` maps to ``(u + 0.5) * f - 0.5``. The corners are mapped and
    the box rebuilt (exact for ``fx == fy``; the minimum-area rectangle of the parallelogram otherwise).
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 5)
    if len(boxes) == 0:
        return boxes.copy()
    polygons = le90_to_polygon(boxes)  # (N, 8)
    polygons[:, 0::2] = (polygons[:, 0::2] + 0.5) * fx - 0.5
    polygons[:, 1::2] = (polygons[:, 1::2] + 0.5) * fy - 0.5
    return polygon_to_le90(polygons)


def mask_box(mask: np.ndarray, origin: tuple[int, int] = (0, 0)) -> np.ndarray | None:
    """The mask -> box path shared by SAM and graph proposals.

    Args:
        mask: ``(h, w)`` binary mask, a window of a larger frame whose top-left pixel is ``origin``
            ``(x0, y0)`` of that frame (crop masks to their bounding box: contours are found faster).
    Returns:
        le90 ``(5,)`` of the mask's largest external contour's minimum-area rectangle, in the frame of
        ``origin``; ``None`` for an empty mask.
    """
    box = mask_to_le90(mask)
    if box is None:
        return None
    box[0] += origin[0]
    box[1] += origin[1]
    return box


def build_proposer(cfg: ProposalsConfig) -> Proposer:
    """The proposer of ``cfg.method`` with its parameters; SAM loads (and checks) its checkpoint here."""
    if cfg.method == "sam":
        from mutdet.proposals.sam import build_sam_proposer

        return build_sam_proposer(cfg.sam, max_per_tile=cfg.max_per_tile)
    if cfg.method == "selective_search":
        from mutdet.proposals.selective_search import SelectiveSearchProposer

        s = cfg.selective_search
        return SelectiveSearchProposer(mode=s.mode, resize=s.resize, max_boxes=s.max_boxes,
                                       max_per_tile=cfg.max_per_tile)
    if cfg.method == "graph":
        from mutdet.proposals.graph import GraphProposer

        g = cfg.graph
        return GraphProposer(sigma=g.sigma, k=g.k, min_size=g.min_size, resize=g.resize, min_area=g.min_area,
                             max_area_fraction=g.max_area_fraction, max_per_tile=cfg.max_per_tile,
                             grouping=g.grouping, max_aspect=g.max_aspect, nms_iou=g.nms_iou, score=g.score)
    raise ValueError(f"proposals.method: unknown method {cfg.method!r} (sam | selective_search | graph)")
