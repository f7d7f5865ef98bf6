"""Batched proposal embedding over many tiles: tile decoding in DataLoader workers, crops and backbone
in batches of ``batch_size`` crops that may span tiles (``mode="crop"``), or one backbone pass over a
batch of whole tiles with every proposal pooled from the maps (``mode="pooled"``); results handed back
per tile in input order.

Tiles are read with OpenCV (BGR -> RGB), their longer side resized to ``input_size`` (ratio kept,
bilinear, ``cv2.INTER_LINEAR``) in the workers and shipped as uint8; normalisation, cropping and the
backbone run on the device. Boxes stay in tile pixels: the rotated crop maps them through the
normalised frame, which an edge-to-edge resize leaves unchanged (:mod:`mutdet.embedding.rotated_crop`).
"""
from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from mutdet.embedding.backbone import EMBEDDING_MODES, ProposalEmbedder

__all__ = ["PRECISIONS", "TileReadError", "TileImages", "tile_loader", "embed_tiles"]

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class TileReadError(RuntimeError):
    """A tile image with proposals that is missing or cannot be decoded."""


@dataclasses.dataclass(frozen=True)
class _Tile:
    path: Path
    tile_id: str
    boxes: np.ndarray  # (n, 5) le90, tile pixels


class TileImages(Dataset):
    """Tiles with their proposals, decoded and resized on access.

    Args:
        paths: tile image files.
        tile_ids: one per path (for error messages and the consumer).
        boxes: one ``(n_i, 5)`` le90 array per tile, tile pixels.
        input_size: the longer side of the tile after resizing (ratio kept).

    Item ``i``: dict with ``position`` (i), ``tile_id``, ``image`` (RGB uint8 ``(3, H', W')``),
    ``frame_size`` (the tile's ``(W, H)``: the boxes' frame) and ``boxes`` (float64 ``(n_i, 5)``).
    """

    def __init__(self, paths: list[Path], tile_ids: list[str], boxes: list[np.ndarray], input_size: int):
        if not len(paths) == len(tile_ids) == len(boxes):
            raise ValueError(f"TileImages: {len(paths)} paths, {len(tile_ids)} tile ids, {len(boxes)} box arrays")
        self.tiles = [_Tile(Path(p), t, np.asarray(b, dtype=np.float64).reshape(-1, 5))
                      for p, t, b in zip(paths, tile_ids, boxes)]
        self.input_size = input_size

    def __len__(self) -> int:
        return len(self.tiles)

    def __getitem__(self, i: int) -> dict:
        tile = self.tiles[i]
        if not tile.path.is_file():
            raise TileReadError(f"{tile.path}: tile {tile.tile_id} has proposals but its image file is missing")
        bgr = cv2.imread(str(tile.path), cv2.IMREAD_COLOR)
        if bgr is None:
            raise TileReadError(f"{tile.path}: tile {tile.tile_id} has proposals but its image cannot be decoded")
        height, width = bgr.shape[:2]
        scale = self.input_size / max(height, width)
        if scale != 1:
            size = (max(1, round(width * scale)), max(1, round(height * scale)))
            bgr = cv2.resize(bgr, size, interpolation=cv2.INTER_LINEAR)
        rgb = np.ascontiguousarray(bgr[:, :, ::-1].transpose(2, 0, 1))  # (H', W', BGR) -> (RGB, H', W')
        return {"position": i, "tile_id": tile.tile_id, "image": torch.from_numpy(rgb),
                "frame_size": (width, height), "boxes": torch.from_numpy(tile.boxes)}


def _worker_init(_: int) -> None:
    cv2.setNumThreads(1)


def tile_loader(dataset: TileImages, *, workers: int, device: torch.device) -> DataLoader:
    """One tile per item, in order; ``workers`` decoding processes (0: in the main process)."""
    return DataLoader(dataset, batch_size=None, shuffle=False, num_workers=workers,
                      pin_memory=device.type == "cuda", worker_init_fn=_worker_init if workers else None,
                      prefetch_factor=4 if workers else None)


@dataclasses.dataclass
class _Pending:
    position: int
    count: int
    parts: list = dataclasses.field(default_factory=list)
    done: int = 0


