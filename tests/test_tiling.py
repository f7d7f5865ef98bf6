import os
import json

import cv2
import numpy as np
import pyarrow as pa
import pytest

from mutdet.boxes import le90_to_polygon, polygon_to_le90
from mutdet.config import from_dict
from mutdet.io.annotations import AnnotationError
from mutdet.io.artefacts import read_artefact, write_artefact
from mutdet.io.task1 import read_task1
from mutdet.stages import merge, tile
from mutdet.tiling import (TilingParams, iter_tiles, merge_detections, sliding_windows,
                           tile_boxes_to_image, tile_name, window_iof)


def test_windows_shift_last_inside_the_image():
    w = sliding_windows(1500, 1000, 512, 128)
    xs, ys = sorted(set(w[:, 0])), sorted(set(w[:, 1]))
    assert xs == [0, 384, 768, 988] and ys == [0, 384, 488]
    assert (w[:, 2] - w[:, 0] == 512).all() and w[:, 2].max() == 1500 and w[:, 3].max() == 1000


def test_small_image_gets_one_padded_window():
    np.testing.assert_array_equal(sliding_windows(300, 200, 512, 128), [[0, 0, 512, 512]])


def test_tile_name():
    name = tile_name("P0001__odd", 0.5, 600, 1200)
    assert name == "P0001__odd__0.5__600___1200"


def test_iof_and_cut_objects_become_difficult_2():
    image = np.random.default_rng(0).integers(0, 255, (700, 700, 3), dtype=np.uint8)
    polys = np.array([
        [100, 100, 140, 100, 140, 120, 100, 120],  # inside the first window only
        [484, 100, 524, 100, 524, 120, 484, 120],  # crosses x=512 where window 0 ends: IoF 28/40 = 0.7
        [505, 300, 530, 300, 530, 320, 505, 320],  # 7/25 inside window 0: IoF 0.28 < 0.7
    ], dtype=float)
    params = TilingParams(size=512, gap=128, iof_threshold=0.7)
    tiles = {t.tile_id: t for t in iter_tiles(image, "img", polys, np.array([0, 1, 0]), params)}
    first = tiles["img__1.0__0___0"]
    assert list(first.object_indices) == [0, 1]
    assert list(first.difficult) == [0, 2]  # the cut difficult-1 object becomes 2
    assert first.iof[1] == pytest.approx(0.7)
    # polygons are whole (not clipped), shifted to tile pixels
    second = tiles["img__1.0__188___0"]
    idx = list(second.object_indices).index(1)
    np.testing.assert_allclose(second.polygons[idx], polys[1] - [188, 0] * 4)
    assert second.difficult[idx] == 1  # whole again in this window: keeps its label
    np.testing.assert_allclose(second.boxes[idx], polygon_to_le90(polys[1] - [188, 0] * 4))
    np.testing.assert_array_equal(first.pixels, image[:512, :512])


def test_window_iof_values():
    polys = np.array([[0, 0, 10, 0, 10, 10, 0, 10.0]])
    windows = np.array([[5, 0, 105, 100], [20, 20, 120, 120]])
    np.testing.assert_allclose(window_iof(polys, windows), [[0.5, 0.0]])


def test_padding_and_multiscale():
    image = np.full((300, 200, 3), 50, np.uint8)
    polys = np.array([[20, 20, 60, 20, 60, 40, 20, 40.0]])
    params = TilingParams(size=256, gap=64, rates=(0.5, 1.0), pad_value=(1, 2, 3))
    tiles = list(iter_tiles(image, "im", polys, np.zeros(1), params))
    half = [t for t in tiles if t.rate == 0.5]
    assert len(half) == 1 and half[0].valid_width == 100 and half[0].valid_height == 150
    assert (half[0].pixels[200, 200] == [3, 2, 1]).all()  # RGB pad value stored as BGR
    np.testing.assert_allclose(half[0].polygons[0], polys[0] * 0.5)
    full = [t for t in tiles if t.rate == 1.0]
    assert {(t.x, t.y) for t in full} == {(0, 0), (0, 44)}


