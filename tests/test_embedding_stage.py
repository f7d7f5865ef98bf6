"""Stage ``embed`` (mutdet.stages.embed) and its pieces: the embeddings schema and join, backbone weights
(random-weights warning, missing ImageNet weights before any work), a tiny end-to-end run with resume."""
import json
import logging
import urllib.error

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401 (pa.compute)
import pytest
import torch
import torchvision

from mutdet.boxes import le90_to_polygon
from mutdet.config import ConfigError, from_dict
from mutdet.embedding import backbone as backbone_module
from mutdet.embedding.artefacts import (JoinError, check_join, embeddings_schema, read_embeddings, vector_column,
                                        vector_matrix, write_embeddings, write_embeddings_batches)
from mutdet.embedding.backbone import BackboneWeightsError, build_embedder, imagenet_checkpoint, resolve_weights
from mutdet.embedding.pipeline import TileReadError
from mutdet.io.artefacts import PROPOSALS_SCHEMA, TILES_SCHEMA, ArtefactError, read_artefact, write_artefact
from mutdet.io.atomic import write_bytes
from mutdet.stages import embed

SMALL = {"backbone": "resnet18", "weights": "none", "batch_size": 3, "workers": 0, "device": "cpu",
         "input_size": 96, "crop_size": 32, "checkpoint_every": 2}
SIZES = [(64, 64), (48, 80), (64, 64), (64, 64)]  # (H, W) per tile; the second is not square
COUNTS = [2, 3, 0, 2]  # proposals per tile; tile 2 has none


def write_inputs(root, interleave=False):
    """A tiles folder (PNG tiles + tiles.parquet) and a proposals folder (proposals.parquet)."""
    rng = np.random.default_rng(1)
    tiles_dir, proposals_dir = root / "tiles", root / "proposals"
    tile_rows, proposal_rows = [], []
    for t, ((height, width), count) in enumerate(zip(SIZES, COUNTS)):
        tile_id = f"img__1.0__{t * 64}___0"
        rel = f"images/img/{tile_id}.png"
        image = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
        write_bytes(tiles_dir / rel, cv2.imencode(".png", image)[1].tobytes())
        tile_rows.append({"tile_id": tile_id, "image_id": "img", "source_path": "img.png", "tile_path": rel,
                          "rate": 1.0, "x": t * 64, "y": 0, "size": 64, "valid_width": width,
                          "valid_height": height, "image_width": 256, "image_height": 64})
        for i in range(count):
            box = [rng.uniform(15, width - 15), rng.uniform(15, height - 15), rng.uniform(12, 20),
                   rng.uniform(4, 10), rng.uniform(-np.pi / 2, np.pi / 2)]
            proposal_rows.append({"tile_id": tile_id, "proposal_index": i, "cx": box[0], "cy": box[1], "w": box[2],
                                  "h": box[3], "theta": box[4], "polygon": le90_to_polygon(box).tolist(),
                                  "score": 1.0, "predicted_iou": None, "stability_score": None, "area": 1.0,
                                  "method": "graph"})
    if interleave:  # rows of one tile need not be contiguous
        proposal_rows = proposal_rows[::2] + proposal_rows[1::2]
    write_artefact(pa.Table.from_pylist(tile_rows, schema=TILES_SCHEMA), tiles_dir / "tiles.parquet", "tiles",
                   {"params": {"tiling": {"size": 64}}})
    write_artefact(pa.Table.from_pylist(proposal_rows, schema=PROPOSALS_SCHEMA), proposals_dir / "proposals.parquet",
                   "proposals", {"params": {"method": "graph"}})
    return tiles_dir, proposals_dir


def keys_table(keys):
    return pa.table({"tile_id": pa.array([k[0] for k in keys], pa.string()),
                     "proposal_index": pa.array([k[1] for k in keys], pa.int32())})


# --- schema and join ------------------------------------------------------------------------------------------


def test_float16_vectors_round_trip_with_dim_metadata(tmp_path):
    vectors = np.random.default_rng(0).normal(size=(5, 7)).astype(np.float16)
    table = keys_table([("a", i) for i in range(5)]).append_column("embedding", vector_column(vectors))
    write_embeddings(table, tmp_path / "e.parquet", {"params": {"backbone": "x"}})
    back = read_embeddings(tmp_path / "e.parquet")
    assert back.schema.field("embedding").type == pa.list_(pa.float16(), 7)
    assert back.schema.remove_metadata().equals(embeddings_schema(7))
    np.testing.assert_array_equal(vector_matrix(back.column("embedding")), vectors)
    np.testing.assert_array_equal(vector_matrix(back.slice(2).column("embedding")), vectors[2:])  # offsets