def embed_tiles(embedder: ProposalEmbedder, tiles: Iterable[dict], *, batch_size: int,
                precision: str = "fp32", mode: str = "crop") -> Iterator[tuple[int, np.ndarray]]:
    """Embed every proposal of every tile, ``batch_size`` crops per backbone pass.

    Args:
        embedder: on its device (tile images are moved there).
        tiles: items of :class:`TileImages` (e.g. from :func:`tile_loader`).
        batch_size: crops per forward pass; a batch takes crops from as many tiles as it needs. In the
            pooled mode, the same pixel budget: ``max(1, batch_size * crop_size**2 // (H' W'))`` whole
            tiles of one resized shape per pass.
        precision: ``fp32 | bf16 | fp16``: autocast dtype of the backbone on CUDA; ignored on CPU
            (the crops are always computed in float32).
        mode: ``crop | pooled`` (:mod:`mutdet.embedding.backbone`).
    Yields:
        ``(position, embeddings)`` per tile, in input order: ``(n_i, D)`` float32, proposals in the
        order of the tile's ``boxes``.
    """
    if batch_size < 1:
        raise ValueError(f"embedding.batch_size must be >= 1, got {batch_size}")
    if precision not in PRECISIONS:
        raise ValueError(f"embedding.precision: {precision!r} is not one of {sorted(PRECISIONS)}")
    if mode not in EMBEDDING_MODES:
        raise ValueError(f"embedding.mode: {mode!r} is not one of {list(EMBEDDING_MODES)}")
    if mode == "pooled":
        yield from _pool_tiles(embedder, tiles, batch_size=batch_size, precision=precision)
        return
    device = embedder.mean.device
    autocast_dtype = PRECISIONS[precision] if device.type == "cuda" else None
    pending: OrderedDict[int, _Pending] = OrderedDict()
    segments: list[tuple[int, torch.Tensor, tuple[int, int], torch.Tensor]] = []  # (position, image, frame, boxes)

    def flush() -> None:
        images = [s[1] for s in segments]
        boxes = torch.cat([s[3] for s in segments])
        index = torch.cat([torch.full((len(s[3]),), k, dtype=torch.int64) for k, s in enumerate(segments)])
        with torch.inference_mode():
            crops = embedder.crops(images, boxes, index, [s[2] for s in segments])
            with torch.autocast(device_type=device.type, dtype=autocast_dtype or torch.float32,
                                enabled=autocast_dtype is not None):
                out = embedder(crops)
            out = out.float().cpu().numpy()
        start = 0
        for position, _, _, seg_boxes in segments:
            entry = pending[position]
            entry.parts.append(out[start:start + len(seg_boxes)])
            entry.done += len(seg_boxes)
            start += len(seg_boxes)
        segments.clear()

    def finished() -> Iterator[tuple[int, np.ndarray]]:
        """Hand back the leading tiles whose every crop has been embedded (input order)."""
        while pending:
            entry = next(iter(pending.values()))
            if entry.done < entry.count:
                return
            del pending[entry.position]
            yield entry.position, np.concatenate(entry.parts or [np.zeros((0, embedder.dim), np.float32)])

    filled = 0
    for tile in tiles:
        boxes = tile["boxes"]
        pending[tile["position"]] = _Pending(tile["position"], len(boxes))
        image = embedder.normalize(tile["image"]) if len(boxes) else None
        start = 0
        while start < len(boxes):
            take = min(batch_size - filled, len(boxes) - start)
            segments.append((tile["position"], image, tuple(tile["frame_size"]), boxes[start:start + take]))
            filled += take
            start += take
            if filled == batch_size:
                flush()
                filled = 0
        yield from finished()
    if segments:
        flush()
    yield from finished()


def _pool_tiles(embedder: ProposalEmbedder, tiles: Iterable[dict], *, batch_size: int,
                precision: str) -> Iterator[tuple[int, np.ndarray]]:
    """The pooled mode of :func:`embed_tiles`: consecutive tiles of one resized shape share a backbone
    pass (at most the pixels of ``batch_size`` crops, at least one tile); tiles without proposals run
    no backbone; results in input order."""
    device = embedder.mean.device
    autocast_dtype = PRECISIONS[precision] if device.type == "cuda" else None
    group: list[dict] = []  # tiles waiting for their pass, in input order (with or without proposals)
    shape: tuple[int, int] | None = None  # the resized (H', W') of the group's tiles with proposals

    def flush() -> Iterator[tuple[int, np.ndarray]]:
        busy = [t for t in group if len(t["boxes"])]
        out = None
        if busy:
            images = torch.stack([embedder.normalize(t["image"]) for t in busy])  # (B, 3, H', W')
            boxes = torch.cat([t["boxes"] for t in busy])
            index = torch.cat([torch.full((len(t["boxes"]),), k, dtype=torch.int64) for k, t in enumerate(busy)])
            with torch.inference_mode(), torch.autocast(device_type=device.type,
                                                        dtype=autocast_dtype or torch.float32,
                                                        enabled=autocast_dtype is not None):
                out = embedder.pooled(images, boxes, index, [tuple(t["frame_size"]) for t in busy]).cpu().numpy()
        start = 0
        for tile in group:
            count = len(tile["boxes"])
            yield tile["position"], (out[start:start + count] if count else np.zeros((0, embedder.dim), np.float32))
            start += count
        group.clear()

    tiles_per_pass = 1
    for tile in tiles:
        if len(tile["boxes"]):
            tile_shape = tuple(tile["image"].shape[-2:])
            if shape is not None and tile_shape != shape:
                yield from flush()
            if shape is None or tile_shape != shape:
                shape = tile_shape
                tiles_per_pass = max(1, batch_size * embedder.crop_size ** 2 // (shape[0] * shape[1]))
            group.append(tile)
            if sum(1 for t in group if len(t["boxes"])) == tiles_per_pass:
                yield from flush()
        else:
            group.append(tile)
            if not any(len(t["boxes"]) for t in group):  # nothing waits before it: hand it back now
                yield from flush()
    yield from flush()
