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
from mutdet.config import from_dict
from mutdet.io.artefacts import write_artefact
from mutdet.layout import FinetuneJob
from mutdet.report.tables import MISSING, NO_PAPER
from mutdet.stages.tables import RunFiles, run

CLASSES = ["plane", "ship"]


LADDER = {  # the demo's ablation ladder: one flag per rung
    "detreg": {"base": "detreg"},
    "contrastive": {"base": "detreg", "alignment": "contrastive"},
    "enhanced_targets": {"base": "detreg", "alignment": "contrastive", "target": "enhanced"},
    "enhanced_features": {"base": "detreg", "alignment": "contrastive", "target": "enhanced",
                          "decoder_features": "enhanced"},
    "pseudo_classes": {"base": "mutdet", "encoder_embedding_loss": False, "siamese": False,
                       "proposal_selection": "objectness"},
    "encoder_loss": {"base": "mutdet", "siamese": False, "proposal_selection": "objectness"},
    "siamese": {"base": "mutdet", "proposal_selection": "objectness"},
    "mutdet": {"base": "mutdet"},
}


def make_config(tmp_path: Path, datasets: dict[str, list[str]] | None = None, variants=None, **tables):
    """A validated config with ``datasets`` (name -> classes), pre-training ``variants`` (default: the
    ladder) and the given ``tables`` settings."""
    datasets = datasets or {"synthetic": CLASSES}
    return from_dict({"results": str(tmp_path / "results"),
                      "datasets": {name: {"root": str(tmp_path / name), "format": "dota", "classes": classes}
                                   for name, classes in datasets.items()},
                      "pretrain": {"variants": LADDER if variants is None else variants},
                      "tables": tables})


def run_files(root: Path, init: str, fraction: float, epochs: int, dataset: str = "synthetic",
              split: str = "test", seed: int = 42) -> RunFiles:
    """A run's files in a folder that says nothing about the run (the stage must not read settings from paths)."""
    folder = root / f"run{len(list(root.glob('run*'))) if root.is_dir() else 0}"
    folder.mkdir(parents=True)
    return RunFiles(job=FinetuneJob(dataset, "train", split, init, fraction, epochs, seed),
                    metrics=folder / "metrics.json", detections=folder / "dets.parquet")


def write_metrics(files: RunFiles, ap50: float | None, ap75: float | None = 0.1, per_class: dict | None = None,
                  **overrides) -> RunFiles:
    """The run's metrics.json as :mod:`mutdet.stages.evaluate` writes it (AP as fractions in [0, 1])."""
    per_class = per_class or {c: ap50 for c in CLASSES}
    metrics = {
        "dataset": files.job.dataset, "split": files.job.split, "detections": "x.parquet", "num_images": 2,
        "settings": {"iou_thresholds": [0.5, 0.75], "use_07_metric": True},
        "classes": {c: {"AP50": v, "AP75": ap75, "num_gt": 3, "num_detections": 5, "num_difficult": 0}
                    for c, v in per_class.items()},
        "mean": {"AP50": ap50, "AP75": ap75, "num_classes": len(per_class), "num_gt": 6, "num_detections": 10},
        "skipped_objects": [], "mutdet_version": "0.1.0", "code_version": "mutdet 0.1.0", **overrides,
    }
    files.metrics.write_text(json.dumps(metrics, indent=2, sort_keys=True))
    return files


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def header_of(path: Path) -> list[str]:
    with open(path, newline="") as f:
        return next(csv.reader(f))


def row_of(rows: list[dict], first: str, value: str) -> dict:
    (row,) = [r for r in rows if r[first] == value]
    return row


