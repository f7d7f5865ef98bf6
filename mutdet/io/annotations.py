"""Ground-truth records shared by the dataset readers, and how bad objects are reported.

A reader turns one label file into :class:`ImageAnnotations`: polygons ``(N, 8)`` in full-image
pixels, class indices into the dataset's class list, and DOTA difficult flags. A malformed object
raises :class:`AnnotationError` naming the file and line, or, with ``on_bad_object="skip"``, is left
out and recorded in ``ImageAnnotations.skipped`` so the stage can count and report it.

Malformed objects: a non-finite coordinate, a degenerate polygon (collinear or coincident points), a
self-intersecting quadrilateral (corners not in order around the object) and, once the image size is
known (:func:`drop_outside`), an object entirely outside its image. The DOTA devkit accepts the last
two silently: it converts a self-intersecting quadrilateral to the minimum-area rectangle of its
points (a box that is not what the annotator drew) and its tiling drops an outside object while its
evaluation still counts it as ground truth that no detector can find.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import shapely

from mutdet.boxes import polygon_to_le90

# A polygon whose minimum-area rectangle is thinner than this (pixels) is degenerate: its points are
# (nearly) collinear or coincident, so it has no usable area or orientation.
MIN_SIDE = 0.1


class AnnotationError(ValueError):
    """Malformed annotation or image; the message starts with ``file:line:``."""

    def __init__(self, file: str | Path, line: int | None, reason: str):
        self.file, self.line, self.reason = str(file), line, reason
        where = f"{file}:{line}" if line is not None else str(file)
        super().__init__(f"{where}: {reason}")

    def __reduce__(self):  # keep file/line/reason across process pools
        return type(self), (self.file, self.line, self.reason)


@dataclass(frozen=True)
class SkippedObject:
    file: str
    line: int | None
    reason: str

    def to_dict(self) -> dict:
        return {"file": self.file, "line": self.line, "reason": self.reason}


@dataclass
class ImageAnnotations:
    """Objects of one image.

    Attributes:
        image_id: file stem shared by the image and its label file.
        polygons: ``(N, 8)`` float64, ``x1 y1 ... x4 y4`` in image pixels.
        labels: ``(N,)`` int64 indices into the dataset's class list.
        difficult: ``(N,)`` int8; 0 normal, 1 difficult (as annotated), 2 cut by tiling.
        skipped: objects left out under ``on_bad_object="skip"``.
        file: the label file, and lines: ``(N,)`` int64 line of each object in it (-1 when unknown),
            so that later checks (:func:`drop_outside`) can name them.
    """

    image_id: str
    polygons: np.ndarray
    labels: np.ndarray
    difficult: np.ndarray
    skipped: list[SkippedObject] = field(default_factory=list)
    file: str | None = None
    lines: np.ndarray | None = None

    def line(self, index: int) -> int | None:
        """Line of object ``index`` in :attr:`file`, or ``None`` when unknown."""
        if self.lines is None or self.lines[index] < 0:
            return None
        return int(self.lines[index])

    def __len__(self) -> int:
        return len(self.labels)


class ClassMap:
    """Case-insensitive class lookup with aliases (``class_aliases`` of the config)."""

    def __init__(self, classes: Iterable[str], aliases: Mapping[str, str] | None = None):
        self.classes = tuple(classes)
        self._index = {c.lower(): i for i, c in enumerate(self.classes)}
        for alias, target in (aliases or {}).items():
            self._index[alias.lower()] = self._index[target.lower()]

    def __call__(self, name: str) -> int | None:
        return self._index.get(name.strip().lower())


class _Collector:
    """Accumulates objects of one file and applies the bad-object policy.

    Polygons given to :meth:`add` are checked in batches (:func:`polygon_problems`, all pending polygons
    at once) when a bad line is reported, when :attr:`skipped` is read, and at :meth:`result`, so the
    first error raised and the skipped list are those of a line-by-line check, in file order.
    """

    def __init__(self, file: Path, on_bad_object: str):
        if on_bad_object not in ("error", "skip"):
            raise ValueError(f"on_bad_object must be 'error' or 'skip', got {on_bad_object!r}")
        self.file, self.policy = file, on_bad_object
        self.polygons: list[list[float]] = []
        self.labels: list[int] = []
        self.difficult: list[int] = []
        self.lines: list[int] = []
        self._skipped: list[SkippedObject] = []
        self._pending: list[tuple] = []  # (line, polygon, label, difficult) added, not yet checked

    @property
    def skipped(self) -> list[SkippedObject]:
        self._flush()
        return self._skipped

    def _flush(self) -> None:
        """Check the pending polygons, all at once, and accept or report each in order."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        for (line, polygon, label, difficult), reason in zip(pending, polygon_problems([p[1] for p in pending])):
            self.add_checked(line, polygon, label, difficult, reason)

    def bad(self, line: int | None, reason: str) -> None:
        self._flush()  # earlier lines first
        if self.policy == "error":
            raise AnnotationError(self.file, line, reason)
        self._skipped.append(SkippedObject(str(self.file), line, reason))

    def add(self, line: int | None, polygon: list[float], label: int, difficult: int) -> None:
        """An object whose quadrilateral ``polygon`` (8 values) is still to be checked (non-finite
        coordinate; minimum-area rectangle thinner than ``MIN_SIDE``; self-intersecting ring)."""
        if len(polygon) != 8:
            return self.bad(line, f"expected 8 coordinates (a quadrilateral), got {len(polygon)}: {polygon}")
        self._pending.append((line, polygon, label, difficult))

    def add_checked(self, line: int | None, polygon: list[float], label: int, difficult: int,
                    reason: str | None) -> None:
        """:meth:`add` with its polygon checks already made (``reason``: :func:`polygon_problems`'s entry)."""
        if reason is not None:
            return self.bad(line, reason)
        self.polygons.append(polygon)
        self.labels.append(label)
        self.difficult.append(difficult)
        self.lines.append(-1 if line is None else line)

    def result(self, image_id: str) -> ImageAnnotations:
        self._flush()
        return ImageAnnotations(
            image_id=image_id,
            polygons=np.asarray(self.polygons, dtype=np.float64).reshape(-1, 8),
            labels=np.asarray(self.labels, dtype=np.int64),
            difficult=np.asarray(self.difficult, dtype=np.int8),
            skipped=self._skipped,
            file=str(self.file),
            lines=np.asarray(self.lines, dtype=np.int64),
        )


