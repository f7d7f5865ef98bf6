"""Stage ``embed``: the proposals of one shard -> ``embeddings.parquet`` (frozen ResNet C5, METHOD.md step 3).

Inputs: ``<tiles>/tiles.parquet`` (tile images, ``tile_path`` relative to ``<tiles>`` or, for a
whole-image tile, the source file) and
``<proposals>/proposals.parquet`` (le90 boxes in tile pixels).
Output folder layout::

    <out>/embeddings.parquet                embeddings schema (mutdet.embedding.artefacts): exactly the
                                            proposals' rows, in the proposals' order
    <out>/manifest.json                     parameters, runtime, code version, counts, proposals/s
    <out>/parts/chunk-<k>.<hash>.parquet    embeddings of the tiles [k * checkpoint_every, (k + 1) * checkpoint_every)
                                            (tiles that have proposals, in order of first appearance),
                                            while the stage runs (removed once embeddings.parquet is written)

Each proposal: the tile resized to ``input_size`` (longer side, ratio kept), ImageNet-normalised, the
box enlarged ``context`` times in ``w`` and ``h``, cropped and stretched to ``crop_size`` squared by the
rotated RoI-align, through the frozen ResNet to C5, average-pooled, stored as float16 (``mode: crop``,
the paper). ``mode: pooled`` runs the ResNet once over the resized tile and pools each enlarged box from
its C5 map by rotated RoI-align (:mod:`mutdet.embedding.backbone`); the output schema is the same.

Resume inside a shard: every ``checkpoint_every`` tiles a part is written atomically, tagged with a hash
of the embedding parameters, the proposals' and the tiles' parameters; a rerun reuses every part whose
hash, tile list and row count match. The weights are resolved (and the backbone built) only when some
tile is left to do, before any tile is decoded. The final file is streamed from the parts (one record
batch in memory at a time when the proposals are grouped by tile, as the propose stage writes them) into
a temporary file renamed into place; the manifest follows, then every part is removed. The final file
and the manifest carry the ``params_hash``: a rerun with the same key is a no-op.
"""
from __future__ import annotations

import itertools
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from mutdet.config import Config
from mutdet.embedding.artefacts import (JoinError, check_join, embeddings_schema, vector_column, write_embeddings,
                                       write_embeddings_batches)
from mutdet.embedding.backbone import build_embedder, embedding_dim
from mutdet.embedding.pipeline import TileImages, embed_tiles, tile_loader
from mutdet.engine.device import resolve_device
from mutdet.io.artefacts import ArtefactError, read_artefact
from mutdet.io.atomic import write_json
from mutdet.io.identity import file_digest
from mutdet.stages import parts
from mutdet.stages.common import code_version, log, params_hash


class NonFiniteEmbeddingError(RuntimeError):
    """An embedding that is not finite in float16 (overflow under fp16 autocast, or broken weights)."""