@pytest.fixture
def sweep(tmp_path):
    """none / detreg / mutdet at 100 % for 8 epochs, mutdet also at 10 % and at 4 epochs; detreg at 10 % listed
    but not done yet (no file)."""
    root = tmp_path / "runs"
    return [
        write_metrics(run_files(root, "none", 1.0, 8), 0.1234, 0.05, per_class={"plane": 0.2, "ship": None}),
        write_metrics(run_files(root, "detreg", 1.0, 8), 0.25, 0.125),
        write_metrics(run_files(root, "mutdet", 1.0, 8), 0.3, 0.2),
        write_metrics(run_files(root, "mutdet", 0.1, 8), 0.15),
        write_metrics(run_files(root, "mutdet", 1.0, 4), 0.22),
        run_files(root, "detreg", 0.1, 8),  # in the sweep, no metrics yet
    ]


def test_paper_numbers_are_the_papers():
    assert paper.MAIN["DIOR-R"]["MutDet"] == (70.7, 51.2) and paper.MAIN["DOTA-v1.0"]["UP-DETR"] == (72.7, 50.0)
    assert paper.LOW_DATA["DIOR-R"][0.25] == {"none": 51.1, "DETReg": 58.4, "MutDet": 62.9}
    assert [label for label, _ in paper.ABLATION["DIOR-R"]][-1] == "+ encoder loss and siamese head (full MutDet)"
    assert paper.ABLATION["DIOR-R"][3][1] == {12: 65.5, 24: 67.0, 36: 69.5}
    assert paper.low_data_ap50("DIOR-R", 0.1, "MutDet") == 56.9 and paper.low_data_ap50("DOTA-v1.0", 0.1, "MutDet") is None


def test_main_table_ours_in_percent_beside_the_paper(sweep, tmp_path):
    cfg = make_config(tmp_path, compare={"synthetic": "DIOR-R"})
    out = run(cfg, runs=sweep, test_tiles={}, out_dir=tmp_path / "out")
    csv_path = out["tables"]["main_synthetic"]["csv"]
    assert header_of(csv_path) == ["method", "plane", "ship", "AP50", "AP50 paper (DIOR-R)", "AP75",
                                   "AP75 paper (DIOR-R)"]
    rows = read_csv(csv_path)
    none = row_of(rows, "method", "none")
    # one seed per cell: the mean alone, saying n=1
    assert none["AP50"] == "12.3 (n=1)" and none["AP75"] == "5.0 (n=1)" and none["AP50 paper (DIOR-R)"] == "65.7"
    assert none["plane"] == "20.0 (n=1)" and none["ship"] == MISSING  # per-class AP null -> n/a, not 0
    detreg = row_of(rows, "method", "DETReg")
    assert detreg["AP50"] == "25.0 (n=1)" and detreg["AP75"] == "12.5 (n=1)" and detreg["AP75 paper (DIOR-R)"] == "49.1"
    # longest schedule at 100 %: 8 epochs (mutdet's 4-epoch run is not the main row)
    assert row_of(rows, "method", "MutDet")["AP50"] == "30.0 (n=1)"
    upd = row_of(rows, "method", "UP-DETR (paper only)")
    assert upd["AP50 paper (DIOR-R)"] == "67.1" and upd["AP75 paper (DIOR-R)"] == "48.4" and upd["AP50"] == ""
    md = out["tables"]["main_synthetic"]["md"].read_text()
    assert "| DETReg | 25.0 (n=1) | 25.0 (n=1) | 25.0 (n=1) | 67.9 | 12.5 (n=1) | 49.1 |" in md
    assert "synthetic test:" in md and "8 epochs" in md
    assert out["index"] == tmp_path / "out" / "index.md" and out["index"].is_file()


def test_methods_in_the_papers_row_order_then_the_configs(sweep, tmp_path):
    cfg = make_config(tmp_path, methods={"mutdet": "MutDet", "mine": "Mine", "none": "none"},
                      compare={"synthetic": "DIOR-R"})
    out = run(cfg, runs=sweep, test_tiles={}, out_dir=tmp_path / "out")
    assert [r["method"] for r in read_csv(out["tables"]["main_synthetic"]["csv"])] == [
        "none", "MutDet", "Mine", "UP-DETR (paper only)", "AlignDet (paper only)", "DETReg (paper only)"]
    assert header_of(out["tables"]["low_data_synthetic"]["csv"])[1::2] == ["none", "MutDet", "Mine"]


