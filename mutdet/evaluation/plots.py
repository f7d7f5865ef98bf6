"""Precision-recall plot of an evaluation, one curve per class, drawn with OpenCV.

The figure is drawn straight into a pixel canvas (OpenCV lines and Hershey text, anti-aliased) rather
than through matplotlib: importing and laying out matplotlib costs more than the rest of an evaluation
of a DOTA-val-sized split. Layout: the axes (recall 0-1, precision 0-1.02, grid every 0.2) on the
left, the legend (one line per class, ``name (AP in percent)``, ``n/a`` for a class without ground
truth) on the right, the title above. Colours are matplotlib's ``tab20`` palette in class order;
classes after the 20th repeat it with dashed lines.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from mutdet.io.atomic import atomic_path

__all__ = ["plot_pr_curves"]

# matplotlib's "tab20" colours (RGB), in its order.
TAB20 = ("1f77b4", "aec7e8", "ff7f0e", "ffbb78", "2ca02c", "98df8a", "d62728", "ff9896", "9467bd", "c5b0d5",
         "8c564b", "c49c94", "e377c2", "f7b6d2", "7f7f7f", "c7c7c7", "bcbd22", "dbdb8d", "17becf", "9edae5")

# Canvas layout in pixels: axes box, legend column, text.
_WIDTH, _HEIGHT = 1000, 600
_LEFT, _RIGHT, _TOP, _BOTTOM = 70, 700, 40, 540  # axes box: x from _LEFT to _RIGHT, y from _TOP to _BOTTOM
_Y_MAX = 1.02
_FONT = cv2.FONT_HERSHEY_SIMPLEX
_DASH = 8  # dash and gap length of the dashed curves, pixels


def _bgr(hex_rgb: str) -> tuple[int, int, int]:
    r, g, b = (int(hex_rgb[i:i + 2], 16) for i in (0, 2, 4))
    return b, g, r


def _to_pixels(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Data coordinates -> pixel coordinates ``(K, 2)`` int32 of the axes box."""
    px = _LEFT + np.clip(x, 0.0, 1.0) * (_RIGHT - _LEFT)
    py = _BOTTOM - np.clip(y, 0.0, _Y_MAX) / _Y_MAX * (_BOTTOM - _TOP)
    return np.rint(np.stack([px, py], axis=1)).astype(np.int32)


