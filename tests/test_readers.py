import numpy as np
import pytest

from mutdet.io.annotations import AnnotationError, ClassMap
from mutdet.io.datasets import find_image, list_image_ids, read_labels, shard_ids
from mutdet.io.dota import read_dota
from mutdet.io.xml_labels import read_dior, read_voc

DOTA = ClassMap(["plane", "small-vehicle"])


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_dota_headers_and_missing_difficult(tmp_path):
    p = write(tmp_path, "P0001.txt", "imagesource:GoogleEarth\ngsd:0.146\n"
              "10 10 50 10 50 30 10 30 plane 0\n"
              "\n"
              "60 60 70 60 70 65 60 65 Small-Vehicle\n"
              "1 1 9 1 9 5 1 5 plane 1\n")
    ann = read_dota(p, DOTA)
    assert ann.image_id == "P0001"
    np.testing.assert_array_equal(ann.labels, [0, 1, 0])
    np.testing.assert_array_equal(ann.difficult, [0, 0, 1])
    np.testing.assert_allclose(ann.polygons[0], [10, 10, 50, 10, 50, 30, 10, 30])


@pytest.mark.parametrize("line, reason", [
    ("10 10 50 10 50 30 plane 0", "got 8: "),
    ("10 10 50 10 50 30 10 plane 0", "non-numeric coordinate 'plane'"),
    ("10 10 50 10 50 3O 10 30 plane 0", "non-numeric coordinate '3O'"),
    ("10 10 50 10 50 30 10 30 tank 0", "unknown class 'tank'"),
    ("10 10 20 20 30 30 40 40 plane 0", "degenerate polygon"),
    ("10 10 10 10 10 10 10 10 plane 0", "degenerate polygon"),
    ("10 10 50 10 50 30 10 30 plane x", "difficult must be 0, 1 or 2"),
    ("10 10 50 10 50 nan 10 30 plane 0", "non-numeric coordinate 'nan'"),
])
def test_dota_bad_lines_name_file_and_line(tmp_path, line, reason):
    p = write(tmp_path, "bad.txt", "gsd:0.1\n10 10 50 10 50 30 10 30 plane 0\n" + line + "\n")
    with pytest.raises(AnnotationError) as exc:
        read_dota(p, DOTA)
    assert str(exc.value).startswith(f"{p}:3: ")
    assert reason in str(exc.value)
    ann = read_dota(p, DOTA, on_bad_object="skip")
    assert len(ann) == 1 and len(ann.skipped) == 1
    assert ann.skipped[0].line == 3 and reason in ann.skipped[0].reason


DIOR_XML = """<annotation>
  <filename>00001.jpg</filename>
  <object>
    <name>Airplane</name>
    <difficult>0</difficult>
    <robndbox>
      <x_left_top>10</x_left_top><y_left_top>10</y_left_top>
      <x_right_top>50</x_right_top><y_right_top>10</y_right_top>
      <x_right_bottom>50</x_right_bottom><y_right_bottom>30</y_right_bottom>
      <x_left_bottom>10</x_left_bottom><y_left_bottom>30</y_left_bottom>
    </robndbox>
  </object>
  <object>
    <name>vehicle</name>
    <difficult>1</difficult>
    <robndbox>
      <x_left_top>0</x_left_top><y_left_top>0</y_left_top>
      <x_right_top>8</x_right_top><y_right_top>0</y_right_top>
      <x_right_bottom>8</x_right_bottom><y_right_bottom>4</y_right_bottom>
      <x_left_bottom>0</x_left_bottom><y_left_bottom>4</y_left_bottom>
    </robndbox>
  </object>
</annotation>
"""


def test_dior_mixed_case_and_difficult(tmp_path):
    ann = read_dior(write(tmp_path, "00001.xml", DIOR_XML), ClassMap(["airplane", "vehicle"]))
    np.testing.assert_array_equal(ann.labels, [0, 1])
    np.testing.assert_array_equal(ann.difficult, [0, 1])
    np.testing.assert_allclose(ann.polygons[1], [0, 0, 8, 0, 8, 4, 0, 4])


def test_dior_errors_name_object_line(tmp_path):
    p = write(tmp_path, "00002.xml", DIOR_XML.replace("<name>vehicle</name>", "<name>tank</name>"))
    with pytest.raises(AnnotationError, match=r"00002\.xml:13: unknown class 'tank'"):
        read_dior(p, ClassMap(["airplane", "vehicle"]))
    p = write(tmp_path, "00003.xml", DIOR_XML.replace("<y_right_top>10</y_right_top>", ""))
    with pytest.raises(AnnotationError, match=r"00003\.xml:3: <robndbox> misses y_right_top"):
        read_dior(p, ClassMap(["airplane", "vehicle"]))
    p = write(tmp_path, "00004.xml", "<annotation><object></annotation>")
    with pytest.raises(AnnotationError, match=r"00004\.xml:1: malformed XML"):
        read_dior(p, ClassMap(["airplane"]))


