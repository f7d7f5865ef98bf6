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
from mutdet.report.figures import _tile_detections, object_counts, pick_tiles, read_rows, read_tiles
from mutdet.report.tables import (MISSING, NO_PAPER, WITHIN_SPREAD, DatasetRuns, RunResult, Spread, Table,
                                  ablation_table, format_spread, latex_escape, low_data_table, main_table,
                                  read_metrics, runs_table, spread, write_table)
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
                          ["MutDet", "50.0 (n=1)", MISSING, "25.0 (n=1)", "12.5 (n=1)"]]  # one seed: the mean alone
    assert table.caption.startswith("d val:") and "12 epochs" in table.caption


# ------------------------------------------------------------------------------------------------ seeds


def metrics_of(ap50: float | None, ap75: float | None = None) -> dict:
    return {"classes": {"plane": {"AP50": ap50}, "ship": {"AP50": None}}, "mean": {"AP50": ap50, "AP75": ap75}}


def seeded(init: str, values: list[float | None], fraction: float = 1.0, epochs: int = 12) -> list[RunResult]:
    """One run per seed (seeds 0, 1, ...), AP50 = ``values`` (fractions; None: no metrics yet)."""
    return [RunResult(init, fraction, epochs, None if v is None else metrics_of(v), None, seed)
            for seed, v in enumerate(values)]


def test_spread_is_the_mean_and_sample_std_over_seeds():
    runs = seeded("mutdet", [0.17, 0.10, 0.12])
    s = spread(runs[::-1], "AP50")  # the order given does not matter: seed order
    # by hand: percent values 17, 10, 12 -> mean 13; deviations 4, -3, -1 -> sum of squares 26, / (3 - 1) = 13
    assert s.values == pytest.approx((17.0, 10.0, 12.0)) and s.seeds == (0, 1, 2) and s.runs == 3 and s.n == 3
    assert s.mean == pytest.approx(13.0) and s.std == pytest.approx(13 ** 0.5)
    assert format_spread(s) == "13.0 ± 3.6 (n=3)"
    assert format_spread(s, marked=True) == f"13.0 ± 3.6 (n=3) {WITHIN_SPREAD}"
    one = spread(seeded("none", [0.25]), "AP50")
    assert one.std is None and format_spread(one) == "25.0 (n=1)"
    # seeds without metrics (or with the AP undefined) are counted as runs of the cell, not as values
    partial = spread(seeded("detreg", [0.2, None, 0.3]), "AP50")
    assert (partial.n, partial.runs) == (2, 3) and format_spread(partial) == "25.0 ± 7.1 (n=2 of 3)"
    assert format_spread(spread(seeded("x", [None, None]), "AP50")) == MISSING
    assert spread([], "AP50") is None and format_spread(None) == MISSING
    assert spread(seeded("x", [0.5, 0.7]), "AP50", "ship").n == 0  # per-class AP undefined in every seed


def test_within_the_spread_rule():
    wide = Spread((10.0, 12.0, 17.0), (0, 1, 2), 3)  # mean 13, std 3.61
    narrow = Spread((15.0, 17.0), (0, 1), 2)  # mean 16, std 1.41
    far = Spread((20.0, 21.0), (0, 1), 2)  # mean 20.5, std 0.71
    single, other_single = Spread((14.0,), (0,), 1), Spread((14.5,), (1,), 1)
    assert narrow.within(wide) and wide.within(narrow)  # |16 - 13| = 3 <= max(3.61, 1.41)
    assert not far.within(narrow)  # |20.5 - 16| = 4.5 > max(0.71, 1.41)
    assert single.within(wide)  # one seed against three: the three seeds' spread decides
    assert not single.within(other_single)  # two single runs have no spread: never marked
    assert not narrow.within(None) and not narrow.within(Spread((), (), 2))


