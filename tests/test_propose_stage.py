"""Stage ``propose`` (mutdet.stages.propose): outputs, resume inside a shard, bad tiles, SAM checkpoint
errors before any work, and the lazy dataset-level reader."""
import json

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mutdet.config import from_dict
from mutdet.io.artefacts import PROPOSALS_SCHEMA, TILES_SCHEMA, read_artefact, write_artefact
from mutdet.proposals.sam import SamCheckpointError
from mutdet.stages import propose

from conftest import tiny_sam_checkpoint

TILE = 96


def write_tiles(folder, n=5, seed=0):
    """``n`` synthetic tiles (bright rotated rectangles on noise) plus their ``tiles.parquet``."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        image = np.clip(rng.normal(90, 20, (TILE, TILE, 3)), 0, 255).astype(np.uint8)
        for _ in range(3):
            centre = tuple(float(v) for v in rng.uniform(20, TILE - 20, 2))
            rect = (centre, (float(rng.uniform(15, 30)), float(rng.uniform(6, 12))), float(rng.uniform(0, 180)))
            cv2.fillPoly(image, [cv2.boxPoints(rect).round().astype(np.int32)], (240, 240, 240))
        tile_id = f"img{i // 2}__1.0__{(i % 2) * 64}___0"
        rel = f"images/img{i // 2}/{tile_id}.png"
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(folder / rel), image)
        rows.append({"tile_id": tile_id, "image_id": f"img{i // 2}", "source_path": f"img{i // 2}.png",
                     "tile_path": rel, "rate": 1.0, "x": (i % 2) * 64, "y": 0, "size": TILE,
                     "valid_width": TILE, "valid_height": TILE, "image_width": 160, "image_height": TILE})
    write_artefact(pa.Table.from_pylist(rows, schema=TILES_SCHEMA), folder / "tiles.parquet", "tiles",
                   {"params": {"tiling": {"size": TILE}}})
    return rows


def config(method="graph", **proposals):
    section = {"method": method, "checkpoint_every": 2, "graph": {"resize": TILE, "min_size": 20}}
    section.update(proposals)
    return from_dict({"proposals": section})


@pytest.fixture
def tiles(tmp_path):
    folder = tmp_path / "tiles"
    return folder, write_tiles(folder)


@pytest.fixture
def count_calls(monkeypatch):
    """Wrap the stage's proposer so each call is counted; ``calls["fail_at"]`` simulates a kill."""
    calls = {"tiles": 0, "builds": 0, "fail_at": None}
    build = propose.build_proposer

    def counting_build(cfg):
        calls["builds"] += 1
        proposer = build(cfg)

        def counted(image):
            if calls["tiles"] == calls["fail_at"]:
                raise KeyboardInterrupt("simulated kill")
            calls["tiles"] += 1
            return proposer(image)

        return counted

    monkeypatch.setattr(propose, "build_proposer", counting_build)
    return calls


def test_graph_stage_outputs_and_manifest(tiles, tmp_path):
    folder, rows = tiles
    out = tmp_path / "out"
    manifest = propose.run(config(), dataset="d", split="train", shard=0, tiles_dir=folder, out_dir=out)
    table = read_artefact(out / "proposals.parquet", "proposals")
    assert pq.read_schema(out / "proposals.parquet").remove_metadata().equals(PROPOSALS_SCHEMA)
    assert set(table.column("method").to_pylist()) == {"graph"}
    ids = table.column("tile_id").to_pylist()
    assert list(dict.fromkeys(ids)) == [r["tile_id"] for r in rows]  # tiles in input order
    d = table.to_pydict()
    for tile_id in set(ids):
        idx = [i for i, t in enumerate(ids) if t == tile_id]
        assert [d["proposal_index"][i] for i in idx] == list(range(len(idx)))
        assert np.all(np.diff([d["score"][i] for i in idx]) <= 0)
    w, h, theta = (np.asarray(d[k]) for k in ("w", "h", "theta"))
    assert (w >= h).all() and (theta >= -np.pi / 2).all() and (theta < np.pi / 2).all()
    assert all(v is None for v in d["predicted_iou"])
    saved = json.loads((out / "manifest.json").read_text())
    assert saved == json.loads(json.dumps(manifest))
    assert manifest["params"] == config().proposals.method_params()
    assert manifest["tiles"] == 5 and manifest["tiles_computed"] == 5 and manifest["bad_tiles"] == []
    assert manifest["proposals"] == table.num_rows > 0
    assert manifest["proposals_per_tile"]["tiles"] == 5
    assert manifest["proposals_per_tile"]["max"] <= manifest["params"]["max_per_tile"]
    assert "mutdet" in manifest["code_version"]
    assert not (out / "parts").exists()  # committed: the parts are removed, not kept beside the final file
    assert pq.read_metadata(out / "proposals.parquet").num_row_groups >= 1


