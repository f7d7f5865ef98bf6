"""DOTA Task1 result files: round trip and malformed input."""
from __future__ import annotations

import numpy as np
import pytest

from mutdet.boxes import le90_to_polygon
from mutdet.io.task1 import Task1FormatError, read_task1, task1_path, write_task1

CLASSES = ["plane", "small-vehicle", "ship"]


def _detections():
    rng = np.random.default_rng(0)
    n = 7
    boxes = np.column_stack([rng.uniform(0, 4000, (n, 2)), rng.uniform(10, 80, n), rng.uniform(5, 10, n),
                             rng.uniform(-1.5, 1.5, n)])
    return {
        "image_ids": np.array(["P0001", "P0002", "P0001", "P0003", "P0002", "P0001", "P0003"], dtype=object),
        "class_names": np.array(["plane", "ship", "ship", "plane", "plane", "ship", "ship"], dtype=object),
        "scores": rng.random(n).astype(np.float32),
        "polygons": le90_to_polygon(boxes),
    }


def test_round_trip_and_every_class_file(tmp_path):
    d = _detections()
    paths = write_task1(tmp_path, d["image_ids"], d["class_names"], d["scores"], d["polygons"], CLASSES)
    assert [p.name for p in paths] == ["Task1_plane.txt", "Task1_small-vehicle.txt", "Task1_ship.txt"]
    assert task1_path(tmp_path, "small-vehicle").read_text() == ""  # written although empty
    first = task1_path(tmp_path, "plane").read_text().splitlines()[0].split()
    assert first[0] == "P0001" and len(first) == 10
    assert first[2:] == [repr(v) for v in d["polygons"][0].tolist()]  # shortest float64 round-trip text

    back = read_task1(tmp_path, CLASSES)
    order = np.concatenate([np.flatnonzero(d["class_names"] == c) for c in CLASSES])  # by class, then input order
    assert list(back["image_ids"]) == list(d["image_ids"][order])
    assert list(back["class_names"]) == list(d["class_names"][order])
    assert np.array_equal(back["scores"].astype(np.float32), d["scores"][order])  # float32-exact
    assert np.array_equal(back["polygons"], d["polygons"][order])  # float64-exact: evaluation sees the same polygons
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporary files


def test_fixed_decimals_and_empty_input(tmp_path):
    d = _detections()
    write_task1(tmp_path / "a", d["image_ids"], d["class_names"], d["scores"], d["polygons"], CLASSES,
                coordinate_decimals=6)
    np.testing.assert_allclose(read_task1(tmp_path / "a", CLASSES)["polygons"][0], d["polygons"][0], atol=5e-7)
    write_task1(tmp_path / "c", d["image_ids"], d["class_names"], d["scores"], d["polygons"], CLASSES,
                coordinate_decimals=2)
    first = task1_path(tmp_path / "c", "plane").read_text().splitlines()[0].split()
    assert all(len(t.split(".")[1]) == 2 for t in first[2:])
    back = read_task1(tmp_path / "c", CLASSES)["polygons"]
    np.testing.assert_allclose(back[0], d["polygons"][0], atol=0.005 + 1e-9)
    assert not np.array_equal(back[0], d["polygons"][0])
    write_task1(tmp_path / "b", [], [], [], np.zeros((0, 8)), CLASSES)
    empty = read_task1(tmp_path / "b", CLASSES)
    assert empty["polygons"].shape == (0, 8) and len(empty["image_ids"]) == 0


def test_exact_text_for_any_float(tmp_path):
    # Values whose shortest text needs all 17 digits, or an exponent, still read back bit-exactly.
    values = np.array([[0.1 + 0.2, 1e-05, -0.0, 4000.000000000001, 1 / 3, 2.5e-300, 123456789.12345679, 7.0]])
    write_task1(tmp_path, ["P1"], ["plane"], [0.5], values, CLASSES)
    assert np.array_equal(read_task1(tmp_path, CLASSES)["polygons"], values)


def test_writer_rejects_bad_input(tmp_path):
    d = _detections()
    with pytest.raises(ValueError, match="not one of"):
        write_task1(tmp_path, d["image_ids"], d["class_names"], d["scores"], d["polygons"], ["plane"])
    with pytest.raises(ValueError, match="whitespace"):
        write_task1(tmp_path, ["P 1"], ["plane"], [0.5], np.zeros((1, 8)), CLASSES)
    with pytest.raises(ValueError, match="7 image ids"):
        write_task1(tmp_path, d["image_ids"], d["class_names"], d["scores"][:3], d["polygons"], CLASSES)


def _folder(tmp_path, lines_for_plane: str):
    for c in CLASSES:
        task1_path(tmp_path, c).write_text("")
    task1_path(tmp_path, "plane").write_text(lines_for_plane)
    return tmp_path


@pytest.mark.parametrize("text, line, message", [
    ("P1 0.9 1 2 3 4 5 6 7 8\nP1 0.8 1 2 3 4 5 6 7\n", 2, "expected 10 tokens"),
    ("\nP1 0.9 1 2 3 4 5 six 7 8\n", 2, "non-numeric or non-finite value 'six'"),
    ("P1 high 1 2 3 4 5 6 7 8\n", 1, "'high'"),
    ("P1 0.9 1 2 3 4 5 6 7 nan\n", 1, "'nan'"),
])
def test_malformed_lines_name_file_and_line(tmp_path, text, line, message):
    folder = _folder(tmp_path, text)
    with pytest.raises(Task1FormatError, match=message) as err:
        read_task1(folder, CLASSES)
    assert str(err.value).startswith(f"{task1_path(folder, 'plane')}:{line}:")
    assert err.value.line == line


def test_unknown_and_missing_class_files(tmp_path):
    folder = _folder(tmp_path, "")
    (folder / "Task1_tank.txt").write_text("")
    with pytest.raises(Task1FormatError, match="class 'tank' is not one of") as err:
        read_task1(folder, CLASSES)
    assert err.value.file.endswith("Task1_tank.txt")
    (folder / "Task1_tank.txt").unlink()
    task1_path(folder, "ship").unlink()
    with pytest.raises(Task1FormatError, match="missing result file for class 'ship'"):
        read_task1(folder, CLASSES)
    with pytest.raises(Task1FormatError, match="not found"):
        read_task1(tmp_path / "nowhere", CLASSES)
    (folder / "README.txt").write_text("ignored")
    task1_path(folder, "ship").write_text("")
    assert len(read_task1(folder, CLASSES)["scores"]) == 0
