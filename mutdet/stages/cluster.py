"""Stage ``cluster``: the embeddings of every shard -> PCA + k-means model and one targets file per shard.

Inputs: ``embeddings.parquet`` files of the embed stage (any number of shards, of one or several
dataset splits; all must come from the same embedding parameters).
Outputs::

    <out>/pca_kmeans.npz        the fitted model as plain arrays (mutdet.embedding.cluster.ClusterModel)
    <out>/manifest.json         parameters, code version, pool and fit sizes, explained variance,
                                k-means statistics, cluster sizes over the whole pool
    <target_files[i]>           targets schema (mutdet.embedding.artefacts) for embedding_files[i],
                                written a batch of rows at a time (ParquetWriter, temporary file renamed):
                                exactly its rows and order, with O (pca_dim, L2-normalised, float16),
                                the cluster id (int16, cosine to the unit centroids, computed from
                                the float32 vector before the cast) and the norm of the PCA projection
                                before normalisation (float32; O * norm is DETReg's L1 target)

The fit sample: the whole pool when it has at most ``max_fit_samples`` rows, else
``max_fit_samples`` rows drawn uniformly without replacement. Randomness (that draw and the k-means++
seeding) comes from ``numpy.random.SeedSequence(seed)``: the outputs are a function of the inputs and
the seed.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mutdet.config import Config
from mutdet.embedding.artefacts import (ROW_GROUP_ROWS, read_embeddings, vector_column, vector_matrix,
                                       write_targets_batches)
from mutdet.embedding.cluster import BLOCK_ROWS, ClusterFitError, fit_cluster_model
from mutdet.io.artefacts import ArtefactError, read_metadata
from mutdet.io.atomic import write_json
from mutdet.stages.common import code_version, log


def _embedding_params(files: list[Path]) -> dict:
    """The embed-stage parameters shared by every file (an error names two files that disagree)."""
    first = None
    for path in files:
        params = read_metadata(path).get("params")
        if first is None:
            first = (path, params)
        elif params != first[1]:
            raise ArtefactError(f"{path}: embedding parameters {params} differ from those of {first[0]} "
                                f"({first[1]}); one cluster model needs one kind of embedding")
    return first[1] if first else {}


def _embedding_batches(path: Path, batch_rows: int = ROW_GROUP_ROWS):
    """``(first row, (n, D) float16 matrix)`` of one embeddings file, a batch of rows at a time: memory
    holds one batch (and one row group), not the file's whole column (the schema is checked once, by
    ``read_embeddings``). Measured on 4 shards of 100k 2048-d proposals: peak RSS 3.9 GB when each
    shard's column was read whole, 1.6 GB by batches of 8192 rows."""
    first = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_rows, columns=["embedding"]):
        matrix = vector_matrix(batch.column(0))
        yield first, matrix
        first += len(matrix)


def _fit_sample(files: list[Path], counts: list[int], max_fit_samples: int, rng: np.random.Generator) -> np.ndarray:
    """Rows of the pool (files concatenated in order) to fit on, ``(n, D)`` float16 as stored (half the
    memory of float32; the fit converts a block at a time), read a batch of rows at a time."""
    total = sum(counts)
    if total <= max_fit_samples:
        chosen = np.arange(total)
    else:
        chosen = np.sort(rng.choice(total, max_fit_samples, replace=False))
    sample, filled, offset = None, 0, 0
    for path, count in zip(files, counts):
        local = chosen[(chosen >= offset) & (chosen < offset + count)] - offset
        if len(local):
            for first, matrix in _embedding_batches(path):
                rows = local[(local >= first) & (local < first + len(matrix))] - first
                if sample is None:  # float16 as stored: the fit converts a block of rows at a time
                    sample = np.empty((len(chosen), matrix.shape[1]), matrix.dtype)
                sample[filled:filled + len(rows)] = matrix[rows]
                filled += len(rows)
        offset += count
    return sample


def _projection_norms(model, embeddings: np.ndarray, block: int = BLOCK_ROWS) -> np.ndarray:
    """``||(x - mean) @ components.T||`` per row ``(N,)`` float32: the PCA projection's norm before the
    L2 normalisation of :meth:`ClusterModel.project` (float32, one block of rows at a time)."""
    out = np.empty(len(embeddings), np.float32)
    for s in range(0, len(embeddings), block):
        rows = embeddings[s:s + block].astype(np.float32)
        out[s:s + block] = np.linalg.norm((rows - model.pca_mean) @ model.pca_components.T, axis=1)
    return out


