"""The un-normalised target of the DETReg L1 loss: the cluster stage stores each PCA projection's norm
(targets' ``norm`` column), the dataset passes it as ``embedding_norms``, older targets files still load."""
from __future__ import annotations


import numpy as np
import pyarrow as pa
import pytest
import torch

from mutdet.data.pretrain import ProposalTileDataset
from mutdet.embedding.artefacts import (read_embeddings, read_targets, targets_schema, vector_column, vector_matrix,
                                        write_targets)
from mutdet.embedding.cluster import ClusterModel
from mutdet.io.artefacts import ArtefactError
from tests.test_cluster import run_cluster, write_shards
from tests.test_pretrain_stage import DIM, artefacts  # noqa: F401  (the module fixture of tiny pre-training artefacts)


def test_cluster_stage_stores_the_norm_of_the_projection(tmp_path):
    files = write_shards(tmp_path)
    _, targets = run_cluster(files, tmp_path / "out")
    model = ClusterModel.load(tmp_path / "out" / "pca_kmeans.npz")
    for source, target in zip(files, targets):
        table = read_targets(target)
        assert table.schema.field("norm").type == pa.float32()
        raw = vector_matrix(read_embeddings(source).column("embedding")).astype(np.float64)
        projection = (raw - model.pca_mean) @ model.pca_components.T.astype(np.float64)  # (N, pca_dim)
        norm = table.column("norm").to_numpy()
        # float32 projection of float16 inputs: rounding of a D-term dot product, relative to the norm
        rel = raw.shape[1] * np.finfo(np.float32).eps * 4
        np.testing.assert_allclose(norm, np.linalg.norm(projection, axis=1), rtol=rel)
        # O * norm is the un-normalised projection, to O's float16 rounding
        o = vector_matrix(table.column("embedding")).astype(np.float64)
        scale = np.abs(projection).max()
        assert np.abs(o * norm[:, None] - projection).max() <= 2 * np.finfo(np.float16).eps * scale


def test_targets_schema_norm_is_optional_but_typed(tmp_path):
    base = {"tile_id": ["a", "a"], "proposal_index": pa.array([0, 1], pa.int32()),
            "embedding": vector_column(np.eye(2, 4)), "cluster_id": pa.array([0, 1], pa.int16())}
    write_targets(pa.table(base), tmp_path / "old.parquet")
    assert "norm" not in read_targets(tmp_path / "old.parquet").column_names
    write_targets(pa.table({**base, "norm": pa.array([2.0, 3.0], pa.float64())}), tmp_path / "new.parquet")
    table = read_targets(tmp_path / "new.parquet")
    assert table.schema == targets_schema(4).with_metadata(table.schema.metadata)
    assert table.column("norm").to_pylist() == [2.0, 3.0]
    with pytest.raises(ArtefactError, match="'norm'"):
        write_targets(pa.table({**base, "norm": ["x", "y"]}), tmp_path / "bad.parquet")


def test_dataset_passes_the_norms_in_box_order(artefacts, tmp_path):  # noqa: F811
    table = read_targets(artefacts["targets"]).drop_columns(["norm"])
    norms = np.arange(1, table.num_rows + 1, dtype=np.float32) * 0.5  # recognisable per row
    write_targets(table.append_column("norm", pa.array(norms, pa.float32())), tmp_path / "targets.parquet",
                  {"dim": DIM, "params": {"k": 3}})
    write_targets(table, tmp_path / "old.parquet", {"dim": DIM, "params": {"k": 3}})  # an older cluster stage's
    ds = ProposalTileDataset([artefacts["tiles"]], [artefacts["proposals"]], [tmp_path / "targets.parquet"],
                             require_norms=True)
    old = ProposalTileDataset([artefacts["tiles"]], [artefacts["proposals"]], [tmp_path / "old.parquet"])
    # a file of an older cluster stage is an error where the norms are needed (the L1 alignment)
    with pytest.raises(ValueError, match=r"old\.parquet: no 'norm' column .*snakemake --forcerun cluster"):
        ProposalTileDataset([artefacts["tiles"]], [artefacts["proposals"]], [tmp_path / "old.parquet"],
                            require_norms=True)
    keys = list(zip(table.column("tile_id").to_pylist(), table.column("proposal_index").to_pylist()))
    row_of = {k: i for i, k in enumerate(keys)}
    for index in range(len(ds)):
        _, target = ds[index]
        _, target_old = old[index]
        expected = [norms[row_of[(ds.tile_ids[index], rank)]] for rank in range(len(target["boxes"]))]
        assert target["embedding_norms"].dtype == torch.float32
        assert target["embedding_norms"].tolist() == expected  # proposals are in rank order
        assert target_old["embedding_norms"].tolist() == [1.0] * len(target_old["boxes"])
        torch.testing.assert_close(target["embeddings"], target_old["embeddings"], rtol=0, atol=0)