def test_resume_reuses_parts_and_recomputes_on_parameter_change(tiles, tmp_path, count_calls, monkeypatch):
    folder, _ = tiles
    out = tmp_path / "out"
    propose.run(config(), dataset="d", split="train", shard=0, tiles_dir=folder, out_dir=out)
    assert count_calls == {"tiles": 5, "builds": 1, "fail_at": None}
    first = read_artefact(out / "proposals.parquet", "proposals")

    assert not (out / "parts").exists()

    # A rerun with the same key finds the committed file: a no-op (nothing built, nothing rewritten).
    stamp = (out / "proposals.parquet").stat().st_mtime_ns, (out / "manifest.json").stat().st_mtime_ns
    manifest = propose.run(config(), dataset="d", split="train", shard=0, tiles_dir=folder, out_dir=out)
    assert count_calls["tiles"] == 5 and count_calls["builds"] == 1
    assert manifest["tiles_reused"] == 5 and manifest["tiles_computed"] == 0 and manifest["proposals"] == first.num_rows
    assert stamp == ((out / "proposals.parquet").stat().st_mtime_ns, (out / "manifest.json").stat().st_mtime_ns)

    # A crash while the final file is written (before its rename): the parts are kept, no final file is
    # left half-written, and the rerun builds it from the parts without proposing again.
    (out / "proposals.parquet").unlink()
    (out / "manifest.json").unlink()
    fresh = tmp_path / "crash"
    writer = propose.write_artefact_batches

    def crash(batches, path, kind, metadata):
        def some():
            yield next(iter(batches))
            raise KeyboardInterrupt("simulated kill while writing")
        writer(some(), path, kind, metadata)

    monkeypatch.setattr(propose, "write_artefact_batches", crash)
    with pytest.raises(KeyboardInterrupt):
        propose.run(config(), dataset="d", split="train", shard=0, tiles_dir=folder, out_dir=fresh)
    monkeypatch.setattr(propose, "write_artefact_batches", writer)
    assert len(list((fresh / "parts").glob("chunk-*.parquet"))) == 3
    assert sorted(p.name for p in fresh.iterdir()) == ["parts"]  # no final file, no temporary file
    builds = count_calls["builds"]
    manifest = propose.run(config(), dataset="d", split="train", shard=0, tiles_dir=folder, out_dir=fresh)
    assert count_calls["builds"] == builds and manifest["tiles_reused"] == 5 and manifest["tiles_computed"] == 0
    assert read_artefact(fresh / "proposals.parquet", "proposals").equals(first)
    assert not (fresh / "parts").exists()

    # A crash after the rename, before the parts were removed: the rerun only removes them.
    (fresh / "parts").mkdir()
    leftover = fresh / "parts" / f"chunk-00000.{manifest['params_hash']}.parquet"
    leftover.write_bytes(b"left by a crash")
    assert propose.run(config(), dataset="d", split="train", shard=0, tiles_dir=folder,
                       out_dir=fresh)["tiles_computed"] == 0
    assert not (fresh / "parts").exists()

    # A killed run (new parameters) keeps the chunks it finished; the rerun does only the rest.
    count_calls.update(tiles=0, fail_at=3)
    changed = config(max_per_tile=3)
    with pytest.raises(KeyboardInterrupt):
        propose.run(changed, dataset="d", split="train", shard=0, tiles_dir=folder, out_dir=out)
    count_calls.update(tiles=0, fail_at=None)
    manifest = propose.run(changed, dataset="d", split="train", shard=0, tiles_dir=folder, out_dir=out)
    assert count_calls["tiles"] == 3  # chunk 0 (2 tiles) was done; chunks 1 and 2 are not
    assert manifest["tiles_reused"] == 2 and manifest["proposals_per_tile"]["max"] <= 3
    assert not (out / "parts").exists()  # the killed run's parts too, once the final file is committed


