"""DOTA Task1 result files, the format of the DOTA evaluation server and of ``dota_evaluation_task1.py``.

One file per class, ``Task1_<class>.txt``, one detection a line::

    <image_id> <score> x1 y1 x2 y2 x3 y3 x4 y4

with the polygon in full-image pixels. Every class gets its file, empty if it has no detections (the
server expects all of them). Scores are written with the shortest text that reads back to the same
float32 (so the ranking, ties included, survives the round trip); coordinates by default with the
shortest text that reads back to the same float64 (Python's ``repr``), so that evaluating the files
(:mod:`mutdet.stages.evaluate`, protocol ``dota_devkit``, which intersects the polygons as written) gives
exactly the AP of the detections they were written from. Fixed decimals (``coordinate_decimals``, e.g. 2
as mmrotate writes them) make smaller files but move corners by up to half a unit of the last decimal,
enough to turn a detection whose IoU is near a threshold from TP to FP.
"""
from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mutdet.io.annotations import parse_float
from mutdet.io.atomic import write_text

PREFIX, SUFFIX = "Task1_", ".txt"


class Task1FormatError(ValueError):
    """A malformed Task1 folder or line; the message starts with ``file:line:`` (or ``file:``)."""

    def __init__(self, file: str | Path, line: int | None, reason: str):
        self.file, self.line, self.reason = str(file), line, reason
        where = f"{file}:{line}" if line is not None else str(file)
        super().__init__(f"{where}: {reason}")


def task1_path(folder: str | Path, class_name: str) -> Path:
    """``<folder>/Task1_<class_name>.txt``."""
    return Path(folder) / f"{PREFIX}{class_name}{SUFFIX}"


def _check_token(value: str, what: str) -> None:
    if not value or any(ch.isspace() for ch in value) or "/" in value:
        raise ValueError(f"write_task1: {what} {value!r} is empty or holds whitespace or '/'")


def write_task1(out_dir: str | Path, image_ids: Sequence[str], class_names: Sequence[str], scores, polygons,
                classes: Sequence[str], coordinate_decimals: int | None = None) -> list[Path]:
    """Write ``Task1_<class>.txt`` for every class of ``classes`` (atomically, one file at a time).

    Args:
        out_dir: folder, created if needed.
        image_ids: ``(D,)`` image id (file stem) of each detection.
        class_names: ``(D,)`` class of each detection, one of ``classes``.
        scores: ``(D,)`` confidence, written as float32 (the ``detections`` artefact's type).
        polygons: ``(D, 8)`` ``x1 y1 ... x4 y4`` in full-image pixels.
        classes: every class name; each gets a file, in input order of its detections.
        coordinate_decimals: decimals written for coordinates; ``None`` (default): the shortest text
            that reads back to the same float64.
    Returns:
        The written paths, in the order of ``classes``.
    """
    image_ids = [str(i) for i in image_ids]
    class_names = [str(c) for c in class_names]
    scores = np.asarray(scores, dtype=np.float32).reshape(-1)
    polygons = np.asarray(polygons, dtype=np.float64).reshape(-1, 8)
    if not (len(image_ids) == len(class_names) == len(scores) == len(polygons)):
        raise ValueError(f"write_task1: {len(image_ids)} image ids, {len(class_names)} class names, "
                         f"{len(scores)} scores, {len(polygons)} polygons")
    for c in classes:
        _check_token(c, "class name")
    for i in set(image_ids):
        _check_token(i, "image id")
    if not (np.isfinite(scores).all() and np.isfinite(polygons).all()):
        raise ValueError("write_task1: non-finite score or coordinate")
    lines: dict[str, list[str]] = {c: [] for c in classes}
    for image_id, name, score, poly in zip(image_ids, class_names, scores, polygons):
        if name not in lines:
            raise ValueError(f"write_task1: detection of class {name!r}, not one of {list(classes)}")
        if coordinate_decimals is None:
            coords = " ".join(map(repr, poly.tolist()))
        else:
            coords = " ".join(f"{v:.{coordinate_decimals}f}" for v in poly)
        lines[name].append(f"{image_id} {np.format_float_positional(score, unique=True, trim='-')} {coords}\n")
    paths = []
    for c in classes:
        path = task1_path(out_dir, c)
        write_text(path, "".join(lines[c]))
        paths.append(path)
    return paths


def read_task1(folder: str | Path, classes: Sequence[str]) -> dict[str, np.ndarray]:
    """Read the ``Task1_<class>.txt`` files of ``classes`` from ``folder``.

    Every class must have its file (possibly empty); a ``Task1_*.txt`` for a class outside
    ``classes`` is an error, as is a line without exactly 10 tokens or with a non-numeric or
    non-finite number. Other files are ignored.

    Returns:
        ``{"image_ids": (D,) object str, "class_names": (D,) object str, "scores": (D,) float64,
        "polygons": (D, 8) float64}``, classes in the order of ``classes``, lines in file order.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise Task1FormatError(folder, None, "Task1 folder not found")
    known = set(classes)
    for path in sorted(folder.glob(f"{PREFIX}*{SUFFIX}")):
        name = path.name[len(PREFIX):-len(SUFFIX)]
        if name not in known:
            raise Task1FormatError(path, None, f"class {name!r} is not one of {list(classes)}")
    image_ids, class_names, values = [], [], []
    for c in classes:
        path = task1_path(folder, c)
        if not path.is_file():
            raise Task1FormatError(path, None, f"missing result file for class {c!r}")
        rows = [tokens for tokens in map(str.split, path.read_text().splitlines()) if tokens]
        try:  # fast path: every line well formed (float() on each number, then one finiteness check)
            if any(len(tokens) != 10 for tokens in rows):
                raise ValueError
            numbers = np.fromiter(map(float, itertools.chain.from_iterable(tokens[1:] for tokens in rows)),
                                  dtype=np.float64, count=9 * len(rows)).reshape(-1, 9)
            if not np.isfinite(numbers).all():
                raise ValueError
        except ValueError:
            _raise_first_bad_line(path)
        image_ids += [tokens[0] for tokens in rows]
        class_names += [c] * len(rows)
        values.append(numbers)
    numbers = np.concatenate(values) if values else np.zeros((0, 9))
    return {
        "image_ids": np.asarray(image_ids, dtype=object),
        "class_names": np.asarray(class_names, dtype=object),
        "scores": numbers[:, 0].copy(),
        "polygons": numbers[:, 1:].copy(),
    }


def _raise_first_bad_line(path: Path) -> None:
    """Raise :class:`Task1FormatError` for the first malformed line of ``path`` (token count, then values)."""
    for lineno, raw in enumerate(path.read_text().splitlines(), start=1):
        tokens = raw.split()
        if not tokens:
            continue
        if len(tokens) != 10:
            raise Task1FormatError(path, lineno, f"expected 10 tokens (image score x1 y1 ... x4 y4), "
                                                 f"got {len(tokens)}: {raw.strip()!r}")
        values = [parse_float(t) for t in tokens[1:]]
        if None in values:
            bad = tokens[1 + values.index(None)]
            raise Task1FormatError(path, lineno, f"non-numeric or non-finite value {bad!r}")
    raise AssertionError(f"{path}: a line failed to parse but none is malformed")  # pragma: no cover
