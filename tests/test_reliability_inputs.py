"""Reliability: bad inputs are errors naming the file and line, or (``on_bad_object: skip``) skipped,
counted and listed, and tiling and evaluation agree on the ground truth (issue 22, items 3-6)."""
from __future__ import annotations

import json
import logging

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mutdet.config import from_dict
from mutdet.io.annotations import AnnotationError, ClassMap
from mutdet.io.artefacts import ArtefactError, write_artefact
from mutdet.io.datasets import list_image_ids
from mutdet.io.dota import read_dota
from mutdet.io.images import image_size, read_image
from mutdet.stages import evaluate, tile

pytestmark = pytest.mark.reliability

CLASSES = ["plane", "ship"]
WIDTH, HEIGHT = 200, 160
PLANE = [20, 20, 60, 20, 60, 50, 20, 50]
SHIP = [100, 80, 140, 80, 140, 100, 100, 100]
OUTSIDE = {
    "far away": [1e12, 1e12, 2e12, 1e12, 2e12, 2e12, 1e12, 2e12],
    "fully negative": [-50, -40, -10, -40, -10, -5, -50, -5],
    "beyond the width": [WIDTH + 5, 20, WIDTH + 45, 20, WIDTH + 45, 50, WIDTH + 5, 50],
}


def line(poly, name="plane", difficult=0):
    return " ".join(f"{v:g}" for v in poly) + f" {name} {difficult}"


