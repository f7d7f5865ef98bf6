"""Ground-truth records shared by the dataset readers, and how bad objects are reported.

A reader turns one label file into :class:`ImageAnnotations`: polygons ``(N, 8)`` in full-image
pixels, class indices into the dataset's class list, and DOTA difficult flags. A malformed object
raises :class:`AnnotationError` naming the file and line, or, with ``on_bad_object="skip"``, is left
out and recorded in ``ImageAnnotations.skipped`` so the stage can count and report it.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

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
    """

    image_id: str
    polygons: np.ndarray
    labels: np.ndarray
    difficult: np.ndarray
    skipped: list[SkippedObject] = field(default_factory=list)

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
        self.polygons.append(polygon)
        self.labels.append(label)
        self.difficult.append(difficult)

    def result(self, image_id: str) -> ImageAnnotations:
        return ImageAnnotations(
            image_id=image_id,
            polygons=np.asarray(self.polygons, dtype=np.float64).reshape(-1, 8),
            labels=np.asarray(self.labels, dtype=np.int64),
            difficult=np.asarray(self.difficult, dtype=np.int8),
            skipped=self.skipped,
        )


def parse_float(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if np.isfinite(value) else None