def test_low_data_table_shows_missing_runs_and_paper_fractions(sweep, tmp_path):
    out = run(make_config(tmp_path, compare={"synthetic": "DIOR-R"}), runs=sweep, test_tiles={},
              out_dir=tmp_path / "out")
    rows = read_csv(out["tables"]["low_data_synthetic"]["csv"])
    assert [r["data fraction"] for r in rows] == ["10 %", "25 %", "50 %", "100 %"]
    ten = row_of(rows, "data fraction", "10 %")
    assert ten["MutDet"] == "15.0 (n=1)" and ten["MutDet paper (DIOR-R)"] == "56.9"
    assert ten["DETReg"] == MISSING and ten["DETReg paper (DIOR-R)"] == "50.8"  # listed, no metrics yet
    assert ten["none"] == MISSING and row_of(rows, "data fraction", "100 %")["none"] == "12.3 (n=1)"
    assert out["missing_metrics"] == [str(sweep[-1].metrics)]
    assert str(sweep[-1].metrics) in out["index"].read_text()


def test_ablation_table_maps_our_schedules_onto_the_papers(sweep, tmp_path):
    cfg = make_config(tmp_path, compare={"synthetic": "DIOR-R"}, paper_epochs={"4": 12, "8": 24})
    out = run(cfg, runs=sweep, test_tiles={}, out_dir=tmp_path / "out")
    path = out["tables"]["ablation_synthetic"]["csv"]
    assert header_of(path) == ["pre-training", "paper row", "4 ep (paper 12 ep)", "paper (DIOR-R) 12 ep",
                               "8 ep (paper 24 ep)", "paper (DIOR-R) 24 ep"]
    rows = read_csv(path)
    labels = [label for label, _ in paper.ABLATION["DIOR-R"]]
    # one row per rung, labelled by the flag it adds; the paper's rows matched by flags, not names
    assert [r["pre-training"] for r in rows][1:] == [
        "+ alignment contrastive (contrastive)", "+ target enhanced (enhanced_targets)",
        "+ decoder_features enhanced (enhanced_features)", "+ classes pseudo (pseudo_classes)",
        "+ encoder_embedding_loss True (encoder_loss)", "+ siamese True (siamese)",
        "+ proposal_selection similarity (mutdet)"]
    assert [r["paper row"] for r in rows] == [*labels[:4], "-", "-", "-", labels[4]]
    full = row_of(rows, "paper row", "+ encoder loss and siamese head (full MutDet)")
    assert full["4 ep (paper 12 ep)"] == "22.0 (n=1)" and full["8 ep (paper 24 ep)"] == "30.0 (n=1)"
    assert full["paper (DIOR-R) 24 ep"] == "69.8"
    contrastive = row_of(rows, "paper row", "+ contrastive")  # not run: visible marker
    assert contrastive["8 ep (paper 24 ep)"] == MISSING and contrastive["paper (DIOR-R) 24 ep"] == "65.8"
    assert rows[4]["paper (DIOR-R) 24 ep"] == NO_PAPER  # a rung the paper does not have
    # a rung named in the ladder but not configured, and a jump of several flags, are said so
    jumpy = make_config(tmp_path, variants={"detreg": {}, "mutdet": {}}, ablation=["detreg", "mutdet", "gone"],
                        compare={"synthetic": "DIOR-R"})
    text = run(jumpy, runs=sweep, test_tiles={}, out_dir=tmp_path / "jumpy")["tables"]["ablation_synthetic"]["md"]
    assert "gone (not configured)" in text.read_text()
    assert "Rows that change more than one flag from the row above: mutdet." in text.read_text()


