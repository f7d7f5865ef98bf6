"""Stage ``evaluate`` on a tiny DOTA-format split written to tmp_path."""
from __future__ import annotations

import json
import logging

import cv2
import numpy as np
import pyarrow as pa
import pytest

import mutdet
from mutdet.boxes import le90_to_polygon
from mutdet.config import from_dict
from mutdet.io.annotations import AnnotationError
from mutdet.io.artefacts import ArtefactError, read_artefact, write_artefact
from mutdet.io.task1 import write_task1
from mutdet.stages import evaluate

CLASSES = ["plane", "ship"]


def rect(x0, y0, x1, y1):
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def box(x0, y0, x1, y1):
    return [(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0, 0.0]


LABELS = {
    "P1": ["imagesource:GoogleEarth", "gsd:0.5",
           " ".join(map(str, rect(10, 10, 50, 40))) + " plane 0",
           " ".join(map(str, rect(60, 60, 90, 70))) + " ship 1"],
    "P2": [" ".join(map(str, rect(5, 5, 45, 15))) + " ship 0",
           " ".join(map(str, rect(100, 100, 140, 130))) + " Airplane 0"],  # alias of plane
    "P3": ["imagesource:GoogleEarth"],
}
# (image, class, score, le90 box)
DETECTIONS = [
    ("P3", "plane", 0.95, box(0, 0, 20, 20)),         # image without objects: FP
    ("P1", "plane", 0.90, box(10, 10, 50, 40)),       # TP
    ("P1", "ship", 0.80, box(60, 60, 90, 70)),        # on a difficult ship: ignored
    ("P2", "ship", 0.70, box(5, 5, 45, 15)),          # TP
    ("P2", "plane", 0.60, box(100, 100, 140, 145)),   # IoU 2/3: TP at 0.5, FP at 0.75
]


@pytest.fixture
def cfg(tmp_path):
    root = tmp_path / "tiny"
    (root / "images").mkdir(parents=True)
    (root / "labelTxt").mkdir()
    for image_id, lines in LABELS.items():
        cv2.imwrite(str(root / "images" / f"{image_id}.png"), np.full((160, 160, 3), 90, np.uint8))
        (root / "labelTxt" / f"{image_id}.txt").write_text("\n".join(lines) + "\n")
    config = from_dict({"datasets": {"tiny": {"root": str(root), "format": "dota", "classes": CLASSES,
                                              "class_aliases": {"Airplane": "plane"}, "splits": {"val": {}}}}})
    return config


def skipping(cfg):
    """The same config with ``on_bad_object: skip``."""
    return from_dict({**cfg.raw, "on_bad_object": "skip"})


def _write_detections(path, frame="image", rows=DETECTIONS):
    table = pa.table({
        "id": [r[0] for r in rows], "class_id": pa.array([CLASSES.index(r[1]) for r in rows], pa.int16()),
        "class_name": [r[1] for r in rows], "score": pa.array([r[2] for r in rows], pa.float32()),
        **{k: [float(r[3][i]) for r in rows] for i, k in enumerate(["cx", "cy", "w", "h", "theta"])},
    })
    write_artefact(table, path, "detections", metadata={"frame": frame})
    return path


def _check(metrics):
    assert metrics["classes"]["plane"]["AP50"] == pytest.approx(2 / 3)  # FP, TP, TP: precision 2/3 at recall 1
    assert metrics["classes"]["plane"]["AP75"] == pytest.approx(6 * 0.5 / 11)  # FP, TP, FP: recall 0.5
    assert metrics["classes"]["ship"]["AP50"] == pytest.approx(1.0)
    assert metrics["classes"]["ship"]["AP75"] == pytest.approx(1.0)
    assert (metrics["classes"]["ship"]["num_gt"], metrics["classes"]["ship"]["num_difficult"]) == (1, 1)
    assert metrics["mean"]["AP50"] == pytest.approx((2 / 3 + 1) / 2)
    assert metrics["mean"]["AP75"] == pytest.approx((3 / 11 + 1) / 2)
    assert metrics["mean"]["num_gt"] == 3 and metrics["mean"]["num_detections"] == 5
    assert metrics["num_images"] == 3


def test_parquet_detections(cfg, tmp_path, caplog):
    out = tmp_path / "eval"
    with caplog.at_level(logging.INFO, logger="mutdet"):
        metrics = evaluate.run(cfg, dataset="tiny", split="val", out_dir=out,
                               detections=_write_detections(tmp_path / "dets.parquet"))
    _check(metrics)
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(metrics))
    assert on_disk["mutdet_version"] == mutdet.__version__
    assert on_disk["settings"]["iou_thresholds"] == [0.5, 0.75] and on_disk["settings"]["use_07_metric"] is True
    assert "pr_curves" not in on_disk and "AP50:95" not in on_disk["mean"]
    assert (out / "pr_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "plane" in caplog.text and "66.67" in caplog.text and "mean" in caplog.text


def test_task1_folder_gives_the_same_metrics(cfg, tmp_path):
    folder = tmp_path / "task1"
    write_task1(folder, [r[0] for r in DETECTIONS], [r[1] for r in DETECTIONS], [r[2] for r in DETECTIONS],
                le90_to_polygon(np.array([r[3] for r in DETECTIONS])), CLASSES)
    metrics = evaluate.run(cfg, dataset="tiny", split="val", out_dir=tmp_path / "eval", task1_dir=folder)
    _check(metrics)
    assert metrics["task1_dir"] == str(folder)


def test_all_points_option(cfg, tmp_path):
    metrics = evaluate.run(cfg, dataset="tiny", split="val", out_dir=tmp_path / "eval",
                           detections=_write_detections(tmp_path / "dets.parquet"), use_07_metric=False,
                           iou_thresholds=(0.5,))
    assert metrics["classes"]["plane"]["AP50"] == pytest.approx(2 / 3)
    assert metrics["settings"]["ap"] == "all_points" and "AP75" not in metrics["mean"]


def test_bad_label_lines_error_or_are_listed(cfg, tmp_path):
    (cfg.dataset("tiny").root / "labelTxt" / "P3.txt").write_text("1 2 3 4 5 6 plane\n")
    dets = _write_detections(tmp_path / "dets.parquet")
    with pytest.raises(AnnotationError, match="P3.txt:1"):
        evaluate.run(cfg, dataset="tiny", split="val", out_dir=tmp_path / "eval", detections=dets)
    metrics = evaluate.run(skipping(cfg), dataset="tiny", split="val", out_dir=tmp_path / "eval", detections=dets)
    assert len(metrics["skipped_objects"]) == 1 and metrics["skipped_objects"][0]["line"] == 1


def test_input_errors(cfg, tmp_path):
    dets = _write_detections(tmp_path / "dets.parquet")
    with pytest.raises(ValueError, match="exactly one"):
        evaluate.run(cfg, dataset="tiny", split="val", out_dir=tmp_path / "eval")
    with pytest.raises(ValueError, match="exactly one"):
        evaluate.run(cfg, dataset="tiny", split="val", out_dir=tmp_path / "eval", detections=dets, task1_dir=tmp_path)
    with pytest.raises(ArtefactError, match="'tile' frame"):
        evaluate.run(cfg, dataset="tiny", split="val", out_dir=tmp_path / "eval",
                     detections=_write_detections(tmp_path / "tiles.parquet", frame="tile"))
    stray = [*DETECTIONS, ("P9", "ship", 0.5, box(0, 0, 5, 5))]
    with pytest.raises(ArtefactError, match=r"not in split 'val' of tiny: \['P9'\]"):
        evaluate.run(cfg, dataset="tiny", split="val", out_dir=tmp_path / "eval",
                     detections=_write_detections(tmp_path / "stray.parquet", rows=stray))
    assert not (tmp_path / "eval" / "metrics.json").exists()


# --- protocols -------------------------------------------------------------------------------------------------

def test_protocol_defaults_to_the_datasets_and_is_recorded(cfg, tmp_path):
    assert cfg.dataset("tiny").evaluation.protocol == "dota_devkit"  # DOTA labels: the devkit / server
    metrics = evaluate.run(cfg, dataset="tiny", split="val", out_dir=tmp_path / "eval",
                           detections=_write_detections(tmp_path / "dets.parquet"))
    settings = json.loads((tmp_path / "eval" / "metrics.json").read_text())["settings"]
    assert settings["protocol"] == "dota_devkit" and settings["iou_rule"] == "iou > threshold"
    assert "difficulty_threshold" not in settings
    assert metrics["polygons"] == {"gt_non_simple": 0, "gt_zero_area": 0, "detections_non_simple": 0,
                                   "detections_zero_area": 0, "gt_skipped_self_intersecting": 0,
                                   "gt_skipped_degenerate": 0}


def test_mmrotate_override_counts_difficult_objects(cfg, tmp_path):
    metrics = evaluate.run(cfg, dataset="tiny", split="val", out_dir=tmp_path / "eval", protocol="mmrotate",
                           detections=_write_detections(tmp_path / "dets.parquet"))
    on_disk = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert on_disk["settings"]["protocol"] == "mmrotate" and on_disk["settings"]["difficulty_threshold"] == 100
    assert on_disk["settings"]["iou_rule"] == "iou >= threshold"
    ship = metrics["classes"]["ship"]
    assert (ship["num_gt"], ship["num_difficult"]) == (2, 0)  # the difficult ship is an ordinary positive
    assert ship["AP50"] == pytest.approx(1.0)  # and the detection on it a TP
    assert metrics["classes"]["plane"]["AP50"] == pytest.approx(2 / 3)
    assert metrics["classes"]["plane"]["AP75"] == pytest.approx(6 * 0.5 / 11)


def test_difficulty_threshold_from_the_config(cfg, tmp_path):
    raw = {**cfg.raw}
    raw["datasets"] = {"tiny": {**cfg.raw["datasets"]["tiny"],
                                "evaluation": {"protocol": "mmrotate", "difficulty_threshold": 0}}}
    metrics = evaluate.run(from_dict(raw), dataset="tiny", split="val", out_dir=tmp_path / "eval",
                           detections=_write_detections(tmp_path / "dets.parquet"))
    assert metrics["settings"]["protocol"] == "mmrotate" and metrics["settings"]["difficulty_threshold"] == 0
    ship = metrics["classes"]["ship"]
    assert (ship["num_gt"], ship["num_difficult"]) == (1, 1)
    assert ship["AP50"] == pytest.approx(0.5)  # the difficult ship is dropped: the detection on it is an FP
    with pytest.raises(ValueError, match="protocol must be one of"):
        evaluate.run(cfg, dataset="tiny", split="val", out_dir=tmp_path / "eval", protocol="coco",
                     detections=_write_detections(tmp_path / "dets.parquet"))


def test_skipped_bad_label_polygons_are_counted(cfg, tmp_path):
    (cfg.dataset("tiny").root / "labelTxt" / "P3.txt").write_text(
        "10 10 50 50 50 10 10 50 plane 0\n"   # self-intersecting (bow tie)
        "10 10 20 10 30 10 40 10 ship 0\n")   # collinear
    metrics = evaluate.run(skipping(cfg), dataset="tiny", split="val", out_dir=tmp_path / "eval",
                           detections=_write_detections(tmp_path / "dets.parquet"))
    assert metrics["polygons"]["gt_skipped_self_intersecting"] == 1
    assert metrics["polygons"]["gt_skipped_degenerate"] == 1


# --- Task1 round trip ------------------------------------------------------------------------------------------

def _round_trip_dataset(tmp_path):
    """Integer-quadrilateral labels (rectangles, trapezoids, concave darts) and le90 detections, many with an
    IoU within 1e-4 of 0.5 or 0.75, in 4 images of 1000 x 1000."""
    rng = np.random.default_rng(7)
    root = tmp_path / "rt"
    (root / "images").mkdir(parents=True)
    (root / "labelTxt").mkdir()
    rows = []
    for i in range(4):
        image_id = f"R{i}"
        cv2.imwrite(str(root / "images" / f"{image_id}.png"), np.zeros((1000, 1000, 3), np.uint8))
        lines = []
        for k in range(30):
            x0, y0 = (k % 6) * 150 + 20 + i, (k // 6) * 180 + 30
            w, h = int(rng.integers(20, 120)), int(rng.integers(8, 60))
            cls = CLASSES[k % 2]
            kind = k % 3
            if kind == 0:
                quad = rect(x0, y0, x0 + w, y0 + h)
            elif kind == 1:
                quad = [x0, y0, x0 + w, y0, x0 + w, y0 + h // 2, x0, y0 + h]  # trapezoid
            else:
                quad = [x0, y0, x0 + w // 2, y0 + h, x0 + w, y0, x0 + w // 2, y0 + h // 3]  # concave dart
            lines.append(" ".join(map(str, quad)) + f" {cls} 0")
            base = np.array(box(x0, y0, x0 + w, y0 + h))
            if kind == 0:  # stretch the height so that IoU = h / h' is a threshold plus 1e-5 .. 1e-4
                t = (0.5, 0.75)[k % 2]
                base[3] = h / (t + float(rng.uniform(1e-5, 1e-4)))
                base[1] = y0 + base[3] / 2
            jitter = rng.normal(0, [1.5, 1.5, 2, 1, 0.03]) * (kind != 0)
            rows.append((image_id, cls, float(np.float32(rng.random())), base + jitter))
            rows.append((image_id, cls, float(np.float32(rng.random())), base + rng.normal(0, [4, 4, 4, 2, 0.1])))
        (root / "labelTxt" / f"{image_id}.txt").write_text("\n".join(lines) + "\n")
    config = from_dict({"datasets": {"rt": {"root": str(root), "format": "dota", "classes": CLASSES,
                                            "splits": {"val": {}}}}})
    return config, rows


def test_task1_files_round_trip_to_the_same_ap(tmp_path):
    config, rows = _round_trip_dataset(tmp_path)
    parquet = _write_detections(tmp_path / "dets.parquet", rows=rows)
    table = read_artefact(parquet, "detections")
    boxes = np.stack([table.column(c).to_numpy() for c in ("cx", "cy", "w", "h", "theta")], axis=1)
    # As merge and detect write them: the le90 boxes' corners.
    args = (table.column("id").to_pylist(), table.column("class_name").to_pylist(), table.column("score").to_numpy(),
            le90_to_polygon(boxes), CLASSES)
    write_task1(tmp_path / "task1", *args)
    write_task1(tmp_path / "task1_2dp", *args, coordinate_decimals=2)
    kw = {"dataset": "rt", "split": "val", "iou_thresholds": (0.5, 0.75)}
    from_parquet = evaluate.run(config, out_dir=tmp_path / "e1", detections=parquet, **kw)
    from_task1 = evaluate.run(config, out_dir=tmp_path / "e2", task1_dir=tmp_path / "task1", **kw)
    assert from_task1["classes"] == from_parquet["classes"] and from_task1["mean"] == from_parquet["mean"]
    assert 0 < from_parquet["mean"]["AP75"] < from_parquet["mean"]["AP50"] < 1
    # Two decimals move the stretched boxes' IoU onto or below the threshold: different AP.
    rounded = evaluate.run(config, out_dir=tmp_path / "e3", task1_dir=tmp_path / "task1_2dp", **kw)
    assert rounded["mean"]["AP50"] != from_parquet["mean"]["AP50"]
    # mmrotate reads the Task1 polygons back as boxes: the same AP too.
    mm = [evaluate.run(config, out_dir=tmp_path / f"m{i}", protocol="mmrotate", **kw, **src)
          for i, src in enumerate([{"detections": parquet}, {"task1_dir": tmp_path / "task1"}])]
    assert mm[0]["classes"] == mm[1]["classes"]


# --- speed paths: the same ground truth, messages and outputs as the line-by-line reading -----------------------

def test_polygon_checks_at_once_match_the_per_object_checks(tmp_path):
    """polygon_problems (all polygons at once, minAreaRect / GEOS only where the numpy screens cannot decide)
    refuses exactly what a check of one polygon at a time refuses (the rules as written in the test:
    non-finite coordinate, minimum-area rectangle thinner than MIN_SIDE, ring not simple), with the same
    message; _Collector gives the same reasons in order."""
    import shapely

    from mutdet.boxes import polygon_to_le90
    from mutdet.io.annotations import MIN_SIDE, _Collector, polygon_problems

    def one_at_a_time(polygon):
        poly = np.asarray(polygon, dtype=np.float64)
        if not np.isfinite(poly).all():
            return f"non-finite coordinate in {polygon}"
        if polygon_to_le90(poly)[3] < MIN_SIDE:
            return f"degenerate polygon (collinear or coincident points): {polygon}"
        if not shapely.is_simple(shapely.linearrings(poly.reshape(4, 2))):
            return f"self-intersecting quadrilateral (corners not in order around the object): {polygon}"
        return None

    rng = np.random.default_rng(0)
    polys = [list(map(float, np.rint(rng.uniform(0, 60, 8)))) for _ in range(300)]  # many self-intersecting
    polys += [rect(0, 0, 10, 0.05), rect(0, 0, 10, 0.2), [0.0, 0, 5, 5, 10, 10, 0, 10], [0.0, 0, 4, 0, 1, 1, 0, 4],
              [0.0, 0, 4, 4, 4, 0, 0, 4], [1e6, 1e6, 1e6 + 30, 1e6, 1e6 + 30, 1e6 + 0.05, 1e6, 1e6 + 0.05],
              [0.0, 0, 0, 0, 0, 0, 0, 0], [0.0, 0, float("nan"), 0, 1, 1, 0, 1]]
    polys += [list(map(float, le90_to_polygon([rng.uniform(0, 500), rng.uniform(0, 500), rng.uniform(0.5, 50),
                                              rng.uniform(0.05, 3), rng.uniform(-2, 2)]))) for _ in range(300)]
    reasons = polygon_problems(polys)
    expected = [one_at_a_time(p) for p in polys]
    assert reasons == expected
    collector = _Collector(tmp_path / "x.txt", "skip")
    for k, p in enumerate(polys):
        collector.add(k, p, 0, 0)
    assert [(s.line, s.reason) for s in collector.skipped] == [(k, r) for k, r in enumerate(expected) if r is not None]
    assert sum(r is None for r in reasons) > 100 and sum(r is not None for r in reasons) > 100
    assert any(r and r.startswith("degenerate") for r in reasons) and any(r and r.startswith("self") for r in reasons)


def test_label_errors_come_in_file_order(tmp_path):
    """Lines are parsed first and polygons checked at once, yet the first error raised and the skipped list
    follow the file's line order, as a line-by-line reading gives them."""
    from mutdet.io.annotations import ClassMap
    from mutdet.io.dota import read_dota

    path = tmp_path / "P9.txt"
    path.write_text("\n".join(["gsd:0.5", " ".join(map(str, rect(0, 0, 10, 10))) + " plane 0",
                               "0 0 10 10 10 0 0 10 plane 0",  # self-intersecting (line 3)
                               "0 0 1 x 2 2 3 3 plane",  # non-numeric (line 4)
                               "0 0 10 0 10 0.01 0 0.01 ship 1",  # degenerate (line 5)
                               " ".join(map(str, rect(5, 5, 20, 20))) + " ship 2"]) + "\n")
    with pytest.raises(AnnotationError, match=r"P9.txt:3: self-intersecting"):
        read_dota(path, ClassMap(CLASSES))
    ann = read_dota(path, ClassMap(CLASSES), "skip")
    assert [(s.line, s.reason.split()[0]) for s in ann.skipped] == [(3, "self-intersecting"), (4, "non-numeric"),
                                                                     (5, "degenerate")]
    assert ann.lines.tolist() == [2, 6] and ann.labels.tolist() == [0, 1] and ann.difficult.tolist() == [0, 2]


@pytest.mark.parametrize("protocol", ["dota_devkit", "mmrotate"])
def test_evaluation_imports_neither_torch_nor_matplotlib(cfg, tmp_path, protocol):
    """`mutdet evaluate` with either protocol does not import torch (nor torchvision's model zoo or torch's
    compiler stack) or matplotlib: start-up and memory are part of the command's cost. For mmrotate, one more
    detection at IoU 0.5 exactly sends its pairs to the rotated-IoU kernel (replayed in numpy)."""
    import subprocess
    import sys

    rows = DETECTIONS + ([("P1", "plane", 0.5, box(10, 10, 50, 25))] if protocol == "mmrotate" else [])
    folder = tmp_path / "task1"
    write_task1(folder, [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows],
                le90_to_polygon(np.array([r[3] for r in rows])), CLASSES)
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"datasets": {"tiny": {"root": str(cfg.dataset("tiny").root), "format": "dota",
                                                         "classes": CLASSES, "class_aliases": {"Airplane": "plane"},
                                                         "splits": {"val": {}}}}}))
    code = ("import sys; from mutdet.cli import main; from mutdet.evaluation import rotated_ap as r; calls = []; "
            "k = r._kernel_pair_iou; r._kernel_pair_iou = lambda *a: calls.append(len(a[2])) or k(*a); "
            f"rc = main(['evaluate', '--config', {str(config)!r}, '--dataset', 'tiny', '--split', 'val', "
            f"'--task1-dir', {str(folder)!r}, '--out', {str(tmp_path / 'eval')!r}, '--protocol', {protocol!r}]); "
            "print(sum(calls), rc, *(m in sys.modules for m in ('torch', 'torchvision', 'matplotlib')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[-4:] == ["0", "False", "False", "False"]
    assert (int(out[-5]) > 0) == (protocol == "mmrotate")  # pairs the kernel decided
    if protocol == "dota_devkit":
        assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["mean"]["AP50"] == pytest.approx((2 / 3 + 1) / 2)


def test_pr_curve_png(cfg, tmp_path):
    """The precision-recall plot: a PNG with one coloured curve per class with ground truth."""
    from mutdet.evaluation.plots import TAB20

    out = tmp_path / "eval"
    evaluate.run(cfg, dataset="tiny", split="val", out_dir=out, detections=_write_detections(tmp_path / "d.parquet"))
    img = cv2.imread(str(out / "pr_curve.png"))
    assert img is not None and img.shape[2] == 3
    for k in range(len(CLASSES)):
        r, g, b = (int(TAB20[k][i:i + 2], 16) for i in (0, 2, 4))
        assert np.all(img == (b, g, r), axis=2).sum() > 20, CLASSES[k]
