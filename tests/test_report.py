"""The report library: table rendering, metrics checks, tile choice, and the one oriented-box drawing function."""
import csv
import io
import json
import math
import re

import cv2
import numpy as np
import pytest

from mutdet.boxes import le90_to_polygon
from mutdet.report.draw import class_colour, draw_boxes
from mutdet.report.figures import pick_tiles
from mutdet.report.tables import (MISSING, NO_PAPER, DatasetRuns, RunResult, Table, latex_escape, main_table,
                                  read_metrics, write_table)
from mutdet.stages import detect

CLASSES = ["plane", "ship"]


# ----------------------------------------------------------------------------------------------- tables


def test_table_renders_markdown_csv_and_booktabs_latex(tmp_path):
    table = Table("main_my_data", "AP (%) on my_data, 50% & more", ["method", "a|b", "AP50"],
                  [["MutDet", "1.0", "70.7"], ["x, y", MISSING, NO_PAPER]], notes=["first note", "5% of a_b"])
    md = table.markdown().splitlines()
    assert md[0] == "**AP (%) on my_data, 50% & more**"
    assert md[2:6] == ["| method | a\\|b | AP50 |", "|---|---:|---:|", "| MutDet | 1.0 | 70.7 |",
                       f"| x, y | {MISSING} | {NO_PAPER} |"]
    assert md[-2:] == ["- first note", "- 5% of a_b"]
    assert list(csv.reader(io.StringIO(table.csv()))) == [["method", "a|b", "AP50"], ["MutDet", "1.0", "70.7"],
                                                         ["x, y", MISSING, NO_PAPER]]
    tex = table.latex()
    assert "\\begin{tabular}{lrr}" in tex and "\\toprule" in tex and "\\midrule" in tex and "\\bottomrule" in tex
    assert "\\caption{AP (\\%) on my\\_data, 50\\% \\& more}" in tex and "\\label{tab:main\\_my\\_data}" in tex
    assert "x, y & n/a & --- \\\\" in tex and NO_PAPER not in tex
    assert "\\footnotesize first note 5\\% of a\\_b" in tex
    assert latex_escape("5% of a_b & c~{x}") == "5\\% of a\\_b \\& c\\textasciitilde{}\\{x\\}"
    paths = write_table(table, tmp_path)
    assert {ext: p.name for ext, p in paths.items()} == {"md": "main_my_data.md", "csv": "main_my_data.csv",
                                                         "tex": "main_my_data.tex"}
    assert paths["tex"].read_text() == tex and paths["md"].read_text() == table.markdown()


def test_main_table_from_plain_runs():
    metrics = {"classes": {"plane": {"AP50": 0.5}, "ship": {"AP50": None}}, "mean": {"AP50": 0.25, "AP75": 0.125}}
    ds = DatasetRuns("d", [RunResult("mutdet", 1.0, 12, metrics), RunResult("mutdet", 1.0, 6, None),
                           RunResult("none", 0.5, 12, metrics)], paper=None, classes=CLASSES, split="val")
    table = main_table(ds, {"none": "none", "mutdet": "MutDet"})
    assert table.header == ["method", "plane", "ship", "AP50", "AP75"]  # no paper: no paper columns
    assert table.rows == [["none", MISSING, MISSING, MISSING, MISSING],  # none ran at 50 % only
                          ["MutDet", "50.0", MISSING, "25.0", "12.5"]]
    assert table.caption.startswith("d val:") and "12 epochs" in table.caption


def test_read_metrics_checks_the_file_against_its_run(tmp_path):
    path = tmp_path / "m.json"
    good = {"dataset": "d", "split": "test", "classes": {"plane": {"AP50": 1.0}}, "mean": {"AP50": 0.0, "AP75": None}}
    path.write_text(json.dumps(good))
    assert read_metrics(path, dataset="d", split="test") == good
    with pytest.raises(ValueError, match=re.escape(f"{path}: dataset 'd' in the file, 'e'")):
        read_metrics(path, dataset="e", split="test")
    path.write_text(json.dumps({**good, "classes": {"plane": {"AP50": 1.5}}}))
    with pytest.raises(ValueError, match=re.escape(f"{path}: plane AP50 = 1.5")):
        read_metrics(path, dataset="d", split="test")
    path.write_text(json.dumps({"mean": {}}))
    with pytest.raises(ValueError, match=re.escape(f"{path}: missing key 'classes'")):
        read_metrics(path, dataset="d", split="test")


