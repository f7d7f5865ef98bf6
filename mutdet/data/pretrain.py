"""Torch dataset of pre-training tiles: proposals as boxes, their cached embeddings as targets.

Inputs are the artefacts of the earlier stages, shard by shard: the ``tile`` stage's tiles folder,
the ``propose`` stage's ``proposals.parquet`` and the ``cluster`` stage's ``targets.parquet`` (same
rows as the proposals, in the same order: checked here). Each item is ``(image, target)`` like
:class:`mutdet.data.datasets.TileDataset`, with the proposals in place of labelled objects:

==============  ===============================================================================
``labels``      ``(N,)`` int64: the pseudo-class (``cluster_id``), or 0 when ``class_agnostic``
``boxes``       ``(N, 5)`` float32 le90 in pixels of the returned image
``embeddings``  ``(N, D)`` float32: the proposal's target embedding ``O`` (unit norm)
``embedding_norms``  ``(N,)`` float32: the norm of the PCA projection before its normalisation (the
                targets' ``norm`` column), so ``embeddings * embedding_norms[:, None]`` is the
                un-normalised projection, the DETReg baseline's L1 target; 1 for targets files
                written without that column, unless ``require_norms`` (then such a file is an error)
``size``        ``(2,)`` int64 ``(h, w)`` of the returned image; ``scale``, ``tile_id`` as TileDataset
==============  ===============================================================================

Proposals are kept best first, at most ``max_boxes`` per tile (the rows past it are dropped when the
shard is read, so memory follows what the items use); tiles without proposals are skipped.
Vectors stay float16 in memory until an item is built (about 0.5 KB per proposal at D = 256, plus 4
bytes for its norm).
"""
from __future__ import annotations

import inspect
import random
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from mutdet.data.datasets import read_tile_image
from mutdet.embedding.artefacts import read_targets, vector_matrix
from mutdet.io.artefacts import read_artefact, read_metadata

__all__ = ["ProposalTileDataset"]


