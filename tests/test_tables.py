"""Tables stage: our fine-tuning metrics beside the paper's numbers, as Markdown / CSV / LaTeX, plus figures."""
import csv
import json
import re
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pytest

from mutdet import paper
from mutdet.boxes import le90_to_polygon
from mutdet.io.artefacts import write_artefact
from mutdet.stages.tables import MISSING, NO_PAPER, latex_escape, parse_metrics_path, pick_tiles, run

CLASSES = ["plane", "ship"]


def metrics_path(results: Path, init: str, fraction: str, epochs: int, dataset: str = "synthetic",
                 split: str = "test") -> Path:
    return results / "finetune" / f"init~{init}" / f"frac~{fraction}" / f"epochs~{epochs}" / dataset / split / "metrics.json"


def write_metrics(results: Path, init: str, fraction: str, epochs: int, ap50: float | None, ap75: float | None = 0.1,
                  per_class: dict | None = None, dataset: str = "synthetic", split: str = "test") -> Path:
    """A metrics.json as :mod:`mutdet.stages.evaluate` writes it (AP as fractions in [0, 1])."""
    per_class = per_class or {c: ap50 for c in CLASSES}
    metrics = {
        "dataset": dataset, "split": split, "detections": "x.parquet", "num_images": 2,
        "settings": {"iou_thresholds": [0.5, 0.75], "use_07_metric": True},
        "classes": {c: {"AP50": v, "AP75": ap75, "num_gt": 3, "num_detections": 5, "num_difficult": 0}
                    for c, v in per_class.items()},
        "mean": {"AP50": ap50, "AP75": ap75, "num_classes": len(per_class), "num_gt": 6, "num_detections": 10},
        "skipped_objects": [], "mutdet_version": "0.1.0", "code_version": "mutdet 0.1.0",
    }
    path = metrics_path(results, init, fraction, epochs, dataset, split)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(metrics, indent=2, sort_keys=True))
    return path


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def row_of(rows: list[dict], first: str, value: str) -> dict:
    (row,) = [r for r in rows if r[first] == value]
    return row


@pytest.fixture
def sweep(tmp_path):
    """none / detreg / mutdet at 100 % for 8 epochs, mutdet also at 10 % and at 4 epochs; detreg at 10 % listed
    but not done yet (no file)."""
    results = tmp_path / "results"
    paths = [
        write_metrics(results, "none", "1.0", 8, 0.1234, 0.05, per_class={"plane": 0.2, "ship": None}),
        write_metrics(results, "detreg", "1.0", 8, 0.25, 0.125),
        write_metrics(results, "mutdet", "1.0", 8, 0.3, 0.2),
        write_metrics(results, "mutdet", "0.1", 8, 0.15),
        write_metrics(results, "mutdet", "1.0", 4, 0.22),
        metrics_path(results, "detreg", "0.1", 8),  # in the sweep, no metrics yet
    ]
    return results, paths


def test_paper_numbers_are_the_papers():
    assert paper.MAIN["DIOR-R"]["MutDet"] == (70.7, 51.2) and paper.MAIN["DOTA-v1.0"]["UP-DETR"] == (72.7, 50.0)
    assert paper.LOW_DATA["DIOR-R"][0.25] == {"none": 51.1, "DETReg": 58.4, "MutDet": 62.9}
    assert [label for label, _ in paper.ABLATION["DIOR-R"]][-1] == "+ encoder loss and siamese head (full MutDet)"
    assert paper.ABLATION["DIOR-R"][3][1] == {12: 65.5, 24: 67.0, 36: 69.5}
    assert paper.low_data_ap50("DIOR-R", 0.1, "MutDet") == 56.9 and paper.low_data_ap50("DOTA-v1.0", 0.1, "MutDet") is None


def test_main_table_ours_in_percent_beside_the_paper(sweep, tmp_path):
    _, paths = sweep
    out = run(metrics=paths, out_dir=tmp_path / "out", compare={"synthetic": "DIOR-R"})
    csv_path = out["tables"]["main_synthetic"]["csv"]
    with open(csv_path, newline="") as f:
        header = next(csv.reader(f))
    assert header == ["method", "plane", "ship", "AP50", "AP50 paper (DIOR-R)", "AP75", "AP75 paper (DIOR-R)"]
    rows = read_csv(csv_path)
    none = row_of(rows, "method", "none")
    assert none["AP50"] == "12.3" and none["AP75"] == "5.0" and none["AP50 paper (DIOR-R)"] == "65.7"
    assert none["plane"] == "20.0" and none["ship"] == MISSING  # per-class AP null -> n/a, not 0
    detreg = row_of(rows, "method", "DETReg")
    assert detreg["AP50"] == "25.0" and detreg["AP75"] == "12.5" and detreg["AP75 paper (DIOR-R)"] == "49.1"
    # longest schedule at 100 %: 8 epochs (mutdet's 4-epoch run is not the main row)
    assert row_of(rows, "method", "MutDet")["AP50"] == "30.0"
    upd = row_of(rows, "method", "UP-DETR (paper only)")
    assert upd["AP50 paper (DIOR-R)"] == "67.1" and upd["AP75 paper (DIOR-R)"] == "48.4" and upd["AP50"] == ""
    md = out["tables"]["main_synthetic"]["md"].read_text()
    assert "| DETReg | 25.0 | 25.0 | 25.0 | 67.9 | 12.5 | 49.1 |" in md and "8 epochs" in md