def test_pick_tiles_most_objects_first_ties_by_id():
    objects = {t: {"boxes": np.zeros((n, 5))} for t, n in {"t0": 1, "t1": 3, "t2": 2, "t3": 0, "a": 2}.items()}
    assert pick_tiles(objects, 3) == ["t1", "a", "t2"]
    assert pick_tiles(objects, 10) == ["t1", "a", "t2", "t0", "t3"]


# ------------------------------------------------------------------------------------------------ draw

BOX = np.array([80.0, 60.0, 80.0, 30.0, 0.6])  # le90: 80 x 30 box turned 0.6 rad clockwise on screen


def edge_midpoints(box: np.ndarray) -> np.ndarray:
    """Midpoints of the four sides of a le90 box, from the convention (not from the code under test)."""
    cx, cy, w, h, t = box
    u, v = np.array([math.cos(t), math.sin(t)]), np.array([-math.sin(t), math.cos(t)])
    return np.array([[cx, cy] + s * w / 2 * u for s in (-1, 1)] + [[cx, cy] + s * h / 2 * v for s in (-1, 1)])


def test_draw_boxes_draws_the_rotated_outline_in_the_class_colour():
    image = np.zeros((120, 160, 3), np.uint8)
    out = draw_boxes(image, BOX[None], ["ship"], CLASSES, captions=False)
    assert not image.any()  # the input is left as it was
    colour = class_colour("ship", CLASSES)
    assert colour != class_colour("plane", CLASSES)
    for x, y in np.round(edge_midpoints(BOX)).astype(int):
        assert tuple(int(c) for c in out[y, x]) == colour
    assert not out[60, 80].any() and not out[0, 0].any() and not out[119, 159].any()  # inside, corners
    assert not out[60, 120].any() and not out[45, 80].any()  # where the box would be with theta = 0
    # every pixel drawn lies on the outline (the line width, antialiased)
    poly = le90_to_polygon(BOX).reshape(4, 2).astype(np.float32)
    ys, xs = np.nonzero(out.any(axis=-1))
    assert len(xs) > 4 * 70
    assert max(abs(cv2.pointPolygonTest(poly, (float(x), float(y)), True)) for x, y in zip(xs, ys)) < 3


def test_draw_boxes_scale_thin_lines_and_captions():
    image = np.zeros((240, 320, 3), np.uint8)
    half = BOX * [0.5, 0.5, 0.5, 0.5, 1.0]  # tile pixels drawn on an image twice the size
    scaled = draw_boxes(image, half[None], ["plane"], CLASSES, captions=False, scale=2.0)
    assert np.array_equal(scaled[:120, :160], draw_boxes(image[:120, :160], BOX[None], ["plane"], CLASSES,
                                                         captions=False))
    thick = draw_boxes(image, BOX[None], ["plane"], CLASSES, captions=False, thickness=3)
    thin = draw_boxes(image, BOX[None], ["plane"], CLASSES, captions=False, thickness=3, thin=[True])
    assert thin.any(axis=-1).sum() < thick.any(axis=-1).sum()
    captioned = draw_boxes(image, BOX[None], ["plane"], CLASSES, scores=[0.87])
    top = int(le90_to_polygon(BOX)[1::2].min())
    assert captioned[: top - 3].any() and not thick[: top - 3].any()  # the caption above the box
    with pytest.raises(ValueError, match="1 boxes, 2 names"):
        draw_boxes(image, BOX[None], ["plane", "ship"], CLASSES)


def test_detect_previews_are_drawn_by_draw_boxes():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 60, (200, 260, 3), dtype=np.uint8)
    boxes = np.array([BOX, [180.0, 120.0, 50.0, 20.0, -0.9], [60.0, 150.0, 40.0, 40.0, 0.2]])
    labels, scores = np.array([1, 0, 1]), np.array([0.9, 0.5, 0.1], np.float32)
    preview = detect.draw_detections(image, labels, scores, boxes, CLASSES, min_score=0.3)
    # lines 1 pixel wide per 800 pixels of the longer side, at least 1; the low-scoring box left out
    expected = draw_boxes(image, boxes[:2], ["ship", "plane"], CLASSES, scores=scores[:2], thickness=1)
    assert np.array_equal(preview, expected)
    assert not np.array_equal(preview, image) and not np.array_equal(preview, draw_boxes(image, boxes, [
        "ship", "plane", "ship"], CLASSES, scores=scores, thickness=1))
