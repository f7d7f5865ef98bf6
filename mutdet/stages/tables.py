"""Stage ``tables``: the paper's tables and figures regenerated from fine-tuning metrics, ours beside the paper's.

Inputs: the ``metrics.json`` files written by :mod:`mutdet.stages.evaluate` for the fine-tuning sweep,
each at ``<results>/finetune/init~<init>/frac~<fraction>/epochs~<epochs>/<dataset>/<split>/metrics.json``
(:data:`mutdet.stages.layout.FINETUNE_DIR`); the run's settings are read from the path. A listed file
that does not exist yet is a run of the sweep without results: its cells show :data:`MISSING`.
``metrics.json`` stores AP as a fraction in ``[0, 1]``; tables show percent with one decimal.
The paper's numbers come from :mod:`mutdet.paper`.

Outputs in ``out_dir``, per dataset ``<d>`` of the runs (and of ``compare``):

* ``main_<d>.{md,csv,tex}``: one row per method at data fraction 1.0 and the longest schedule: per-class
  AP50, then AP50 and AP75 each followed by the paper's number (Tables 2/3); the paper's other
  methods (UP-DETR, AlignDet) as rows marked "paper only" (our cells empty);
* ``low_data_<d>.{md,csv,tex}``: rows = data fractions (ours and the paper's), columns = methods, ours
  beside the paper's AP50, at the main table's schedule;
* ``ablation_<d>.{md,csv,tex}``: rows = the five ablation initialisations (the paper's row labels),
  columns = our fine-tuning schedules at data fraction 1.0, ours beside the paper's AP50 (our epochs
  mapped to the paper's by ``paper_epochs``);
* ``ap50_vs_fraction_<d>.png``: our AP50 against the data fraction per method, the paper's points dashed;
* ``detections_<d>.png`` (only with ``test_tiles_dirs``): rotated boxes on the test tiles with the most
  ground-truth objects, one column for the ground truth and one per method;
* ``index.md``: every table and figure with a one-line caption, and the notes.

Cell markers: :data:`MISSING` (``n/a``) where we have no number (run not done, method not run, AP
undefined), :data:`NO_PAPER` (``—``) where the paper reports none. The ``.tex`` files are booktabs
tables (``\\usepackage{booktabs}``).
"""
from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from mutdet import paper
from mutdet.boxes import le90_to_polygon
from mutdet.io.artefacts import read_artefact, read_metadata
from mutdet.io.atomic import atomic_path, write_bytes, write_text
from mutdet.stages.common import log

__all__ = ["MISSING", "NO_PAPER", "FinetuneRun", "Table", "load_runs", "parse_metrics_path", "run",
           "kwargs_from_config"]

MISSING = "n/a"
NO_PAPER = "—"
DEFAULT_METHODS: dict[str, str] = {"none": "none", "detreg": "DETReg", "mutdet": "MutDet"}
DEFAULT_ABLATION: tuple[str, ...] = ("detreg", "contrastive", "enhanced_targets", "enhanced_features", "mutdet")
LEVELS = ("init", "frac", "epochs")


# ----------------------------------------------------------------------------------------------- runs


@dataclass(frozen=True)
class FinetuneRun:
    """One fine-tuning run of the sweep: its settings (from the path) and its metrics (None: not done yet)."""

    path: Path
    init: str
    fraction: float
    epochs: int
    dataset: str
    split: str
    metrics: dict | None = None

    def ap(self, key: str, class_name: str | None = None) -> float | None:
        """Mean (or per-class) AP ``key`` (``"AP50"``, ``"AP75"``) in percent; None if unknown."""
        if self.metrics is None:
            return None
        entry = self.metrics["mean"] if class_name is None else self.metrics["classes"].get(class_name)
        value = None if entry is None else entry.get(key)
        return None if value is None else 100.0 * float(value)

    @property
    def detections(self) -> Path:
        """The tile-frame detections written beside ``metrics.json``."""
        return self.path.parent / "detections_tiles.parquet"