def box(poly):
    xs, ys = poly[0::2], poly[1::2]
    return [(min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2, max(xs) - min(xs), max(ys) - min(ys), 0.0]


def image_bytes(ext: str) -> bytes:
    """A real, textured image encoded by OpenCV (so a cut lands in compressed pixel data)."""
    rng = np.random.default_rng(0)
    pixels = cv2.GaussianBlur(rng.integers(0, 255, (HEIGHT, WIDTH, 3), dtype=np.uint8), (7, 7), 3)
    ok, buf = cv2.imencode(ext, pixels)
    assert ok
    return buf.tobytes()


def make_dataset(root, labels: dict[str, list[str]], ext=".png"):
    """A DOTA-format split: one ``WIDTH x HEIGHT`` image and one label file per id."""
    (root / "images").mkdir(parents=True)
    (root / "labelTxt").mkdir()
    for image_id, lines in labels.items():
        (root / "images" / f"{image_id}{ext}").write_bytes(image_bytes(ext))
        (root / "labelTxt" / f"{image_id}.txt").write_text("".join(f"{ln}\n" for ln in lines))
    return root


def config(root, on_bad_object="error"):
    return from_dict({
        "results": str(root.parent / "results"), "on_bad_object": on_bad_object,
        "datasets": {"d": {"root": str(root), "format": "dota", "classes": CLASSES,
                           "tiling": {"size": 128, "gap": 32}, "splits": {"val": {}}}},
    })


def perfect_detections(path, objects: dict[str, list[tuple[str, list[float]]]]):
    """A ``detections`` artefact with one exact, confident detection per listed object."""
    rows = [(image_id, name, poly) for image_id, objs in objects.items() for name, poly in objs]
    boxes = [box(poly) for _, _, poly in rows]
    table = pa.table({
        "id": [r[0] for r in rows], "class_id": pa.array([CLASSES.index(r[1]) for r in rows], pa.int16()),
        "class_name": [r[1] for r in rows], "score": pa.array([0.9] * len(rows), pa.float32()),
        **{k: [float(b[i]) for b in boxes] for i, k in enumerate(["cx", "cy", "w", "h", "theta"])},
    })
    write_artefact(table, path, "detections", metadata={"frame": "image"})
    return path


# --- item 3: objects entirely outside their image ---------------------------------------------------

@pytest.mark.parametrize("case", sorted(OUTSIDE))
def test_tiling_outside_object_is_an_error_naming_file_and_line(tmp_path, case):
    root = make_dataset(tmp_path / "data", {"a": [line(PLANE), line(OUTSIDE[case], "ship")]})
    with pytest.raises(AnnotationError, match=rf"a\.txt:2: object entirely outside the {WIDTH}x{HEIGHT} image"):
        tile.run(config(root), dataset="d", split="val", shard=0, out_dir=tmp_path / "out")


def test_tiling_skips_counts_and_lists_outside_objects(tmp_path):
    root = make_dataset(tmp_path / "data", {"a": [line(PLANE)] + [line(p, "ship") for p in OUTSIDE.values()]})
    summary = tile.run(config(root, "skip"), dataset="d", split="val", shard=0, out_dir=tmp_path / "out")
    assert summary["skipped_objects"] == 3
    assert [s["line"] for s in summary["skipped"]["objects"]] == [2, 3, 4]
    assert all("entirely outside" in s["reason"] and s["file"].endswith("a.txt")
               for s in summary["skipped"]["objects"])
    on_disk = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert on_disk["skipped_objects"] == 3 and on_disk["objects_per_class"] == {"plane": summary["objects"]}


def test_tiling_accounts_for_objects_that_no_tile_holds(tmp_path):
    # Mostly outside: inside the image, but no window holds 70 % of it.
    mostly_out = [WIDTH - 10, 20, WIDTH + 90, 20, WIDTH + 90, 50, WIDTH - 10, 50]
    root = make_dataset(tmp_path / "data", {"a": [line(PLANE), line(mostly_out, "ship")]})
    summary = tile.run(config(root), dataset="d", split="val", shard=0, out_dir=tmp_path / "out")
    assert summary["objects_in_no_tile"] == 1
    assert summary["not_tiled"] == [{"image_id": "a", "object_index": 1, "file": str(root / "labelTxt" / "a.txt"),
                                     "line": 2}]


def test_evaluation_drops_outside_objects_like_tiling(tmp_path):
    labels = {"a": [line(PLANE), line(OUTSIDE["beyond the width"], "ship"), line(SHIP, "ship")],
              "b": [line(PLANE)]}
    root = make_dataset(tmp_path / "data", labels)
    dets = perfect_detections(tmp_path / "dets.parquet", {"a": [("plane", PLANE), ("ship", SHIP)],
                                                         "b": [("plane", PLANE)]})
    with pytest.raises(AnnotationError, match=r"a\.txt:2: object entirely outside"):
        evaluate.run(config(root), dataset="d", split="val", out_dir=tmp_path / "eval", detections=dets)
    metrics = evaluate.run(config(root, "skip"), dataset="d", split="val", out_dir=tmp_path / "eval", detections=dets)
    # before: the outside ship counted as a missed ground truth (ship AP 0.5 with perfect detections)
    assert metrics["classes"]["ship"]["num_gt"] == 1 and metrics["classes"]["ship"]["AP50"] == pytest.approx(1.0)
    assert metrics["mean"]["AP50"] == pytest.approx(1.0)
    [skip] = metrics["skipped_objects"]
    assert skip["line"] == 2 and "entirely outside" in skip["reason"] and skip["file"].endswith("a.txt")


# --- items 3 and 6: images skipped under on_bad_object: skip do not count in evaluation ---------------

def test_evaluation_leaves_out_and_lists_skipped_images(tmp_path):
    root = make_dataset(tmp_path / "data", {"a": [line(PLANE)], "b": [line(SHIP, "ship")], "c": [line(PLANE)]})
    (root / "images" / "b.png").write_bytes(b"not a png")
    (root / "images" / "c.png").write_bytes(image_bytes(".png")[:3000])  # truncated
    dets = perfect_detections(tmp_path / "dets.parquet", {"a": [("plane", PLANE)]})
    with pytest.raises(AnnotationError, match=r"b\.png"):
        evaluate.run(config(root), dataset="d", split="val", out_dir=tmp_path / "eval", detections=dets)
    metrics = evaluate.run(config(root, "skip"), dataset="d", split="val", out_dir=tmp_path / "eval", detections=dets)
    # before: b's ship and c's plane were misses (mean AP50 0.5 with perfect detections on a)
    assert metrics["num_images"] == 1
    assert metrics["classes"]["plane"]["num_gt"] == 1 and metrics["classes"]["ship"]["num_gt"] == 0
    assert metrics["mean"]["AP50"] == pytest.approx(1.0)
    skipped = {s["image_id"]: s["reason"] for s in metrics["skipped_images"]}
    assert sorted(skipped) == ["b", "c"] and "b.png" in skipped["b"] and "truncated" in skipped["c"]
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["skipped_images"] == metrics["skipped_images"]
    # the tile stage skips the same images
    summary = tile.run(config(root, "skip"), dataset="d", split="val", shard=0, out_dir=tmp_path / "out")
    assert sorted(s["image_id"] for s in summary["skipped"]["images"]) == ["b", "c"]


def test_detections_on_skipped_images_are_left_out_and_counted(tmp_path):
    root = make_dataset(tmp_path / "data", {"a": [line(PLANE)], "b": [line(PLANE)]})
    (root / "images" / "b.png").write_bytes(b"not a png")
    dets = perfect_detections(tmp_path / "dets.parquet", {"a": [("plane", PLANE)], "b": [("plane", PLANE)]})
    metrics = evaluate.run(config(root, "skip"), dataset="d", split="val", out_dir=tmp_path / "eval",
                           detections=dets)
    assert metrics["mean"]["AP50"] == pytest.approx(1.0) and metrics["mean"]["num_detections"] == 1
    assert metrics["detections_on_skipped_images"] == 1


# --- item 4: truncated images are errors naming the file ---------------------------------------------

@pytest.mark.parametrize("ext", [".jpg", ".png"])
@pytest.mark.parametrize("cut", ["half", "last byte"])
def test_truncated_image_is_an_error_naming_the_file(tmp_path, ext, cut):
    data = image_bytes(ext)
    path = tmp_path / f"cut{ext}"
    path.write_bytes(data[:len(data) // 2] if cut == "half" else data[:-1])
    with pytest.raises(AnnotationError, match=rf"{path}: truncated"):
        read_image(path)
    with pytest.raises(AnnotationError, match=rf"{path}: truncated"):
        image_size(path)


@pytest.mark.parametrize("ext", [".jpg", ".png"])
def test_complete_image_reads_with_its_size(tmp_path, ext):
    path = tmp_path / f"ok{ext}"
    path.write_bytes(image_bytes(ext) + b"trailing bytes after the end marker are ignored by decoders")
    assert read_image(path).shape == (HEIGHT, WIDTH, 3)
    assert image_size(path) == (WIDTH, HEIGHT)


def test_truncated_jpeg_in_tiling_is_an_error_or_a_skipped_image(tmp_path):
    root = make_dataset(tmp_path / "data", {"a": [line(PLANE)], "b": [line(PLANE)]}, ext=".jpg")
    jpg = root / "images" / "b.jpg"
    jpg.write_bytes(jpg.read_bytes()[:-200])
    with pytest.raises(AnnotationError, match=rf"{jpg}: truncated"):
        tile.run(config(root), dataset="d", split="val", shard=0, out_dir=tmp_path / "out")
    summary = tile.run(config(root, "skip"), dataset="d", split="val", shard=0, out_dir=tmp_path / "out2")
    assert summary["skipped_images"] == 1 and summary["skipped"]["images"][0]["image_id"] == "b"
    assert "truncated" in summary["skipped"]["images"][0]["reason"]


# --- item 5: image ids are validated at the dataset reader -------------------------------------------

@pytest.mark.parametrize("name", ["a b.png", "tab\there.png", "#hash.png"])
def test_bad_image_id_in_image_folder(tmp_path, name):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / name).write_bytes(image_bytes(".png"))
    with pytest.raises(AnnotationError, match="image id") as exc:
        list_image_ids(tmp_path / "images", None, [".png"])
    assert str(exc.value).startswith(str(tmp_path / "images" / name))
    assert repr(name[:-4]) in str(exc.value) and "whitespace" in str(exc.value)


def test_bad_image_id_in_list_file(tmp_path):
    lst = tmp_path / "val.txt"
    lst.write_text("ok\nwith space\n")
    with pytest.raises(AnnotationError, match=rf"{lst}:2: .*'with space'.*whitespace"):
        list_image_ids(tmp_path, lst, [".png"])


def test_tiling_stops_on_a_whitespace_id_before_any_work(tmp_path):
    root = make_dataset(tmp_path / "data", {"a": [line(PLANE)], "b c": [line(PLANE)]})
    with pytest.raises(AnnotationError, match=r"image id 'b c'"):
        tile.run(config(root, "skip"), dataset="d", split="val", shard=0, out_dir=tmp_path / "out")
    assert not (tmp_path / "out" / "parts").exists()


# --- weak messages ---------------------------------------------------------------------------------

DOTA = ClassMap(CLASSES)


def test_nine_numbers_and_a_class_report_the_field_count(tmp_path):
    p = tmp_path / "x.txt"
    p.write_text("20 20 60 20 60 50 20 50 77 plane\n")
    with pytest.raises(AnnotationError, match=r"x\.txt:1: .*9 numbers before the class name 'plane'.*10 fields"):
        read_dota(p, DOTA)


def test_self_intersecting_quadrilateral_is_a_bad_object(tmp_path):
    p = tmp_path / "x.txt"
    bowtie = [20, 20, 60, 50, 60, 20, 20, 50]  # corners 2 and 3 swapped
    p.write_text(line(PLANE) + "\n" + line(bowtie) + "\n")
    with pytest.raises(AnnotationError, match=r"x\.txt:2: self-intersecting quadrilateral"):
        read_dota(p, DOTA)
    ann = read_dota(p, DOTA, on_bad_object="skip")
    assert len(ann) == 1 and ann.skipped[0].line == 2 and "self-intersecting" in ann.skipped[0].reason


def test_byte_order_mark_before_the_first_object(tmp_path):
    p = tmp_path / "x.txt"
    p.write_bytes(b"\xef\xbb\xbf" + (line(PLANE) + "\n").encode())
    ann = read_dota(p, DOTA)
    np.testing.assert_allclose(ann.polygons, [PLANE])


def test_label_file_without_image_is_warned_and_counted(tmp_path, caplog):
    root = make_dataset(tmp_path / "data", {"a": [line(PLANE)]})
    orphan = root / "labelTxt" / "ghost.txt"
    orphan.write_text(line(PLANE) + "\n")
    with caplog.at_level(logging.WARNING, logger="mutdet"):
        summary = tile.run(config(root), dataset="d", split="val", shard=0, out_dir=tmp_path / "out")
    assert summary["labels_without_image"] == 1 and summary["skipped"]["labels_without_image"] == [str(orphan)]
    assert str(orphan) in caplog.text


@pytest.mark.parametrize("column, value", [("score", float("nan")), ("cx", float("inf")), ("w", -3.0)])
def test_bad_values_in_detections_name_the_file(tmp_path, column, value):
    root = make_dataset(tmp_path / "data", {"a": [line(PLANE)]})
    dets = perfect_detections(tmp_path / "ok.parquet", {"a": [("plane", PLANE), ("plane", SHIP)]})
    table = pq.read_table(dets)
    col = table.column(column).to_pylist()
    col[1] = value
    table = table.set_column(table.column_names.index(column), column, pa.array(col, table.schema.field(column).type))
    bad = tmp_path / "bad.parquet"
    write_artefact(table, bad, "detections", metadata={"frame": "image"})
    with pytest.raises(ArtefactError, match=rf"{bad}: row 1: {column} "):
        evaluate.run(config(root), dataset="d", split="val", out_dir=tmp_path / "eval", detections=bad)


def test_detect_checks_image_ids_before_any_work(tmp_path):
    from mutdet.stages import detect

    (tmp_path / "ok.png").write_bytes(image_bytes(".png"))
    (tmp_path / "b c.png").write_bytes(image_bytes(".png"))
    with pytest.raises(AnnotationError, match=r"b c\.png: invalid image id 'b c'"):
        detect.list_images([tmp_path])