def test_low_data_table_shows_missing_runs_and_paper_fractions(sweep, tmp_path):
    _, paths = sweep
    out = run(metrics=paths, out_dir=tmp_path / "out", compare={"synthetic": "DIOR-R"})
    rows = read_csv(out["tables"]["low_data_synthetic"]["csv"])
    assert [r["data fraction"] for r in rows] == ["10 %", "25 %", "50 %", "100 %"]
    ten = row_of(rows, "data fraction", "10 %")
    assert ten["MutDet"] == "15.0" and ten["MutDet paper (DIOR-R)"] == "56.9"
    assert ten["DETReg"] == MISSING and ten["DETReg paper (DIOR-R)"] == "50.8"  # listed, no metrics yet
    assert ten["none"] == MISSING and row_of(rows, "data fraction", "100 %")["none"] == "12.3"
    assert out["missing_metrics"] == [str(paths[-1])]
    assert str(paths[-1]) in out["index"].read_text()


def test_ablation_table_maps_our_schedules_onto_the_papers(sweep, tmp_path):
    _, paths = sweep
    out = run(metrics=paths, out_dir=tmp_path / "out", compare={"synthetic": "DIOR-R"}, paper_epochs={4: 12, 8: 24})
    path = out["tables"]["ablation_synthetic"]["csv"]
    with open(path, newline="") as f:
        header = next(csv.reader(f))
    assert header == ["pre-training", "4 ep (paper 12 ep)", "paper (DIOR-R) 12 ep", "8 ep (paper 24 ep)",
                      "paper (DIOR-R) 24 ep"]
    rows = read_csv(path)
    assert [r["pre-training"] for r in rows] == [label for label, _ in paper.ABLATION["DIOR-R"]]
    full = row_of(rows, "pre-training", "+ encoder loss and siamese head (full MutDet)")
    assert full["4 ep (paper 12 ep)"] == "22.0" and full["8 ep (paper 24 ep)"] == "30.0"
    assert full["paper (DIOR-R) 24 ep"] == "69.8"
    contrastive = row_of(rows, "pre-training", "+ contrastive")  # not run: visible marker
    assert contrastive["8 ep (paper 24 ep)"] == MISSING and contrastive["paper (DIOR-R) 24 ep"] == "65.8"


def test_epochs_the_paper_lacks_and_datasets_without_comparison(sweep, tmp_path):
    _, paths = sweep
    out = run(metrics=paths, out_dir=tmp_path / "out", compare={"synthetic": "DIOR-R"})  # identity: 4, 8 epochs
    rows = read_csv(out["tables"]["ablation_synthetic"]["csv"])
    assert {r["paper (DIOR-R) 8 ep"] for r in rows} == {NO_PAPER}
    plain = run(metrics=paths, out_dir=tmp_path / "plain")  # no compare: no paper columns at all
    with open(plain["tables"]["main_synthetic"]["csv"], newline="") as f:
        assert not any("paper" in h for h in next(csv.reader(f)))
    assert "not compared" in plain["tables"]["main_synthetic"]["md"].read_text()


def test_table_without_any_run_is_written_with_a_note(tmp_path):
    out = run(metrics=[], out_dir=tmp_path / "out", compare={"dior": "DIOR-R"})
    rows = read_csv(out["tables"]["main_dior"]["csv"])
    assert row_of(rows, "method", "MutDet")["AP50"] == MISSING
    assert row_of(rows, "method", "MutDet")["AP50 paper (DIOR-R)"] == "70.7"
    for name in ("main_dior", "low_data_dior", "ablation_dior"):
        assert "No fine-tuning metrics for dior" in out["tables"][name]["md"].read_text()
    assert out["figures"]["ap50_vs_fraction_dior"].is_file()


def test_latex_is_booktabs_and_escaped(tmp_path):
    results = tmp_path / "results"
    path = write_metrics(results, "mutdet", "0.5", 3, 0.5, dataset="my_data",
                         per_class={"storage_tank": 0.5, "a&b": 0.4})
    out = run(metrics=[path], out_dir=tmp_path / "out", compare={"my_data": "DIOR-R"})
    tex = out["tables"]["low_data_my_data"]["tex"].read_text()
    assert "\\toprule" in tex and "\\midrule" in tex and "\\bottomrule" in tex
    assert "my\\_data" in tex and "50 \\%" in tex and "my_data" not in tex.replace("my\\_data", "")
    main = out["tables"]["main_my_data"]["tex"].read_text()
    assert "a\\&b" in main and "storage\\_tank" in main
    ablation = out["tables"]["ablation_my_data"]["tex"].read_text()
    assert " --- " in ablation and NO_PAPER not in ablation  # the paper has no 3-epoch column
    # every unescaped & is a column separator: the same number in each row
    body = [line for line in main.splitlines() if line.endswith("\\\\")]
    assert len({len(re.findall(r"(?<!\\)&", line)) for line in body}) == 1
    assert latex_escape("5% of a_b & c") == "5\\% of a\\_b \\& c"