def test_tile_boxes_back_to_image_and_merge():
    rng = np.random.default_rng(1)
    truth = np.column_stack([rng.uniform(100, 900, 20), rng.uniform(100, 900, 20), rng.uniform(20, 40, 20),
                             rng.uniform(5, 15, 20), rng.uniform(-1.5, 1.5, 20)])
    # the same objects seen from two overlapping tiles at rate 0.5 and origin (x, y)
    outs, scores = [], []
    for (x, y), noise in (((0, 0), 0.0), ((100, 50), 0.3)):
        tb = truth.copy()
        tb[:, 0] = truth[:, 0] * 0.5 - x + noise
        tb[:, 1] = truth[:, 1] * 0.5 - y
        tb[:, 2:4] *= 0.5
        outs.append(tile_boxes_to_image(tb, np.full(20, x), np.full(20, y), np.full(20, 0.5)))
        scores.append(np.full(20, 0.9 if noise == 0 else 0.5))
    boxes, scores = np.concatenate(outs), np.concatenate(scores)
    np.testing.assert_allclose(outs[0], truth, atol=1e-9)
    keep = merge_detections(np.array(["a"] * 40), boxes, scores, np.zeros(40, int), 0.1)
    assert sorted(keep.tolist()) == list(range(20))  # the duplicates from the second tile are gone
    # different images never suppress each other
    keep = merge_detections(np.array(["a"] * 20 + ["b"] * 20), boxes, scores, np.zeros(40, int), 0.1)
    assert len(keep) == 40


def write_dataset(root, n_images=3, size=(700, 650)):
    (root / "images").mkdir(parents=True)
    (root / "labelTxt").mkdir()
    rng = np.random.default_rng(0)
    ids = []
    for i in range(n_images):
        image_id = f"im{i}"
        ids.append(image_id)
        img = rng.integers(0, 255, (*size, 3), dtype=np.uint8)
        cv2.imwrite(str(root / "images" / f"{image_id}.png"), img)
        boxes = np.column_stack([70 + 100 * np.arange(6), rng.uniform(40, 600, 6), rng.uniform(20, 50, 6),  # apart
                                 rng.uniform(8, 18, 6), rng.uniform(-1.5, 1.5, 6)])
        lines = ["imagesource:test", "gsd:1"]
        lines += [" ".join(f"{v:.2f}" for v in p) + " ship 0" for p in le90_to_polygon(boxes)]
        (root / "labelTxt" / f"{image_id}.txt").write_text("\n".join(lines) + "\n")
    (root / "train.txt").write_text("\n".join(ids) + "\n")
    return ids


def test_tile_stage_outputs_resume_and_parameter_change(tmp_path, dota_config):
    root = tmp_path / "data"
    write_dataset(root)
    raw = dota_config(root, tiling={"size": 256, "gap": 64})
    out = tmp_path / "out"
    summary = tile.run(from_dict(raw), dataset="d", split="train", shard=0, out_dir=out, threads=2)
    tiles = read_artefact(out / "tiles.parquet", "tiles")
    objects = read_artefact(out / "objects.parquet", "objects")
    assert summary["images"] == 3 and summary["images_reused"] == 0
    assert tiles.num_rows == summary["tiles"] == 3 * 16  # 4 x 4 windows of 256 over 650 x 700
    assert objects.num_rows == summary["objects"] > 18  # overlapping windows repeat objects
    for rel in tiles.column("tile_path").to_pylist():
        assert cv2.imread(str(out / rel)).shape == (256, 256, 3)
    assert json.loads((out / "summary.json").read_text())["objects_per_class"] == {"ship": objects.num_rows}
    # rerun: nothing recomputed; a tiling change recomputes everything
    again = tile.run(from_dict(raw), dataset="d", split="train", shard=0, out_dir=out, threads=1)
    assert again["images_reused"] == 3 and again["tiles"] == summary["tiles"]
    raw["datasets"]["d"]["tiling"]["size"] = 320
    changed = tile.run(from_dict(raw), dataset="d", split="train", shard=0, out_dir=out, threads=1)
    assert changed["images_reused"] == 0 and changed["tiles"] != summary["tiles"]
    pngs = list((out / "images").rglob("*.png"))
    assert len(pngs) == changed["tiles"]  # stale tiles of the old size are gone
    assert not list(out.rglob("*.tmp"))