def test_reader_rejects_mistyped_and_missing_columns(tmp_path):
    import pyarrow.parquet as pq

    table = keys_table([("a", 0)]).append_column("embedding", pa.FixedSizeListArray.from_arrays(
        pa.array([1.0, 2.0], pa.float32()), 2))
    pq.write_table(table.replace_schema_metadata({b"mutdet_kind": b"embeddings", b"mutdet_dim": b"2"}),
                   tmp_path / "f32.parquet")
    with pytest.raises(ArtefactError, match=r"f32\.parquet.*'embedding'.*halffloat"):
        read_embeddings(tmp_path / "f32.parquet")
    pq.write_table(keys_table([("a", 0)]), tmp_path / "none.parquet")
    with pytest.raises(ArtefactError, match=r"none\.parquet: missing column 'embedding'"):
        read_embeddings(tmp_path / "none.parquet")
    with pytest.raises(ArtefactError, match="not found"):
        read_embeddings(tmp_path / "absent.parquet")


@pytest.mark.parametrize("keys, message", [
    ([("a", 0), ("a", 1)], r"1 proposal\(s\) missing, first \[\('b', 0\)\]"),
    ([("a", 0), ("a", 1), ("b", 0), ("b", 1)], r"1 extra key\(s\), first \[\('b', 1\)\]"),
    ([("a", 1), ("a", 0), ("b", 0)], r"different order; row 0 is \('a', 1\) where the proposals have \('a', 0\)"),
    ([("a", 0), ("a", 1), ("b", 0), ("b", 0)], "duplicated keys"),
])
def test_join_mismatch_names_both_files(keys, message):
    proposals = keys_table([("a", 0), ("a", 1), ("b", 0)])
    with pytest.raises(JoinError, match=message) as err:
        check_join(keys_table(keys), proposals, path="E.parquet", proposals_path="P.parquet")
    assert "E.parquet" in str(err.value) and "P.parquet" in str(err.value)
    check_join(proposals, proposals, path="E.parquet", proposals_path="P.parquet")  # the exact join passes


# --- weights --------------------------------------------------------------------------------------------------


def test_random_weights_warn_loudly(caplog):
    with caplog.at_level(logging.WARNING, logger="mutdet"):
        assert resolve_weights("resnet18", "none") == "none"
    assert any(r.levelno == logging.WARNING and "RANDOM weights" in r.getMessage() for r in caplog.records)


@pytest.fixture
def empty_hub(tmp_path, monkeypatch):
    """An empty torch hub cache and a network that fails; counts download attempts."""
    hub = tmp_path / "hub"
    hub.mkdir()
    attempts = []

    def offline(url, *args, **kwargs):
        attempts.append(url)
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    return hub, attempts


def test_missing_imagenet_weights_name_the_cache_file(empty_hub):
    hub, attempts = empty_hub
    with pytest.raises(BackboneWeightsError) as err:
        resolve_weights("resnet50", "imagenet")
    expected = hub / "checkpoints" / "resnet50-0676ba61.pth"
    assert str(expected) in str(err.value) and "no network" in str(err.value)
    assert attempts == ["https://download.pytorch.org/models/resnet50-0676ba61.pth"]


def test_cached_imagenet_weights_are_used_without_download(empty_hub):
    hub, attempts = empty_hub
    url, path = imagenet_checkpoint("resnet18")
    assert path == hub / "checkpoints" / "resnet18-f37072fd.pth"
    reference = torchvision.models.resnet18(weights=None)
    path.parent.mkdir()
    torch.save(reference.state_dict(), path)  # what torchvision's IMAGENET1K_V1 file holds
    loaded = build_embedder(backbone="resnet18", weights="imagenet")
    assert attempts == []
    torch.testing.assert_close(loaded.backbone.stem[0].weight, reference.conv1.weight)
    torch.testing.assert_close(loaded.backbone.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)


def test_bad_local_weights(tmp_path):
    with pytest.raises(BackboneWeightsError, match="no file"):
        resolve_weights("resnet18", str(tmp_path / "absent.pth"))
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "wrong.pth")
    with pytest.raises(BackboneWeightsError, match=r"wrong\.pth.*not a usable torchvision resnet18"):
        build_embedder(backbone="resnet18", weights=str(tmp_path / "wrong.pth"))


