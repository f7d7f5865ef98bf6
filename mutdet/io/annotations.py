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
    """Accumulates objects of one file and applies the bad-object policy."""

    def __init__(self, file: Path, on_bad_object: str):
        if on_bad_object not in ("error", "skip"):
            raise ValueError(f"on_bad_object must be 'error' or 'skip', got {on_bad_object!r}")
        self.file, self.policy = file, on_bad_object
        self.polygons: list[list[float]] = []
        self.labels: list[int] = []
        self.difficult: list[int] = []
        self.lines: list[int] = []
        self.skipped: list[SkippedObject] = []

    def bad(self, line: int | None, reason: str) -> None:
        if self.policy == "error":
            raise AnnotationError(self.file, line, reason)
        self.skipped.append(SkippedObject(str(self.file), line, reason))

    def add(self, line: int | None, polygon: list[float], label: int, difficult: int) -> None:
        poly = np.asarray(polygon, dtype=np.float64)
        if not np.isfinite(poly).all():
            return self.bad(line, f"non-finite coordinate in {polygon}")
        if polygon_to_le90(poly)[3] < MIN_SIDE:
            return self.bad(line, f"degenerate polygon (collinear or coincident points): {polygon}")
        if not shapely.is_simple(shapely.linearrings(poly.reshape(4, 2))):
            return self.bad(line, "self-intersecting quadrilateral (corners not in order around the object): "
                                  f"{polygon}")
        self.polygons.append(polygon)
        self.labels.append(label)
        self.difficult.append(difficult)
        self.lines.append(-1 if line is None else line)

    def result(self, image_id: str) -> ImageAnnotations:
        return ImageAnnotations(
            image_id=image_id,
            polygons=np.asarray(self.polygons, dtype=np.float64).reshape(-1, 8),
            labels=np.asarray(self.labels, dtype=np.int64),
            difficult=np.asarray(self.difficult, dtype=np.int8),
            skipped=self.skipped,
            file=str(self.file),
            lines=np.asarray(self.lines, dtype=np.int64),
        )


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
    hulls = shapely.convex_hull(shapely.polygons(np.concatenate([pts, pts[:, :1]], axis=1)))
    inside = shapely.area(shapely.intersection(hulls, shapely.box(0, 0, width, height))) > 0
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
