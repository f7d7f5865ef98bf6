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

Proposals are kept best first, at most ``max_boxes`` per tile; tiles without proposals are skipped.
The kept proposals of every shard live in ONE compact record array (:func:`record_dtype`: the le90
box as float32, the pseudo-class, the norm and the float16 vector, ``26 + 2 D`` bytes per kept
proposal, nothing of the rows past ``max_boxes``), built by streaming the shards' Parquet files in
record batches (memory bounded by a batch plus a few bytes of key per row of the shard being read).
With ``cache_dir`` the array is a ``.npy`` file there, keyed to the inputs' content and ``max_boxes``,
and opened memory-mapped: the ranks of a DDP job and the DataLoader workers share its pages (the OS page
cache) instead of each holding a copy; a rank holds only the per-tile index (about 20 bytes a tile and
the tile ids). Build it on one rank first (see mutdet.stages.pretrain), the others then open it.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import random
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch.utils.data import Dataset

from mutdet.data.datasets import read_tile_image
from mutdet.embedding.artefacts import check_file
from mutdet.io.artefacts import check_schema, read_artefact, read_file_schema, read_metadata
from mutdet.io.atomic import atomic_path, write_json
from mutdet.io.identity import file_digest

__all__ = ["ProposalTileDataset", "record_dtype"]

_FORMAT = 1  # version of the cache layout: part of its key
_BATCH_ROWS = 8192


def record_dtype(dim: int) -> np.dtype:
    """One kept proposal: ``box`` (5,) float32 le90 tile pixels, ``label`` int16 (cluster id), ``norm``
    float32, ``embedding`` (D,) float16; packed, ``26 + 2 D`` bytes."""
    return np.dtype([("box", "<f4", (5,)), ("label", "<i2"), ("norm", "<f4"), ("embedding", "<f2", (dim,))])


def _exact_batches(path: Path, columns: list[str], rows: int) -> Iterator[pa.Table]:
    """The file's ``columns`` in tables of exactly ``rows`` rows (the last may be shorter), so that two
    files of the same rows can be read side by side whatever their row groups."""
    pending: list[pa.RecordBatch] = []
    count = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=rows, columns=columns):
        pending.append(batch)
        count += batch.num_rows
        while count >= rows:
            table = pa.Table.from_batches(pending)
            yield table.slice(0, rows)
            rest = table.slice(rows).combine_chunks()
            pending, count = rest.to_batches(), rest.num_rows
    if count:
        yield pa.Table.from_batches(pending)


class _TileCodes:
    """Tile id strings -> int32 codes, batch by batch (one dictionary lookup per distinct tile)."""

    def __init__(self, known: dict[str, int] | None = None):
        self.codes: dict[str, int] = dict(known or {})
        self.frozen = known is not None

    def __call__(self, column: pa.ChunkedArray | pa.Array) -> np.ndarray:
        encoded = pc.dictionary_encode(column)
        if isinstance(encoded, pa.ChunkedArray):
            encoded = encoded.combine_chunks() if encoded.num_chunks else pa.array([], pa.dictionary(pa.int32(), pa.string()))
        lookup = np.array([self.codes.setdefault(t, len(self.codes)) if not self.frozen else self.codes.get(t, -1)
                           for t in encoded.dictionary.to_pylist()], dtype=np.int32)
        indices = encoded.indices.to_numpy(zero_copy_only=False)
        return lookup[indices] if len(lookup) else np.zeros(len(indices), np.int32)


