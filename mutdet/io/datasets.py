"""Finding a dataset's images and labels on disk, independent of the config.

Image ids are file stems. A split is an image folder, a label folder and optionally a list file of ids;
shard ``k`` of ``n`` holds ``sorted(ids)[k::n]``, so every job is known before anything runs.

Rule for image ids, checked once here when a split is listed (:func:`list_image_ids`), before any work:
an id is a non-empty string of printable characters without whitespace, ``/`` or ``\\``, and it
does not start with ``#``. Ids are written one a line into data-fraction list files (where ``#``
starts a comment), as the first whitespace-separated field of DOTA Task1 lines, and into output
paths; an id breaking the rule would break those files only after tiling, training and detection.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mutdet.io.annotations import AnnotationError, ClassMap, ImageAnnotations, drop_outside
from mutdet.io.dota import read_dota
from mutdet.io.images import image_size, read_image
from mutdet.io.xml_labels import read_dior, read_voc

READERS = {"dota": read_dota, "dior": read_dior, "voc": read_voc}
LABEL_SUFFIX = {"dota": ".txt", "dior": ".xml", "voc": ".xml"}


ID_RULE = "printable characters without whitespace, '/' or '\\', not starting with '#'"


def check_image_id(image_id: str, file: str | Path, line: int | None = None) -> str:
    """Return ``image_id`` if it follows the rule for ids (module docstring), else raise naming it and ``file``."""
    bad = (not image_id or image_id.startswith("#") or "/" in image_id or "\\" in image_id
           or any(ch.isspace() or not ch.isprintable() for ch in image_id))
    if bad:
        raise AnnotationError(file, line, f"invalid image id {image_id!r}: an image id must be {ID_RULE} "
                                          "(ids go one a line into list files and into Task1 result lines)")
    return image_id


def list_image_ids(images_dir: Path, list_file: Path | None, extensions: Sequence[str]) -> list[str]:
    """Sorted image ids of a split: the list file's lines, or every image in ``images_dir``.

    Every id is checked against the rule for ids (module docstring); the error names the id and the
    list file and line, or the image file.
    """
    if list_file is not None:
        if not Path(list_file).is_file():
            raise FileNotFoundError(f"split list not found: {list_file}")
        ids = []
        for lineno, line in enumerate(Path(list_file).read_text().splitlines(), start=1):
            token = line.strip()
            if not token or token.startswith("#"):
                continue
            image_id = Path(token).stem if Path(token).suffix.lower() in extensions else token
            ids.append(check_image_id(image_id, list_file, lineno))
        if len(set(ids)) != len(ids):
            dup = sorted({i for i in ids if ids.count(i) > 1})
            raise AnnotationError(list_file, None, f"duplicate image ids: {dup[:5]}")
        return sorted(ids)
    if not Path(images_dir).is_dir():
        raise FileNotFoundError(f"image folder not found: {images_dir}")
    exts = {e.lower() for e in extensions}
    return sorted(check_image_id(p.stem, p) for p in Path(images_dir).iterdir() if p.suffix.lower() in exts)


def labels_without_image(fmt: str, images_dir: Path, labels_dir: Path, extensions: Sequence[str]) -> list[Path]:
    """Label files of ``labels_dir`` whose stem has no image in ``images_dir`` (sorted).

    Their objects are in no split, so a misnamed image or label file would otherwise lose them unseen.
    """
    if not Path(labels_dir).is_dir() or not Path(images_dir).is_dir():
        return []
    exts = {e.lower() for e in extensions}
    stems = {p.stem for p in Path(images_dir).iterdir() if p.suffix.lower() in exts}
    return sorted(p for p in Path(labels_dir).iterdir()
                  if p.suffix.lower() == LABEL_SUFFIX[fmt] and p.is_file() and p.stem not in stems)


def shard_ids(ids: Sequence[str], shard: int, num_shards: int) -> list[str]:
    if not 0 <= shard < num_shards:
        raise ValueError(f"shard {shard} out of range for {num_shards} shards")
    return sorted(ids)[shard::num_shards]


def find_image(images_dir: Path, image_id: str, extensions: Sequence[str]) -> Path:
    for ext in extensions:
        for candidate in (Path(images_dir) / f"{image_id}{ext}", Path(images_dir) / f"{image_id}{ext.upper()}"):
            if candidate.is_file():
                return candidate
    raise FileNotFoundError(f"no image for id {image_id!r} in {images_dir} (tried {', '.join(extensions)})")


def read_labels(fmt: str, labels_dir: Path, image_id: str, class_map: ClassMap,
                on_bad_object: str = "error") -> ImageAnnotations | None:
    """Ground truth of one image, or ``None`` when the split has no label folder (unlabelled, e.g. DOTA test)."""
    if fmt not in READERS:
        raise ValueError(f"unknown label format {fmt!r} (known: {', '.join(READERS)})")
    if not Path(labels_dir).is_dir():
        return None
    path = Path(labels_dir) / f"{image_id}{LABEL_SUFFIX[fmt]}"
    if not path.is_file():
        raise AnnotationError(path, None, f"label file missing for image {image_id!r}")
    return READERS[fmt](path, class_map, on_bad_object)


@dataclass
class LoadedImage:
    """One image accepted for tiling or evaluation.

    Attributes:
        path: the image file; width, height: its decoded size.
        annotations: ground truth with objects outside the image already handled (``None`` when unlabelled).
        pixels: ``(height, width, 3)`` uint8 BGR, or ``None`` when loaded with ``decode=False``.
    """

    image_id: str
    path: Path
    width: int
    height: int
    annotations: ImageAnnotations | None
    pixels: np.ndarray | None


def load_image(fmt: str, images_dir: Path, labels_dir: Path, image_id: str, extensions: Sequence[str],
               class_map: ClassMap, on_bad_object: str = "error", decode: bool = True) -> LoadedImage:
    """Find, verify and read one image and its ground truth: the one rule tiling and evaluation share.

    The image must exist and be complete (:mod:`mutdet.io.images`; evaluation, with ``decode=False``,
    verifies JPEG and PNG without decoding them), its label file must parse, and objects entirely
    outside the image go through the bad-object policy (:func:`~mutdet.io.annotations.drop_outside`).

    Raises:
        AnnotationError, FileNotFoundError: naming the file, for an image the caller must skip (under
            ``on_bad_object="skip"``) or report.
    """
    path = find_image(images_dir, image_id, extensions)
    ann = read_labels(fmt, labels_dir, image_id, class_map, on_bad_object)
    pixels = read_image(path) if decode else None
    width, height = (pixels.shape[1], pixels.shape[0]) if pixels is not None else image_size(path)
    if ann is not None:
        ann = drop_outside(ann, width, height, on_bad_object)
    return LoadedImage(image_id=image_id, path=path, width=width, height=height, annotations=ann, pixels=pixels)