def parse_metrics_path(path: str | Path) -> FinetuneRun:
    """Settings of a run from ``.../finetune/init~I/frac~F/epochs~E/<dataset>/<split>/metrics.json``.

    Raises:
        ValueError naming ``path`` if it does not follow that layout.
    """
    path = Path(path)
    parts = path.parts
    expected = "<results>/finetune/init~<init>/frac~<fraction>/epochs~<epochs>/<dataset>/<split>/metrics.json"
    if len(parts) < 7 or parts[-1] != "metrics.json" or parts[-7] != "finetune":
        raise ValueError(f"{path}: not a fine-tuning metrics file (expected {expected})")
    values = {}
    for level, part in zip(LEVELS, parts[-6:-3]):
        prefix = f"{level}~"
        if not part.startswith(prefix) or len(part) == len(prefix):
            raise ValueError(f"{path}: folder {part!r} should be {prefix}<value> (expected {expected})")
        values[level] = part[len(prefix):]
    try:
        fraction, epochs = float(values["frac"]), int(values["epochs"])
    except ValueError:
        raise ValueError(f"{path}: frac~{values['frac']} / epochs~{values['epochs']} are not a number / an integer "
                         f"(expected {expected})") from None
    if not 0.0 < fraction <= 1.0 or epochs <= 0:
        raise ValueError(f"{path}: data fraction {fraction} must be in (0, 1] and epochs {epochs} positive")
    return FinetuneRun(path=path, init=values["init"], fraction=fraction, epochs=epochs, dataset=parts[-3],
                       split=parts[-2])