# A quadrilateral is taken as strictly convex without asking GEOS when every turn of its ring has the same
# sign and a sine of at least this (relative to the two edges' lengths); float64 rounding of the cross
# products is ~1e-16 relative, so such a ring is simple and valid for any exact predicate.
CONVEX_SINE = 1e-9


_NEXT = [1, 2, 3, 0]  # corner i -> corner i + 1 around a quadrilateral
_TRIANGLES = ([0, 0, 0, 1], [1, 1, 2, 2], [2, 3, 3, 3])  # the four triangles of three corners
_PAIRS = ([0, 0, 0, 1, 1, 2], [1, 2, 3, 2, 3, 3])  # the six pairs of corners


def strictly_convex(pts: np.ndarray) -> np.ndarray:
    """``(N,)``: quads ``(N, 4, 2)`` whose four turns all have the same sign, each with
    ``|e_i x e_(i+1)| > CONVEX_SINE * |e_i| |e_(i+1)|`` (distinct corners, none collinear: a simple ring)."""
    e = pts[:, _NEXT] - pts  # e_i = p_(i+1) - p_i
    en = e[:, _NEXT]
    cross = e[..., 0] * en[..., 1] - e[..., 1] * en[..., 0]
    length = np.hypot(e[..., 0], e[..., 1])
    tol = CONVEX_SINE * length * length[:, _NEXT]
    return np.all(cross > tol, axis=1) | np.all(cross < -tol, axis=1)


def _largest_triangle(pts: np.ndarray) -> np.ndarray:
    """``(N,)``: the largest area of a triangle of three corners of each quad ``(N, 4, 2)``."""
    i, j, k = _TRIANGLES
    a, b = pts[:, j] - pts[:, i], pts[:, k] - pts[:, i]
    return 0.5 * np.abs(a[..., 0] * b[..., 1] - a[..., 1] * b[..., 0]).max(axis=1)


