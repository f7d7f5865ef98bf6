"""Where each artefact lives under ``config.results``: shared by the Snakefile and ``mutdet outputs``.

Patterns use Snakemake wildcard syntax (``{dataset}``), relative to the results folder.
"""
from __future__ import annotations

from pathlib import Path

TILES_DIR = "{dataset}/tiles/{split}/shard-{shard}"
LOGS_DIR = "logs"


def tiles_dir(results: str | Path, dataset: str, split: str, shard: int) -> Path:
    return Path(results) / TILES_DIR.format(dataset=dataset, split=split, shard=shard)
