"""Parquet artefacts of the embed and cluster stages: schemas, one save/load pair each, the proposal join.

Both artefacts are keyed by ``(tile_id, proposal_index)`` and hold **exactly** the rows of the
``proposals.parquet`` they were computed from, in the same order (:func:`check_join`). Vectors are a
``fixed_size_list<halffloat>[D]`` column: Arrow's float16 inside a fixed-size list round-trips through
Parquet (Parquet's FLOAT16 logical type, pyarrow >= 15), 2 bytes per value, read back zero-copy as a
``(N, D)`` numpy float16 matrix. ``D`` is not fixed by the schema: it follows the backbone (2048 for
ResNet-50/101, 512 for ResNet-18/34) or the PCA dimension, and is also stored as ``dim`` metadata.

Schemas
-------
``embeddings``: one row per proposal, the frozen ResNet's C5 average (METHOD.md step 3); the DETReg
baseline's target and the input of the cluster stage.
    tile_id (string), proposal_index (int32)   the proposal's key (proposals schema)
    embedding (fixed_size_list<halffloat>[D])  raw average-pooled C5, not normalised

``targets``: one row per proposal, MutDet's target (METHOD.md step 4).
    tile_id (string), proposal_index (int32)
    embedding (fixed_size_list<halffloat>[pca_dim])  O: the PCA projection, L2-normalised
    cluster_id (int16)                            pseudo-class in ``[0, k)``: the centroid of highest cosine
    norm (float, optional)                        ``||P||``, the PCA projection's L2 norm before the
                                                  normalisation: ``O * norm`` is the un-normalised
                                                  projection, the DETReg baseline's L1 target. Optional
                                                  so that files written before it existed still load
                                                  (readers then take 1, see mutdet.data.pretrain)

Metadata (JSON, ``mutdet_*`` keys, :func:`mutdet.io.artefacts.read_metadata`): ``dim``, ``params``,
``code_version``, ``proposals_file`` (embeddings) / ``embeddings_file`` and ``model_file`` (targets).
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mutdet.io.artefacts import ArtefactError, read_file_schema, write_parquet_stream
from mutdet.io.atomic import atomic_path

# Rows per Parquet row group of embeddings/targets files (8192 x 2048 float16 vectors: 32 MiB).
ROW_GROUP_ROWS = 8192

__all__ = ["KEY_COLUMNS", "embeddings_schema", "targets_schema", "vector_column", "vector_matrix",
           "write_embeddings", "write_embeddings_batches", "write_targets_batches", "read_embeddings",
           "check_file", "write_targets", "read_targets", "check_join", "JoinError"]

KEY_COLUMNS = ("tile_id", "proposal_index")
_KEYS = [("tile_id", pa.string()), ("proposal_index", pa.int32())]
_EXTRA = {"embeddings": [], "targets": [("cluster_id", pa.int16())]}
_OPTIONAL = {"embeddings": [], "targets": [("norm", pa.float32())]}  # checked and kept when present


class JoinError(ArtefactError):
    """Vectors whose keys are not exactly the rows of their proposals file (missing, extra or reordered)."""


def embeddings_schema(dim: int) -> pa.Schema:
    """The ``embeddings`` schema for ``dim``-dimensional vectors (see the module docstring)."""
    return pa.schema([*_KEYS, ("embedding", pa.list_(pa.float16(), dim))])


def targets_schema(dim: int, with_norm: bool = True) -> pa.Schema:
    """The ``targets`` schema for ``dim``-dimensional (PCA) vectors (see the module docstring); without
    the optional ``norm`` column if ``with_norm`` is False."""
    return pa.schema([*_KEYS, ("embedding", pa.list_(pa.float16(), dim)), *_EXTRA["targets"],
                      *(_OPTIONAL["targets"] if with_norm else [])])


_SCHEMA_OF = {"embeddings": embeddings_schema, "targets": targets_schema}


def _schema(kind: str, dim: int, names) -> pa.Schema:
    """The schema of ``kind`` with the optional columns found in ``names``."""
    full = _SCHEMA_OF[kind](dim)
    optional = {name for name, _ in _OPTIONAL[kind]}
    return pa.schema([f for f in full if f.name not in optional or f.name in names])


def vector_column(vectors: np.ndarray) -> pa.FixedSizeListArray:
    """``(N, D)`` array -> ``fixed_size_list<halffloat>[D]`` array (values cast to float16)."""
    vectors = np.asarray(vectors)
    if vectors.ndim != 2:
        raise ValueError(f"vector_column: expected (N, D), got shape {vectors.shape}")
    flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float16).reshape(-1), pa.float16())
    return pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1])


def vector_matrix(column: pa.ChunkedArray | pa.FixedSizeListArray) -> np.ndarray:
    """``fixed_size_list<halffloat>[D]`` column -> ``(N, D)`` float16 numpy array."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks else pa.array([], column.type)
    dim = column.type.list_size
    values = column.flatten()  # respects the array's offset
    return values.to_numpy(zero_copy_only=False).reshape(len(column), dim)