def test_tile_stage_bad_objects_and_images(tmp_path, dota_config):
    root = tmp_path / "data"
    write_dataset(root)
    with open(root / "labelTxt" / "im1.txt", "a") as fh:
        fh.write("1 2 3 plane\n")
    (root / "images" / "im2.png").write_bytes(b"not a png")
    raw = dota_config(root, tiling={"size": 256, "gap": 64})
    with pytest.raises(AnnotationError, match=r"im1\.txt:9: expected 9 or 10 tokens"):
        tile.run(from_dict(raw), dataset="d", split="train", shard=0, out_dir=tmp_path / "out", threads=1)
    raw["on_bad_object"] = "skip"
    summary = tile.run(from_dict(raw), dataset="d", split="train", shard=0, out_dir=tmp_path / "out2", threads=2)
    assert summary["skipped_objects"] == 1 and summary["skipped_images"] == 1
    assert "im2.png" in summary["skipped"]["images"][0]["reason"]
    assert summary["skipped"]["objects"][0]["line"] == 9


def test_merge_stage_maps_tile_detections_to_images(tmp_path, dota_config):
    root = tmp_path / "data"
    write_dataset(root, n_images=1)
    out = tmp_path / "out"
    tile.run(from_dict(dota_config(root, tiling={"size": 256, "gap": 64})), dataset="d", split="train", shard=0, out_dir=out, threads=1)
    objects = read_artefact(out / "objects.parquet", "objects")
    # pretend the detector found every ground-truth object in every tile
    dets = pa.table({
        "id": objects.column("tile_id"), "class_id": objects.column("class_id"),
        "class_name": objects.column("class_name"), "score": pa.array(np.linspace(1, 0.5, objects.num_rows), pa.float32()),
        **{c: objects.column(c) for c in ("cx", "cy", "w", "h", "theta")},
    })
    write_artefact(dets, tmp_path / "tile_dets.parquet", "detections", {"frame": "tile"})
    merged = merge.run(tmp_path / "tile_dets.parquet", [out / "tiles.parquet"], tmp_path / "dets.parquet",
                       task1_dir=tmp_path / "task1", classes=["ship", "plane"])
    task1 = read_task1(tmp_path / "task1", ["ship", "plane"])
    assert len(task1["image_ids"]) == merged.num_rows and (tmp_path / "task1" / "Task1_plane.txt").is_file()
    np.testing.assert_allclose(task1["polygons"], le90_to_polygon(np.stack(
        [merged.column(c).to_numpy() for c in ("cx", "cy", "w", "h", "theta")], axis=1)), atol=0.006)
    labelled = (root / "labelTxt" / "im0.txt").read_text().splitlines()[2:]
    assert merged.num_rows == len(labelled)
    truth = polygon_to_le90(np.array([[float(v) for v in l.split()[:8]] for l in labelled]))
    got = np.stack([merged.column(c).to_numpy() for c in ("cx", "cy", "w", "h", "theta")], axis=1)
    order = np.lexsort((got[:, 1], got[:, 0]))
    torder = np.lexsort((truth[:, 1], truth[:, 0]))
    np.testing.assert_allclose(got[order], truth[torder], atol=1e-2)  # minAreaRect runs in float32
    assert set(merged.column("id").to_pylist()) == {"im0"}