def test_epochs_the_paper_lacks_and_datasets_without_comparison(sweep, tmp_path):
    out = run(make_config(tmp_path, compare={"synthetic": "DIOR-R"}), runs=sweep, test_tiles={},
              out_dir=tmp_path / "out")  # paper_epochs identity: 4, 8 epochs
    rows = read_csv(out["tables"]["ablation_synthetic"]["csv"])
    assert {r["paper (DIOR-R) 8 ep"] for r in rows} == {NO_PAPER}
    plain = run(make_config(tmp_path), runs=sweep, test_tiles={}, out_dir=tmp_path / "plain")  # no paper columns
    assert not any("paper" in h for h in header_of(plain["tables"]["main_synthetic"]["csv"]))
    assert "not compared" in plain["tables"]["main_synthetic"]["md"].read_text()


def test_table_without_any_run_is_written_with_a_note(tmp_path):
    cfg = make_config(tmp_path, {"dior": CLASSES}, compare={"dior": "DIOR-R"})
    out = run(cfg, runs=[], test_tiles={}, out_dir=tmp_path / "out")
    rows = read_csv(out["tables"]["main_dior"]["csv"])
    assert row_of(rows, "method", "MutDet")["AP50"] == MISSING
    assert row_of(rows, "method", "MutDet")["AP50 paper (DIOR-R)"] == "70.7"
    for name in ("main_dior", "low_data_dior", "ablation_dior"):
        assert "No fine-tuning metrics for dior" in out["tables"][name]["md"].read_text()
    assert out["figures"]["ap50_vs_fraction_dior"].is_file()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        ["index.md", "ap50_vs_fraction_dior.png", "runs_dior.csv"] + [f"{t}_dior.{e}" for t in ("main", "low_data", "ablation")
                                                     for e in ("csv", "md", "tex")])


def test_class_order_of_the_config_and_latex_escaping(tmp_path):
    cfg = make_config(tmp_path, {"my_data": ["storage_tank", "a&b"]}, compare={"my_data": "DIOR-R"})
    files = write_metrics(run_files(tmp_path / "runs", "mutdet", 0.5, 3, dataset="my_data"), 0.5,
                          per_class={"a&b": 0.4, "storage_tank": 0.5})  # the file's order is not the table's
    out = run(cfg, runs=[files], test_tiles={}, out_dir=tmp_path / "out")
    assert header_of(out["tables"]["main_my_data"]["csv"])[:3] == ["method", "storage_tank", "a&b"]
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


def test_bad_metrics_and_runs_raise_naming_the_file(tmp_path):
    cfg = make_config(tmp_path)
    root = tmp_path / "runs"

    def check(runs, match):
        with pytest.raises(ValueError, match=match):
            run(cfg, runs=runs, test_tiles={}, out_dir=tmp_path / "out")

    percent = write_metrics(run_files(root, "none", 1.0, 4), 65.7)  # percent instead of a fraction
    check([percent], re.escape(str(percent.metrics)) + ".*fraction in \\[0, 1\\]")
    broken = run_files(root, "none", 1.0, 4)
    broken.metrics.write_text("{not json")
    check([broken], re.escape(str(broken.metrics)) + ": not valid JSON")
    other_split = write_metrics(run_files(root, "none", 1.0, 4), 0.5, split="val")  # claims another run
    check([other_split], re.escape(str(other_split.metrics)) + ": split 'val' in the file, 'test'")
    ok = write_metrics(run_files(root, "none", 1.0, 4), 0.5)
    twice = write_metrics(run_files(root, "none", 1.0, 4), 0.6)
    check([ok, twice], re.escape(f"{twice.metrics}: same run (init, fraction, epochs, seed, dataset) as {ok.metrics}"))
    other_seed = write_metrics(run_files(root, "none", 1.0, 4, seed=7), 0.6)  # the same cell, another seed: fine
    both = run(cfg, runs=[ok, other_seed], test_tiles={}, out_dir=tmp_path / "seeds")
    assert row_of(read_csv(both["tables"]["low_data_synthetic"]["csv"]), "data fraction", "100 %")["none"] == (
        "55.0 ± 7.1 (n=2)")
    on_val = run_files(root, "mutdet", 1.0, 4, split="val")
    check([ok, on_val], re.escape(str(on_val.metrics)) + ".*evaluated on split 'val' and 'test'")
    # a metrics.json that does not say which dataset and split it is of is taken as the run's
    unlabelled = RunFiles(ok.job, ok.metrics, ok.detections)
    data = json.loads(ok.metrics.read_text())
    del data["dataset"], data["split"]
    ok.metrics.write_text(json.dumps(data))
    out = run(cfg, runs=[unlabelled], test_tiles={}, out_dir=tmp_path / "out")
    assert row_of(read_csv(out["tables"]["low_data_synthetic"]["csv"]), "data fraction", "100 %")["none"] == "50.0 (n=1)"


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