def test_bad_paths_raise_naming_the_file(tmp_path):
    bad = tmp_path / "results" / "finetune" / "init~none" / "fraction~1.0" / "epochs~4" / "d" / "test" / "metrics.json"
    with pytest.raises(ValueError, match=re.escape(str(bad))):
        run(metrics=[bad], out_dir=tmp_path / "out")
    elsewhere = tmp_path / "metrics.json"
    with pytest.raises(ValueError, match=re.escape(str(elsewhere))):
        parse_metrics_path(elsewhere)
    percent = write_metrics(tmp_path / "r", "none", "1.0", 4, 65.7)  # percent instead of a fraction
    with pytest.raises(ValueError, match=re.escape(str(percent))):
        run(metrics=[percent], out_dir=tmp_path / "out")
    r = parse_metrics_path(metrics_path(tmp_path, "mutdet", "0.25", 12, "dota", "val"))
    assert (r.init, r.fraction, r.epochs, r.dataset, r.split) == ("mutdet", 0.25, 12, "dota", "val")


def make_tiles(folder: Path, counts: dict[str, int], size: int = 48) -> dict[str, np.ndarray]:
    """A tiles folder: tile id -> ``count`` objects (le90 boxes, tile pixels) on a dark PNG."""
    (folder / "png").mkdir(parents=True)
    tiles, objects, boxes_of = [], [], {}
    for k, (tile_id, count) in enumerate(counts.items()):
        boxes = np.array([[10 + 8 * j, 20, 10, 4, 0.3 * j] for j in range(count)], np.float64).reshape(-1, 5)
        boxes_of[tile_id] = boxes
        cv2.imwrite(str(folder / "png" / f"{tile_id}.png"), np.full((size, size, 3), 30, np.uint8))
        tiles.append({"tile_id": tile_id, "image_id": "img", "source_path": "img.png", "tile_path": f"png/{tile_id}.png",
                      "rate": 1.0, "x": k * size, "y": 0, "size": size, "valid_width": size, "valid_height": size,
                      "image_width": size * len(counts), "image_height": size})
        for j, b in enumerate(boxes):
            objects.append({"tile_id": tile_id, "object_index": j, **dict(zip(["cx", "cy", "w", "h", "theta"], b)),
                            "polygon": le90_to_polygon(b).tolist(), "class_id": j % 2, "class_name": CLASSES[j % 2],
                            "difficult": 0, "iof": 1.0})
    write_artefact(pa.Table.from_pylist(tiles), folder / "tiles.parquet", "tiles")
    write_artefact(pa.Table.from_pylist(objects), folder / "objects.parquet", "objects")
    return boxes_of


def test_figures_are_readable_pngs_and_the_grid_skips_methods_without_detections(sweep, tmp_path):
    results, paths = sweep
    boxes = make_tiles(tmp_path / "tiles", {"t0": 1, "t1": 3, "t2": 2, "t3": 0})
    dets = [{"id": t, "class_id": 0, "class_name": "plane", "score": s, **dict(zip(["cx", "cy", "w", "h", "theta"], b))}
            for t, bs in boxes.items() for b in bs for s in (0.9, 0.1)]
    write_artefact(pa.Table.from_pylist(dets), paths[2].parent / "detections_tiles.parquet", "detections",
                   metadata={"frame": "tile"})  # mutdet only
    out = run(metrics=paths, out_dir=tmp_path / "out", compare={"synthetic": "DIOR-R"},
              test_tiles_dirs={"synthetic": [tmp_path / "tiles"]}, num_tiles=2, score_threshold=0.3)
    plot = cv2.imread(str(out["figures"]["ap50_vs_fraction_synthetic"]))
    grid = cv2.imread(str(out["figures"]["detections_synthetic"]))
    assert plot is not None and plot.shape[0] > 100
    assert grid is not None and grid.shape[1] == 2 * 256  # ground truth + mutdet
    assert set(out["skipped"]["detections_synthetic"]) == {"none", "detreg"}
    assert "detections_tiles.parquet" in out["skipped"]["detections_synthetic"]["none"]
    index = out["index"].read_text()
    for name in ("main_synthetic.md", "low_data_synthetic.csv", "ablation_synthetic.tex",
                 "ap50_vs_fraction_synthetic.png", "detections_synthetic.png"):
        assert name in index
    objects = {t: {"boxes": b} for t, b in boxes.items()}
    assert pick_tiles(objects, 3) == ["t1", "t2", "t0"]
