"""Parquet artefacts: one documented schema and one save/load pair each.

Every artefact is written atomically; loaders reject a missing or mistyped column with an error that
names the file and the column. Boxes are le90 (``cx, cy, w, h, theta``: pixels, radians, clockwise,
``w >= h``, ``theta`` in ``[-pi/2, pi/2)``); polygons are ``x1 y1 ... x4 y4`` in the same frame.

Schemas
-------
``tiles``: one row per tile.
    tile_id (string)        ``<image>__<rate>__<x>___<y>``, unique within a dataset split
    image_id (string)       source image id (file stem)
    source_path (string)    source image file
    tile_path (string)      tile PNG, relative to the folder holding ``tiles.parquet``; or, for a tile that
                            is its whole source image unchanged, that image's absolute path (read both
                            as ``folder / tile_path`` with ``cv2.imread(..., IMREAD_COLOR)``)
    rate (float64)          scale applied to the source image before cutting
    x, y (int32)            window origin in the rescaled image
    size (int32)            window side (tiles are ``size x size``, padded where the image ends)
    valid_width, valid_height (int32)  extent of real image pixels inside the tile
    image_width, image_height (int32)  source image size (before rescaling)

``objects``: one row per ground-truth object per tile (tile pixels).
    tile_id (string), object_index (int32: index in the source label file after skips),
    cx, cy, w, h, theta (float64: le90 in tile pixels), polygon (fixed_size_list<float64>[8], tile pixels),
    class_id (int16: index into the dataset's classes), class_name (string),
    difficult (int8: 0, 1 as annotated, 2 cut by the window), iof (float32: area inside / area)

``proposals``: one row per class-agnostic proposal (tile pixels), best first within a tile.
    tile_id (string), proposal_index (int32: rank within the tile, 0 = best),
    cx, cy, w, h, theta (float64: le90), polygon (fixed_size_list<float64>[8]),
    score (float32: the ranking score: SAM predicted_iou, selective-search rank score, graph score),
    predicted_iou, stability_score (float32, null for methods other than SAM),
    area (float32: mask area in tile pixels; the box area for box-only methods), method (string)

``detections``: one row per detection, in a frame given by ``frame`` metadata (``tile`` or ``image``).
    id (string: tile_id or image_id), class_id (int16), class_name (string), score (float32),
    cx, cy, w, h, theta (float64: le90)
"""
from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from mutdet.io.atomic import atomic_path

LE90 = [("cx", pa.float64()), ("cy", pa.float64()), ("w", pa.float64()), ("h", pa.float64()), ("theta", pa.float64())]

TILES_SCHEMA = pa.schema([
    ("tile_id", pa.string()),
    ("image_id", pa.string()),
    ("source_path", pa.string()),
    ("tile_path", pa.string()),
    ("rate", pa.float64()),
    ("x", pa.int32()),
    ("y", pa.int32()),
    ("size", pa.int32()),
    ("valid_width", pa.int32()),
    ("valid_height", pa.int32()),
    ("image_width", pa.int32()),
    ("image_height", pa.int32()),
])

OBJECTS_SCHEMA = pa.schema([
    ("tile_id", pa.string()),
    ("object_index", pa.int32()),
    *LE90,
    ("polygon", pa.list_(pa.float64(), 8)),
    ("class_id", pa.int16()),
    ("class_name", pa.string()),
    ("difficult", pa.int8()),
    ("iof", pa.float32()),
])

DETECTIONS_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("class_id", pa.int16()),
    ("class_name", pa.string()),
    ("score", pa.float32()),
    *LE90,
])

PROPOSALS_SCHEMA = pa.schema([
    ("tile_id", pa.string()),
    ("proposal_index", pa.int32()),
    *LE90,
    ("polygon", pa.list_(pa.float64(), 8)),
    ("score", pa.float32()),
    ("predicted_iou", pa.float32()),
    ("stability_score", pa.float32()),
    ("area", pa.float32()),
    ("method", pa.string()),
])

SCHEMAS = {"tiles": TILES_SCHEMA, "objects": OBJECTS_SCHEMA, "proposals": PROPOSALS_SCHEMA,
           "detections": DETECTIONS_SCHEMA}


def pyarrow_without_pandas() -> None:
    """Keep pyarrow from importing pandas (0.2-0.4 s of a command's start, in every process).

    pyarrow imports pandas the first time it builds a table or converts an array, only to recognise
    pandas inputs and to read pandas metadata; the stages that call this (``tile``, ``merge``) give it
    lists and numpy arrays and never ask for a DataFrame. Its first probe is made here with ``import
    pandas`` failing, which pyarrow remembers; anything that does ask for pandas later (``to_pandas``)
    still imports it then. The Parquet files written are the same either way."""
    if "pandas" in sys.modules:
        return
    blocker = _NoPandas()
    sys.meta_path.insert(0, blocker)
    try:
        pa.array([0])
    finally:
        sys.meta_path.remove(blocker)


class _NoPandas:
    """A meta path finder under which ``import pandas`` fails (see :func:`pyarrow_without_pandas`)."""

    def find_spec(self, name, path=None, target=None):
        if name == "pandas":
            raise ModuleNotFoundError("pandas is not imported by this stage", name=name)
        return None


class ArtefactError(ValueError):
    """An artefact file that does not match its schema."""


