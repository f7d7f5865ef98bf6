"""Torch datasets over tiled splits (``tiles.parquet`` + ``objects.parquet`` + tile PNGs).

A *tiles folder* is what the ``tile`` stage writes for one shard of one split (see
:mod:`mutdet.io.artefacts` for the schemas); a dataset may span several folders (shards). Boxes are
le90 in tile pixels (:mod:`mutdet.boxes`).

Difficult objects: kept for training, as mmrotate does by default (its DOTA/DIOR-R loaders keep
``difficult`` boxes; only the evaluator ignores them). That includes objects cut by a tile window
(``difficult == 2``, IoF >= the tiling threshold). Pass ``max_difficult`` to drop them
(``max_difficult=0``: only objects annotated as not difficult and not cut).

Each item is ``(image, target)``: ``image`` ``(3, H, W)`` (uint8 RGB without a transform; the
transform's output otherwise) and ``target`` a dict:

=============  ==============================================================================
``labels``     ``(N,)`` int64 class indices (the dataset's ``class_id``)
``boxes``      ``(N, 5)`` float32 le90 in pixels of the returned image
``difficult``  ``(N,)`` int8 (0, 1 as annotated, 2 cut by the tile window)
``size``       ``(2,)`` int64 ``(h, w)`` of the returned image (the valid region in a padded batch)
``scale``      ``(2,)`` float64 ``(sx, sy)``: returned-image pixels per tile pixel
``tile_id``    str
=============  ==============================================================================

:func:`collate` pads a batch to its largest image and returns the padding mask.
"""
from __future__ import annotations

import inspect
import random
from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from mutdet.io.artefacts import read_artefact

__all__ = ["TileDataset", "collate", "read_tile_image"]