def test_tables_aggregate_seeds_and_mark_cells_within_the_spread_of_the_one_compared():
    runs = (seeded("none", [0.10, 0.12, 0.17]) + seeded("detreg", [0.15, 0.17]) + seeded("mutdet", [0.20, 0.21])
            + seeded("none", [0.05, 0.07], fraction=0.5) + seeded("detreg", [0.06], fraction=0.5)
            + seeded("mutdet", [0.30, 0.32], fraction=0.5))
    ds = DatasetRuns("d", runs, paper=None, classes=CLASSES)
    methods = {"none": "none", "detreg": "DETReg", "mutdet": "MutDet"}
    main = main_table(ds, methods)
    assert [row[3] for row in main.rows] == ["13.0 ± 3.6 (n=3)",  # first row: nothing above
                                             f"16.0 ± 1.4 (n=2) {WITHIN_SPREAD}",  # |16 - 13| <= 3.6
                                             "20.5 ± 0.7 (n=2)"]  # |20.5 - 16| > 1.4
    assert [row[2] for row in main.rows] == [MISSING] * 3  # ship: undefined in every seed
    notes = " ".join(main.notes)
    assert "sample standard deviation (ddof=1)" in notes and "seeds in the sweep: 0, 1, 2" in notes
    assert "≤ the larger standard deviation of the two cells" in notes and "the method in the row above" in notes
    assert WITHIN_SPREAD in main.caption and "mean ± std over seeds" in main.caption
    # low-data: methods are columns, each cell compared with the previous method's at the same fraction
    low = {row[0]: row[1:] for row in low_data_table(ds, methods).rows}
    assert low["50 %"] == ["6.0 ± 1.4 (n=2)", f"6.0 (n=1) {WITHIN_SPREAD}", "31.0 ± 1.4 (n=2)"]
    assert low["100 %"] == ["13.0 ± 3.6 (n=3)", f"16.0 ± 1.4 (n=2) {WITHIN_SPREAD}", "20.5 ± 0.7 (n=2)"]
    # ablation: each rung compared with the rung above, same schedule
    ladder = [("none", {"a": 1}), ("detreg", {"a": 2}), ("mutdet", {"a": 3})]
    ablation = ablation_table(ds, ladder, {})
    assert [row[2] for row in ablation.rows] == [r[3] for r in main.rows]
    assert "the rung in the row above" in " ".join(ablation.notes)
    tex = ablation.latex()
    assert "16.0 $\\pm$ 1.4 (n=2) $\\approx$" in tex and "±" not in tex and WITHIN_SPREAD not in tex
    # the per-seed values behind the cells, one row per run
    per_run = runs_table(ds)
    assert per_run.header == ["init", "fraction", "epochs", "seed", "AP50", "AP75", "AP50 plane", "AP50 ship"]
    assert ["none", "1", "12", "2", "17", "", "17", ""] in per_run.rows and len(per_run.rows) == len(runs)