def test_voc_axis_aligned_and_aliases(tmp_path):
    xml = ("<annotation><object><name>Dead</name><bndbox><xmin>1</xmin><ymin>2</ymin><xmax>11</xmax>"
           "<ymax>7</ymax></bndbox></object>\n<object><name>Tree</name><bndbox><xmin>5</xmin><ymin>5</ymin>"
           "<xmax>5</xmax><ymax>9</ymax></bndbox></object></annotation>")
    p = write(tmp_path, "a.xml", xml)
    cmap = ClassMap(["tree"], {"dead": "tree"})
    with pytest.raises(AnnotationError, match=r"a\.xml:2: empty <bndbox>"):
        read_voc(p, cmap)
    ann = read_voc(p, cmap, on_bad_object="skip")
    np.testing.assert_allclose(ann.polygons, [[1, 2, 11, 2, 11, 7, 1, 7]])
    assert len(ann.skipped) == 1


def test_dataset_listing_sharding_and_missing_files(tmp_path):
    (tmp_path / "images").mkdir()
    for name in ["b.png", "a.jpg", "c.png", "notes.txt"]:
        (tmp_path / "images" / name).write_bytes(b"")
    exts = [".png", ".jpg"]
    assert list_image_ids(tmp_path / "images", None, exts) == ["a", "b", "c"]
    lst = write(tmp_path, "train.txt", "c\n# comment\na.jpg\n")
    assert list_image_ids(tmp_path / "images", lst, exts) == ["a", "c"]
    assert shard_ids(["c", "a", "b"], 0, 2) == ["a", "c"] and shard_ids(["c", "a", "b"], 1, 2) == ["b"]
    assert find_image(tmp_path / "images", "a", exts).name == "a.jpg"
    with pytest.raises(FileNotFoundError, match="no image for id 'z'"):
        find_image(tmp_path / "images", "z", exts)
    dup = write(tmp_path, "dup.txt", "a\na\n")
    with pytest.raises(AnnotationError, match="duplicate image ids"):
        list_image_ids(tmp_path / "images", dup, exts)
    # no label folder: an unlabelled split; a folder without the file: an error naming it
    assert read_labels("dota", tmp_path / "labelTxt", "a", DOTA) is None
    (tmp_path / "labelTxt").mkdir()
    with pytest.raises(AnnotationError, match=r"a\.txt: label file missing"):
        read_labels("dota", tmp_path / "labelTxt", "a", DOTA)


def _dior_objects(rows):
    """A DIOR-R XML file of ``(class, difficult, 8 coordinates)`` rows, one ``<object>`` per line."""
    keys = ["x_left_top", "y_left_top", "x_right_top", "y_right_top", "x_right_bottom", "y_right_bottom",
            "x_left_bottom", "y_left_bottom"]
    lines = ["<annotation>"]
    for name, difficult, coords in rows:
        box = "".join(f"<{k}>{v}</{k}>" for k, v in zip(keys, coords))
        lines.append(f"<object><name>{name}</name><difficult>{difficult}</difficult><robndbox>{box}</robndbox></object>")
    return "\n".join(lines + ["</annotation>"]) + "\n"


def test_xml_polygons_are_checked_at_once_in_file_order(tmp_path, monkeypatch):
    """All polygons of a file go through one batched check (not one conversion per object), yet the first
    error raised and the skipped list follow the file's line order."""
    from mutdet.io import annotations

    calls = []
    batched = annotations.polygon_problems
    monkeypatch.setattr(annotations, "polygon_problems", lambda polys: calls.append(len(polys)) or batched(polys))
    good = [("airplane", 0, [0, 0, 10, 0, 10, 5, 0, 5])] * 300
    ann = read_dior(write(tmp_path, "a.xml", _dior_objects(good)), ClassMap(["airplane"]))
    assert len(ann) == 300 and calls == [300]
    rows = list(good[:3]) + [("airplane", 0, [0, 0, 10, 10, 10, 0, 0, 10]),  # self-intersecting, line 5
                             ("tank", 0, [0, 0, 10, 0, 10, 5, 0, 5]),  # unknown class, line 6
                             ("airplane", 0, [0, 0, 10, 0, 10, 0.01, 0, 0.01])]  # degenerate, line 7
    path = write(tmp_path, "b.xml", _dior_objects(rows))
    with pytest.raises(AnnotationError, match=r"b\.xml:5: self-intersecting"):
        read_dior(path, ClassMap(["airplane"]))
    ann = read_dior(path, ClassMap(["airplane"]), on_bad_object="skip")
    assert len(ann) == 3 and [s.line for s in ann.skipped] == [5, 6, 7]
    assert [s.reason.split()[0] for s in ann.skipped] == ["self-intersecting", "unknown", "degenerate"]