def read_tile_image(path: Path) -> torch.Tensor:
    """A tile PNG -> ``(3, H, W)`` uint8 RGB tensor; a missing/unreadable file raises naming it."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise FileNotFoundError(f"cannot read tile image {path}")
    return torch.from_numpy(np.ascontiguousarray(image[:, :, ::-1].transpose(2, 0, 1)))  # (H, W, BGR) -> (3, H, W) RGB


class TileDataset(Dataset):
    """Tiles of one or more tiles folders, optionally restricted to some source images.

    Args:
        tiles_dirs: folders holding ``tiles.parquet``, ``objects.parquet`` and the PNGs.
        image_ids: keep only tiles of these source image ids (a data fraction); None keeps all. Ids
            without any tile raise (a subset from another dataset is a user error).
        transform: ``(image, target) -> (image, target)``, e.g. :func:`mutdet.data.transforms.build_transforms`.
        skip_empty: drop tiles without (kept) objects (mmrotate's ``filter_empty_gt`` for training).
        max_difficult: drop objects whose ``difficult`` flag is above this (default 2: keep all).
    Attributes:
        tile_ids: ``list[str]``, in dataset order (folder order, then tile id); ``tiles`` the
            matching rows of the tiles table (a ``pyarrow.Table``); ``class_names``: class id -> name
            as seen in the objects (may be incomplete: the config's class list is authoritative).
    """

    def __init__(self, tiles_dirs: Sequence[str | Path] | str | Path, *, image_ids: Sequence[str] | None = None,
                 transform: Callable | None = None, skip_empty: bool = False, max_difficult: int = 2):
        import pyarrow as pa

        dirs = [Path(tiles_dirs)] if isinstance(tiles_dirs, (str, Path)) else [Path(d) for d in tiles_dirs]
        if not dirs:
            raise ValueError("TileDataset: no tiles folder given")
        self.transform = transform
        self._transform_takes_generator = transform is not None and "generator" in inspect.signature(
            transform).parameters
        wanted = None if image_ids is None else {str(i) for i in image_ids}
        self.tile_ids: list[str] = []
        self._paths: list[Path] = []
        self._objects: dict[str, dict[str, np.ndarray]] = {}
        self.class_names: dict[int, str] = {}
        tables, seen_images = [], set()
        for folder in dirs:
            tiles = read_artefact(folder / "tiles.parquet", "tiles")
            objects = read_artefact(folder / "objects.parquet", "objects")
            obj = {k: np.asarray(v) for k, v in objects.to_pydict().items() if k not in ("polygon",)}
            keep_obj = obj["difficult"] <= max_difficult
            obj = {k: v[keep_obj] for k, v in obj.items()}
            self.class_names.update({int(i): str(n) for i, n in zip(obj["class_id"], obj["class_name"])})
            order = np.argsort(obj["tile_id"], kind="stable")
            obj = {k: v[order] for k, v in obj.items()}
            uniq, starts = np.unique(obj["tile_id"], return_index=True)
            ends = np.append(starts[1:], len(obj["tile_id"]))
            span = {str(t): (s, e) for t, s, e in zip(uniq, starts, ends)}
            rows = sorted(range(tiles.num_rows), key=lambda r: tiles.column("tile_id")[r].as_py())
            ids, image_of, paths = (tiles.column(c).to_pylist() for c in ("tile_id", "image_id", "tile_path"))
            kept_rows = []
            for r in rows:
                tile_id, image_id = ids[r], image_of[r]
                if wanted is not None and image_id not in wanted:
                    continue
                seen_images.add(image_id)
                s, e = span.get(tile_id, (0, 0))
                if skip_empty and e == s:
                    continue
                self.tile_ids.append(tile_id)
                self._paths.append(folder / paths[r])
                self._objects[tile_id] = {k: v[s:e] for k, v in obj.items()}
                kept_rows.append(r)
            tables.append(tiles.take(pa.array(kept_rows, type=pa.int64())))
        if wanted is not None:
            missing = sorted(wanted - seen_images)
            if missing:
                raise ValueError(f"{len(missing)} requested image id(s) have no tiles in {[str(d) for d in dirs]}, "
                                 f"e.g. {missing[:5]}")
        if len(set(self.tile_ids)) != len(self.tile_ids):
            raise ValueError(f"duplicate tile ids across tiles folders {[str(d) for d in dirs]}")
        self.tiles = pa.concat_tables(tables)

    def __len__(self) -> int:
        return len(self.tile_ids)

    def __getitem__(self, index: int, generator: random.Random | None = None) -> tuple[torch.Tensor, dict]:
        """Item ``index``; ``generator`` (optional) is the random source of the transform."""
        tile_id = self.tile_ids[index]
        image = read_tile_image(self._paths[index])
        obj = self._objects[tile_id]
        boxes = np.stack([obj[k] for k in ("cx", "cy", "w", "h", "theta")], 1).reshape(-1, 5)
        target = {
            "labels": torch.from_numpy(obj["class_id"].astype(np.int64)),
            "boxes": torch.from_numpy(boxes.astype(np.float32)),
            "difficult": torch.from_numpy(obj["difficult"].astype(np.int8)),
            "size": torch.tensor(image.shape[-2:], dtype=torch.int64),
            "scale": torch.ones(2, dtype=torch.float64),
            "tile_id": tile_id,
        }
        if self.transform is not None:
            if generator is not None and self._transform_takes_generator:
                image, target = self.transform(image, target, generator=generator)
            else:
                image, target = self.transform(image, target)
        return image, target


def collate(batch: Sequence[tuple[torch.Tensor, dict]]) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    """Pad images to the largest height and width of the batch (top-left aligned, zeros).

    Returns:
        ``images`` ``(B, 3, H, W)``, ``padding_mask`` ``(B, H, W)`` bool (True on padding),
        ``targets`` (list of the per-image dicts, unchanged: boxes stay in the image's own pixels,
        which are also the padded frame's since the origin is shared).
    """
    images = [image for image, _ in batch]
    height = max(i.shape[-2] for i in images)
    width = max(i.shape[-1] for i in images)
    out = images[0].new_zeros(len(images), images[0].shape[0], height, width)
    mask = torch.ones(len(images), height, width, dtype=torch.bool)
    for k, image in enumerate(images):
        h, w = image.shape[-2:]
        out[k, :, :h, :w] = image
        mask[k, :h, :w] = False
    return out, mask, [target for _, target in batch]
