"""DOTA ``labelTxt`` files: one object a line, ``x1 y1 x2 y2 x3 y3 x4 y4 class [difficult]``.

Header lines such as ``imagesource:GoogleEarth`` and ``gsd:0.146`` (a ``key:value`` token, fewer than
9 tokens) are skipped, a missing difficult column means 0, and class names are matched through the
dataset's :class:`~mutdet.io.annotations.ClassMap`. Any other line is an object or an error. Files
are read as UTF-8; a byte-order mark at the start (some Windows editors write one) is dropped.
"""
from __future__ import annotations

import math
from pathlib import Path

from mutdet.io.annotations import (AnnotationError, ClassMap, ImageAnnotations, _Collector, parse_float,
                                   polygon_problems)


def _is_header(tokens: list[str]) -> bool:
    return len(tokens) < 9 and ":" in tokens[0]


def read_dota(path: str | Path, class_map: ClassMap, on_bad_object: str = "error") -> ImageAnnotations:
    """Read one DOTA label file. ``image_id`` is the file stem.

    Lines are parsed first, then the polygons of all object lines are checked at once
    (:func:`~mutdet.io.annotations.polygon_problems`), then every line is accepted or reported in file
    order, so the first error raised, and the list of skipped objects, are those of a line-by-line read.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise AnnotationError(path, None, f"cannot read label file: {exc}") from None
    out = _Collector(path, on_bad_object)
    # Per line, in file order: (line, reason, None) for a bad line, (line, None, (coords, label, difficult))
    # for an object whose polygon is still to be checked.
    entries: list[tuple] = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        tokens = raw.split()
        if not tokens or (len(tokens) < 9 and ":" in tokens[0]):  # empty, or a header (_is_header)
            continue
        if len(tokens) not in (9, 10):
            entries.append((lineno, f"expected 9 or 10 tokens (x1 y1 ... x4 y4 class [difficult]), got "
                                    f"{len(tokens)}: {raw.strip()!r}", None))
            continue
        try:
            coords = list(map(float, tokens[:8]))
            if not all(map(math.isfinite, coords)):
                raise ValueError
        except ValueError:
            coords = [parse_float(t) for t in tokens[:8]]
            bad = tokens[coords.index(None)]
            entries.append((lineno, f"non-numeric coordinate {bad!r}", None))
            continue
        label = class_map(tokens[8])
        if label is None and parse_float(tokens[8]) is not None:
            # A number where the class belongs: a coordinate too many, not an unknown class.
            after = f"before the class name {tokens[9]!r}" if len(tokens) == 10 else "and no class name"
            entries.append((lineno, f"expected 8 coordinates then a class name (9 or 10 fields), got 9 numbers "
                                    f"{after} ({len(tokens)} fields): {raw.strip()!r}", None))
            continue
        if label is None:
            entries.append((lineno, f"unknown class {tokens[8]!r} (known: {', '.join(class_map.classes)})", None))
            continue
        difficult = 0
        if len(tokens) == 10:
            if tokens[9] not in ("0", "1", "2"):
                entries.append((lineno, f"difficult must be 0, 1 or 2, got {tokens[9]!r}", None))
                continue
            difficult = int(tokens[9])
        entries.append((lineno, None, (coords, label, difficult)))
    problems = iter(polygon_problems([obj[0] for _, _, obj in entries if obj is not None]))
    for lineno, reason, obj in entries:
        if obj is None:
            out.bad(lineno, reason)
        else:
            out.add_checked(lineno, obj[0], obj[1], obj[2], next(problems))
    return out.result(path.stem)


def format_dota_line(polygon, class_name: str, difficult: int = 0) -> str:
    """One DOTA label line for a polygon ``(8,)``."""
    return " ".join(f"{v:.1f}" for v in polygon) + f" {class_name} {int(difficult)}"
