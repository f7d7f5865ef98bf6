"""Data-fraction subsets of the training images, the protocol of METHOD.md ("Data fractions").

A subset is ``round(p * N)`` image ids drawn without replacement from the **sorted** ids:

* ``method="choice"`` (default, the protocol): ``numpy.random.default_rng(seed).choice(ids, k,
  replace=False)``, returned sorted. The same seed and ids give the same subset for every method.
* ``method="permutation"`` (``nested=True``): the first ``k`` ids of ``default_rng(seed).permutation(ids)``,
  returned sorted. A smaller fraction is then always contained in a larger one.

Is the protocol itself nested? Checked with numpy 2.2: ``Generator.choice(..., replace=False)`` is
**not** a prefix of one permutation for different ``k`` (it shuffles its result), and its *sets* are
nested only in one regime. Without replacement numpy picks ``k`` of ``N`` either by a partial
Fisher-Yates shuffle of the tail (when ``N > 10000`` and ``k > N // 50``), whose tail sets grow with
``k`` from the same random draws, or else by Floyd's algorithm, whose draws depend on ``k``. So
the protocol's subsets are nested for DIOR-R trainval (N = 11725, fractions 10/25/50/100 %) but not
for small sets (e.g. N = 1000 or 5862), nor for any fraction with ``k <= N // 50``. ``nested=True``
gives nesting for every ``N`` at the price of different subsets than the protocol's; the list file
names the method used. (``round`` is Python's: halves go to the even integer.)

Subset list files are plain split lists (one id a line, sorted) with ``#`` header lines naming the
seed, fraction, N, k and method; :func:`mutdet.io.datasets.list_image_ids` reads them as a split.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mutdet.io.atomic import write_text

METHODS = ("choice", "permutation")


@dataclass(frozen=True)
class Subset:
    """A drawn subset: ``ids`` sorted, ``k = len(ids) = round(fraction * total)``."""

    ids: tuple[str, ...]
    seed: int
    fraction: float
    total: int
    method: str


def subset_size(fraction: float, total: int) -> int:
    """``round(fraction * total)``; rejects fractions outside ``(0, 1]`` and empty subsets."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    k = round(fraction * total)
    if k == 0:
        raise ValueError(f"fraction {fraction} of {total} images rounds to an empty subset")
    return k


def fraction_subset(ids: Sequence[str], fraction: float, seed: int = 42, nested: bool = False) -> Subset:
    """Draw ``round(fraction * len(ids))`` image ids (see the module docstring).

    Args:
        ids: every training image id (any order, no duplicates); they are sorted first.
        fraction: in ``(0, 1]``.
        seed: the ``numpy.random.default_rng`` seed (42 in the paper protocol).
        nested: ``False`` for the protocol's ``choice``; ``True`` for prefixes of one permutation.
    """
    ordered = sorted(str(i) for i in ids)
    if len(set(ordered)) != len(ordered):
        dup = sorted({i for i, j in zip(ordered, ordered[1:]) if i == j})
        raise ValueError(f"duplicate image ids: {dup[:5]}")
    k = subset_size(fraction, len(ordered))
    rng = np.random.default_rng(seed)
    pool = np.asarray(ordered, dtype=object)
    picked = rng.permutation(pool)[:k] if nested else rng.choice(pool, k, replace=False)
    return Subset(ids=tuple(sorted(picked)), seed=seed, fraction=float(fraction), total=len(ordered),
                  method=METHODS[int(nested)])


def format_subset(subset: Subset) -> str:
    """The list-file text: header comments, then one id a line."""
    rule = ("numpy.random.default_rng(seed).choice(sorted ids, k, replace=False)" if subset.method == "choice"
            else "numpy.random.default_rng(seed).permutation(sorted ids)[:k]")
    header = [
        "# mutdet data-fraction subset",
        f"# seed: {subset.seed}",
        f"# fraction: {subset.fraction}",
        f"# N: {subset.total}",
        f"# k: {len(subset.ids)}",
        f"# method: {subset.method} ({rule}), ids sorted",
    ]
    return "\n".join([*header, *subset.ids]) + "\n"


def write_subset(path: str | Path, subset: Subset) -> Path:
    """Write ``subset`` as a list file, atomically."""
    write_text(path, format_subset(subset))
    return Path(path)