def _check_schema(schema: pa.Schema, kind: str, source: str) -> int:
    """Check the columns of an ``embeddings``/``targets`` file; returns ``D``."""
    for name, typ in _KEYS + _EXTRA[kind]:
        if name not in schema.names:
            raise ArtefactError(f"{source}: missing column {name!r} ({typ}) of the {kind} schema")
        if schema.field(name).type != typ:
            raise ArtefactError(f"{source}: column {name!r} has type {schema.field(name).type}, "
                                f"the {kind} schema needs {typ}")
    for name, typ in _OPTIONAL[kind]:
        found = schema.field(name).type if name in schema.names else None
        if found is not None and not (found.equals(typ) or (pa.types.is_floating(typ) and pa.types.is_floating(found))):
            raise ArtefactError(f"{source}: column {name!r} has type {schema.field(name).type}, "
                                f"the {kind} schema needs {typ}")
    if "embedding" not in schema.names:
        raise ArtefactError(f"{source}: missing column 'embedding' (fixed_size_list<halffloat>[D]) "
                            f"of the {kind} schema")
    typ = schema.field("embedding").type
    if not (pa.types.is_fixed_size_list(typ) and typ.value_type == pa.float16() and typ.list_size > 0):
        raise ArtefactError(f"{source}: column 'embedding' has type {typ}, the {kind} schema needs "
                            "fixed_size_list<halffloat>[D]")
    return typ.list_size


def _write(table: pa.Table, path: str | Path, kind: str, metadata: Mapping[str, object] | None) -> None:
    source = f"{kind} table for {path}"
    dim = _check_schema(table.schema, kind, source)
    schema = _schema(kind, dim, table.schema.names)
    table = table.select(schema.names).cast(schema)
    meta = {b"mutdet_kind": kind.encode(), b"mutdet_dim": json.dumps(dim).encode()}
    for key, value in (metadata or {}).items():
        meta[f"mutdet_{key}".encode()] = json.dumps(value, default=str).encode()
    with atomic_path(path) as tmp:
        # Dictionary-encoding float16 vectors only costs time; zstd still shares repeated tile ids.
        # Row groups of ROW_GROUP_ROWS let a reader hold one group of vectors at a time (the cluster stage).
        pq.write_table(table.replace_schema_metadata(meta), tmp, compression="zstd",
                       use_dictionary=list(KEY_COLUMNS), row_group_size=ROW_GROUP_ROWS)


def check_file(path: str | Path, kind: str) -> tuple[int, pa.Schema]:
    """Check an ``embeddings``/``targets`` file's schema and metadata without reading its rows; returns
    ``(D, schema)``. Errors name the file and the column."""
    path = Path(path)
    schema = read_file_schema(path, kind)
    dim = _check_schema(schema, kind, str(path))
    found_kind = (schema.metadata or {}).get(b"mutdet_kind", b"").decode()
    if found_kind != kind:
        raise ArtefactError(f"{path}: a {found_kind or 'non-mutdet'} file where a {kind} artefact is expected")
    stored_dim = json.loads((schema.metadata or {}).get(b"mutdet_dim", b"null"))
    if stored_dim != dim:
        raise ArtefactError(f"{path}: 'dim' metadata {stored_dim} does not match the embedding column's size {dim}")
    return dim, schema


def _read(path: str | Path, kind: str, columns: list[str] | None) -> pa.Table:
    path = Path(path)
    schema = read_file_schema(path, kind)
    dim = _check_schema(schema, kind, str(path))
    found_kind = (schema.metadata or {}).get(b"mutdet_kind", b"").decode()
    if found_kind != kind:
        raise ArtefactError(f"{path}: a {found_kind or 'non-mutdet'} file where a {kind} artefact is expected")
    stored_dim = json.loads((schema.metadata or {}).get(b"mutdet_dim", b"null"))
    if stored_dim != dim:
        raise ArtefactError(f"{path}: 'dim' metadata {stored_dim} does not match the embedding column's size {dim}")
    return pq.read_table(path, columns=columns or _schema(kind, dim, schema.names).names)


