"""Where each artefact lives under ``config.results``: shared by the Snakefile and ``mutdet outputs``.

Patterns use Snakemake wildcard syntax (``{dataset}``), relative to the results folder.
"""
from __future__ import annotations

from pathlib import Path

from mutdet.config import Config
from mutdet.stages.common import params_hash

TILES_DIR = "{dataset}/tiles/{split}/shard-{shard}"
FINETUNE_DIR = "finetune/init~{init}/frac~{fraction}/epochs~{epochs}/{dataset}/{split}"
# One pre-training run per variant, under the tags of the proposals and embeddings it learned from.
PRETRAIN_RUN_DIR = "pretrain/{ptag}/{etag}/{variant}"
TABLES_DIR = "tables"
LOGS_DIR = "logs"
# Parameters that determine the embeddings (batch size, workers and device do not).
EMBEDDING_KEYS = ("backbone", "weights", "context", "input_size", "crop_size", "precision")


def proposals_tag(cfg: Config) -> str:
    """Folder name of the configured proposals, e.g. ``graph-1a2b3c4d``: new parameters, new folder."""
    return f"{cfg.proposals.method}-{params_hash(cfg.proposals.method_params())[:8]}"


def embedding_tag(cfg: Config) -> str:
    """Folder name of the configured embeddings, e.g. ``resnet50-5e6f7a8b``."""
    return f"{cfg.embedding.backbone}-{params_hash({k: cfg.raw['embedding'][k] for k in EMBEDDING_KEYS})[:8]}"


def pretrain_dir(results: str | Path, kind: str, dataset: str, split: str, shard: int, cfg: Config) -> Path:
    """Shard folder of ``kind`` = proposals | embeddings | targets of the pre-training data."""
    folder = {
        "proposals": proposals_tag(cfg),
        "embeddings": f"{proposals_tag(cfg)}/{embedding_tag(cfg)}",
        "targets": f"{proposals_tag(cfg)}/{embedding_tag(cfg)}",
    }[kind]
    return Path(results) / dataset / kind / folder / split / f"shard-{shard}"


def tiles_dir(results: str | Path, dataset: str, split: str, shard: int) -> Path:
    return Path(results) / TILES_DIR.format(dataset=dataset, split=split, shard=shard)