class ProposalTileDataset(Dataset):
    """Pre-training items of one or more shards.

    Args:
        tiles_dirs: tiles folders, one per shard.
        proposals_files: ``proposals.parquet`` of the same shards, in the same order.
        targets_files: ``targets.parquet`` of the same shards, in the same order.
        class_agnostic: every label 0 (DETReg) instead of the pseudo-class (MutDet).
        max_boxes: keep the best ``max_boxes`` proposals of a tile (None: all).
        require_norms: the targets must carry their ``norm`` column (the L1 alignment regresses the
            un-normalised projection; a file of an older cluster stage lacks it: rerun that stage).
        transform: ``(image, target) -> (image, target)``; must keep the boxes' order and number (flips
            and resizing do), since ``labels`` and ``embeddings`` are not passed through it.
    Attributes:
        tile_ids, num_classes (``k`` of the cluster stage, from the targets' metadata, else the largest
        cluster id + 1; 1 when ``class_agnostic``), dim (``D``).
    """

    def __init__(self, tiles_dirs: Sequence[str | Path], proposals_files: Sequence[str | Path],
                 targets_files: Sequence[str | Path], *, class_agnostic: bool = False, max_boxes: int | None = None,
                 require_norms: bool = False, transform: Callable | None = None):
        if not (len(tiles_dirs) == len(proposals_files) == len(targets_files)) or not tiles_dirs:
            raise ValueError(f"ProposalTileDataset: need as many tiles folders ({len(tiles_dirs)}), proposal files "
                             f"({len(proposals_files)}) and target files ({len(targets_files)}), at least one")
        if max_boxes is not None and max_boxes < 1:
            raise ValueError(f"max_boxes must be >= 1 or None, got {max_boxes}")
        self.transform, self.class_agnostic = transform, class_agnostic
        self._transform_takes_generator = transform is not None and "generator" in inspect.signature(
            transform).parameters
        self.tile_ids: list[str] = []
        self._paths: list[Path] = []
        self._items: list[tuple[int, int, int]] = []  # (shard, start, stop) rows of the shard's arrays
        self._boxes: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []
        self._vectors: list[np.ndarray] = []
        self._norms: list[np.ndarray] = []
        num_classes, dim = 0, None
        for shard, (tiles_dir, prop_file, tgt_file) in enumerate(zip(tiles_dirs, proposals_files, targets_files)):
            tiles_dir = Path(tiles_dir)
            tiles = read_artefact(tiles_dir / "tiles.parquet", "tiles")
            proposals = read_artefact(prop_file, "proposals")
            targets = read_targets(tgt_file)
            keys = ("tile_id", "proposal_index")
            if proposals.num_rows != targets.num_rows or any(
                    not proposals.column(k).equals(targets.column(k)) for k in keys):
                raise ValueError(f"{tgt_file}: its rows are not those of {prop_file} (rerun the cluster stage)")
            vectors = vector_matrix(targets.column("embedding"))
            if dim is not None and vectors.shape[1] != dim:
                raise ValueError(f"{tgt_file}: embeddings of dimension {vectors.shape[1]}, other shards have {dim}")
            dim = vectors.shape[1]
            if "norm" in targets.column_names:
                norms = targets.column("norm").to_numpy().astype(np.float32)
            elif require_norms:
                raise ValueError(f"{tgt_file}: no 'norm' column (written by an older cluster stage), which the L1 "
                                 f"alignment's un-normalised targets need; rerun it: snakemake --forcerun cluster")
            else:  # the contrastive alignment normalises its targets: the norms are not used
                norms = np.ones(len(vectors), np.float32)
            labels = targets.column("cluster_id").to_numpy().astype(np.int64)
            k = (read_metadata(tgt_file).get("params") or {}).get("k")  # the cluster stage's k
            seen = int(labels.max()) + 1 if len(labels) else 0
            if k is not None and seen > k:
                raise ValueError(f"{tgt_file}: cluster ids up to {seen - 1} for k = {k}")
            num_classes = max(num_classes, seen if k is None else int(k))
            boxes = np.stack([proposals.column(c).to_numpy() for c in ("cx", "cy", "w", "h", "theta")], 1)
            ids = np.asarray(proposals.column("tile_id").to_pylist(), dtype=object)
            rank = proposals.column("proposal_index").to_numpy()
            order = np.lexsort((rank, ids))  # by tile, best first
            ids, boxes, labels, vectors, norms = ids[order], boxes[order], labels[order], vectors[order], norms[order]
            uniq, starts = np.unique(ids, return_index=True) if len(ids) else (np.array([]), np.array([], int))
            stops = np.append(starts[1:], len(ids))
            if max_boxes is not None and len(ids):  # only the rows items can use stay in memory
                kept = (np.arange(len(ids)) - np.repeat(starts, stops - starts)) < max_boxes
                ids, boxes, labels, vectors, norms = ids[kept], boxes[kept], labels[kept], vectors[kept], norms[kept]
                uniq, starts = np.unique(ids, return_index=True)
                stops = np.append(starts[1:], len(ids))
            span = {str(t): (int(s), int(e)) for t, s, e in zip(uniq, starts, stops)}
            known = dict(zip(tiles.column("tile_id").to_pylist(), tiles.column("tile_path").to_pylist()))
            unknown = sorted(set(span) - set(known))
            if unknown:
                raise ValueError(f"{prop_file}: proposals for tiles not in {tiles_dir / 'tiles.parquet'}, "
                                 f"e.g. {unknown[:3]}")
            self._boxes.append(boxes.astype(np.float32))
            self._labels.append(labels)
            self._vectors.append(vectors)
            self._norms.append(norms)
            for tile_id in sorted(span):
                start, stop = span[tile_id]
                self.tile_ids.append(tile_id)
                self._paths.append(tiles_dir / known[tile_id])
                self._items.append((shard, start, stop))
        if len(set(self.tile_ids)) != len(self.tile_ids):
            raise ValueError(f"duplicate tile ids across tiles folders {[str(d) for d in tiles_dirs]}")
        self.num_classes = 1 if class_agnostic else num_classes
        self.dim = dim

    def __len__(self) -> int:
        return len(self.tile_ids)

    def __getitem__(self, index: int, generator: random.Random | None = None) -> tuple[torch.Tensor, dict]:
        shard, start, stop = self._items[index]
        image = read_tile_image(self._paths[index])
        labels = torch.from_numpy(self._labels[shard][start:stop])
        target = {
            "labels": torch.zeros_like(labels) if self.class_agnostic else labels,
            "boxes": torch.from_numpy(self._boxes[shard][start:stop]),
            "embeddings": torch.from_numpy(self._vectors[shard][start:stop].astype(np.float32)),
            "embedding_norms": torch.from_numpy(self._norms[shard][start:stop].copy()),
            "size": torch.tensor(image.shape[-2:], dtype=torch.int64),
            "scale": torch.ones(2, dtype=torch.float64),
            "tile_id": self.tile_ids[index],
        }
        if self.transform is not None:
            if generator is not None and self._transform_takes_generator:
                image, target = self.transform(image, target, generator=generator)
            else:
                image, target = self.transform(image, target)
            if len(target["boxes"]) != len(target["labels"]):
                raise RuntimeError(f"the transform changed the number of boxes of tile {self.tile_ids[index]}")
        return image, target
