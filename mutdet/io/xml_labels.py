"""VOC-style XML label files: DIOR-R (``<robndbox>``) and Pascal VOC (``<bndbox>``).

DIOR-R: ``<object><name>`` (mixed case), ``<difficult>``, ``<robndbox>`` with ``x_left_top
y_left_top x_right_top y_right_top x_right_bottom y_right_bottom x_left_bottom y_left_bottom``.
Pascal VOC: ``<bndbox>`` with ``xmin ymin xmax ymax`` (an axis-aligned polygon is returned).
Errors name the file and the line on which the offending ``<object>`` starts.
"""
from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

from mutdet.io.annotations import AnnotationError, ClassMap, ImageAnnotations, _Collector, parse_float

DIOR_KEYS = (
    "x_left_top", "y_left_top", "x_right_top", "y_right_top",
    "x_right_bottom", "y_right_bottom", "x_left_bottom", "y_left_bottom",
)
VOC_KEYS = ("xmin", "ymin", "xmax", "ymax")
_OBJECT_TAG = re.compile(rb"<object[\s>]")


def _object_lines(data: bytes) -> list[int]:
    """1-based line number of each ``<object>`` start tag, in document order."""
    return [data.count(b"\n", 0, m.start()) + 1 for m in _OBJECT_TAG.finditer(data)]


def _read_xml(path: Path, box_tag: str, keys: tuple[str, ...], class_map: ClassMap, on_bad_object: str) -> ImageAnnotations:
    try:
        data = path.read_bytes()
        root = ET.fromstring(data)
    except OSError as exc:
        raise AnnotationError(path, None, f"cannot read label file: {exc}") from None
    except ET.ParseError as exc:
        raise AnnotationError(path, exc.position[0], f"malformed XML: {exc}") from None
    out = _Collector(path, on_bad_object)
    objects = root.findall("object")
    lines = _object_lines(data)
    for k, obj in enumerate(objects):
        line = lines[k] if k < len(lines) else None
        name = (obj.findtext("name") or "").strip()
        label = class_map(name)
        if label is None:
            out.bad(line, f"unknown class {name!r} (known: {', '.join(class_map.classes)})")
            continue
        diff_text = (obj.findtext("difficult") or "0").strip()
        if diff_text not in ("0", "1"):
            out.bad(line, f"<difficult> must be 0 or 1, got {diff_text!r}")
            continue
        box = obj.find(box_tag)
        if box is None:
            out.bad(line, f"object {name!r} has no <{box_tag}>")
            continue
        texts = [box.findtext(key) for key in keys]
        if any(t is None for t in texts):
            missing = [key for key, t in zip(keys, texts) if t is None]
            out.bad(line, f"<{box_tag}> misses {', '.join(missing)}")
            continue
        values = [parse_float(t) for t in texts]
        if any(v is None for v in values):
            bad = texts[values.index(None)]
            out.bad(line, f"non-numeric coordinate {bad!r} in <{box_tag}>")
            continue
        if box_tag == "bndbox":
            x0, y0, x1, y1 = values
            if x1 <= x0 or y1 <= y0:
                out.bad(line, f"empty <bndbox> {values}")
                continue
            values = [x0, y0, x1, y0, x1, y1, x0, y1]
        out.add(line, values, label, int(diff_text))
    return out.result(path.stem)


def read_dior(path: str | Path, class_map: ClassMap, on_bad_object: str = "error") -> ImageAnnotations:
    """Read one DIOR-R XML file (``<robndbox>`` quadrilaterals)."""
    return _read_xml(Path(path), "robndbox", DIOR_KEYS, class_map, on_bad_object)


def read_voc(path: str | Path, class_map: ClassMap, on_bad_object: str = "error") -> ImageAnnotations:
    """Read one Pascal VOC XML file (axis-aligned ``<bndbox>``)."""
    return _read_xml(Path(path), "bndbox", VOC_KEYS, class_map, on_bad_object)
