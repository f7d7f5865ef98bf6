"""A tile that is its whole source image unchanged (DIOR-R's 800x800 images with an 800 px tile) points at
the source file instead of a PNG copy: every reader of tiles sees the pixels the copy would hold (JPEG,
TIFF, 16-bit grey, alpha, EXIF orientation), and an edited source image changes the tiles table's
identity, so later stages recompute."""
import os
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mutdet.boxes import le90_to_polygon
from mutdet.config import from_dict
from mutdet.data.datasets import TileDataset, read_tile_image
from mutdet.embedding.pipeline import TileImages
from mutdet.io.artefacts import read_artefact, read_metadata
from mutdet.io.identity import file_digest
from mutdet.report.figures import read_tiles
from mutdet.stages import propose, tile

SIDE = 64


def textured(rng, channels=3, dtype=np.uint8):
    """Smooth shading plus noise: JPEG keeps it lossy but real-looking."""
    yy, xx = np.mgrid[0:SIDE, 0:SIDE]
    top = np.iinfo(dtype).max
    base = (0.5 + 0.4 * np.sin(xx / 7.0) * np.cos(yy / 5.0))[..., None] * top
    noise = rng.normal(0, 0.05 * top, (SIDE, SIDE, channels))
    return np.clip(base + noise, 0, top).astype(dtype)


def write_sources(root: Path) -> dict[str, Path]:
    """Square images of every kind a reader must decode like a PNG tile, plus a wider one (cut: copies)."""
    rng = np.random.default_rng(0)
    images = root / "images"
    images.mkdir(parents=True)
    (root / "labelTxt").mkdir()
    files = {"jpeg": images / "jpeg.jpg", "tiff": images / "tiff.tif", "grey16": images / "grey16.png",
             "alpha": images / "alpha.png", "exif": images / "exif.jpg", "wide": images / "wide.png"}
    cv2.imwrite(str(files["jpeg"]), textured(rng), [cv2.IMWRITE_JPEG_QUALITY, 85])
    cv2.imwrite(str(files["tiff"]), textured(rng))
    cv2.imwrite(str(files["grey16"]), textured(rng, 1, np.uint16)[..., 0])  # 16-bit grey
    cv2.imwrite(str(files["alpha"]), textured(rng, 4))  # BGRA
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display: OpenCV applies it when decoding in colour
    Image.fromarray(textured(rng)[:, :, ::-1]).save(files["exif"], exif=exif.tobytes(), quality=90)
    cv2.imwrite(str(files["wide"]), np.concatenate([textured(rng), textured(rng)[:, :32]], axis=1))
    for image_id in files:
        box = np.array([[20.0, 30.0, 16.0, 6.0, 0.3]])
        line = " ".join(f"{v:.2f}" for v in le90_to_polygon(box)[0]) + " ship 0"
        (root / "labelTxt" / f"{image_id}.txt").write_text(f"imagesource:test\ngsd:1\n{line}\n")
    (root / "train.txt").write_text("\n".join(files) + "\n")
    return files


def run_tile(root, out, dota_config, **tiling):
    raw = dota_config(root, tiling={"size": SIDE, "gap": 16, **tiling})
    return tile.run(from_dict(raw), dataset="d", split="train", shard=0, out_dir=out, threads=1)


@pytest.fixture
def both(tmp_path, dota_config):
    """The same split tiled with references (the default) and with copies only."""
    files = write_sources(tmp_path / "data")
    ref, copy = tmp_path / "ref", tmp_path / "copy"
    summary = run_tile(tmp_path / "data", ref, dota_config)
    run_tile(tmp_path / "data", copy, dota_config, reference_whole_images=False)
    return files, ref, copy, summary


def test_whole_image_tiles_point_at_their_source_and_the_rest_are_copies(both):
    files, ref, copy, summary = both
    tiles = read_artefact(ref / "tiles.parquet", "tiles").to_pylist()
    paths = {t["tile_id"]: t["tile_path"] for t in tiles}
    whole = {t["tile_id"] for t in tiles if t["image_id"] != "wide"}
    assert len(whole) == 5 and summary["tiles_referencing_source"] == 5
    for t in tiles:
        if t["tile_id"] in whole:
            assert paths[t["tile_id"]] == str(files[t["image_id"]].resolve())
            assert not (ref / "images" / t["image_id"]).exists()  # no copy written
        else:
            assert not Path(t["tile_path"]).is_absolute() and (ref / t["tile_path"]).is_file()
    copies = read_artefact(copy / "tiles.parquet", "tiles")
    assert not any(Path(p).is_absolute() for p in copies.column("tile_path").to_pylist())
    # everything but the path is the same, and so are the objects
    assert read_artefact(ref / "tiles.parquet", "tiles").drop_columns(["tile_path"]).equals(
        copies.drop_columns(["tile_path"]))
    assert read_artefact(ref / "objects.parquet", "objects").equals(read_artefact(copy / "objects.parquet", "objects"))


