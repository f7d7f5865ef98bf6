"""Dataset-level reading of proposal shards: many ``proposals.parquet`` files as one lazy dataset."""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pyarrow.dataset as pads

from mutdet.io.artefacts import PROPOSALS_SCHEMA, check_schema, read_file_schema


def read_proposals(paths: str | Path | Iterable[str | Path]) -> pads.Dataset:
    """Concatenate proposal shard files lazily (nothing but the footers is read here).

    Args:
        paths: one ``proposals.parquet`` or several (e.g. every shard of every dataset split).
    Returns:
        A ``pyarrow.dataset.Dataset`` with the proposals schema (see :mod:`mutdet.io.artefacts`); scan it
        with ``.to_table(columns=..., filter=...)`` or ``.to_batches()``.
    Raises:
        ArtefactError: naming a file that is missing, unreadable, or misses/mistypes a column.
    """
    paths = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
    for path in paths:
        check_schema(read_file_schema(path, "proposals"), "proposals", str(path))
    return pads.dataset([str(p) for p in paths], schema=PROPOSALS_SCHEMA, format="parquet")