def test_stage_fails_on_missing_weights_before_reading_tiles(tmp_path, empty_hub, monkeypatch):
    tiles_dir, proposals_dir = write_inputs(tmp_path)
    monkeypatch.setattr(embed.TileImages, "__getitem__", lambda *a: pytest.fail("a tile was read"))
    with pytest.raises(BackboneWeightsError, match="resnet18-f37072fd.pth"):
        embed.run(small_config(weights="imagenet"), tiles_dir=tiles_dir, proposals_dir=proposals_dir,
                  out_dir=tmp_path / "out")
    assert not (tmp_path / "out" / "parts").exists()


# --- the stage ------------------------------------------------------------------------------------------------


def direct_embeddings(tiles_dir, proposals_dir):
    """Each proposal embedded alone (its own crop, its own forward pass) with the same seeded weights."""
    embedder = build_embedder(backbone="resnet18", weights="none", crop_size=SMALL["crop_size"], context=1.5)
    tiles = {r["tile_id"]: r["tile_path"] for r in read_artefact(tiles_dir / "tiles.parquet", "tiles").to_pylist()}
    out = []
    for row in read_artefact(proposals_dir / "proposals.parquet", "proposals").to_pylist():
        bgr = cv2.imread(str(tiles_dir / tiles[row["tile_id"]]))
        height, width = bgr.shape[:2]
        scale = SMALL["input_size"] / max(height, width)
        bgr = cv2.resize(bgr, (round(width * scale), round(height * scale)), interpolation=cv2.INTER_LINEAR)
        image = embedder.normalize(torch.from_numpy(bgr[:, :, ::-1].transpose(2, 0, 1).copy()))
        box = torch.tensor([[row[c] for c in ("cx", "cy", "w", "h", "theta")]], dtype=torch.float64)
        with torch.inference_mode():
            crops = embedder.crops([image], box, torch.zeros(1, dtype=torch.int64), [(width, height)])
            out.append(embedder(crops)[0].numpy())
    return np.stack(out)


def small_config(**overrides):
    return from_dict({"embedding": {**SMALL, **overrides}})


def run_small(tiles_dir, proposals_dir, out_dir, **overrides):
    return embed.run(small_config(**overrides), tiles_dir=tiles_dir, proposals_dir=proposals_dir, out_dir=out_dir)


def test_embed_stage_end_to_end(tmp_path):
    tiles_dir, proposals_dir = write_inputs(tmp_path)
    manifest = run_small(tiles_dir, proposals_dir, tmp_path / "out")
    table = read_embeddings(tmp_path / "out" / "embeddings.parquet")
    proposals = read_artefact(proposals_dir / "proposals.parquet", "proposals")
    check_join(table, proposals, path="embeddings", proposals_path="proposals")
    vectors = vector_matrix(table.column("embedding"))
    assert vectors.shape == (sum(COUNTS), 512) and vectors.dtype == np.float16  # resnet18: 512-d
    # Batches of 3 crops span tiles; every crop must still get its own embedding.
    np.testing.assert_allclose(vectors.astype(np.float32), direct_embeddings(tiles_dir, proposals_dir),
                               rtol=2e-3, atol=2e-3)
    assert manifest["proposals"] == sum(COUNTS) and manifest["tiles_with_proposals"] == 3
    assert manifest["proposals_computed"] == sum(COUNTS) and manifest["params"]["dim"] == 512
    on_disk = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert on_disk["params_hash"] == manifest["params_hash"]


def test_rows_follow_the_proposals_order_and_workers_agree(tmp_path):
    plain = write_inputs(tmp_path / "plain")
    mixed = write_inputs(tmp_path / "mixed", interleave=True)
    run_small(*plain, tmp_path / "plain" / "out")
    run_small(*mixed, tmp_path / "mixed" / "out", workers=1)
    a = read_embeddings(tmp_path / "plain" / "out" / "embeddings.parquet")
    b = read_embeddings(tmp_path / "mixed" / "out" / "embeddings.parquet")
    check_join(b, read_artefact(mixed[1] / "proposals.parquet", "proposals"), path="b", proposals_path="p")
    by_key = {(r["tile_id"], r["proposal_index"]): i for i, r in enumerate(a.select(["tile_id", "proposal_index"])
                                                                           .to_pylist())}
    rows = [by_key[(r["tile_id"], r["proposal_index"])] for r in b.select(["tile_id", "proposal_index"]).to_pylist()]
    np.testing.assert_allclose(vector_matrix(b.column("embedding")).astype(np.float32),
                               vector_matrix(a.column("embedding"))[rows].astype(np.float32), rtol=2e-3, atol=2e-3)


