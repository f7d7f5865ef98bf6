"""Where every artefact lives under ``config.results``: the one place that spells paths out.

The Snakemake rules, the stages and ``mutdet outputs`` all take their paths from :class:`Layout`.
Every method accepts wildcard strings (``"{dataset}"``) as well as values, so a rule's patterns are
the same calls with Snakemake wildcards, e.g. ``layout.tiles_dir("{dataset}", "{split}", "{shard}")``.

Folder names carry what made their content: proposals and embeddings folders a tag of the parameters
that determine them (``graph-1a2b3c4d``, ``resnet50-5e6f7a8b``), so changing such a parameter makes new
outputs beside the old ones instead of mixing them.

==============================================================================  ==========================
``<dataset>/tiles/<split>/shard-<k>/``                                          tile stage
``<dataset>/fractions/<split>/frac~<p>.txt``                                    subset stage
``<dataset>/proposals/<ptag>/<split>/shard-<k>/``                               propose stage
``<dataset>/embeddings/<ptag>/<etag>/<split>/shard-<k>/``                       embed stage
``<dataset>/targets/<ptag>/<etag>/<split>/shard-<k>/targets.parquet``           cluster stage (per shard)
``targets/<ptag>/<etag>/``                                                      cluster stage (the model)
``pretrain/<ptag>/<etag>/<variant>/``                                           pretrain stage
``pretrain/<ptag>/<etag>/loss_curves.png``                                      loss-curves figure
``finetune/init~<i>/frac~<p>/epochs~<e>/seed~<n>/<dataset>/<test split>/``      finetune + evaluate
``tables/``                                                                     tables stage
``logs/``                                                                       one log per job
``configs/config-<digest>.json``                                                the resolved config jobs read
==============================================================================  ==========================
"""
from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from mutdet.config import Config, params_digest

# Parameters that determine the embeddings (batch size, workers, device and resume chunking do not).
EMBEDDING_KEYS = ("backbone", "weights", "context", "input_size", "crop_size", "precision", "mode")


@dataclass(frozen=True)
class FinetuneJob:
    """One job of the fine-tuning sweep: train on ``train_split`` of ``dataset`` from ``init`` with a
    ``fraction`` of its images for ``epochs`` with the training seed ``seed``, then detect on and evaluate
    ``split``. The seeds of one (dataset, init, fraction, epochs) cell share the fraction's image list (drawn
    with the config's top-level ``seed``); the job's ``seed`` drives initialisation, tile order and
    augmentation only."""
    dataset: str
    train_split: str
    split: str
    init: str
    fraction: float
    epochs: int
    seed: int


class Layout:
    """Paths of one configuration's artefacts (relative to the working directory, like ``results``)."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.results = Path(cfg.results)

    # -- tags ------------------------------------------------------------------------------------------
    @functools.cached_property
    def proposals_tag(self) -> str:
        """Folder name of the configured proposals, e.g. ``graph-1a2b3c4d``."""
        p = self.cfg.proposals
        return f"{p.method}-{params_digest(p.method_params())[:8]}"

    @functools.cached_property
    def embedding_tag(self) -> str:
        """Folder name of the configured embeddings, e.g. ``resnet50-5e6f7a8b``."""
        e = self.cfg.raw["embedding"]
        return f"{e['backbone']}-{params_digest({k: e[k] for k in EMBEDDING_KEYS})[:8]}"

    # -- per dataset split -----------------------------------------------------------------------------
    def tiles_dir(self, dataset: str, split: str, shard: int | str) -> Path:
        return self.results / dataset / "tiles" / split / f"shard-{shard}"

    def tiles_table(self, dataset: str, split: str, shard: int | str) -> Path:
        return self.tiles_dir(dataset, split, shard) / "tiles.parquet"

    def split_tiles_dirs(self, dataset: str, split: str) -> list[Path]:
        """The tiles folder of every shard of a split."""
        return [self.tiles_dir(dataset, split, k) for k in range(self.cfg.dataset(dataset).shards)]

    def fractions_file(self, dataset: str, split: str, fraction: float | str) -> Path:
        return self.results / dataset / "fractions" / split / f"frac~{fraction}.txt"

    def proposals_dir(self, dataset: str, split: str, shard: int | str) -> Path:
        return self.results / dataset / "proposals" / self.proposals_tag / split / f"shard-{shard}"

    def embeddings_dir(self, dataset: str, split: str, shard: int | str) -> Path:
        return self.results / dataset / "embeddings" / self.proposals_tag / self.embedding_tag / split / f"shard-{shard}"

    def targets_file(self, dataset: str, split: str, shard: int | str) -> Path:
        return (self.results / dataset / "targets" / self.proposals_tag / self.embedding_tag / split
                / f"shard-{shard}" / "targets.parquet")

    # -- pre-training ----------------------------------------------------------------------------------
    def pretrain_shards(self) -> Iterator[tuple[str, str, int]]:
        """``(dataset, split, shard)`` of every shard of ``proposals.datasets``, in config order."""
        for name, split in self.cfg.proposals.datasets:
            for shard in range(self.cfg.dataset(name).shards):
                yield name, split, shard

    def cluster_dir(self) -> Path:
        return self.results / "targets" / self.proposals_tag / self.embedding_tag

    def pretrain_root(self) -> Path:
        return self.results / "pretrain" / self.proposals_tag / self.embedding_tag

    def pretrain_dir(self, variant: str) -> Path:
        return self.pretrain_root() / variant

    def pretrain_checkpoint(self, variant: str) -> Path:
        return self.pretrain_dir(variant) / "checkpoint.pt"

    def loss_curves_figure(self) -> Path:
        return self.pretrain_root() / "loss_curves.png"

    # -- fine-tuning -----------------------------------------------------------------------------------
    def finetune_dir(self, init: str, fraction: float | str, epochs: int | str, seed: int | str, dataset: str,
                     split: str) -> Path:
        """Folder of one fine-tuning job, e.g. ``finetune/init~mutdet/frac~0.25/epochs~36/seed~42/dior/test``."""
        return (self.results / "finetune" / f"init~{init}" / f"frac~{fraction}" / f"epochs~{epochs}" / f"seed~{seed}"
                / dataset / split)

    def job_dir(self, job: FinetuneJob) -> Path:
        return self.finetune_dir(job.init, job.fraction, job.epochs, job.seed, job.dataset, job.split)

    def finetune_jobs(self) -> list[FinetuneJob]:
        """Every job of the sweep: the union of the ``finetune.runs`` entries (init x fraction x epochs x seed),
        each job once, in order."""
        jobs = [FinetuneJob(r.dataset, r.train_split, r.test_split, init, fraction, epochs, seed)
                for r in self.cfg.finetune.runs for init in r.inits for fraction in r.fractions for epochs in r.epochs
                for seed in r.seeds]
        return list(dict.fromkeys(jobs))

    # -- reports and bookkeeping -----------------------------------------------------------------------
    def tables_dir(self) -> Path:
        return self.results / "tables"

    def logs_dir(self) -> Path:
        return self.results / "logs"

    def resolved_config(self) -> Path:
        """The whole validated config, every default filled in, as YAML (the run's record)."""
        return self.results / "config.resolved.yaml"

    def config_file(self) -> Path:
        """The resolved config every job of this configuration reads (named by its content digest, so
        runs of different configurations sharing a results folder never read each other's)."""
        return self.results / "configs" / f"config-{self.cfg.digest()[:16]}.json"
