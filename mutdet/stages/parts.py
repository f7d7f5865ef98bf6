"""Resume parts: a stage's results kept piece by piece under ``<out>/parts/`` (one part per image, or per
chunk of tiles), so that a killed or repeated run recomputes only the parts that are missing or stale.

Every part file is written atomically, its metadata holding ``params_hash`` (the key of what the part is
made from) and the values a stage checks on reuse (its tile ids, its row count, its input files' identity).
A part is current when that metadata is readable and holds the key and the expected values; a missing,
unreadable or other part is recomputed. A part of several files is current when each of them is.
Values that identify inputs are taken before the inputs are read, so an input edited during the run
leaves a stale part, not a current one.

Parts live only until the stage's final file is committed. A stage streams its parts into the final
file (:func:`batches`, memory bounded by one record batch), renames it into place atomically, writes its
manifest, and only then removes the parts (:func:`remove_all`). The final file and the manifest carry the
same ``params_hash``; a rerun whose key matches both (:func:`committed`) is a no-op. So a crash before
the final file's rename resumes from the parts, and one after it (parts not yet removed) finds the final
file committed and only removes the leftover parts.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from mutdet.embedding.artefacts import ROW_GROUP_ROWS, read_embeddings, write_embeddings
from mutdet.io.artefacts import ArtefactError, read_artefact, read_metadata, write_artefact

Part = Path | Sequence[Path]  # one file, or the files of one part


def chunk_paths(out_dir: str | Path, key: str, n: int) -> list[Path]:
    """The parts of ``n`` chunks of tiles of a sharded stage: ``<out>/parts/chunk-<k>.<key>.parquet``."""
    return [Path(out_dir) / "parts" / f"chunk-{k:05d}.{key}.parquet" for k in range(n)]


def _metadata(path: Path) -> dict | None:
    try:
        return read_metadata(path)
    except Exception:  # missing or unreadable: recomputed
        return None


def is_current(part: Part, key: str, expect: Mapping) -> bool:
    """Whether every file of ``part`` is readable, made with ``key`` and holds the ``expect``ed values."""
    metas = [_metadata(p) for p in ([part] if isinstance(part, (str, Path)) else part)]
    return all(m is not None and m.get("params_hash") == key and all(m.get(k) == v for k, v in expect.items())
               for m in metas)


def todo(parts: Sequence[Part], key: str, expect: Sequence[Mapping]) -> list[int]:
    """Indices of the parts to (re)compute: those not current (part ``i`` must hold ``expect[i]``)."""
    return [i for i, part in enumerate(parts) if not is_current(part, key, expect[i])]


def write(table: pa.Table, path: Path, kind: str, key: str, /, **values) -> None:
    """Write one part file (a ``kind`` artefact, or ``embeddings``) atomically, with ``key`` and ``values``
    in its metadata."""
    meta = {"params_hash": key, **values}
    if kind == "embeddings":
        write_embeddings(table, path, meta)
    else:
        write_artefact(table, path, kind, meta)


def read(paths: Sequence[Path], kind: str, empty: pa.Table | None = None) -> tuple[pa.Table, list[dict]]:
    """The tables of the part files, concatenated in order (``empty`` if there are none: required for
    ``embeddings``, whose schema depends on the dimension), and the files' metadata."""
    if kind == "embeddings":
        table = pa.concat_tables([read_embeddings(p) for p in paths]) if paths else empty
    else:
        table = read_artefact(list(paths), kind)
    return table, [read_metadata(p) for p in paths]


def remove_stale(out_dir: str | Path, keep: Iterable[Path], pattern: str = "chunk-*.parquet") -> None:
    """Remove the part files of ``out_dir`` matching ``pattern`` that are not in ``keep`` (parts of other
    parameters or chunkings)."""
    names = {Path(p).name for p in keep}
    for path in (Path(out_dir) / "parts").glob(pattern):
        if path.name not in names:
            path.unlink()


def batches(paths: Sequence[Path], columns: Sequence[str] | None = None,
            batch_rows: int = ROW_GROUP_ROWS) -> Iterator[tuple[int, pa.RecordBatch]]:
    """The part files' rows as ``(part index, record batch)``, in order, at most ``batch_rows`` rows per
    batch: one batch is in memory at a time (the parts are not concatenated). Errors name the file."""
    for k, path in enumerate(paths):
        try:
            reader = pq.ParquetFile(path)
            for batch in reader.iter_batches(batch_size=batch_rows, columns=list(columns) if columns else None):
                yield k, batch
        except (pa.ArrowInvalid, OSError) as exc:
            raise ArtefactError(f"{path}: part file not readable: {exc}") from None


def committed(final: Path, manifest: Path, key: str, rows: int | None = None) -> dict | None:
    """The stored manifest if the final file ``final`` and its ``manifest`` were both made with ``key``
    (and ``final`` holds ``rows`` rows, when given): the stage's work is done. Otherwise None."""
    meta = _metadata(final)
    if meta is None or meta.get("params_hash") != key:
        return None
    try:
        stored = json.loads(Path(manifest).read_text())
        if rows is not None and pq.ParquetFile(final).metadata.num_rows != rows:
            return None
    except (OSError, ValueError, pa.ArrowInvalid):
        return None
    return stored if isinstance(stored, dict) and stored.get("params_hash") == key else None


def remove_all(out_dir: str | Path, pattern: str = "chunk-*.parquet") -> None:
    """Remove every part file of ``out_dir`` matching ``pattern`` (once the final file is committed), and
    the ``parts`` folder when it is left empty."""
    folder = Path(out_dir) / "parts"
    for path in folder.glob(pattern):
        path.unlink(missing_ok=True)
    try:
        folder.rmdir()
    except OSError:  # missing, or holds other files
        pass