def write_embeddings(table: pa.Table, path: str | Path, metadata: Mapping[str, object] | None = None) -> None:
    """Write an ``embeddings`` table atomically (cast to the schema; JSON ``metadata``)."""
    _write(table, path, "embeddings", metadata)


def _write_batches(batches: Iterable[pa.Table | pa.RecordBatch], path: str | Path, kind: str, dim: int,
                   metadata: Mapping[str, object] | None) -> int:
    schema = _SCHEMA_OF[kind](dim)
    meta = {b"mutdet_kind": kind.encode(), b"mutdet_dim": json.dumps(dim).encode()}
    for key, value in (metadata or {}).items():
        meta[f"mutdet_{key}".encode()] = json.dumps(value, default=str).encode()

    def checked():
        for batch in batches:
            found = _check_schema(batch.schema, kind, f"{kind} batch for {path}")
            if found != dim:
                raise ArtefactError(f"{kind} batch for {path}: {found}-d vectors where {dim}-d are expected")
            yield batch

    return write_parquet_stream(checked(), path, schema.with_metadata(meta), row_group_rows=ROW_GROUP_ROWS,
                                use_dictionary=list(KEY_COLUMNS))


def write_embeddings_batches(batches: Iterable[pa.Table | pa.RecordBatch], path: str | Path, dim: int,
                             metadata: Mapping[str, object] | None = None) -> int:
    """Write a stream of ``embeddings`` tables/batches of ``dim``-d vectors atomically, memory bounded by
    a batch plus one row group (``ROW_GROUP_ROWS`` rows); same file layout as :func:`write_embeddings`.
    Returns the rows written."""
    return _write_batches(batches, path, "embeddings", dim, metadata)


def write_targets_batches(batches: Iterable[pa.Table | pa.RecordBatch], path: str | Path, dim: int,
                          metadata: Mapping[str, object] | None = None) -> int:
    """:func:`write_embeddings_batches` for ``targets`` (``norm`` column included)."""
    return _write_batches(batches, path, "targets", dim, metadata)


def read_embeddings(path: str | Path, columns: list[str] | None = None) -> pa.Table:
    """Read an ``embeddings`` file, checking its schema (errors name the file and the column)."""
    return _read(path, "embeddings", columns)


def write_targets(table: pa.Table, path: str | Path, metadata: Mapping[str, object] | None = None) -> None:
    """Write a ``targets`` table atomically (cast to the schema; JSON ``metadata``)."""
    _write(table, path, "targets", metadata)


def read_targets(path: str | Path, columns: list[str] | None = None) -> pa.Table:
    """Read a ``targets`` file, checking its schema (errors name the file and the column)."""
    return _read(path, "targets", columns)


def check_join(table: pa.Table, proposals: pa.Table, *, path: str | Path, proposals_path: str | Path) -> None:
    """Require ``table``'s keys to be exactly ``proposals``' keys, row by row.

    Args:
        table: an embeddings or targets table (or any table with the key columns), read from ``path``.
        proposals: the proposals table (``tile_id``, ``proposal_index``) read from ``proposals_path``.
    Raises:
        JoinError: naming both files and the first missing keys, extra keys, or the first row where
            the order differs.
    """
    a = table.select(list(KEY_COLUMNS))
    b = proposals.select(list(KEY_COLUMNS))
    if a.num_rows == b.num_rows and all(a.column(c).equals(b.column(c)) for c in KEY_COLUMNS):
        return
    keys_a = list(zip(*(a.column(c).to_pylist() for c in KEY_COLUMNS)))
    keys_b = list(zip(*(b.column(c).to_pylist() for c in KEY_COLUMNS)))
    set_a, set_b = set(keys_a), set(keys_b)
    missing = [k for k in keys_b if k not in set_a]
    extra = [k for k in keys_a if k not in set_b]
    head = f"{path} ({a.num_rows} rows) does not match {proposals_path} ({b.num_rows} proposals)"
    if missing or extra:
        raise JoinError(f"{head}: {len(missing)} proposal(s) missing, first {missing[:3]}; "
                        f"{len(extra)} extra key(s), first {extra[:3]}")
    if len(keys_a) != len(keys_b):
        raise JoinError(f"{head}: duplicated keys")
    first = next(i for i, (x, y) in enumerate(zip(keys_a, keys_b)) if x != y)
    raise JoinError(f"{head}: same keys in a different order; row {first} is {keys_a[first]} "
                    f"where the proposals have {keys_b[first]}")