def run(cfg: Config, *, embedding_files: list[str | Path], target_files: list[str | Path],
        out_dir: str | Path) -> dict:
    """Fit PCA + spherical k-means (``cluster`` section, seeded by ``seed``) on the pool of
    ``embedding_files`` and write one targets file per input.

    Args:
        embedding_files: embeddings artefacts (one per shard).
        target_files: output targets artefacts, ``target_files[i]`` for ``embedding_files[i]``.
        out_dir: folder of ``pca_kmeans.npz`` and ``manifest.json``.
    Returns:
        The manifest dict.
    Raises:
        ArtefactError: a missing or malformed embeddings file, or files of different embedding parameters.
        ClusterFitError: a pool too small for ``pca_dim`` / ``k`` (see mutdet.embedding.cluster).
        ValueError: bad arguments.
    """
    c, seed = cfg.cluster, cfg.seed
    pca_dim, k, max_fit_samples, max_iter = c.pca_dim, c.k, c.max_fit_samples, c.max_iter
    embedding_files = [Path(p) for p in embedding_files]
    target_files = [Path(p) for p in target_files]
    out_dir = Path(out_dir)
    if len(embedding_files) != len(target_files):
        raise ValueError(f"cluster: {len(embedding_files)} embedding files but {len(target_files)} target files")
    if not embedding_files:
        raise ValueError("cluster: no embedding files given")

    counts = [read_embeddings(p, columns=["proposal_index"]).num_rows for p in embedding_files]
    embedding_params = _embedding_params(embedding_files)
    total = sum(counts)
    if total == 0:
        raise ClusterFitError(f"cluster: the {len(embedding_files)} embedding file(s) hold no embeddings "
                              f"(first {embedding_files[0]})")
    sample_seq, kmeans_seq = np.random.SeedSequence(seed).spawn(2)
    start = time.perf_counter()
    x = _fit_sample(embedding_files, counts, max_fit_samples, np.random.default_rng(sample_seq))
    log.info("cluster: fitting PCA %d -> %d and k-means k=%d on %d of %d embeddings (%d files)",
             x.shape[1], pca_dim, k, len(x), total, len(embedding_files))
    model = fit_cluster_model(x, pca_dim=pca_dim, k=k, seed=int(kmeans_seq.generate_state(1)[0]), max_iter=max_iter)
    del x
    fit_seconds = time.perf_counter() - start
    params = {"pca_dim": pca_dim, "k": k, "max_fit_samples": max_fit_samples, "seed": seed, "max_iter": max_iter}
    model = dataclasses.replace(model, meta={**model.meta, "params": params, "embedding_params": embedding_params,
                                             "embedding_files": [str(p) for p in embedding_files],
                                             "code_version": code_version()})
    model_file = out_dir / "pca_kmeans.npz"
    model.save(model_file)

    sizes = np.zeros(k, dtype=np.int64)
    cosines = []
    meta = {"params": params, "embedding_params": embedding_params, "model_file": str(model_file),
            "code_version": code_version()}
    for source, target in zip(embedding_files, target_files):
        def targets(source=source):  # one batch of rows at a time: read, projected, assigned, written
            keys = read_embeddings(source, columns=["tile_id", "proposal_index"])  # about 50 B a row
            for first, raw in _embedding_batches(source):
                z = model.project(raw)
                ids, cos = model.assign(z)
                sizes[:] += np.bincount(ids, minlength=k)
                cosines.append(cos)
                rows = keys.slice(first, len(raw))
                yield pa.table({"tile_id": rows.column("tile_id"), "proposal_index": rows.column("proposal_index"),
                                "embedding": vector_column(z), "cluster_id": pa.array(ids, pa.int16()),
                                "norm": pa.array(_projection_norms(model, raw), pa.float32())})

        write_targets_batches(targets(), target, model.pca_components.shape[0],
                              {**meta, "embeddings_file": str(source)})
    cos = np.concatenate(cosines)
    manifest = {
        "params": params, "embedding_params": embedding_params, "code_version": code_version(),
        "embedding_files": [str(p) for p in embedding_files], "target_files": [str(p) for p in target_files],
        "model_file": str(model_file), "pool": total, "fit_samples": model.meta["fit_samples"],
        "input_dim": model.meta["input_dim"],
        "pca_explained_variance_ratio_total": model.meta["pca_explained_variance_ratio_total"],
        "kmeans": model.meta["kmeans"], "pool_mean_cosine": float(cos.mean()),
        "cluster_sizes": {"min": int(sizes.min()), "median": float(np.median(sizes)), "max": int(sizes.max()),
                          "empty": int((sizes == 0).sum())},
        "seconds": {"fit": round(fit_seconds, 3), "total": round(time.perf_counter() - start, 3)},
    }
    write_json(out_dir / "manifest.json", manifest)
    log.info("cluster: %d embeddings -> %d clusters (mean cosine %.3f, %d empty) -> %s", total, k,
             manifest["pool_mean_cosine"], manifest["cluster_sizes"]["empty"], out_dir)
    return manifest