def _read_metrics(run: FinetuneRun) -> dict:
    """``metrics.json`` of ``run``, checked against its path; AP values must be fractions in [0, 1]."""
    try:
        metrics = json.loads(run.path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{run.path}: not valid JSON: {exc}") from None
    for key in ("classes", "mean"):
        if not isinstance(metrics.get(key), dict):
            raise ValueError(f"{run.path}: missing key {key!r} of an evaluation metrics file")
    for key, ours in (("dataset", run.dataset), ("split", run.split)):
        if metrics.get(key, ours) != ours:
            raise ValueError(f"{run.path}: {key} {metrics[key]!r} in the file, {ours!r} in its path")
    for name, entry in [("mean", metrics["mean"]), *metrics["classes"].items()]:
        for k, v in entry.items():
            if k.startswith("AP") and v is not None and not 0.0 <= float(v) <= 1.0:
                raise ValueError(f"{run.path}: {name} {k} = {v}; metrics.json stores AP as a fraction in [0, 1]")
    return metrics


def load_runs(paths: Sequence[str | Path]) -> list[FinetuneRun]:
    """Parse every path and read the metrics that exist; a missing file gives a run with ``metrics=None``.

    Raises:
        ValueError naming the file for a path outside the layout, an unreadable file, two files of the
        same run, or one dataset evaluated on two splits.
    """
    runs, seen, splits = [], {}, {}
    for p in paths:
        r = parse_metrics_path(p)
        key = (r.dataset, r.init, r.fraction, r.epochs)
        if key in seen:
            raise ValueError(f"{r.path}: same run (init, fraction, epochs, dataset) as {seen[key]}")
        seen[key] = r.path
        if splits.setdefault(r.dataset, r.split) != r.split:
            raise ValueError(f"{r.path}: dataset {r.dataset} evaluated on split {r.split!r} and "
                             f"{splits[r.dataset]!r}; give the metrics of one split per dataset")
        if r.path.is_file():
            r = FinetuneRun(**{**r.__dict__, "metrics": _read_metrics(r)})
        runs.append(r)
    return runs


# --------------------------------------------------------------------------------------------- tables


@dataclass
class Table:
    """A rendered table: header and rows of strings, a caption and notes (shown under the table)."""

    name: str
    caption: str
    header: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        def line(cells: Sequence[str]) -> str:
            return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

        rule = "|" + "|".join(["---"] + ["---:"] * (len(self.header) - 1)) + "|"  # numbers right-aligned
        out = [f"**{self.caption}**", "", line(self.header), rule]
        out += [line(r) for r in self.rows]
        if self.notes:
            out += [""] + [f"- {n}" for n in self.notes]
        return "\n".join(out) + "\n"

    def csv(self) -> str:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(self.header)
        writer.writerows(self.rows)
        return buf.getvalue()

    def latex(self) -> str:
        spec = "l" + "r" * (len(self.header) - 1)
        out = ["\\begin{table}[t]", "\\centering", f"\\caption{{{latex_escape(self.caption)}}}",
               f"\\label{{tab:{latex_escape(self.name)}}}", f"\\begin{{tabular}}{{{spec}}}", "\\toprule",
               " & ".join(latex_escape(c) for c in self.header) + " \\\\", "\\midrule"]
        out += [" & ".join(latex_escape(c) for c in r) + " \\\\" for r in self.rows]
        out += ["\\bottomrule", "\\end{tabular}"]
        if self.notes:
            out += ["\\par\\footnotesize " + " ".join(latex_escape(n) for n in self.notes)]
        out += ["\\end{table}"]
        return "\n".join(out) + "\n"


_LATEX = {"\\": "\\textbackslash{}", "&": "\\&", "%": "\\%", "$": "\\$", "#": "\\#", "_": "\\_", "{": "\\{",
          "}": "\\}", "~": "\\textasciitilde{}", "^": "\\textasciicircum{}", NO_PAPER: "---"}


def latex_escape(text: str) -> str:
    """Escape LaTeX specials (``_``, ``%``, ``&``, ...); the no-number dash becomes ``---``."""
    return "".join(_LATEX.get(ch, ch) for ch in text)


def _ours(value: float | None) -> str:
    return MISSING if value is None or math.isnan(value) else f"{value:.1f}"


def _theirs(value: float | None) -> str:
    return NO_PAPER if value is None else f"{value:.1f}"


def _percent(fraction: float) -> str:
    return f"{100 * fraction:g} %"


@dataclass
class _Dataset:
    """The runs of one of our datasets and how it maps onto the paper."""

    name: str
    runs: list[FinetuneRun]
    paper: str | None  # paper dataset compared with, None: no comparison
    classes: list[str]

    def find(self, init: str, fraction: float, epochs: int | None) -> FinetuneRun | None:
        for r in self.runs:
            if r.init == init and abs(r.fraction - fraction) < 1e-9 and r.epochs == epochs:
                return r
        return None

    @property
    def schedule(self) -> int | None:
        """The longest schedule at fraction 1.0 (of any fraction if none), None without runs."""
        full = [r.epochs for r in self.runs if abs(r.fraction - 1.0) < 1e-9] or [r.epochs for r in self.runs]
        return max(full, default=None)

    def paper_header(self) -> str:
        return f"paper ({self.paper})"


def _missing_notes(ds: _Dataset, runs: list[FinetuneRun | None], what: str) -> list[str]:
    if not ds.runs:
        return [f"No fine-tuning metrics for {ds.name} yet: every cell of ours is {MISSING}."]
    if not any(r is not None and r.metrics is not None for r in runs):
        return [f"No run of {what} has metrics yet: every cell of ours is {MISSING}."]
    return []


def main_table(ds: _Dataset, methods: Mapping[str, str]) -> Table:
    """Tables 2/3: per-class AP50, then AP50 and AP75 with the paper's numbers, one row per method."""
    epochs = ds.schedule
    header = ["method", *ds.classes, "AP50"] + ([f"AP50 {ds.paper_header()}"] if ds.paper else []) + ["AP75"] + (
        [f"AP75 {ds.paper_header()}"] if ds.paper else [])
    rows, used = [], []
    for init, label in methods.items():
        r = ds.find(init, 1.0, epochs)
        used.append(r)
        ap50, ap75 = paper.main_ap(ds.paper, label) or (None, None)
        row = [label] + [_ours(r.ap("AP50", c) if r else None) for c in ds.classes]
        row += [_ours(r.ap("AP50") if r else None)] + ([_theirs(ap50)] if ds.paper else [])
        row += [_ours(r.ap("AP75") if r else None)] + ([_theirs(ap75)] if ds.paper else [])
        rows.append(row)
    notes = _missing_notes(ds, used, "the main comparison")
    if ds.paper:
        for label in paper.MAIN_METHODS:
            if label not in methods.values():
                ap50, ap75 = paper.main_ap(ds.paper, label)
                rows.append([f"{label} (paper only)"] + [""] * len(ds.classes)  # not part of our sweep
                            + ["", _theirs(ap50), "", _theirs(ap75)])
        notes.append(f"Paper columns: {paper.DETECTOR} on the {ds.paper} test set, not our {ds.name} data; "
                     "the paper gives no per-class numbers here.")
    else:
        notes.append(f"{ds.name} is not compared with a paper dataset (set compare); no paper columns.")
    caption = (f"{ds.name} {ds.runs[0].split if ds.runs else 'test'}: AP (%) after fine-tuning on all training data "
               f"for {epochs if epochs is not None else '?'} epochs; per-class columns are AP50.")
    return Table(f"main_{ds.name}", caption, header, rows, notes)


def low_data_table(ds: _Dataset, methods: Mapping[str, str]) -> Table:
    """The low-data table: AP50 per data fraction (rows) and method (columns), ours beside the paper's."""
    epochs = ds.schedule
    fractions = {r.fraction for r in ds.runs} | set(paper.LOW_DATA.get(ds.paper or "", {}))
    header = ["data fraction"]
    for label in methods.values():
        header += [label] + ([f"{label} {ds.paper_header()}"] if ds.paper else [])
    rows, used = [], []
    for frac in sorted(fractions):
        row = [_percent(frac)]
        for init, label in methods.items():
            r = ds.find(init, frac, epochs)
            used.append(r)
            row.append(_ours(r.ap("AP50") if r else None))
            if ds.paper:
                row.append(_theirs(paper.low_data_ap50(ds.paper, frac, label)))
        rows.append(row)
    notes = _missing_notes(ds, used, "the low-data sweep")
    if ds.paper and ds.paper not in paper.LOW_DATA:
        notes.append(f"The paper reports low-data results on {', '.join(paper.LOW_DATA)} only, not {ds.paper}.")
    elif ds.paper:
        notes.append(f"Paper columns: {paper.DETECTOR} on {ds.paper}, not our {ds.name} data.")
    caption = (f"{ds.name}: AP50 (%) against the fraction of training data used for fine-tuning "
               f"({epochs if epochs is not None else '?'} epochs).")
    return Table(f"low_data_{ds.name}", caption, header, rows, notes)


def ablation_table(ds: _Dataset, ablation: Sequence[str | None], paper_epochs: Mapping[int, int]) -> Table:
    """The ablation table: the five ablation inits (paper row labels) against our schedules, AP50."""
    labels = [label for label, _ in paper.ABLATION["DIOR-R"]]
    # our schedules at 100 % data; else any of ours; without runs the schedules the comparison would use
    epochs_list = (sorted({r.epochs for r in ds.runs if abs(r.fraction - 1.0) < 1e-9})
                   or sorted({r.epochs for r in ds.runs}) or sorted(paper_epochs) or list(paper.ABLATION_EPOCHS))
    header = ["pre-training"]
    for e in epochs_list:
        pe = paper_epochs.get(e, e)
        header.append(f"{e} ep" + (f" (paper {pe} ep)" if ds.paper else ""))
        if ds.paper:
            header.append(f"{ds.paper_header()} {pe} ep")
    rows, used = [], []
    for k, (init, label) in enumerate(zip(ablation, labels)):
        row = [label]
        for e in epochs_list:
            r = ds.find(init, 1.0, e) if init is not None else None  # None: this row is not in the sweep
            used.append(r)
            row.append(_ours(r.ap("AP50") if r else None))
            if ds.paper:
                row.append(_theirs(paper.ablation_ap50(ds.paper, k, paper_epochs.get(e, e))))
        rows.append(row)
    notes = _missing_notes(ds, used, "the ablation")
    notes.append("Rows (our init names): " + ", ".join(f"{lab} = {init or 'not run'}"
                                                       for init, lab in zip(ablation, labels)) + ".")
    if ds.paper and ds.paper not in paper.ABLATION:
        notes.append(f"The paper reports the ablation on {', '.join(paper.ABLATION)} only, not {ds.paper}.")
    caption = f"{ds.name}: ablation of the pre-training components, AP50 (%) after each fine-tuning schedule."
    return Table(f"ablation_{ds.name}", caption, header, rows, notes)


def _write_table(table: Table, out_dir: Path) -> dict[str, Path]:
    paths = {}
    for ext, text in (("md", table.markdown()), ("csv", table.csv()), ("tex", table.latex())):
        paths[ext] = out_dir / f"{table.name}.{ext}"
        write_text(paths[ext], text)
    return paths


# -------------------------------------------------------------------------------------------- figures

_COLOURS = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:gray"]


def plot_ap50_vs_fraction(ds: _Dataset, methods: Mapping[str, str], path: Path) -> Path:
    """Our AP50 against the data fraction, one line per method; the paper's points dashed, same colour."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    epochs = ds.schedule
    for k, (init, label) in enumerate(methods.items()):
        colour = _COLOURS[k % len(_COLOURS)]
        points = sorted((r.fraction, r.ap("AP50")) for r in ds.runs
                        if r.init == init and r.epochs == epochs and r.ap("AP50") is not None)
        if points:
            xs, ys = zip(*points)
            ax.plot([100 * x for x in xs], ys, "-o", color=colour, label=f"{label} (ours, {ds.name})")
        else:
            ax.plot([], [], "-o", color=colour, label=f"{label} (ours: {MISSING})")
        theirs = sorted((f, row[label]) for f, row in paper.LOW_DATA.get(ds.paper or "", {}).items() if label in row)
        if theirs:
            xs, ys = zip(*theirs)
            ax.plot([100 * x for x in xs], ys, "--s", color=colour, alpha=0.7, label=f"{label} paper ({ds.paper})")
    ax.set_xlabel("fraction of training data (%)")
    ax.set_ylabel("AP50 (%)")
    ax.set_xlim(0, 105)
    ax.grid(True, alpha=0.3)
    ax.set_title(f"{ds.name}: AP50 vs data fraction ({epochs if epochs is not None else '?'} epochs)")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def _read_tiles(dirs: Sequence[Path]) -> tuple[dict[str, Path], dict[str, dict[str, np.ndarray]]]:
    """Tile image paths and ground truth (``boxes`` ``(N, 5)`` le90 tile pixels, ``class_name``, ``difficult``)."""
    paths, objects = {}, {}
    for folder in dirs:
        tiles = read_artefact(folder / "tiles.parquet", "tiles", columns=["tile_id", "tile_path"])
        for tile_id, rel in zip(*(tiles.column(c).to_pylist() for c in ("tile_id", "tile_path"))):
            paths[tile_id] = folder / rel  # as TileDataset: relative to the folder of tiles.parquet
        obj = read_artefact(folder / "objects.parquet", "objects").to_pydict()
        boxes = np.stack([np.asarray(obj[k], np.float64) for k in ("cx", "cy", "w", "h", "theta")], -1).reshape(-1, 5)
        ids = np.asarray(obj["tile_id"], dtype=object)
        names, difficult = np.asarray(obj["class_name"], object), np.asarray(obj["difficult"], np.int8)
        for tile_id in dict.fromkeys(obj["tile_id"]):
            mine = ids == tile_id
            objects[tile_id] = {"boxes": boxes[mine], "class_name": names[mine], "difficult": difficult[mine]}
    return paths, objects


def pick_tiles(objects: Mapping[str, Mapping[str, np.ndarray]], count: int) -> list[str]:
    """The ``count`` tiles with the most ground-truth objects (ties: tile id), deterministic."""
    return sorted(objects, key=lambda t: (-len(objects[t]["boxes"]), t))[:count]


def _class_colour(name: str, classes: Sequence[str]) -> tuple[int, int, int]:
    k = classes.index(name) if name in classes else len(classes)
    hue = int(179 * ((k * 0.618034) % 1.0))
    bgr = cv2.cvtColor(np.uint8([[[hue, 220, 255]]]), cv2.COLOR_HSV2BGR)[0, 0]
    return int(bgr[0]), int(bgr[1]), int(bgr[2])


def _draw(image: np.ndarray, boxes: np.ndarray, names: Sequence[str], classes: Sequence[str], scale: float,
          thin: np.ndarray | None = None) -> np.ndarray:
    """Draw le90 boxes ``(N, 5)`` (tile pixels) on ``image`` (already resized by ``scale``)."""
    polys = le90_to_polygon(boxes).reshape(-1, 4, 2) * scale  # (N, 8) -> (N, 4, 2), cell pixels
    for k, (poly, name) in enumerate(zip(polys, names)):
        width = 1 if thin is not None and thin[k] else 2
        cv2.polylines(image, [poly.round().astype(np.int32)], True, _class_colour(str(name), classes), width,
                      cv2.LINE_AA)
    return image


def _label(text: str, width: int, height: int = 24) -> np.ndarray:
    """A white strip ``(height, width, 3)`` with ``text`` (cut to fit)."""
    strip = np.full((height, width, 3), 255, np.uint8)
    cv2.putText(strip, text[: max(1, width // 8)], (4, height - 7), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1,
                cv2.LINE_AA)
    return strip


def _legend(classes: Sequence[str], width: int, height: int = 24) -> np.ndarray:
    """Strips naming each class in its box colour, wrapped to ``width``."""
    lines, x = [np.full((height, width, 3), 255, np.uint8)], 4
    for name in classes:
        text_width = cv2.getTextSize(name, cv2.FONT_HERSHEY_SIMPLEX, 0.45, 1)[0][0] + 28
        if x + text_width > width and x > 4:
            lines.append(np.full((height, width, 3), 255, np.uint8))
            x = 4
        colour = _class_colour(name, classes)
        cv2.rectangle(lines[-1], (x, 6), (x + 14, height - 6), colour, -1)
        cv2.putText(lines[-1], name, (x + 18, height - 7), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
        x += text_width
    return np.concatenate(lines, axis=0)


def detection_grid(ds: _Dataset, methods: Mapping[str, str], tiles_dirs: Sequence[Path], path: Path, *,
                   num_tiles: int = 4, score_threshold: float = 0.3, cell_size: int = 256) -> dict[str, str]:
    """Grid of test tiles (rows) x ground truth and methods at fraction 1.0, longest schedule (columns).

    Detections come from ``detections_tiles.parquet`` (frame ``tile``, le90 tile pixels) beside each
    run's ``metrics.json``, kept above ``score_threshold``. Returns init -> reason for each method left out.
    """
    image_paths, objects = _read_tiles([Path(d) for d in tiles_dirs])
    tile_ids = pick_tiles({t: o for t, o in objects.items() if t in image_paths}, num_tiles)
    columns: list[tuple[str, dict[str, dict]]] = [("ground truth", {t: objects[t] for t in tile_ids})]
    skipped = {}
    for init, label in methods.items():
        r = ds.find(init, 1.0, ds.schedule)
        if r is None:
            skipped[init] = f"no run at fraction 1.0, {ds.schedule} epochs"
            continue
        if not r.detections.is_file():
            skipped[init] = f"no detections file {r.detections}"
            continue
        if read_metadata(r.detections).get("frame", "tile") != "tile":
            skipped[init] = f"{r.detections} is not in the tile frame"
            continue
        dets = read_artefact(r.detections, "detections").to_pydict()
        ids, scores = np.asarray(dets["id"], object), np.asarray(dets["score"], np.float64)
        names = np.asarray(dets["class_name"], object)
        boxes = np.stack([np.asarray(dets[k], np.float64) for k in ("cx", "cy", "w", "h", "theta")], -1).reshape(-1, 5)
        per_tile = {}
        for t in tile_ids:
            keep = (ids == t) & (scores >= score_threshold)
            per_tile[t] = {"boxes": boxes[keep], "class_name": names[keep]}
        columns.append((label, per_tile))
    for init, why in skipped.items():
        log.warning("detections grid %s: %s left out: %s", ds.name, init, why)

    seen = [str(n) for _, per_tile in columns for e in per_tile.values() for n in e["class_name"]]
    classes = list(dict.fromkeys([*ds.classes, *sorted(set(seen))]))  # one colour per class, in every column
    width = cell_size * len(columns)
    header = np.concatenate([_label(name, cell_size) for name, _ in columns], axis=1)
    grid_rows = [header]
    for t in tile_ids:
        tile = cv2.imread(str(image_paths[t]), cv2.IMREAD_COLOR)
        if tile is None:
            raise FileNotFoundError(f"cannot read tile image {image_paths[t]}")
        scale = cell_size / max(tile.shape[:2])
        tile = cv2.resize(tile, (round(tile.shape[1] * scale), round(tile.shape[0] * scale)),
                          interpolation=cv2.INTER_AREA)
        canvas = np.zeros((cell_size, cell_size, 3), np.uint8)
        canvas[: tile.shape[0], : tile.shape[1]] = tile
        cells = []
        for name, per_tile in columns:
            entry = per_tile[t]
            thin = entry.get("difficult")
            cells.append(_draw(canvas.copy(), entry["boxes"], entry["class_name"], classes, scale,
                               None if thin is None else thin > 0))
        grid_rows.append(_label(t, width))
        grid_rows.append(np.concatenate(cells, axis=1))
    grid_rows.append(_label(f"score >= {score_threshold}; thin ground-truth boxes: difficult", width))
    grid_rows.append(_legend(classes, width))
    ok, png = cv2.imencode(".png", np.concatenate(grid_rows, axis=0))
    if not ok:
        raise RuntimeError(f"could not encode {path}")
    write_bytes(path, png.tobytes())
    return skipped


# ---------------------------------------------------------------------------------------------- stage


def kwargs_from_config(cfg) -> dict:
    """Keywords of :func:`run` other than ``metrics`` and ``out_dir`` from a :class:`mutdet.config.Config`:
    the ``tables`` section, each dataset's class order, and the test tiles of every fine-tuned dataset."""
    from mutdet.stages.layout import tiles_dir

    t = cfg.raw["tables"]
    tiles = {r.dataset: [tiles_dir(cfg.results, r.dataset, r.test_split, k) for k in range(cfg.dataset(r.dataset).shards)]
             for r in cfg.finetune.runs}
    order = {label: k for k, label in enumerate(paper.MAIN_METHODS)}  # the paper's row order, others after
    methods = dict(sorted(t["methods"].items(), key=lambda item: order.get(item[1], len(order))))
    return {"methods": methods, "ablation": list(t["ablation"]), "compare": dict(t["compare"]),
            "paper_epochs": {int(k): int(v) for k, v in t["paper_epochs"].items()},
            "class_names": {name: list(ds.classes) for name, ds in cfg.datasets.items()},
            "test_tiles_dirs": tiles, "num_tiles": t["num_tiles"], "score_threshold": t["score_threshold"]}


def run(*, metrics: Sequence[str | Path], out_dir: str | Path, methods: Mapping[str, str] | None = None,
        ablation: Sequence[str] | None = None, compare: Mapping[str, str] | None = None,
        paper_epochs: Mapping[int, int] | None = None, class_names: Mapping[str, Sequence[str]] | None = None,
        test_tiles_dirs: Mapping[str, Sequence[str | Path]] | None = None, num_tiles: int = 4,
        score_threshold: float = 0.3) -> dict:
    """Write the paper's tables and figures for our fine-tuning runs, with the paper's numbers beside ours.

    Args:
        metrics: ``metrics.json`` paths of the sweep, in the :data:`~mutdet.stages.layout.FINETUNE_DIR`
            layout; a path that does not exist (yet) is a run whose cells show ``n/a``.
        out_dir: output folder.
        methods: our init name -> the paper's row label (default ``none``/``detreg``/``mutdet`` ->
            none/DETReg/MutDet), in row order.
        ablation: our init names of the paper's five ablation rows, in the paper's order.
        compare: our dataset -> paper dataset (``"DIOR-R"``, ``"DOTA-v1.0"``); datasets not listed get
            no paper columns.
        paper_epochs: our epochs -> the paper's epochs in the ablation (default identity).
        class_names: dataset -> class order of the per-class columns (default: the classes in the metrics).
        test_tiles_dirs: dataset -> tiles folders of its test split, for the detections grid (optional).
        num_tiles, score_threshold: grid rows (the tiles with the most objects) and detection score cut.
    Returns:
        ``{"tables": {name: {"md", "csv", "tex": Path}}, "figures": {name: Path}, "index": Path,
        "missing_metrics": [str, ...], "skipped": {figure name: {init: reason}}}``.
    Raises:
        ValueError naming the file or key for a path outside the layout, an unreadable metrics file,
        an unknown paper dataset or an ablation list that is not five inits long.
    """
    out_dir = Path(out_dir)
    methods = dict(DEFAULT_METHODS if methods is None else methods)
    ablation = list(DEFAULT_ABLATION if ablation is None else ablation)
    compare = dict(compare or {})
    paper_epochs = {int(k): int(v) for k, v in (paper_epochs or {}).items()}
    class_names = class_names or {}
    test_tiles_dirs = test_tiles_dirs or {}
    n_rows = len(paper.ABLATION["DIOR-R"])
    if len(ablation) != n_rows:
        raise ValueError(f"tables.ablation: {len(ablation)} inits {ablation}; the paper's ablation has {n_rows} rows")
    for ours, theirs in compare.items():
        if theirs not in paper.DATASETS:
            raise ValueError(f"tables.compare.{ours}: unknown paper dataset {theirs!r} "
                             f"(one of {list(paper.DATASETS)})")

    runs = load_runs(metrics)
    missing = [str(r.path) for r in runs if r.metrics is None]
    log.info("tables: %d fine-tuning runs, %d without metrics yet", len(runs), len(missing))
    names = list(dict.fromkeys([r.dataset for r in runs] + list(compare)))
    result: dict = {"tables": {}, "figures": {}, "missing_metrics": missing, "skipped": {}}
    index = ["# Tables and figures", "",
             f"Ours beside the paper's ({paper.DETECTOR}); `{MISSING}`: no result of ours, `{NO_PAPER}`: "
             "no number in the paper, empty: a paper-only row. AP in percent.", ""]
    for name in names:
        mine = [r for r in runs if r.dataset == name]
        seen = dict.fromkeys(c for r in mine if r.metrics for c in r.metrics["classes"])
        classes = list(class_names.get(name) or seen)
        ds = _Dataset(name, mine, compare.get(name, name if name in paper.DATASETS else None), classes)
        index += [f"## {name}" + (f" (compared with the paper's {ds.paper})" if ds.paper else ""), ""]
        for table in (main_table(ds, methods), low_data_table(ds, methods),
                      ablation_table(ds, ablation, paper_epochs)):
            result["tables"][table.name] = _write_table(table, out_dir)
            index.append(f"- [{table.name}.md]({table.name}.md) ([csv]({table.name}.csv), "
                         f"[tex]({table.name}.tex)): {table.caption}")
            log.info("tables: wrote %s", out_dir / f"{table.name}.md")
        fig = f"ap50_vs_fraction_{name}"
        result["figures"][fig] = plot_ap50_vs_fraction(ds, methods, out_dir / f"{fig}.png")
        index.append(f"- [{fig}.png]({fig}.png): AP50 against the data fraction per method"
                     + (f", the paper's {ds.paper} points dashed." if ds.paper in paper.LOW_DATA else "."))
        if name in test_tiles_dirs:
            fig = f"detections_{name}"
            skipped = detection_grid(ds, methods, [Path(d) for d in test_tiles_dirs[name]], out_dir / f"{fig}.png",
                                     num_tiles=num_tiles, score_threshold=score_threshold)
            result["figures"][fig] = out_dir / f"{fig}.png"
            result["skipped"][fig] = skipped
            index.append(f"- [{fig}.png]({fig}.png): rotated boxes on the {num_tiles} test tiles with the most "
                         f"objects: ground truth, then each method (score >= {score_threshold})"
                         + (f"; left out: {', '.join(f'{k} ({v})' for k, v in skipped.items())}." if skipped else "."))
        index.append("")
    if missing:
        index += ["## Runs without metrics yet", ""] + [f"- `{p}`" for p in missing] + [""]
    result["index"] = out_dir / "index.md"
    write_text(result["index"], "\n".join(index))
    log.info("tables: wrote %d tables and %d figures to %s", len(result["tables"]), len(result["figures"]), out_dir)
    return result