def _group_by_tile(tile_ids: np.ndarray) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Proposal rows grouped by tile, tiles in order of first appearance, rows stable within a tile.

    Returns ``(tiles, order, bounds)``: ``order`` (N,) row indices grouped by tile, tile ``t``'s rows
    are ``order[bounds[t]:bounds[t + 1]]``.
    """
    unique, first, inverse = np.unique(tile_ids, return_index=True, return_inverse=True)
    rank = np.empty(len(unique), dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(unique))
    row_rank = rank[inverse]
    order = np.argsort(row_rank, kind="stable")
    bounds = np.searchsorted(row_rank[order], np.arange(len(unique) + 1))
    tiles = [str(t) for t in unique[np.argsort(first, kind="stable")]]
    return tiles, order, bounds


def _write_final(paths: list[Path], order: np.ndarray, proposals: pa.Table, dim: int, final: Path,
                 proposals_file: Path, meta: dict) -> None:
    """Stream the parts (rows grouped by tile) into ``final`` in the proposals' row order, atomically.

    When the proposals are already grouped by tile (as the propose stage writes them) the parts are
    copied batch by batch, memory bounded by one record batch; each batch's keys are checked against the
    proposals rows it stands for. Otherwise (proposals of a tile spread over the file) the grouped rows
    must be permuted back, which needs them all in memory: that case reads the parts whole.
    """
    keys = proposals.select(["tile_id", "proposal_index"])
    if np.array_equal(order, np.arange(len(order))):
        def checked():
            done = 0
            for k, batch in parts.batches(paths):
                expected = keys.slice(done, batch.num_rows)
                if not (batch.column("tile_id").equals(expected.column("tile_id").combine_chunks())
                        and batch.column("proposal_index").equals(expected.column("proposal_index").combine_chunks())):
                    check_join(pa.Table.from_batches([batch]).select(["tile_id", "proposal_index"]), expected,
                               path=paths[k], proposals_path=f"{proposals_file} rows {done}..{done + batch.num_rows}")
                done += batch.num_rows
                yield batch
            if done != keys.num_rows:
                raise JoinError(f"{final}: the parts hold {done} rows, {proposals_file} has {keys.num_rows} proposals")

        write_embeddings_batches(checked(), final, dim, meta)
        return
    grouped, _ = parts.read(paths, "embeddings", empty=embeddings_schema(dim).empty_table())
    inverse = np.empty(len(order), dtype=np.int64)
    inverse[order] = np.arange(len(order))
    # Grouped row j is proposal row order[j]; proposal row i is grouped row inverse[i].
    embeddings = grouped.take(pa.array(inverse))
    check_join(embeddings, proposals, path=final, proposals_path=proposals_file)
    write_embeddings(embeddings, final, meta)


def run(cfg: Config, *, tiles_dir: str | Path, proposals_dir: str | Path, out_dir: str | Path) -> dict:
    """Embed every proposal of ``proposals_dir/proposals.parquet`` into ``out_dir/embeddings.parquet``
    with the ``embedding`` section's backbone (its keys are described in the config schema; the
    embedding dimension follows the backbone: 512 for resnet18/34, 2048 for resnet50/101).

    Args:
        tiles_dir: folder of ``tiles.parquet`` and the tile images.
        proposals_dir: folder of ``proposals.parquet`` (proposals of the tiles of ``tiles_dir``).
        out_dir: output folder (see the module docstring).
    Returns:
        The manifest dict (also written to ``out_dir/manifest.json``).
    Raises:
        ValueError: a bad parameter (naming the ``embedding.*`` key). BackboneWeightsError: weights not
            found (before any tile is read). ArtefactError: missing/malformed inputs, or proposals of
            tiles that ``tiles.parquet`` does not list. TileReadError: a tile image with proposals that
            cannot be read. NonFiniteEmbeddingError: an embedding that overflows float16.
    """
    tiles_dir, proposals_dir, out_dir = Path(tiles_dir), Path(proposals_dir), Path(out_dir)
    e = cfg.embedding
    backbone, weights, precision, context, mode = e.backbone, e.weights, e.precision, e.context, e.mode
    batch_size, workers, input_size, crop_size, checkpoint_every = (e.batch_size, e.workers, e.input_size,
                                                                     e.crop_size, e.checkpoint_every)
    torch_device = resolve_device(e.device, "embedding.device")
    dim = embedding_dim(backbone)

    tiles_file, proposals_file = tiles_dir / "tiles.parquet", proposals_dir / "proposals.parquet"
    tile_paths = {r["tile_id"]: tiles_dir / r["tile_path"]
                  for r in read_artefact(tiles_file, "tiles", columns=["tile_id", "tile_path"]).to_pylist()}
    proposals = read_artefact(proposals_file, "proposals", columns=["tile_id", "proposal_index", "cx", "cy", "w",
                                                                     "h", "theta"])
    tile_of_row = proposals.column("tile_id").to_numpy(zero_copy_only=False).astype(str)
    unknown = sorted(set(tile_of_row) - set(tile_paths))
    if unknown:
        raise ArtefactError(f"{proposals_file}: {len(unknown)} tile(s) with proposals are not listed in {tiles_file}, "
                            f"first {unknown[:3]}")
    boxes = np.stack([proposals.column(c).to_numpy() for c in ("cx", "cy", "w", "h", "theta")], axis=-1)
    indices = proposals.column("proposal_index").to_numpy()
    tiles, order, bounds = _group_by_tile(tile_of_row)

    params = {"backbone": backbone, "weights": weights, "dim": dim, "context": context, "input_size": input_size,
              "crop_size": crop_size, "mode": mode}
    runtime = {"device": str(torch_device), "precision": precision, "batch_size": batch_size, "workers": workers}
    # Parts are keyed to what makes them: these parameters, the autocast precision, the content of the
    # proposals and tiles tables and of a weights file, and the code version (a part of other inputs or
    # an older mutdet is recomputed, never reused).
    phash = params_hash({"embedding": params, "precision": precision, "proposals": file_digest(proposals_file),
                         "tiles": file_digest(tiles_file), "code_version": code_version(),
                         "weights_file": file_digest(weights) if weights not in ("imagenet", "none") else None})
    final, manifest_file = out_dir / "embeddings.parquet", out_dir / "manifest.json"
    done = parts.committed(final, manifest_file, phash, rows=proposals.num_rows)
    if done is not None:  # committed by an earlier run: remove parts a crash after the commit left
        parts.remove_all(out_dir)
        log.info("embed %s: %s is current, nothing to do", proposals_file, final)
        return {**done, "proposals_reused": proposals.num_rows, "proposals_computed": 0, "seconds": 0.0,
                "proposals_per_second": None}
    chunks = [range(s, min(s + checkpoint_every, len(tiles))) for s in range(0, len(tiles), checkpoint_every)]
    expect = [{"tile_ids": [tiles[t] for t in c], "rows": int(bounds[c.stop] - bounds[c.start])} for c in chunks]
    paths = parts.chunk_paths(out_dir, phash, len(chunks))
    todo = parts.todo(paths, phash, expect)
    reused = sum(expect[k]["rows"] for k in range(len(chunks)) if k not in todo)
    log.info("embed %s (%s, %d-d, mode %s): %d proposals on %d tiles (%d already done) -> %s",
             proposals_file, backbone, dim, mode, proposals.num_rows, len(tiles), reused, out_dir)

    start = time.perf_counter()
    if todo:
        embedder = build_embedder(backbone=backbone, weights=weights, crop_size=crop_size,
                                  context=context).to(torch_device)
        todo_tiles = [t for k in todo for t in chunks[k]]
        images = TileImages([tile_paths[tiles[t]] for t in todo_tiles], [tiles[t] for t in todo_tiles],
                            [boxes[order[bounds[t]:bounds[t + 1]]] for t in todo_tiles], input_size)
        # One loader (its workers run ahead across chunks); a chunk's last, partly filled batch is
        # flushed before its part is written, so a kill loses at most the chunk in progress.
        loaded = iter(tile_loader(images, workers=workers, device=torch_device))
        progress = tqdm(total=proposals.num_rows, initial=reused, desc=f"embed {backbone}", unit="box",
                        mininterval=1.0)
        for k in todo:
            positions, vectors = [], []
            for position, tile_vectors in embed_tiles(embedder, itertools.islice(loaded, len(chunks[k])),
                                                      batch_size=batch_size, precision=precision, mode=mode):
                positions.append(position)
                vectors.append(tile_vectors.astype(np.float16))
                progress.update(len(tile_vectors))
            assert [todo_tiles[p] for p in positions] == list(chunks[k]), "tiles come back in input order"
            rows = order[bounds[chunks[k].start]:bounds[chunks[k].stop]]
            matrix = np.concatenate(vectors) if vectors else np.zeros((0, dim), np.float16)
            bad = ~np.isfinite(matrix).all(axis=1)
            if bad.any():
                raise NonFiniteEmbeddingError(
                    f"{proposals_file}: {int(bad.sum())} embedding(s) not finite in float16 (precision "
                    f"{precision}, weights {weights}); first at tile {tile_of_row[rows[bad][0]]!r} "
                    f"proposal {int(indices[rows[bad][0]])}")
            part = pa.table({"tile_id": pa.array(tile_of_row[rows], pa.string()),
                             "proposal_index": pa.array(indices[rows], pa.int32()),
                             "embedding": vector_column(matrix)})
            parts.write(part, paths[k], "embeddings", phash, **expect[k])
        progress.close()
    seconds = time.perf_counter() - start
    computed = proposals.num_rows - reused

    meta = {"params": params, "runtime": runtime, "code_version": code_version(), "proposals_file": str(proposals_file),
            "params_hash": phash}
    _write_final(paths, order, proposals, dim, final, proposals_file, meta)
    manifest = {
        "params": params, "runtime": runtime, "params_hash": phash, "code_version": code_version(),
        "tiles_file": str(tiles_file), "proposals_file": str(proposals_file),
        "tiles_with_proposals": len(tiles), "proposals": proposals.num_rows, "proposals_reused": reused,
        "proposals_computed": computed, "seconds": round(seconds, 3),
        "proposals_per_second": round(computed / seconds, 3) if computed and seconds > 0 else None,
    }
    write_json(manifest_file, manifest)
    parts.remove_all(out_dir)  # committed: the parts would only duplicate embeddings.parquet
    log.info("embed: %d proposals -> %s (%d computed, %.1f proposals/s)", proposals.num_rows,
             out_dir / "embeddings.parquet", computed, manifest["proposals_per_second"] or 0.0)
    return manifest

