"""Finding a dataset's images and labels on disk, independent of the config.

Image ids are file stems. A split is an image folder, a label folder and optionally a list file of ids;
shard ``k`` of ``n`` holds ``sorted(ids)[k::n]``, so every job is known before anything runs.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from mutdet.io.annotations import AnnotationError, ClassMap, ImageAnnotations
from mutdet.io.dota import read_dota
from mutdet.io.xml_labels import read_dior, read_voc

READERS = {"dota": read_dota, "dior": read_dior, "voc": read_voc}
LABEL_SUFFIX = {"dota": ".txt", "dior": ".xml", "voc": ".xml"}


def list_image_ids(images_dir: Path, list_file: Path | None, extensions: Sequence[str]) -> list[str]:
    """Sorted image ids of a split: the list file's lines, or every image in ``images_dir``."""
    if list_file is not None:
        if not Path(list_file).is_file():
            raise FileNotFoundError(f"split list not found: {list_file}")
        ids = []
        for lineno, line in enumerate(Path(list_file).read_text().splitlines(), start=1):
            token = line.strip()
            if not token or token.startswith("#"):
                continue
            if len(token.split()) != 1:
                raise AnnotationError(list_file, lineno, f"expected one image id a line, got {line!r}")
            ids.append(Path(token).stem if Path(token).suffix.lower() in extensions else token)
        if len(set(ids)) != len(ids):
            dup = sorted({i for i in ids if ids.count(i) > 1})
            raise AnnotationError(list_file, None, f"duplicate image ids: {dup[:5]}")
        return sorted(ids)
    if not Path(images_dir).is_dir():
        raise FileNotFoundError(f"image folder not found: {images_dir}")
    exts = {e.lower() for e in extensions}
    return sorted(p.stem for p in Path(images_dir).iterdir() if p.suffix.lower() in exts)


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