def write_detections(path: Path, boxes: dict[str, np.ndarray]) -> None:
    """Tile-frame detections: each ground-truth box twice, scored 0.9 and 0.1."""
    dets = [{"id": t, "class_id": 0, "class_name": "plane", "score": s, **dict(zip(["cx", "cy", "w", "h", "theta"], b))}
            for t, bs in boxes.items() for b in bs for s in (0.9, 0.1)]
    write_artefact(pa.Table.from_pylist(dets), path, "detections", metadata={"frame": "tile"})


def test_figures_and_the_grid_read_the_declared_detections_only(sweep, tmp_path):
    boxes = make_tiles(tmp_path / "tiles", {"t0": 1, "t1": 3, "t2": 2, "t3": 0})
    none, detreg, mutdet = sweep[:3]
    # mutdet's detections are declared in a folder of their own; detreg's lie beside its metrics.json under
    # the old name but are not declared (its declared file does not exist): the grid must not use them
    mutdet = RunFiles(mutdet.job, mutdet.metrics, tmp_path / "elsewhere" / "mutdet_dets.parquet")
    write_detections(mutdet.detections, boxes)
    write_detections(detreg.metrics.parent / "detections_tiles.parquet", boxes)
    runs = [none, detreg, mutdet, *sweep[3:]]
    cfg = make_config(tmp_path, compare={"synthetic": "DIOR-R"}, num_tiles=2, score_threshold=0.3)
    out = run(cfg, runs=runs, test_tiles={"synthetic": [tmp_path / "tiles"]}, out_dir=tmp_path / "out")
    plot = cv2.imread(str(out["figures"]["ap50_vs_fraction_synthetic"]))
    grid = cv2.imread(str(out["figures"]["detections_synthetic"]))
    assert out["figures"]["detections_synthetic"] == tmp_path / "out" / "detections_synthetic.png"
    assert plot is not None and plot.shape[0] > 100
    # ground truth + mutdet; header, 2 tiles (name strip + 256-pixel cells), the score note, one legend line
    assert grid is not None and grid.shape == (24 + 2 * (24 + 256) + 24 + 24, 2 * 256, 3)
    assert out["skipped"]["detections_synthetic"] == {"none": f"no detections file {none.detections}",
                                                      "detreg": f"no detections file {detreg.detections}"}
    index = out["index"].read_text()
    for name in ("main_synthetic.md", "low_data_synthetic.csv", "ablation_synthetic.tex",
                 "ap50_vs_fraction_synthetic.png", "detections_synthetic.png", "2 test tiles", "score >= 0.3"):
        assert name in index

    def mutdet_cells(image: np.ndarray) -> list[np.ndarray]:
        return [image[24 + k * 280 + 24: 24 + (k + 1) * 280, 256:] for k in range(2)]

    assert all((cell != 30).any() for cell in mutdet_cells(grid))  # detections scoring 0.9 drawn
    strict = run(make_config(tmp_path, compare={"synthetic": "DIOR-R"}, num_tiles=2, score_threshold=0.95),
                 runs=runs, test_tiles={"synthetic": [tmp_path / "tiles"]}, out_dir=tmp_path / "strict")
    strict_grid = cv2.imread(str(strict["figures"]["detections_synthetic"]))
    assert all((cell == 30).all() for cell in mutdet_cells(strict_grid))  # none scores 0.95: bare tiles


