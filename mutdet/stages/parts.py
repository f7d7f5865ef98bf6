"""Resume parts: a stage's results kept piece by piece under ``<out>/parts/`` (one part per image, or per
chunk of tiles), so that a killed or repeated run recomputes only the parts that are missing or stale.

Every part file is written atomically, its metadata holding ``params_hash`` (the key of what the part is
made from) and the values a stage checks on reuse (its tile ids, its row count, its input files' identity).
A part is current when that metadata is readable and holds the key and the expected values; a missing,
unreadable or other part is recomputed. A part of several files is current when each of them is.
Values that identify inputs are taken before the inputs are read, so an input edited during the run
leaves a stale part, not a current one.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import pyarrow as pa

from mutdet.embedding.artefacts import read_embeddings, write_embeddings
from mutdet.io.artefacts import read_artefact, read_metadata, write_artefact

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
