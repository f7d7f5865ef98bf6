"""Oriented boxes drawn on images: the one drawing function of the detection grid and ``mutdet detect``'s previews."""
from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from mutdet.boxes import le90_to_polygon

__all__ = ["class_colour", "draw_boxes"]


def class_colour(name: str, classes: Sequence[str]) -> tuple[int, int, int]:
    """BGR colour of class ``name``: a fixed hue per position in ``classes`` (one shared colour for
    names not in ``classes``)."""
    k = list(classes).index(name) if name in classes else len(classes)
    hue = int(179 * ((k * 0.618034) % 1.0))  # golden-ratio steps: neighbouring classes far apart in hue
    bgr = cv2.cvtColor(np.uint8([[[hue, 220, 255]]]), cv2.COLOR_HSV2BGR)[0, 0]
    return int(bgr[0]), int(bgr[1]), int(bgr[2])


def draw_boxes(image: np.ndarray, boxes, names: Sequence[str], classes: Sequence[str], *, scores=None,
               captions: bool = True, thickness: int = 2, thin=None, scale: float = 1.0) -> np.ndarray:
    """A copy of the BGR ``image`` with oriented boxes drawn in their class colours.

    Args:
        boxes: ``(N, 5)`` le90 ``(cx, cy, w, h, theta)``; multiplied by ``scale`` to give ``image`` pixels
            (e.g. tile pixels drawn on a resized tile).
        names: class name of each box; its colour is :func:`class_colour` of ``classes``.
        scores: ``(N,)`` scores, written after the class name in the captions (None: names only).
        captions: write ``name [score]`` above each box.
        thickness: line width in pixels (captions scale with it); boxes with ``thin[k]`` true are drawn 1 pixel wide.
    """
    canvas = image.copy()
    boxes = np.asarray(boxes, np.float64).reshape(-1, 5)
    if len(names) != len(boxes) or (scores is not None and len(scores) != len(boxes)):
        raise ValueError(f"draw_boxes: {len(boxes)} boxes, {len(names)} names"
                         + ("" if scores is None else f", {len(scores)} scores"))
    polys = (le90_to_polygon(boxes).reshape(-1, 4, 2) * scale).round().astype(np.int32)
    for k, (poly, name) in enumerate(zip(polys, names)):
        colour = class_colour(str(name), classes)
        width = 1 if thin is not None and thin[k] else thickness
        cv2.polylines(canvas, [poly], True, colour, width, cv2.LINE_AA)
        if captions:
            text = str(name) if scores is None else f"{name} {float(scores[k]):.2f}"
            x, y = int(poly[:, 0].min()), int(poly[:, 1].min())
            cv2.putText(canvas, text, (x, max(y - 3, 10)), cv2.FONT_HERSHEY_SIMPLEX, 0.4 * thickness, colour,
                        thickness, cv2.LINE_AA)
    return canvas
