"""Stage ``propose``: the tiles of one shard -> ``proposals.parquet`` (class-agnostic le90 boxes).

Input: ``<tiles>/tiles.parquet`` (tiles schema; ``tile_path`` relative to ``<tiles>``, or the absolute
source path of a whole-image tile), from the tile stage.
Output folder layout::

    <out>/proposals.parquet                 proposals schema (mutdet.io.artefacts), tiles in input order,
                                            best first within a tile; method column = proposals.method
    <out>/manifest.json                     parameters, code version, counts, per-tile count summary,
                                            tiles that failed to decode (by name)
    <out>/parts/chunk-<k>.<hash>.parquet    proposals of tiles [k * checkpoint_every, (k + 1) * checkpoint_every),
                                            while the stage runs (removed once proposals.parquet is written)

Resume inside a shard: every ``proposals.checkpoint_every`` tiles a part is written (atomically), tagged
with a hash of the proposal parameters and of the tiling parameters; a rerun reuses every part whose
hash and tile list match and computes only the rest (chunks holding undecodable tiles are retried, the
tiles may have been repaired). The proposer (for SAM: checkpoint check and model load) is built only
when some tile is left to do. The final file is streamed from the parts once every part exists (one
record batch in memory at a time) and renamed into place; the manifest follows, then the parts are
removed (kept only when some tile could not be decoded, so that a rerun retries just those chunks).
The final file and the manifest carry the ``params_hash``: a rerun with the same key is a no-op.
"""
from __future__ import annotations

import time
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm import tqdm

from mutdet.boxes import le90_to_polygon
from mutdet.config import Config
from mutdet.io.artefacts import SCHEMAS, read_artefact, read_metadata, write_artefact_batches
from mutdet.io.atomic import write_json
from mutdet.proposals import ProposalSet, Proposer, build_proposer
from mutdet.io.identity import file_digest
from mutdet.stages import parts
from mutdet.stages.common import code_version, log, params_hash


class BadTileError(RuntimeError):
    """A tile image that is missing or cannot be decoded (``proposals.on_bad_tile: error``)."""


def _read_tile(path: Path) -> tuple[np.ndarray | None, str | None]:
    """A tile as BGR uint8 ``(H, W, 3)``, or ``(None, reason)``."""
    if not path.is_file():
        return None, "file not found"
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        return None, "not a decodable image"
    return image, None


def _columns(tile_id: str, proposals: ProposalSet, method: str) -> dict[str, pa.Array]:
    """One tile's proposals as proposals-schema columns."""
    n = len(proposals)
    b = proposals.boxes
    return {
        "tile_id": pa.array([tile_id] * n, pa.string()),
        "proposal_index": pa.array(np.arange(n, dtype=np.int32)),
        "cx": pa.array(b[:, 0]), "cy": pa.array(b[:, 1]), "w": pa.array(b[:, 2]), "h": pa.array(b[:, 3]),
        "theta": pa.array(b[:, 4]),
        "polygon": pa.FixedSizeListArray.from_arrays(pa.array(le90_to_polygon(b).reshape(-1)), 8),
        "score": pa.array(proposals.score, pa.float32()),
        "predicted_iou": pa.array(proposals.predicted_iou, pa.float32(), from_pandas=True),  # NaN -> null
        "stability_score": pa.array(proposals.stability_score, pa.float32(), from_pandas=True),
        "area": pa.array(proposals.area, pa.float32()),
        "method": pa.array([method] * n, pa.string()),
    }


def _propose_chunk(proposer: Proposer, tiles: list[dict], tiles_dir: Path, method: str, on_bad_tile: str,
                   progress: tqdm) -> tuple[pa.Table, list[dict]]:
    tables, bad = [], []
    for tile in tiles:
        path = tiles_dir / tile["tile_path"]
        image, reason = _read_tile(path)
        if image is None:
            if on_bad_tile == "error":
                raise BadTileError(f"{path}: tile {tile['tile_id']}: {reason} (proposals.on_bad_tile: error)")
            log.warning("tile %s (%s): %s; skipped and listed in the manifest", tile["tile_id"], path, reason)
            bad.append({"tile_id": tile["tile_id"], "tile_path": tile["tile_path"], "reason": reason})
        else:
            tables.append(pa.table(_columns(tile["tile_id"], proposer(image), method), schema=SCHEMAS["proposals"]))
        progress.update()
    table = pa.concat_tables(tables) if tables else SCHEMAS["proposals"].empty_table()
    return table, bad


def _count_summary(counts: np.ndarray) -> dict:
    if len(counts) == 0:
        return {"tiles": 0}
    return {"tiles": int(len(counts)), "min": int(counts.min()), "median": float(np.median(counts)),
            "mean": float(counts.mean()), "max": int(counts.max()), "tiles_without_proposals": int((counts == 0).sum())}