def test_captions_name_the_evaluation_protocol(sweep, tmp_path):
    out = run(make_config(tmp_path), runs=sweep, test_tiles={}, out_dir=tmp_path / "devkit")
    for table in ("main_synthetic", "low_data_synthetic", "ablation_synthetic"):
        assert "Scored with the dota_devkit protocol." in out["tables"][table]["md"].read_text()
    cfg = from_dict({**make_config(tmp_path).raw,
                     "datasets": {"synthetic": {"root": str(tmp_path), "format": "dota", "classes": CLASSES,
                                                "evaluation": {"protocol": "mmrotate"}}}})
    out = run(cfg, runs=sweep, test_tiles={}, out_dir=tmp_path / "mmrotate")
    assert "Scored with the mmrotate protocol." in out["tables"]["main_synthetic"]["md"].read_text()


def test_seeds_of_a_cell_are_aggregated_and_listed_per_seed(tmp_path):
    """Three seeds per cell: each cell is mean ± sample std (n), the per-seed values are in runs_<d>.csv,
    a cell within the seed spread of the row above is marked, and the grid uses the lowest seed's detections."""
    root = tmp_path / "runs"
    ap50 = {"none": [0.10, 0.12, 0.17], "detreg": [0.15, 0.17, 0.16], "mutdet": [0.30, 0.31, 0.29]}
    runs = [write_metrics(run_files(root, init, 1.0, 8, seed=seed), v, 0.1)
            for init, values in ap50.items() for seed, v in zip((3, 1, 2), values)]
    runs.append(run_files(root, "mutdet", 1.0, 8, seed=4))  # a fourth seed of mutdet not done yet
    boxes = make_tiles(tmp_path / "tiles", {"t0": 2})
    write_detections(runs[4].detections, boxes)  # detreg seed 1 (its lowest) has detections, seed 3 too
    write_detections(runs[3].detections, boxes)
    out = run(make_config(tmp_path, compare={"synthetic": "DIOR-R"}, ablation=["none", "detreg", "mutdet"],
                          num_tiles=1),
              runs=runs, test_tiles={"synthetic": [tmp_path / "tiles"]}, out_dir=tmp_path / "out")
    main = read_csv(out["tables"]["main_synthetic"]["csv"])
    # by hand: none 10, 12, 17 -> mean 13.0, std sqrt(26 / 2) = 3.6; detreg 15, 17, 16 -> 16.0, 1.0;
    # mutdet 30, 31, 29 (one seed of four without metrics) -> 30.0, 1.0
    assert row_of(main, "method", "none")["AP50"] == "13.0 ± 3.6 (n=3)"
    assert row_of(main, "method", "DETReg")["AP50"] == "16.0 ± 1.0 (n=3) ≈"  # |16 - 13| <= 3.6
    assert row_of(main, "method", "MutDet")["AP50"] == "30.0 ± 1.0 (n=3 of 4)"  # |30 - 16| > 1.0
    assert row_of(main, "method", "DETReg")["AP75"] == "10.0 ± 0.0 (n=3) ≈"  # the same AP75 in every seed
    md = out["tables"]["main_synthetic"]["md"].read_text()
    assert "seeds in the sweep: 1, 2, 3, 4" in md and "|difference of means| ≤ the larger standard deviation" in md
    per_seed = read_csv(out["runs"]["synthetic"])
    assert out["runs"]["synthetic"] == tmp_path / "out" / "runs_synthetic.csv"
    assert [(r["init"], r["seed"], r["AP50"]) for r in per_seed if r["init"] == "none"] == [
        ("none", "1", "12"), ("none", "2", "17"), ("none", "3", "10")]
    assert row_of([r for r in per_seed if r["init"] == "mutdet"], "seed", "4")["AP50"] == ""  # no metrics yet
    assert "runs_synthetic.csv" in out["index"].read_text()
    assert out["figures"]["ap50_vs_fraction_synthetic"].stat().st_size > 0
    assert "mutdet" in out["skipped"]["detections_synthetic"] and "detreg" not in out["skipped"]["detections_synthetic"]
