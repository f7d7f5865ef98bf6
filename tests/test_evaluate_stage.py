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
from mutdet.io.artefacts import ArtefactError, write_artefact
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