def run(cfg: Config, *, dataset: str, split: str, shard: int, tiles_dir: str | Path, out_dir: str | Path) -> dict:
    """Propose on every tile of ``tiles_dir`` (one shard of ``dataset``/``split``) into ``out_dir``.

    Returns the manifest dict (also written to ``out_dir/manifest.json``).

    Raises:
        SamCheckpointError (mutdet.proposals.sam): a missing or
            mismatched SAM checkpoint, before any tile is processed. BadTileError: an undecodable tile
            with ``on_bad_tile: error``. ArtefactError: a missing or malformed ``tiles.parquet``.
    """
    p = cfg.proposals
    tiles_dir, out_dir = Path(tiles_dir), Path(out_dir)
    tiles_file = tiles_dir / "tiles.parquet"
    tiles = read_artefact(tiles_file, "tiles", columns=["tile_id", "tile_path"]).to_pylist()
    params = p.method_params()
    runtime = {"device": p.sam.device, "precision": p.sam.precision} if p.method == "sam" else {}
    # Parts are keyed to what makes them: the method's parameters (SAM's precision included), the
    # content of the tiles table (rewritten with the tile images) and the code version, so a part of
    # other tiles or an older mutdet is recomputed, never reused.
    phash = params_hash({"proposals": params, "tiles": file_digest(tiles_file), "code_version": code_version()})
    final, manifest_file = out_dir / "proposals.parquet", out_dir / "manifest.json"
    done = parts.committed(final, manifest_file, phash)
    if done is not None and not done.get("bad_tiles"):
        # Committed by an earlier run (a shard with undecodable tiles is retried instead): nothing to do
        # but remove parts a crash after the commit may have left.
        parts.remove_all(out_dir)
        log.info("propose %s/%s shard %d: %s is current, nothing to do", dataset, split, shard, final)
        return {**done, "tiles_reused": len(tiles), "tiles_computed": 0, "seconds": 0.0, "tiles_per_second": None}
    every = p.checkpoint_every
    chunks = [tiles[i:i + every] for i in range(0, len(tiles), every)]
    chunk_ids = [[t["tile_id"] for t in c] for c in chunks]
    paths = parts.chunk_paths(out_dir, phash, len(chunks))
    # A chunk with undecodable tiles is retried: the tiles may have been repaired since.
    todo = parts.todo(paths, phash, [{"tile_ids": ids, "bad_tiles": []} for ids in chunk_ids])
    reused = sum(len(chunks[k]) for k in range(len(chunks)) if k not in todo)
    log.info("propose %s/%s shard %d (%s): %d tiles (%d already done) -> %s",
             dataset, split, shard, p.method, len(tiles), reused, out_dir)

    proposer = build_proposer(p) if todo else None
    progress = tqdm(total=len(tiles), initial=reused, desc=f"propose {p.method} {dataset}/{split}/{shard}",
                    unit="tile", mininterval=1.0)
    start = time.perf_counter()
    for k in todo:
        table, bad = _propose_chunk(proposer, chunks[k], tiles_dir, p.method, p.on_bad_tile, progress)
        parts.write(table, paths[k], "proposals", phash, tile_ids=chunk_ids[k], bad_tiles=bad)
    progress.close()
    seconds = time.perf_counter() - start
    computed = len(tiles) - reused

    metas = [read_metadata(path) for path in paths]
    bad_tiles = [b for meta in metas for b in meta["bad_tiles"]]
    bad_ids = {b["tile_id"] for b in bad_tiles}
    per_tile = dict.fromkeys((t["tile_id"] for t in tiles if t["tile_id"] not in bad_ids), 0)

    def counted():  # the parts' record batches, one at a time, counting proposals per tile
        for _, batch in parts.batches(paths):
            for item in pc.value_counts(batch.column("tile_id")).to_pylist():
                per_tile[item["values"]] = per_tile.get(item["values"], 0) + item["counts"]
            yield batch

    meta = {"params": params, "runtime": runtime, "code_version": code_version(), "dataset": dataset,
            "split": split, "shard": shard, "params_hash": phash}
    # Streamed part by part into a temporary file renamed into place: memory bounded by a batch.
    rows = write_artefact_batches(counted(), final, "proposals", meta)
    manifest = {
        "dataset": dataset, "split": split, "shard": shard, "method": p.method,
        "params": params, "runtime": runtime, "params_hash": phash, "code_version": code_version(),
        "tiles_file": str(tiles_file), "tiles": len(tiles), "tiles_reused": reused, "tiles_computed": computed,
        "proposals": rows, "proposals_per_tile": _count_summary(np.fromiter(per_tile.values(), int)),
        "bad_tiles": bad_tiles, "seconds": round(seconds, 3),
        "tiles_per_second": round(computed / seconds, 3) if computed and seconds > 0 else None,
    }
    write_json(manifest_file, manifest)
    if bad_tiles:  # kept, so that a rerun retries only the chunks that held undecodable tiles
        parts.remove_stale(out_dir, paths)
    else:  # committed: the parts would only duplicate the final file
        parts.remove_all(out_dir)
    if bad_tiles:
        log.warning("%d tile(s) could not be decoded (on_bad_tile: report); listed in %s",
                    len(bad_tiles), out_dir / "manifest.json")
    log.info("propose %s/%s shard %d: %d tiles -> %d proposals (%s)", dataset, split, shard, len(tiles),
             rows, final)
    return manifest