def test_every_reader_sees_the_pixels_of_the_copy(both):
    _, ref, copy, _ = both
    ref_tiles = read_artefact(ref / "tiles.parquet", "tiles").to_pylist()
    copy_paths = {t["tile_id"]: copy / t["tile_path"] for t in read_artefact(copy / "tiles.parquet", "tiles").to_pylist()}
    ids = [t["tile_id"] for t in ref_tiles]
    ref_paths = [ref / t["tile_path"] for t in ref_tiles]  # how every reader joins tile_path
    for tile_id, path in zip(ids, ref_paths):
        want = cv2.imread(str(copy_paths[tile_id]), cv2.IMREAD_COLOR)
        assert want.shape == (SIDE, SIDE, 3) and want.dtype == np.uint8
        np.testing.assert_array_equal(read_tile_image(path).numpy(), read_tile_image(copy_paths[tile_id]).numpy())
        got, reason = propose._read_tile(path)
        assert reason is None
        np.testing.assert_array_equal(got, want)
    grey = cv2.imread(str(ref_paths[ids.index("grey16__1.0__0___0")]), cv2.IMREAD_COLOR)
    assert grey.dtype == np.uint8 and (grey[..., 0] == grey[..., 2]).all()  # 16-bit grey -> 8-bit BGR
    # the embedding pipeline, the training dataset and the tables' detection grid
    boxes = [np.zeros((0, 5))] * len(ids)
    ref_embed = TileImages(ref_paths, ids, boxes, input_size=SIDE)
    copy_embed = TileImages([copy_paths[t] for t in ids], ids, boxes, input_size=SIDE)
    for k in range(len(ids)):
        assert (ref_embed[k]["image"] == copy_embed[k]["image"]).all()
    ref_data, copy_data = TileDataset([ref]), TileDataset([copy])
    assert ref_data.tile_ids == copy_data.tile_ids
    for k in range(len(ref_data)):
        (a, ta), (b, tb) = ref_data[k], copy_data[k]
        assert (a == b).all() and (ta["boxes"] == tb["boxes"]).all()
    grid_paths, _ = read_tiles([ref])
    assert grid_paths["jpeg__1.0__0___0"].resolve() == ref_paths[ids.index("jpeg__1.0__0___0")].resolve()


def test_an_edited_source_changes_the_tiles_identity_and_later_stages_recompute(tmp_path, dota_config):
    files = write_sources(tmp_path / "data")
    out, proposals = tmp_path / "ref", tmp_path / "proposals"
    run_tile(tmp_path / "data", out, dota_config)
    cfg = from_dict({"proposals": {"method": "graph", "graph": {"resize": SIDE, "min_size": 8}}})
    first = propose.run(cfg, dataset="d", split="train", shard=0, tiles_dir=out, out_dir=proposals)
    n_tiles = read_artefact(out / "tiles.parquet", "tiles").num_rows
    assert first["tiles_computed"] == n_tiles == 7  # 5 whole images, the wide one in 2 windows
    digest = file_digest(out / "tiles.parquet")
    images_digest = read_metadata(out / "tiles.parquet")["images_digest"]
    # touched, not changed: re-tiled (the stage keys its parts to size + mtime), same table, nothing to redo
    stat = files["jpeg"].stat()
    os.utime(files["jpeg"], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert run_tile(tmp_path / "data", out, dota_config)["images_reused"] == 5
    assert file_digest(out / "tiles.parquet") == digest
    again = propose.run(cfg, dataset="d", split="train", shard=0, tiles_dir=out, out_dir=proposals)
    assert again["tiles_computed"] == 0
    # edited in place (same size, other pixels): a new identity, and the proposals are recomputed
    image = cv2.imread(str(files["jpeg"]))
    cv2.imwrite(str(files["jpeg"]), 255 - image)
    run_tile(tmp_path / "data", out, dota_config)
    assert read_metadata(out / "tiles.parquet")["images_digest"] != images_digest
    assert file_digest(out / "tiles.parquet") != digest
    redone = propose.run(cfg, dataset="d", split="train", shard=0, tiles_dir=out, out_dir=proposals)
    assert redone["tiles_computed"] == n_tiles


def test_copies_also_carry_their_pixels_in_the_tiles_identity(tmp_path, dota_config):
    """With copies only, an edited source rewrites its PNGs: the table's identity follows them too (before,
    ``tiles.parquet`` held only geometry and stayed byte-identical)."""
    files = write_sources(tmp_path / "data")
    out = tmp_path / "copy"
    run_tile(tmp_path / "data", out, dota_config, reference_whole_images=False)
    digest = file_digest(out / "tiles.parquet")
    cv2.imwrite(str(files["wide"]), 255 - cv2.imread(str(files["wide"])))
    run_tile(tmp_path / "data", out, dota_config, reference_whole_images=False)
    assert file_digest(out / "tiles.parquet") != digest
    meta = pq.read_schema(out / "tiles.parquet").metadata
    assert b"mutdet_images_digest" in meta