def write_artefact(table: pa.Table, path: str | Path, kind: str, metadata: Mapping[str, object] | None = None) -> None:
    """Cast ``table`` to the schema of ``kind`` and write it atomically, with JSON ``metadata``."""
    schema = SCHEMAS[kind]
    missing = [n for n in schema.names if n not in table.column_names]
    if missing:
        raise ArtefactError(f"{kind} table for {path} misses columns {missing}")
    table = table.select(schema.names).cast(schema)
    meta = {b"mutdet_kind": kind.encode()}
    for key, value in (metadata or {}).items():
        meta[f"mutdet_{key}".encode()] = json.dumps(value, default=str).encode()
    table = table.replace_schema_metadata(meta)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def _metadata_bytes(kind: str, metadata: Mapping[str, object] | None, **extra: object) -> dict[bytes, bytes]:
    meta = {b"mutdet_kind": kind.encode()}
    for key, value in {**extra, **(metadata or {})}.items():
        meta[f"mutdet_{key}".encode()] = json.dumps(value, default=str).encode()
    return meta


def write_parquet_stream(batches: Iterable[pa.Table | pa.RecordBatch], path: str | Path, schema: pa.Schema, *,
                         row_group_rows: int = 65536, **options) -> int:
    """Write ``batches`` (tables or record batches castable to ``schema``) to one Parquet file, atomically.

    Memory is bounded by one batch plus one row group of ``row_group_rows`` rows: batches are buffered
    until a row group is full, then written through a ``pyarrow.parquet.ParquetWriter`` to a temporary
    file renamed over ``path`` at the end (a crash leaves the previous file, or none). ``schema`` carries
    the file's metadata; ``options`` go to the writer (compression defaults to zstd). Returns the rows.
    """
    options.setdefault("compression", "zstd")
    plain = schema.remove_metadata()
    rows = 0
    with atomic_path(path) as tmp:
        with pq.ParquetWriter(tmp, schema, **options) as writer:
            pending: list[pa.Table] = []
            buffered = 0
            for batch in batches:
                table = batch if isinstance(batch, pa.Table) else pa.Table.from_batches([batch])
                table = table.select(plain.names).cast(plain)
                pending.append(table)
                buffered += table.num_rows
                rows += table.num_rows
                if buffered >= row_group_rows:
                    writer.write_table(pa.concat_tables(pending).replace_schema_metadata(schema.metadata),
                                       row_group_size=row_group_rows)
                    pending, buffered = [], 0
            if pending and buffered:
                writer.write_table(pa.concat_tables(pending).replace_schema_metadata(schema.metadata),
                                   row_group_size=row_group_rows)
    return rows


def write_artefact_batches(batches: Iterable[pa.Table | pa.RecordBatch], path: str | Path, kind: str,
                           metadata: Mapping[str, object] | None = None) -> int:
    """Like :func:`write_artefact` for a stream of tables/batches (each cast to the schema of ``kind``),
    with memory bounded by a batch (:func:`write_parquet_stream`). Returns the rows written."""
    schema = SCHEMAS[kind].with_metadata(_metadata_bytes(kind, metadata))
    return write_parquet_stream(_checked(batches, kind, path), path, schema)


def _checked(batches, kind: str, path):
    names = SCHEMAS[kind].names
    for batch in batches:
        missing = [n for n in names if n not in batch.schema.names]
        if missing:
            raise ArtefactError(f"{kind} table for {path} misses columns {missing}")
        yield batch


def check_schema(schema: pa.Schema, kind: str, source: str) -> None:
    expected = SCHEMAS[kind]
    for f in expected:
        if f.name not in schema.names:
            raise ArtefactError(f"{source}: missing column {f.name!r} ({f.type}) of the {kind} schema")
        actual = schema.field(f.name).type
        if actual != f.type:
            raise ArtefactError(f"{source}: column {f.name!r} has type {actual}, the {kind} schema needs {f.type}")


def read_file_schema(path: str | Path, kind: str) -> pa.Schema:
    """The Parquet schema of an artefact file; errors name a missing or unreadable file."""
    path = Path(path)
    if not path.is_file():
        raise ArtefactError(f"{path}: {kind} artefact not found")
    try:
        return pq.read_schema(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise ArtefactError(f"{path}: not a readable Parquet file: {exc}") from None


def read_artefact(path: str | Path | list, kind: str, columns: list[str] | None = None) -> pa.Table:
    """Read one artefact file (or a list of shard files, concatenated) and check its schema."""
    paths = [Path(p) for p in path] if isinstance(path, list) else [Path(path)]
    tables = []
    for p in paths:
        check_schema(read_file_schema(p, kind), kind, str(p))
        with pq.ParquetFile(p) as file:  # one file: no pyarrow.dataset (its import costs ~0.2 CPU-s)
            tables.append(file.read(columns=columns or SCHEMAS[kind].names))
    if not tables:
        return SCHEMAS[kind].empty_table() if columns is None else SCHEMAS[kind].empty_table().select(columns)
    return pa.concat_tables(tables)


def read_metadata(path: str | Path) -> dict:
    """The ``mutdet_*`` metadata of an artefact as a dict (values JSON-decoded)."""
    meta = pq.read_schema(path).metadata or {}
    out = {}
    for key, value in meta.items():
        k = key.decode()
        if k.startswith("mutdet_") and k != "mutdet_kind":
            out[k[len("mutdet_"):]] = json.loads(value)
    return out
