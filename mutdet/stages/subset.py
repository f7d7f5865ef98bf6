"""Stage ``subset``: a data-fraction list file of a split's image ids (METHOD.md "Data fractions").

The list file is a plain split list (``#`` header naming seed, fraction, N, k and method), so a
fine-tuning split can point at it and anyone can audit which images a fraction used.
"""
from __future__ import annotations

from pathlib import Path

from mutdet.config import Config
from mutdet.data.fractions import Subset, fraction_subset, write_subset
from mutdet.io.datasets import list_image_ids
from mutdet.stages.common import log


def run(cfg: Config, *, dataset: str, split: str, fraction: float, out: str | Path) -> Subset:
    """Write the ``fraction`` subset of ``dataset``/``split`` (drawn with ``seed``, ``fractions.nested``) to ``out``."""
    seed, nested = cfg.seed, cfg.fractions.nested
    ds = cfg.dataset(dataset)
    sp = ds.split(split)
    ids = list_image_ids(sp.images, sp.list, ds.image_extensions)
    subset = fraction_subset(ids, fraction, seed=seed, nested=nested)
    write_subset(out, subset)
    log.info("subset %s/%s: %d of %d images (fraction %g, seed %d, %s) -> %s",
             dataset, split, len(subset.ids), subset.total, fraction, seed, subset.method, out)
    return subset
