"""PCA + spherical k-means (mutdet.embedding.cluster) and stage ``cluster`` (mutdet.stages.cluster):
recovery of known clusters, determinism, the npz round trip, tiny pools, targets per shard."""
import numpy as np
import pyarrow as pa
import pytest

from mutdet.config import from_dict
from mutdet.embedding.artefacts import (check_join, read_embeddings, read_targets, vector_column, vector_matrix,
                                        write_embeddings)
from mutdet.embedding.cluster import (ClusterFitError, ClusterModel, fit_cluster_model, fit_pca, fit_spherical_kmeans,
                                     l2_normalize, row_ids)
from mutdet.io.artefacts import ArtefactError, read_metadata
from mutdet.stages import cluster

pytestmark = pytest.mark.numerics  # run again under other CPU kernels by `make test`

DIM = 48


def blobs(n_per: int, k: int, seed: int, dim: int = DIM) -> tuple[np.ndarray, np.ndarray]:
    """``k`` well-separated directions (non-negative like pooled ReLU features) with noise; (x, true labels)."""
    rng = np.random.default_rng(seed)
    centres = rng.gamma(1.0, 1.0, (k, dim)) * 4 + 1
    labels = np.repeat(np.arange(k), n_per)
    x = centres[labels] + rng.normal(0, 0.3, (len(labels), dim))
    return x.astype(np.float32), labels


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Two labelings describe the same partition (up to renaming the clusters)."""
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def test_fit_recovers_known_clusters_with_cosine_assignment():
    x, truth = blobs(40, 6, seed=0)
    model = fit_cluster_model(x, pca_dim=8, k=6, seed=3)
    z = model.project(x)
    ids, cos = model.assign(z)
    assert same_partition(ids, truth)
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(model.centroids, axis=1), 1, atol=1e-5)
    np.testing.assert_array_equal(ids, np.argmax(z @ model.centroids.T, axis=1))  # highest cosine
    np.testing.assert_allclose(cos, np.max(z @ model.centroids.T, axis=1), rtol=1e-6)
    assert model.meta["kmeans"]["converged"] and model.meta["kmeans"]["mean_cosine"] > 0.9


def test_pca_matches_an_svd():
    x, _ = blobs(30, 4, seed=1)
    mean, components, variance, ratio = fit_pca(x, 5)
    centred = x.astype(np.float64) - x.mean(axis=0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    np.testing.assert_allclose(mean, x.mean(axis=0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.abs(components), np.abs(vt[:5]), atol=1e-3)  # same axes up to sign
    np.testing.assert_allclose(variance, s[:5] ** 2 / (len(x) - 1), rtol=1e-3)
    np.testing.assert_allclose(ratio, s[:5] ** 2 / (s ** 2).sum(), rtol=1e-3)


def test_fit_is_deterministic_for_a_seed():
    x, _ = blobs(30, 5, seed=2)
    a = fit_cluster_model(x, pca_dim=6, k=8, seed=11)  # k above the true count: the seeding matters
    b = fit_cluster_model(x, pca_dim=6, k=8, seed=11)
    for name in ("pca_mean", "pca_components", "centroids"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    c = fit_cluster_model(x, pca_dim=6, k=8, seed=12)
    assert not np.array_equal(a.centroids, c.centroids)


def test_npz_round_trip_reproduces_projections_and_ids(tmp_path):
    x, _ = blobs(25, 4, seed=3)
    model = fit_cluster_model(x, pca_dim=6, k=4, seed=0)
    model.save(tmp_path / "m.npz")
    with np.load(tmp_path / "m.npz", allow_pickle=False) as npz:  # plain arrays only
        assert set(npz.files) == {"pca_mean", "pca_components", "pca_explained_variance",
                                  "pca_explained_variance_ratio", "centroids", "meta_json"}
    back = ClusterModel.load(tmp_path / "m.npz")
    np.testing.assert_array_equal(back.project(x), model.project(x))
    np.testing.assert_array_equal(back.assign(back.project(x))[0], model.assign(model.project(x))[0])
    assert back.meta == model.meta and back.k == 4 and back.dim == 6


def test_load_names_a_missing_array(tmp_path):
    np.savez(tmp_path / "bad.npz", pca_mean=np.zeros(3))
    with pytest.raises(ValueError, match=r"bad\.npz: not a cluster model: missing arrays \['pca_components'"):
        ClusterModel.load(tmp_path / "bad.npz")


@pytest.mark.parametrize("n, pca_dim, k, message", [
    (10, 10, 2, r"cluster.pca_dim \(10\) needs more than 10 embeddings to fit, the fit sample has 10"),
    (100, DIM + 1, 2, rf"cluster.pca_dim \({DIM + 1}\) exceeds the embedding dimension \({DIM}\)"),
    (12, 4, 13, r"cluster.k \(13\) exceeds the number of embeddings in the fit sample \(12\)"),
])
def test_tiny_pools_are_errors_naming_the_key(n, pca_dim, k, message):
    x, _ = blobs(n, 1, seed=4)
    with pytest.raises(ClusterFitError, match=message):
        fit_cluster_model(x, pca_dim=pca_dim, k=k, seed=0)


def test_too_few_distinct_vectors_for_k():
    # Distinctness is decided on the raw rows, exactly: no kernel's rounding of the projection enters.
    x = np.repeat(blobs(1, 3, seed=5)[0], 10, axis=0)  # 3 distinct vectors, 30 rows
    with pytest.raises(ClusterFitError, match=r"cluster.k \(4\): the fit sample has only 3 distinct"):
        fit_cluster_model(x, pca_dim=2, k=4, seed=0)
    assert fit_cluster_model(x, pca_dim=2, k=3, seed=0).k == 3  # exactly k distinct rows are enough


def test_row_ids_are_exact_identity():
    x = np.array([[1.0, 0.0], [1.0, -0.0], [1.0, np.nextafter(np.float32(0), np.float32(1))], [2.0, 0.0]], np.float32)
    ids, distinct = row_ids(x)
    assert distinct == 3
    assert ids[0] == ids[1] and len({ids[0], ids[2], ids[3]}) == 3


@pytest.mark.parametrize("seed", range(5))
def test_kmeans_pp_never_seeds_one_direction_twice(seed):
    """Copies of a unit vector that differ by a rounding error (one ulp, as two BLAS kernels may give)
    are one direction: k-means++ cannot pick them as two seeds, on any machine."""
    rng = np.random.default_rng(seed)
    base = l2_normalize(rng.normal(size=(3, 16)))
    copies = np.repeat(base, 5, axis=0)
    jitter = rng.integers(-1, 2, copies.shape).astype(np.float32)  # -1, 0 or +1 ulp per coordinate
    z = np.nextafter(copies, copies + jitter)
    assert z.dtype == np.float32 and row_ids(z)[1] > 3
    z[::5] = base  # the first copy of each is exact
    with pytest.raises(ClusterFitError, match=r"cluster.k \(4\): the fit sample has only 3 distinct"):
        fit_spherical_kmeans(z, 4, seed=seed)
    centroids, info = fit_spherical_kmeans(z, 3, seed=seed)
    cos = centroids @ base.T  # each centroid is one of the three directions
    np.testing.assert_allclose(np.sort(cos.max(axis=1)), 1.0, atol=16 * 16 * np.finfo(np.float32).eps)
    assert sorted(cos.argmax(axis=1).tolist()) == [0, 1, 2]


def test_l2_normalize_keeps_zero_rows():
    np.testing.assert_allclose(l2_normalize(np.array([[0.0, 0.0], [3.0, 4.0]])), [[0, 0], [0.6, 0.8]], rtol=1e-6)


# --- the stage ------------------------------------------------------------------------------------------------


def write_shards(folder, sizes=(70, 50), params=None) -> list:
    """Embedding files of blob data (6 clusters) split into shards of ``sizes`` rows."""
    x, _ = blobs(20, 6, seed=6)
    paths, start = [], 0
    for s, size in enumerate(sizes):
        rows = np.arange(start, start + size)
        table = pa.table({"tile_id": pa.array([f"t{r // 7}" for r in rows]),
                          "proposal_index": pa.array(rows % 7, pa.int32()),
                          "embedding": vector_column(x[rows])})
        paths.append(folder / f"shard-{s}" / "embeddings.parquet")
        write_embeddings(table, paths[-1], {"params": params or {"backbone": "resnet50", "dim": DIM}})
        start += size
    return paths


def cluster_config(seed=42, **kw):
    return from_dict({"seed": seed, "cluster": {"pca_dim": 8, "k": 6, **kw}})


def run_cluster(files, out, **kw):
    targets = [out / f"targets-{i}.parquet" for i in range(len(files))]
    manifest = cluster.run(cluster_config(**kw), embedding_files=files, target_files=targets, out_dir=out)
    return manifest, targets


def test_cluster_stage_writes_targets_per_shard(tmp_path):
    files = write_shards(tmp_path)
    manifest, targets = run_cluster(files, tmp_path / "out")
    model = ClusterModel.load(tmp_path / "out" / "pca_kmeans.npz")
    for source, target in zip(files, targets):
        embeddings, table = read_embeddings(source), read_targets(target)
        check_join(table, embeddings, path=target, proposals_path=source)
        z = vector_matrix(table.column("embedding"))
        assert z.dtype == np.float16 and z.shape == (embeddings.num_rows, 8)
        assert table.schema.field("cluster_id").type == pa.int16()
        # Reloaded arrays reproduce the stored targets from the raw embeddings.
        expected = model.project(vector_matrix(embeddings.column("embedding")))
        np.testing.assert_allclose(z.astype(np.float32), expected, atol=1e-3)
        np.testing.assert_array_equal(table.column("cluster_id").to_numpy(), model.assign(expected)[0])
        assert read_metadata(target)["model_file"] == str(tmp_path / "out" / "pca_kmeans.npz")
    assert manifest["pool"] == 120 and manifest["fit_samples"] == 120
    assert manifest["cluster_sizes"]["empty"] == 0 and manifest["cluster_sizes"]["min"] == 20


def test_cluster_stage_samples_the_pool_deterministically(tmp_path):
    files = write_shards(tmp_path)
    a, targets_a = run_cluster(files, tmp_path / "a", max_fit_samples=60)
    b, targets_b = run_cluster(files, tmp_path / "b", max_fit_samples=60)
    assert a["fit_samples"] == 60 and a["pool"] == 120
    for ta, tb in zip(targets_a, targets_b):
        assert read_targets(ta).equals(read_targets(tb))
    ma, mb = ClusterModel.load(tmp_path / "a" / "pca_kmeans.npz"), ClusterModel.load(tmp_path / "b" / "pca_kmeans.npz")
    np.testing.assert_array_equal(ma.pca_mean, mb.pca_mean)
    c, _ = run_cluster(files, tmp_path / "c", max_fit_samples=60, seed=7)
    mc = ClusterModel.load(tmp_path / "c" / "pca_kmeans.npz")
    assert not np.array_equal(ma.pca_mean, mc.pca_mean)  # another seed draws another sample


def test_cluster_stage_rejects_mixed_embeddings_and_tiny_pools(tmp_path):
    files = write_shards(tmp_path / "a")
    other = write_shards(tmp_path / "b", sizes=(30,), params={"backbone": "resnet18", "dim": DIM})
    with pytest.raises(ArtefactError, match=r"b/shard-0/embeddings\.parquet: embedding parameters .* differ"):
        run_cluster([files[0], other[0]], tmp_path / "out")
    with pytest.raises(ClusterFitError, match=r"cluster.k \(256\)"):
        run_cluster(files, tmp_path / "out", pca_dim=8, k=256)
    with pytest.raises(ValueError, match="2 embedding files but 1 target files"):
        cluster.run(cluster_config(), embedding_files=files, target_files=[tmp_path / "t.parquet"],
                    out_dir=tmp_path / "out")


def test_cluster_stage_reads_embeddings_a_batch_at_a_time_with_the_same_result(tmp_path, monkeypatch):
    """Memory follows one batch of rows, not a shard's whole column: batches of 7 rows (sample rows and
    projections split across batch boundaries) give exactly the targets of one whole read."""
    files = write_shards(tmp_path)
    _, whole = run_cluster(files, tmp_path / "whole")
    original = cluster._embedding_batches
    seen = []

    def small(path, batch_rows=7):
        for first, matrix in original(path, 7):
            seen.append(len(matrix))
            yield first, matrix

    monkeypatch.setattr(cluster, "_embedding_batches", small)
    _, batched = run_cluster(files, tmp_path / "batched")
    assert max(seen) == 7 and len(seen) > 2 * len(files)
    for a, b in zip(whole, batched):
        a, b = read_targets(a), read_targets(b)
        # BLAS may round a product of 7 rows differently from one of 70: equal up to float rounding,
        # keys and clusters (well separated blobs) exactly
        for key in ("tile_id", "proposal_index", "cluster_id"):
            assert a.column(key).equals(b.column(key))
        dim = vector_matrix(read_embeddings(files[0]).column("embedding")).shape[1]
        norm_a, norm_b = (t.column("norm").to_numpy() for t in (a, b))
        np.testing.assert_allclose(norm_b, norm_a, rtol=4 * dim * np.finfo(np.float32).eps)
        z_a, z_b = (vector_matrix(t.column("embedding")).astype(np.float32) for t in (a, b))
        assert np.abs(z_a - z_b).max() <= np.finfo(np.float16).eps  # one float16 step of a unit vector


def test_pca_is_blockwise_on_float16_and_accurate_far_from_the_origin():
    """fit_pca takes the float16 sample as stored (the stage no longer converts it whole) and, with a
    float64 covariance of centred blocks, recovers the axes of data far from the origin (mean 30, where
    X^T X - n mean mean^T in float32 cancels) as an exact SVD does; signs follow scikit-learn's rule."""
    from mutdet.embedding import cluster as cluster_module

    rng = np.random.default_rng(0)
    basis = rng.standard_normal((6, 64))
    x = ((rng.standard_normal((5000, 6)) * np.linspace(6, 1, 6)) @ basis + 30).astype(np.float16)
    block = cluster_module._PCA_BLOCK
    try:
        cluster_module._PCA_BLOCK = 700  # several blocks, the last one partial
        mean, components, variance, _ = fit_pca(x, 6)
    finally:
        cluster_module._PCA_BLOCK = block
    whole = fit_pca(x.astype(np.float32), 6)
    centred = x.astype(np.float64) - x.astype(np.float64).mean(axis=0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    np.testing.assert_allclose(mean, x.astype(np.float64).mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(np.abs(components), np.abs(vt[:6]), atol=1e-5)
    np.testing.assert_allclose(variance, s[:6] ** 2 / (len(x) - 1), rtol=1e-5)
    rows = np.arange(6)
    assert (components[rows, np.abs(components).argmax(axis=1)] > 0).all()
    np.testing.assert_allclose(components, whole[1], atol=1e-6)