def test_resume_reuses_finished_parts(tmp_path, monkeypatch):
    tiles_dir, proposals_dir = write_inputs(tmp_path)
    out = tmp_path / "out"
    calls = {"tiles": 0}
    getitem = embed.TileImages.__getitem__

    def killed_after_two(self, i):
        if calls["tiles"] == 2:
            raise KeyboardInterrupt("simulated kill")
        calls["tiles"] += 1
        return getitem(self, i)

    monkeypatch.setattr(embed.TileImages, "__getitem__", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        run_small(tiles_dir, proposals_dir, out)
    assert len(list((out / "parts").glob("chunk-*.parquet"))) == 1  # tiles 0 and 1 (checkpoint_every 2)
    monkeypatch.setattr(embed.TileImages, "__getitem__", getitem)
    manifest = run_small(tiles_dir, proposals_dir, out)
    assert manifest["proposals_reused"] == COUNTS[0] + COUNTS[1]
    assert manifest["proposals_computed"] == COUNTS[3]
    again = run_small(tiles_dir, proposals_dir, out)
    assert again["proposals_computed"] == 0
    torch.manual_seed(99)  # random weights ("none") use their own fixed seed, not the global one
    run_small(tiles_dir, proposals_dir, tmp_path / "fresh")
    np.testing.assert_array_equal(vector_matrix(read_embeddings(out / "embeddings.parquet").column("embedding")),
                                  vector_matrix(read_embeddings(tmp_path / "fresh" / "embeddings.parquet")
                                                .column("embedding")))
    # Other parameters: nothing reused; parts removed once the final file is committed.
    changed = run_small(tiles_dir, proposals_dir, out, context=1.0)
    assert changed["proposals_reused"] == 0 and changed["params_hash"] != manifest["params_hash"]
    assert not (out / "parts").exists()


def test_parts_removed_after_commit_and_rerun_is_a_no_op(tmp_path, monkeypatch):
    tiles_dir, proposals_dir = write_inputs(tmp_path)
    out = tmp_path / "out"
    first = run_small(tiles_dir, proposals_dir, out, checkpoint_every=1)
    assert not (out / "parts").exists() and sorted(p.name for p in out.iterdir()) == ["embeddings.parquet",
                                                                                      "manifest.json"]
    vectors = vector_matrix(read_embeddings(out / "embeddings.parquet").column("embedding"))

    def no_backbone(**kwargs):
        raise AssertionError("the backbone must not be built")

    # Committed: a rerun builds nothing and rewrites nothing.
    monkeypatch.setattr(embed, "build_embedder", no_backbone)
    stamp = [(out / n).stat().st_mtime_ns for n in ("embeddings.parquet", "manifest.json")]
    again = run_small(tiles_dir, proposals_dir, out, checkpoint_every=1)
    assert again["proposals_computed"] == 0 and again["proposals_reused"] == first["proposals"]
    assert stamp == [(out / n).stat().st_mtime_ns for n in ("embeddings.parquet", "manifest.json")]
    monkeypatch.undo()

    # A crash while streaming the final file (before its rename): parts kept, no final or temporary
    # file left; the rerun writes it from the parts without building the backbone.
    crashed = tmp_path / "crashed"
    writer = embed.write_embeddings_batches

    def crash(batches, path, dim, metadata):
        def one_then_kill():
            yield next(iter(batches))
            raise KeyboardInterrupt("simulated kill while writing")
        writer(one_then_kill(), path, dim, metadata)

    monkeypatch.setattr(embed, "write_embeddings_batches", crash)
    with pytest.raises(KeyboardInterrupt):
        run_small(tiles_dir, proposals_dir, crashed, checkpoint_every=1)
    assert sorted(p.name for p in crashed.iterdir()) == ["parts"]
    assert len(list((crashed / "parts").glob("chunk-*.parquet"))) == 3  # one per tile with proposals
    monkeypatch.setattr(embed, "write_embeddings_batches", writer)
    monkeypatch.setattr(embed, "build_embedder", no_backbone)
    resumed = run_small(tiles_dir, proposals_dir, crashed, checkpoint_every=1)
    assert resumed["proposals_computed"] == 0 and not (crashed / "parts").exists()
    np.testing.assert_array_equal(vector_matrix(read_embeddings(crashed / "embeddings.parquet").column("embedding")),
                                  vectors)


def test_streamed_embeddings_equal_a_whole_write(tmp_path):
    rng = np.random.default_rng(0)
    keys = keys_table([(f"t{i // 7}", i % 7) for i in range(50)])
    table = keys.append_column("embedding", vector_column(rng.normal(size=(50, 4))))
    write_embeddings(table, tmp_path / "whole.parquet", {"x": 1})
    rows = write_embeddings_batches(table.to_batches(max_chunksize=6), tmp_path / "streamed.parquet", 4, {"x": 1})
    assert rows == 50
    assert read_embeddings(tmp_path / "streamed.parquet").equals(read_embeddings(tmp_path / "whole.parquet"))
    with pytest.raises(ArtefactError, match="streamed2.parquet: 4-d vectors where 8-d"):
        write_embeddings_batches(table.to_batches(), tmp_path / "streamed2.parquet", 8)
    assert not list(tmp_path.glob(".streamed2*"))


def test_bad_inputs_are_named(tmp_path):
    tiles_dir, proposals_dir = write_inputs(tmp_path)
    tile = next((tiles_dir / "images" / "img").glob("*__0___0.png"))
    tile.write_bytes(b"not a png")
    with pytest.raises(TileReadError, match=f"{tile}.*cannot be decoded"):
        run_small(tiles_dir, proposals_dir, tmp_path / "out")
    tiles = read_artefact(tiles_dir / "tiles.parquet", "tiles")
    write_artefact(tiles.slice(1), tiles_dir / "tiles.parquet", "tiles")
    with pytest.raises(ArtefactError, match=r"proposals\.parquet: 1 tile\(s\) with proposals are not listed in .*tiles"):
        run_small(tiles_dir, proposals_dir, tmp_path / "out")
    with pytest.raises(ConfigError, match="embedding.precision"):  # the config rejects it, before any job
        small_config(precision="fp8")


def test_embedding_dimension_follows_the_backbone():
    assert backbone_module.embedding_dim("resnet50") == 2048
    assert backbone_module.embedding_dim("resnet18") == 512
    with pytest.raises(ValueError, match="embedding.backbone"):
        backbone_module.embedding_dim("vgg16")


def test_shard_without_proposals_gives_an_empty_file(tmp_path):
    tiles_dir, proposals_dir = write_inputs(tmp_path)
    proposals = read_artefact(proposals_dir / "proposals.parquet", "proposals")
    write_artefact(proposals.slice(0, 0), proposals_dir / "proposals.parquet", "proposals")
    manifest = run_small(tiles_dir, proposals_dir, tmp_path / "out")
    table = read_embeddings(tmp_path / "out" / "embeddings.parquet")
    assert table.num_rows == 0 and table.schema.field("embedding").type == pa.list_(pa.float16(), 512)
    assert manifest["proposals"] == 0 and manifest["proposals_per_second"] is None


@pytest.mark.reliability
def test_changed_proposals_are_embedded_again(tmp_path):
    """Same rows and parameters, shifted boxes (a re-run of propose): no part of the old ones is reused."""
    tiles_dir, proposals_dir = write_inputs(tmp_path)
    out = tmp_path / "out"
    first = run_small(tiles_dir, proposals_dir, out)
    before = vector_matrix(read_embeddings(out / "embeddings.parquet").column("embedding"))
    table = read_artefact(proposals_dir / "proposals.parquet", "proposals")
    shifted = table.set_column(table.schema.get_field_index("cx"), "cx", pa.compute.add(table.column("cx"), 3.0))
    write_artefact(shifted, proposals_dir / "proposals.parquet", "proposals", {"params": {"method": "graph"}})
    again = run_small(tiles_dir, proposals_dir, out)
    assert again["proposals_reused"] == 0 and again["proposals_computed"] == first["proposals_computed"]
    after = vector_matrix(read_embeddings(out / "embeddings.parquet").column("embedding"))
    assert not np.array_equal(before, after)
    fresh = run_small(tiles_dir, proposals_dir, tmp_path / "fresh")
    np.testing.assert_array_equal(after, vector_matrix(read_embeddings(tmp_path / "fresh" / "embeddings.parquet")
                                                       .column("embedding")))
    assert fresh["params_hash"] == again["params_hash"] != first["params_hash"]