def test_ap50_vs_fraction_draws_error_bars_and_n(tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    from mutdet.report.figures import plot_ap50_vs_fraction

    calls = []
    original = Axes.errorbar
    monkeypatch.setattr(Axes, "errorbar", lambda ax, x, y, **kw: calls.append((x, y, kw)) or original(ax, x, y, **kw))
    runs = seeded("none", [0.10, 0.12, 0.17]) + seeded("none", [0.05], fraction=0.5) + seeded("mutdet", [None])
    ds = DatasetRuns("d", runs, paper="DIOR-R", classes=CLASSES)
    path = plot_ap50_vs_fraction(ds, {"none": "none", "mutdet": "MutDet"}, tmp_path / "plot.png")
    image = cv2.imread(str(path))
    assert image is not None and image.shape[0] > 100
    ((xs, ys, kw),) = calls  # one line of ours: mutdet has no value
    assert xs == [50.0, 100.0] and ys == pytest.approx([5.0, 13.0])
    assert kw["yerr"] == pytest.approx([0.0, 13 ** 0.5]) and kw["label"] == "none (ours, d, n=1-3)"


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


def test_pick_tiles_takes_counts_too():
    assert pick_tiles({"t0": 1, "t1": 3, "t2": 2, "a": 2}, 3) == ["t1", "a", "t2"]


def _write_detections(path, n_tiles=50, per_tile=40):
    import pyarrow as pa

    from mutdet.io.artefacts import write_artefact

    rng = np.random.default_rng(0)
    n = n_tiles * per_tile
    ids = [f"t{i % n_tiles:03d}" for i in range(n)]  # interleaved: a tile's rows are spread over the file
    table = pa.table({"id": ids, "class_id": pa.array(np.zeros(n), pa.int16()), "class_name": ["plane"] * n,
                      "score": pa.array(rng.uniform(0, 1, n), pa.float32()),
                      **{k: rng.uniform(1, 50, n) for k in ("cx", "cy", "w", "h")}, "theta": np.zeros(n)})
    write_artefact(table, path, "detections", {"frame": "tile"})
    return table


def test_detections_are_read_with_a_filter_only_for_the_drawn_tiles(tmp_path):
    table = _write_detections(tmp_path / "d.parquet")
    rows = read_rows(tmp_path / "d.parquet", "detections", ["id", "score"], key="id", ids=["t001", "t007"],
                     min_score=0.5)
    ids, scores = np.array(table.column("id").to_pylist()), table.column("score").to_numpy()
    expected = np.isin(ids, ["t001", "t007"]) & (scores.astype(np.float64) >= 0.5)
    assert rows.column_names == ["id", "score"] and rows.num_rows == expected.sum()
    assert sorted(rows.column("id").to_pylist()) == sorted(ids[expected].tolist())
    per_tile = _tile_detections(tmp_path / "d.parquet", ["t001", "t007", "none"], 0.5)
    assert len(per_tile["t001"]["boxes"]) == (expected & (ids == "t001")).sum() and len(per_tile["none"]["boxes"]) == 0
    cx = table.column("cx").to_numpy()[expected & (ids == "t007")]
    np.testing.assert_array_equal(per_tile["t007"]["boxes"][:, 0], cx)  # rows of a tile keep the file order
    with pytest.raises(Exception, match=re.escape(str(tmp_path / "missing.parquet"))):
        read_rows(tmp_path / "missing.parquet", "detections", ["id"], key="id")


def test_ground_truth_grouped_by_tile_with_one_sort(tmp_path):
    import pyarrow as pa

    from mutdet.io.artefacts import OBJECTS_SCHEMA, TILES_SCHEMA, write_artefact

    n = 30
    ids = [f"t{i % 4}" for i in range(n)]  # interleaved objects of 4 tiles
    objects = pa.table({"tile_id": ids, "object_index": pa.array(range(n), pa.int32()),
                        **{k: np.arange(n, dtype=float) + j for j, k in enumerate(("cx", "cy", "w", "h", "theta"))},
                        "polygon": pa.array([[0.0] * 8] * n, pa.list_(pa.float64(), 8)),
                        "class_id": pa.array([0] * n, pa.int16()), "class_name": ["plane"] * n,
                        "difficult": pa.array([i % 2 for i in range(n)], pa.int8()),
                        "iof": pa.array([1.0] * n, pa.float32())}, schema=OBJECTS_SCHEMA)
    write_artefact(objects, tmp_path / "objects.parquet", "objects")
    tiles = pa.table({name: [f"t{i}" if name == "tile_id" else f"t{i}.png" if name == "tile_path" else
                             ("x" if pa.types.is_string(field.type) else 0) for i in range(5)]
                      for name, field in zip(TILES_SCHEMA.names, TILES_SCHEMA)}, schema=TILES_SCHEMA)
    write_artefact(tiles, tmp_path / "tiles.parquet", "tiles")
    assert object_counts([tmp_path]) == {f"t{k}": len(range(k, n, 4)) for k in range(4)}
    paths, picked = read_tiles([tmp_path], tile_ids=["t1", "t3"])
    assert set(paths) == {f"t{i}" for i in range(5)} and set(picked) == {"t1", "t3"}
    np.testing.assert_array_equal(picked["t3"]["boxes"][:, 0], np.arange(3, n, 4))
    np.testing.assert_array_equal(picked["t3"]["difficult"], np.arange(3, n, 4) % 2)
    _, everything = read_tiles([tmp_path])
    assert {t: len(o["boxes"]) for t, o in everything.items()} == object_counts([tmp_path])


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