def _step_pixels(recall: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """The ``where="post"`` step curve through the points, as pixel vertices without repeats."""
    r = np.asarray(recall, dtype=np.float64)
    p = np.asarray(precision, dtype=np.float64)
    if len(r) == 0:
        return np.zeros((0, 2), np.int32)
    # (r0, p0), (r1, p0), (r1, p1), (r2, p1), ...
    xs = np.repeat(r, 2)[1:]
    ys = np.repeat(p, 2)[:-1]
    pts = _to_pixels(np.r_[r[0], xs], np.r_[p[0], ys])
    keep = np.r_[True, np.any(pts[1:] != pts[:-1], axis=1)]
    return pts[keep]


def _draw_polyline(img: np.ndarray, pts: np.ndarray, colour, dashed: bool) -> None:
    if len(pts) < 2:
        if len(pts) == 1:
            cv2.circle(img, tuple(int(v) for v in pts[0]), 1, colour, -1, cv2.LINE_AA)
        return
    if not dashed:
        cv2.polylines(img, [pts.reshape(-1, 1, 2)], False, colour, 2, cv2.LINE_AA)
        return
    # Dashes: keep the parts of the curve whose running length falls in an "on" interval.
    seg = np.diff(pts.astype(np.float64), axis=0)
    length = np.r_[0.0, np.cumsum(np.hypot(seg[:, 0], seg[:, 1]))]
    dense = np.arange(0.0, length[-1], 1.0)
    xy = np.stack([np.interp(dense, length, pts[:, 0]), np.interp(dense, length, pts[:, 1])], axis=1)
    on = (dense // _DASH) % 2 == 0
    starts = np.flatnonzero(on & ~np.r_[False, on[:-1]])
    ends = np.flatnonzero(on & ~np.r_[on[1:], False])
    for a, b in zip(starts, ends):
        piece = np.rint(xy[a:b + 1]).astype(np.int32)
        cv2.polylines(img, [piece.reshape(-1, 1, 2)], False, colour, 2, cv2.LINE_AA)


def _text(img, text: str, org, scale: float = 0.45, colour=(0, 0, 0), thickness: int = 1, anchor: str = "left"):
    (w, h), _ = cv2.getTextSize(text, _FONT, scale, thickness)
    x, y = org
    if anchor == "centre":
        x -= w // 2
    elif anchor == "right":
        x -= w
    cv2.putText(img, text, (int(x), int(y + h // 2)), _FONT, scale, colour, thickness, cv2.LINE_AA)


def plot_pr_curves(result: dict, path: str | Path, key: str = "AP50", title: str | None = None) -> Path:
    """Write a PNG of the precision-recall curves at one IoU threshold (layout: module docstring).

    Args:
        result: the dict returned by :func:`mutdet.evaluation.evaluate_detections`.
        path: PNG file, written atomically.
        key: which threshold's curves (``"AP50"``, ``"AP75"``, ...); the legend gives each class's AP.
        title: figure title; default ``"<key>: mean <value>"``.
    Returns:
        ``path``. Classes without ground truth have no curve and are listed as ``n/a`` in the legend.
    """
    if key not in result["mean"]:
        raise KeyError(f"plot_pr_curves: no {key!r} in the evaluation (have "
                       f"{[k for k in result['mean'] if k.startswith('AP')]})")
    img = np.full((_HEIGHT, _WIDTH, 3), 255, np.uint8)
    grid, axis = (225, 225, 225), (0, 0, 0)
    for v in np.linspace(0.0, 1.0, 6):
        x, y = _to_pixels(np.array([v]), np.array([v]))[0]
        cv2.line(img, (int(x), _TOP), (int(x), _BOTTOM), grid, 1)
        cv2.line(img, (_LEFT, int(y)), (_RIGHT, int(y)), grid, 1)
        _text(img, f"{v:.1f}", (x, _BOTTOM + 14), anchor="centre")
        _text(img, f"{v:.1f}", (_LEFT - 6, y), anchor="right")
    cv2.rectangle(img, (_LEFT, _TOP), (_RIGHT, _BOTTOM), axis, 1)
    _text(img, "recall", ((_LEFT + _RIGHT) // 2, _BOTTOM + 40), 0.55, anchor="centre")
    label = np.full((30, 120, 3), 255, np.uint8)
    _text(label, "precision", (60, 15), 0.55, anchor="centre")
    rotated = cv2.rotate(label, cv2.ROTATE_90_COUNTERCLOCKWISE)
    y0 = (_TOP + _BOTTOM) // 2 - rotated.shape[0] // 2
    img[y0:y0 + rotated.shape[0], 5:5 + rotated.shape[1]] = np.minimum(img[y0:y0 + rotated.shape[0],
                                                                            5:5 + rotated.shape[1]], rotated)
    mean = result["mean"][key]
    _text(img, title or f"{key}: mean {'n/a' if mean is None else f'{100 * mean:.1f}'}",
          ((_LEFT + _RIGHT) // 2, _TOP // 2), 0.6, anchor="centre")

    entries = list(result["classes"].items())
    step = min(22, (_HEIGHT - 2 * _TOP) // max(1, len(entries) + 1))
    legend_x, legend_y = _RIGHT + 20, max(_TOP, (_HEIGHT - step * (len(entries) + 1)) // 2)
    _text(img, f"class ({key})", (legend_x, legend_y), 0.5)
    for k, (name, entry) in enumerate(entries):
        colour, dashed = _bgr(TAB20[k % len(TAB20)]), k >= len(TAB20)
        y = legend_y + step * (k + 1)
        curve = result["pr_curves"].get(name, {}).get(key)
        if curve is None:
            _text(img, f"{name} (n/a)", (legend_x + 40, y), colour=(90, 90, 90))
            continue
        _draw_polyline(img, _step_pixels(curve["recall"], curve["precision"]), colour, dashed)
        _draw_polyline(img, np.array([[legend_x, y], [legend_x + 30, y]], np.int32), colour, dashed)
        _text(img, f"{name} ({100 * entry[key]:.1f})", (legend_x + 40, y))
    ok, png = cv2.imencode(".png", img)
    if not ok:  # pragma: no cover - OpenCV always encodes a uint8 image
        raise RuntimeError(f"plot_pr_curves: PNG encoding failed for {path}")
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(png.tobytes())
    return path