def test_bad_tiles_reported_by_name_or_raised(tiles, tmp_path):
    folder, rows = tiles
    (folder / rows[1]["tile_path"]).write_bytes(b"not a png")
    (folder / rows[3]["tile_path"]).unlink()
    manifest = propose.run(config(), dataset="d", split="train", shard=0, tiles_dir=folder, out_dir=tmp_path / "out")
    assert [(b["tile_id"], b["reason"]) for b in manifest["bad_tiles"]] == [
        (rows[1]["tile_id"], "not a decodable image"), (rows[3]["tile_id"], "file not found")]
    assert manifest["proposals_per_tile"]["tiles"] == 3
    table = read_artefact(tmp_path / "out" / "proposals.parquet", "proposals")
    assert rows[1]["tile_id"] not in set(table.column("tile_id").to_pylist())
    assert len(list((tmp_path / "out" / "parts").glob("chunk-*.parquet"))) == 3  # kept for the retry
    # Repaired tiles are picked up by a rerun: chunks that held bad tiles are not reused.
    (folder / rows[1]["tile_path"]).write_bytes((folder / rows[0]["tile_path"]).read_bytes())
    (folder / rows[3]["tile_path"]).write_bytes((folder / rows[0]["tile_path"]).read_bytes())
    manifest = propose.run(config(), dataset="d", split="train", shard=0, tiles_dir=folder, out_dir=tmp_path / "out")
    assert manifest["bad_tiles"] == [] and manifest["tiles_reused"] == 1
    assert not (tmp_path / "out" / "parts").exists()  # nothing left to retry: parts removed
    (folder / rows[1]["tile_path"]).write_bytes(b"not a png")
    with pytest.raises(propose.BadTileError, match=rf"{rows[1]['tile_path']}: tile {rows[1]['tile_id']}: not a"):
        propose.run(config(on_bad_tile="error"), dataset="d", split="train", shard=0, tiles_dir=folder, out_dir=tmp_path / "out2")


@pytest.fixture
def tiny_checkpoint(monkeypatch, tmp_path):
    """The vit_b builder swapped for a tiny SAM (same loading path); a seeded checkpoint of it."""
    return tiny_sam_checkpoint(monkeypatch, tmp_path, "vit_b")


def sam_config(checkpoint, **proposals):
    return config("sam", max_per_tile=4, sam={
        "model_type": "vit_b", "checkpoint": None if checkpoint is None else str(checkpoint), "device": "cpu",
        "generator": {"points_per_side": 4, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0,
                      "box_nms_thresh": 1.0}}, **proposals)


def test_sam_stage_with_a_tiny_model(tiles, tmp_path, tiny_checkpoint):
    folder, _ = tiles
    manifest = propose.run(sam_config(tiny_checkpoint), dataset="d", split="train", shard=0, tiles_dir=folder, out_dir=tmp_path / "out")
    table = read_artefact(tmp_path / "out" / "proposals.parquet", "proposals").to_pydict()
    assert set(table["method"]) == {"sam"}
    assert 0 < manifest["proposals_per_tile"]["min"] and manifest["proposals_per_tile"]["max"] <= 4
    assert all(v is not None for v in table["predicted_iou"] + table["stability_score"])
    assert table["score"] == table["predicted_iou"]
    assert manifest["params"]["model_type"] == "vit_b" and manifest["runtime"]["precision"] == "fp32"


def test_sam_checkpoint_errors_before_any_work(tiles, tmp_path, tiny_checkpoint):
    folder, _ = tiles
    out = tmp_path / "out"
    with pytest.raises(SamCheckpointError, match=r"missing\.pth not found.*model_type vit_b"):
        propose.run(sam_config(tmp_path / "missing.pth"), dataset="d", split="train", shard=0, tiles_dir=folder, out_dir=out)
    with pytest.raises(SamCheckpointError, match="proposals.sam.checkpoint is not set"):
        propose.run(sam_config(None), dataset="d", split="train", shard=0, tiles_dir=folder, out_dir=out)
    assert not (out / "parts").exists()