def test_atomic_writes_have_normal_permissions(tmp_path):
    from mutdet.io.atomic import write_text

    write_text(tmp_path / "a.txt", "x")
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o666 & ~umask
    with pytest.raises(RuntimeError):
        from mutdet.io.atomic import atomic_path

        with atomic_path(tmp_path / "b.txt") as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash")
    assert not (tmp_path / "b.txt").exists() and not list(tmp_path.glob(".b.txt*"))


@pytest.mark.reliability
def test_tile_parts_follow_label_edits_and_code_updates(tmp_path, dota_config, monkeypatch):
    """An edited label file re-tiles exactly its image; a new code version (the README's --forcerun after
    an update) re-tiles everything instead of reusing parts of the old code."""
    root = tmp_path / "data"
    write_dataset(root)
    raw = dota_config(root, tiling={"size": 256, "gap": 64})
    out = tmp_path / "out"
    first = tile.run(from_dict(raw), dataset="d", split="train", shard=0, out_dir=out, threads=1)
    label = root / "labelTxt" / "im1.txt"
    lines = label.read_text().splitlines(keepends=True)
    label.write_text("".join(lines[:-1]))  # one object fewer
    edited = tile.run(from_dict(raw), dataset="d", split="train", shard=0, out_dir=out, threads=1)
    assert edited["images_reused"] == first["images"] - 1
    objects = read_artefact(out / "objects.parquet", "objects")
    fresh = tile.run(from_dict(raw), dataset="d", split="train", shard=0, out_dir=tmp_path / "fresh", threads=1)
    assert objects.num_rows == fresh["objects"] < first["objects"]
    monkeypatch.setattr(tile, "code_version", lambda: "mutdet 9.9.9")
    updated = tile.run(from_dict(raw), dataset="d", split="train", shard=0, out_dir=out, threads=1)
    assert updated["images_reused"] == 0


def test_tile_workers_are_joined_even_on_an_error(tmp_path, dota_config):
    """The worker pool never outlives the stage: joined after a run, terminated and joined on an error."""
    import multiprocessing

    root = tmp_path / "data"
    write_dataset(root)
    raw = dota_config(root, tiling={"size": 256, "gap": 64})
    tile.run(from_dict(raw), dataset="d", split="train", shard=0, out_dir=tmp_path / "out", threads=2)
    assert multiprocessing.active_children() == []
    with open(root / "labelTxt" / "im1.txt", "a") as fh:
        fh.write("1 2 3 plane\n")
    with pytest.raises(AnnotationError, match=r"im1\.txt:9"):
        tile.run(from_dict(raw), dataset="d", split="train", shard=0, out_dir=tmp_path / "out2", threads=2)
    assert multiprocessing.active_children() == []


def test_tile_command_does_not_import_pandas_and_leaves_no_process(tmp_path, dota_config):
    """`mutdet tile` as a whole process: pyarrow is kept from importing pandas (0.2-0.4 s per command,
    mutdet.io.artefacts.pyarrow_without_pandas) and the Parquet outputs are the same as with pandas
    imported (the in-process run of this test's interpreter)."""
    import subprocess
    import sys

    import yaml

    root = tmp_path / "data"
    write_dataset(root)
    raw = dota_config(root, tiling={"size": 256, "gap": 64})
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(raw))
    code = ("import sys; from mutdet.cli import main; rc = main(sys.argv[1:]); "
            "print('pandas imported:', 'pandas' in sys.modules); sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code, "tile", "--config", str(config), "--dataset", "d", "--split",
                           "train", "--shard", "0", "--out", str(tmp_path / "cmd"), "--threads", "2"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "pandas imported: False" in proc.stdout
    import pandas  # noqa: F401  (this process: pyarrow with pandas, as any other stage has it)

    tile.run(from_dict(raw), dataset="d", split="train", shard=0, out_dir=tmp_path / "inproc", threads=1)
    for name in ("tiles", "objects"):
        a = read_artefact(tmp_path / "cmd" / f"{name}.parquet", name)
        b = read_artefact(tmp_path / "inproc" / f"{name}.parquet", name)
        assert a.equals(b) and a.schema.metadata == b.schema.metadata, name