def _thick(pts: np.ndarray) -> np.ndarray:
    """``(N,)``: quads ``(N, 4, 2)`` whose minimum-area rectangle is certainly not thinner than ``MIN_SIDE``.

    The rectangle's shorter side is at least the smallest width of the points' convex hull, which is at
    least the hull's area over its diameter; the hull's area is at least that of any triangle of three
    corners. Certain when that bound exceeds ``2 * MIN_SIDE`` plus ``1e-5`` of the largest coordinate
    (far above float32 rounding in ``minAreaRect``)."""
    d = pts[:, _PAIRS[1]] - pts[:, _PAIRS[0]]
    diam = np.hypot(d[..., 0], d[..., 1]).max(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return _largest_triangle(pts) > (2 * MIN_SIDE + 1e-5 * np.abs(pts).max(axis=(1, 2))) * diam


def polygon_problems(polygons: list[list[float]]) -> list[str | None]:
    """For each quadrilateral ``[x1, y1, ..., x4, y4]``, why :meth:`_Collector.add` would refuse it, or ``None``.

    The same checks in the same order (non-finite coordinate; minimum-area rectangle thinner than
    ``MIN_SIDE``; ring not simple), made for all polygons at once: ``minAreaRect`` only where
    :func:`_thick` cannot decide, GEOS's ``is_simple`` only where :func:`strictly_convex` cannot.
    """
    n = len(polygons)
    if n == 0:
        return []
    polys = np.asarray(polygons, dtype=np.float64).reshape(n, 8)
    pts = polys.reshape(n, 4, 2)
    finite = np.isfinite(polys).all(axis=1)
    degenerate = np.zeros(n, dtype=bool)
    with np.errstate(invalid="ignore", over="ignore"):
        ask = np.flatnonzero(finite & ~_thick(pts))
        if len(ask):
            degenerate[ask] = polygon_to_le90(polys[ask])[:, 3] < MIN_SIDE
        ok = finite & ~degenerate
        ask = np.flatnonzero(ok & ~strictly_convex(pts))
    crossing = np.zeros(n, dtype=bool)
    if len(ask):
        crossing[ask] = ~shapely.is_simple(shapely.linearrings(pts[ask]))
    reasons: list[str | None] = [None] * n
    for i in np.flatnonzero(~finite | degenerate | crossing):
        polygon = polygons[i]
        if not finite[i]:
            reasons[i] = f"non-finite coordinate in {polygon}"
        elif degenerate[i]:
            reasons[i] = f"degenerate polygon (collinear or coincident points): {polygon}"
        else:
            reasons[i] = f"self-intersecting quadrilateral (corners not in order around the object): {polygon}"
    return reasons


def drop_outside(ann: ImageAnnotations, width: int, height: int, on_bad_object: str) -> ImageAnnotations:
    """Apply the bad-object policy to objects entirely outside a ``width x height`` image.

    An object is outside when its convex hull shares no area with the image rectangle (touching the
    border is outside too). Such an object can be in no tile, and no detection on the image can match
    it, so it is an error naming the label file and line, or, with ``on_bad_object="skip"``, left out
    and added to ``skipped``. Objects partly inside are kept (tiling decides by IoF, as the devkit).
    Tiling and evaluation both call this, so they agree on the ground truth.
    """
    if len(ann) == 0:
        return ann
    pts = ann.polygons.reshape(-1, 4, 2)
    # Entirely within the image with a hull of clearly positive area: inside, without asking GEOS.
    within = np.all((pts > 0) & (pts < (width, height)), axis=(1, 2))
    extent = (pts.max(axis=1) - pts.min(axis=1)).max(axis=1)
    inside = within & (_largest_triangle(pts) > 1e-9 * (1.0 + extent * extent))
    ask = np.flatnonzero(~inside)
    if len(ask):
        hulls = shapely.convex_hull(shapely.polygons(np.concatenate([pts[ask], pts[ask, :1]], axis=1)))
        inside[ask] = shapely.area(shapely.intersection(hulls, shapely.box(0, 0, width, height))) > 0
    if inside.all():
        return ann
    out = _Collector(Path(ann.file or ann.image_id), on_bad_object)
    for k in np.flatnonzero(~inside):
        out.bad(ann.line(k), f"object entirely outside the {width}x{height} image: {ann.polygons[k].tolist()}")
    return ImageAnnotations(
        image_id=ann.image_id, polygons=ann.polygons[inside], labels=ann.labels[inside],
        difficult=ann.difficult[inside], skipped=[*ann.skipped, *out.skipped], file=ann.file,
        lines=None if ann.lines is None else ann.lines[inside],
    )


def parse_float(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if np.isfinite(value) else None