def _shard_plan(prop_file: Path, max_boxes: int | None) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Which rows of a proposals file are kept, and where they go.

    Returns ``(tiles, codes, ranks, dest, counts)``: tiles sorted by id; ``codes`` (N,) int32 each row's
    tile (an index into ``tiles``) and ``ranks`` (N,) its proposal_index, for the join check; ``dest``
    (N,) int64 the kept row's position in the shard's block (rows by tile, best first), -1 if dropped;
    ``counts`` (T,) kept rows per tile.
    """
    codes, ranks, parts = _TileCodes(), [], []
    for batch in pq.ParquetFile(prop_file).iter_batches(batch_size=_BATCH_ROWS, columns=["tile_id", "proposal_index"]):
        parts.append(codes(batch.column("tile_id")))
        ranks.append(batch.column("proposal_index").to_numpy(zero_copy_only=False))
    code = np.concatenate(parts) if parts else np.zeros(0, np.int32)
    rank = np.concatenate(ranks).astype(np.int32) if ranks else np.zeros(0, np.int32)
    tiles = sorted(codes.codes, key=codes.codes.get)
    by_name = np.argsort(np.array(tiles, dtype=object), kind="stable") if tiles else np.zeros(0, np.int64)
    sorted_code = np.empty(len(tiles), np.int32)
    sorted_code[by_name] = np.arange(len(tiles), dtype=np.int32)
    code = sorted_code[code] if len(code) else code  # codes in the order of the sorted tile ids
    tiles = [tiles[i] for i in by_name]
    order = np.lexsort((rank, code))  # by tile, best first
    del parts, ranks
    per_tile = np.bincount(code, minlength=len(tiles))
    starts = np.concatenate([[0], np.cumsum(per_tile)[:-1]]) if len(tiles) else np.zeros(0, np.int64)
    within = np.arange(len(order)) - np.repeat(starts, per_tile)  # position in the tile, 0 = best
    keep = within < max_boxes if max_boxes is not None else np.ones(len(order), bool)
    counts = np.minimum(per_tile, max_boxes) if max_boxes is not None else per_tile
    dest = np.full(len(code), -1, np.int64)
    dest[order[keep]] = np.arange(int(keep.sum()))
    return tiles, code, rank, dest, counts.astype(np.int64)


def _cache_key(tiles_dirs, proposals_files, targets_files, max_boxes) -> str:
    inputs = {"format": _FORMAT, "max_boxes": max_boxes,
              "tiles": [file_digest(Path(d) / "tiles.parquet") for d in tiles_dirs],
              "proposals": [file_digest(p) for p in proposals_files],
              "targets": [file_digest(p) for p in targets_files]}
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


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
        cache_dir: folder of the memory-mapped record array (``<key>.npy``) and its index
            (``<key>.json``), ``key`` a hash of the inputs' content and ``max_boxes``; reused when
            present, else built (and other keys' files removed). None: the array is built in memory.
    Attributes:
        tile_ids, num_classes (``k`` of the cluster stage, from the targets' metadata, else the largest
        cluster id + 1; 1 when ``class_agnostic``), dim (``D``), records (the kept proposals, (M,)
        :func:`record_dtype`, tiles in item order), cache_file (the ``.npy``, or None).
    """

    def __init__(self, tiles_dirs: Sequence[str | Path], proposals_files: Sequence[str | Path],
                 targets_files: Sequence[str | Path], *, class_agnostic: bool = False, max_boxes: int | None = None,
                 require_norms: bool = False, transform: Callable | None = None,
                 cache_dir: str | Path | None = None):
        if not (len(tiles_dirs) == len(proposals_files) == len(targets_files)) or not tiles_dirs:
            raise ValueError(f"ProposalTileDataset: need as many tiles folders ({len(tiles_dirs)}), proposal files "
                             f"({len(proposals_files)}) and target files ({len(targets_files)}), at least one")
        if max_boxes is not None and max_boxes < 1:
            raise ValueError(f"max_boxes must be >= 1 or None, got {max_boxes}")
        self.transform, self.class_agnostic = transform, class_agnostic
        self._transform_takes_generator = transform is not None and "generator" in inspect.signature(
            transform).parameters
        tiles_dirs = [Path(d) for d in tiles_dirs]
        proposals_files, targets_files = [Path(p) for p in proposals_files], [Path(p) for p in targets_files]
        has_norms = self._check_inputs(proposals_files, targets_files, require_norms)
        self.cache_file: Path | None = None
        if cache_dir is not None:
            cache_dir = Path(cache_dir)
            key = _cache_key(tiles_dirs, proposals_files, targets_files, max_boxes)
            self.cache_file, index_file = cache_dir / f"{key}.npy", cache_dir / f"{key}.json"
            try:
                index = json.loads(index_file.read_text())
                self._records = np.load(self.cache_file, mmap_mode="r")
            except (OSError, ValueError):
                index = self._build(tiles_dirs, proposals_files, targets_files, max_boxes, has_norms)
                write_json(index_file, index)
                for stale in cache_dir.glob("*"):
                    if stale.name not in (self.cache_file.name, index_file.name) and stale.suffix in (".npy", ".json"):
                        stale.unlink(missing_ok=True)
                self._records = np.load(self.cache_file, mmap_mode="r")
        else:
            index = self._build(tiles_dirs, proposals_files, targets_files, max_boxes, has_norms)
        self.tile_ids: list[str] = index["tile_ids"]
        self._paths = [tiles_dirs[s] / p for s, p in zip(index["shards"], index["tile_paths"])]
        self._starts = np.asarray(index["starts"], np.int64)
        self._stops = np.asarray(index["stops"], np.int64)
        self.dim = index["dim"]
        self.num_classes = 1 if class_agnostic else index["num_classes"]
        if self._records.dtype != record_dtype(self.dim) or len(self._records) != (self._stops[-1] if len(
                self._stops) else 0):
            raise ValueError(f"{self.cache_file}: not the record array its index describes (remove the file)")

    @property
    def records(self) -> np.ndarray:
        return self._records

    @staticmethod
    def _check_inputs(proposals_files: list[Path], targets_files: list[Path], require_norms: bool) -> list[bool]:
        """Schemas, row counts and dimensions of the inputs (no rows read); whether each has norms."""
        dim, has_norms = None, []
        for prop_file, tgt_file in zip(proposals_files, targets_files):
            check_schema(read_file_schema(prop_file, "proposals"), "proposals", str(prop_file))
            tgt_dim, schema = check_file(tgt_file, "targets")
            if pq.ParquetFile(prop_file).metadata.num_rows != pq.ParquetFile(tgt_file).metadata.num_rows:
                raise ValueError(f"{tgt_file}: its rows are not those of {prop_file} (rerun the cluster stage)")
            if dim is not None and tgt_dim != dim:
                raise ValueError(f"{tgt_file}: embeddings of dimension {tgt_dim}, other shards have {dim}")
            dim = tgt_dim
            if "norm" not in schema.names and require_norms:
                raise ValueError(f"{tgt_file}: no 'norm' column (written by an older cluster stage), which the L1 "
                                 f"alignment's un-normalised targets need; rerun it: snakemake --forcerun cluster")
            has_norms.append("norm" in schema.names)
        return has_norms

    def _build(self, tiles_dirs: list[Path], proposals_files: list[Path], targets_files: list[Path],
               max_boxes: int | None, has_norms: list[bool]) -> dict:
        """Stream the shards into the record array (``self._records``: the cache file, memory-mapped, or
        an in-memory array); returns the index (tile ids, their shard and path, row spans, dim, classes)."""
        try:
            return self._build_all(tiles_dirs, proposals_files, targets_files, max_boxes, has_norms)
        finally:  # the batches read are freed; hand their pages back rather than keep them for training
            pa.default_memory_pool().release_unused()

    def _build_all(self, tiles_dirs: list[Path], proposals_files: list[Path], targets_files: list[Path],
                   max_boxes: int | None, has_norms: list[bool]) -> dict:
        # One shard's plan at a time (its keys: about 16 bytes a row), here for the size, then again
        # while its rows are copied: reading two small columns twice costs less than holding every plan.
        total = sum(int(_shard_plan(p, max_boxes)[4].sum()) for p in proposals_files)
        dim = check_file(targets_files[0], "targets")[0]
        dtype = record_dtype(dim)
        if self.cache_file is None:
            return self._fill(np.empty(total, dtype), max_boxes, tiles_dirs, proposals_files, targets_files, has_norms)
        with atomic_path(self.cache_file) as tmp:
            records = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(total,))
            index = self._fill(records, max_boxes, tiles_dirs, proposals_files, targets_files, has_norms)
            records.flush()
            del records
        return index

    def _fill(self, records: np.ndarray, max_boxes: int | None, tiles_dirs: list[Path], proposals_files: list[Path],
              targets_files: list[Path], has_norms: list[bool]) -> dict:
        index = {"tile_ids": [], "shards": [], "tile_paths": [], "starts": [], "stops": [], "dim": records.dtype[
            "embedding"].shape[0], "num_classes": 0}
        num_classes, offset = 0, 0
        for shard, (tiles_dir, prop_file, tgt_file, norms) in enumerate(
                zip(tiles_dirs, proposals_files, targets_files, has_norms)):
            tiles, code, rank, dest, counts = _shard_plan(prop_file, max_boxes)
            names = _TileCodes({t: i for i, t in enumerate(tiles)})
            block = records[offset:offset + int(counts.sum())]
            columns = ["tile_id", "proposal_index", "embedding", "cluster_id"] + (["norm"] if norms else [])
            seen, row = 0, 0
            pairs = zip(_exact_batches(prop_file, ["cx", "cy", "w", "h", "theta"], _BATCH_ROWS),
                        _exact_batches(tgt_file, columns, _BATCH_ROWS))
            for boxes, targets in pairs:
                n = targets.num_rows
                if (boxes.num_rows != n or not np.array_equal(names(targets.column("tile_id")), code[row:row + n])
                        or not np.array_equal(targets.column("proposal_index").to_numpy(), rank[row:row + n])):
                    raise ValueError(f"{tgt_file}: its rows are not those of {prop_file} (rerun the cluster stage); "
                                     f"first difference in rows {row}..{row + n}")
                labels = targets.column("cluster_id").to_numpy()
                seen = max(seen, int(labels.max()) + 1 if n else 0)
                at = dest[row:row + n]
                kept = at >= 0
                if kept.any():
                    where = at[kept]
                    box = np.stack([boxes.column(c).to_numpy() for c in ("cx", "cy", "w", "h", "theta")], 1)
                    block["box"][where] = box[kept]
                    block["label"][where] = labels[kept]
                    block["norm"][where] = targets.column("norm").to_numpy()[kept] if norms else 1.0
                    flat = targets.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False)
                    block["embedding"][where] = flat.reshape(n, -1)[kept]
                row += n
            k = (read_metadata(tgt_file).get("params") or {}).get("k")  # the cluster stage's k
            if k is not None and seen > k:
                raise ValueError(f"{tgt_file}: cluster ids up to {seen - 1} for k = {k}")
            num_classes = max(num_classes, seen if k is None else int(k))
            tile_table = read_artefact(tiles_dir / "tiles.parquet", "tiles", columns=["tile_id", "tile_path"])
            known = dict(zip(tile_table.column("tile_id").to_pylist(), tile_table.column("tile_path").to_pylist()))
            unknown = [t for t in tiles if t not in known]
            if unknown:
                raise ValueError(f"{prop_file}: proposals for tiles not in {tiles_dir / 'tiles.parquet'}, "
                                 f"e.g. {unknown[:3]}")
            stops = offset + np.cumsum(counts)
            index["tile_ids"] += tiles
            index["shards"] += [shard] * len(tiles)
            index["tile_paths"] += [known[t] for t in tiles]
            index["starts"] += (stops - counts).tolist()
            index["stops"] += stops.tolist()
            offset = int(stops[-1]) if len(stops) else offset
        if len(set(index["tile_ids"])) != len(index["tile_ids"]):
            raise ValueError(f"duplicate tile ids across tiles folders {[str(d) for d in tiles_dirs]}")
        index["num_classes"] = num_classes
        if self.cache_file is None:
            self._records = records
        return index

    def __getstate__(self) -> dict:
        """Pickled (DataLoader workers started by spawn) without the memory-mapped array: reopened."""
        state = dict(self.__dict__)
        if self.cache_file is not None:
            state["_records"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if self._records is None:
            self._records = np.load(self.cache_file, mmap_mode="r")

    def __len__(self) -> int:
        return len(self.tile_ids)

    def __getitem__(self, index: int, generator: random.Random | None = None) -> tuple[torch.Tensor, dict]:
        rows = self._records[self._starts[index]:self._stops[index]]
        image = read_tile_image(self._paths[index])
        labels = torch.from_numpy(rows["label"].astype(np.int64))
        target = {
            "labels": torch.zeros_like(labels) if self.class_agnostic else labels,
            "boxes": torch.from_numpy(np.array(rows["box"], np.float32)),
            "embeddings": torch.from_numpy(rows["embedding"].astype(np.float32)),
            "embedding_norms": torch.from_numpy(np.array(rows["norm"], np.float32)),
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
