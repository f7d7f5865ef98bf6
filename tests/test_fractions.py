"""Data-fraction subsets: the METHOD.md protocol, sizes, nesting, list files."""
from __future__ import annotations

import numpy as np
import pytest

from mutdet.data.fractions import fraction_subset, write_subset
from mutdet.io.datasets import list_image_ids

FRACTIONS = (0.1, 0.25, 0.5, 1.0)


def _ids(n):
    rng = np.random.default_rng(123)
    return [f"{i:05d}" for i in rng.permutation(n)]  # unsorted on purpose


@pytest.mark.parametrize("n", [37, 1000, 11725])
@pytest.mark.parametrize("fraction", FRACTIONS)
def test_protocol_is_numpy_choice_on_sorted_ids(n, fraction):
    ids = _ids(n)
    subset = fraction_subset(ids, fraction, seed=42)
    direct = np.random.default_rng(42).choice(np.array(sorted(ids)), round(fraction * n), replace=False)
    assert subset.ids == tuple(sorted(direct.tolist()))
    assert len(subset.ids) == round(fraction * n) and subset.total == n and subset.method == "choice"
    assert list(subset.ids) == sorted(subset.ids) and set(subset.ids) <= set(ids)


def test_deterministic_and_seed_dependent():
    ids = _ids(500)
    assert fraction_subset(ids, 0.25, seed=7) == fraction_subset(list(reversed(ids)), 0.25, seed=7)
    assert fraction_subset(ids, 0.25, seed=7).ids != fraction_subset(ids, 0.25, seed=8).ids
    assert fraction_subset(ids, 1.0).ids == tuple(sorted(ids))


def test_sizes_use_python_round():
    assert len(fraction_subset(_ids(11725), 0.1).ids) == round(0.1 * 11725) == 1172
    assert len(fraction_subset(_ids(10), 0.25).ids) == 2  # round(2.5) == 2
    with pytest.raises(ValueError, match="empty subset"):
        fraction_subset(_ids(10), 0.01)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        fraction_subset(_ids(10), 1.5)
    with pytest.raises(ValueError, match="duplicate image ids"):
        fraction_subset(["a", "b", "a"], 0.5)


def _is_nested(subsets):
    return all(set(a.ids) <= set(b.ids) for a, b in zip(subsets, subsets[1:]))


@pytest.mark.parametrize("n", [37, 1000, 5862, 11725])
@pytest.mark.parametrize("seed", [0, 42])
def test_nested_option_is_nested_and_a_permutation_prefix(n, seed):
    ids = _ids(n)
    subsets = [fraction_subset(ids, p, seed=seed, nested=True) for p in FRACTIONS]
    assert _is_nested(subsets) and all(s.method == "permutation" for s in subsets)
    perm = np.random.default_rng(seed).permutation(np.array(sorted(ids)))
    for p, s in zip(FRACTIONS, subsets):
        assert s.ids == tuple(sorted(perm[: round(p * n)].tolist()))


def test_protocol_nesting_is_what_the_docstring_says():
    # numpy's choice without replacement: tail shuffle (nested sets) when N > 10000 and k > N // 50,
    # Floyd's algorithm otherwise (not nested).
    for seed in (0, 42):
        assert _is_nested([fraction_subset(_ids(11725), p, seed=seed) for p in FRACTIONS])
        assert not _is_nested([fraction_subset(_ids(1000), p, seed=seed) for p in FRACTIONS])
    assert not _is_nested([fraction_subset(_ids(20000), p, seed=42) for p in (0.01, 0.1)])


def test_list_file_is_auditable_and_readable_as_a_split(tmp_path):
    subset = fraction_subset(_ids(200), 0.25, seed=42)
    path = write_subset(tmp_path / "splits" / "train_25.txt", subset)
    lines = path.read_text().splitlines()
    header = [line for line in lines if line.startswith("#")]
    assert "# seed: 42" in header and "# fraction: 0.25" in header and "# N: 200" in header and "# k: 50" in header
    assert any(line.startswith("# method: choice (numpy.random.default_rng(seed).choice(") for line in header)
    assert lines[len(header):] == list(subset.ids)
    assert list_image_ids(tmp_path, path, [".png"]) == list(subset.ids)
