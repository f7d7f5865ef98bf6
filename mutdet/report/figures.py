"""Figures of the fine-tuning sweep: AP50 against the data fraction, and detections on test tiles."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mutdet import paper
from mutdet.io.artefacts import ArtefactError, check_schema, read_artefact, read_file_schema, read_metadata
from mutdet.io.atomic import atomic_path, write_bytes
from mutdet.report.draw import class_colour, draw_boxes
from mutdet.report.tables import MISSING, DatasetRuns, spread

__all__ = ["detection_grid", "object_counts", "pick_tiles", "plot_ap50_vs_fraction", "read_rows", "read_tiles"]

_COLOURS = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:gray"]
_LE90 = ("cx", "cy", "w", "h", "theta")


def plot_ap50_vs_fraction(ds: DatasetRuns, methods: Mapping[str, str], path: Path) -> Path:
    """Our AP50 against the data fraction at the main schedule, one line per method (``methods``: our
    init -> label): the mean over the seeds of each point with error bars of +- the sample standard
    deviation (ddof=1; none for a point of one seed), the number of seeds per point (n) in the legend;
    the paper's points dashed, same colour. Writes the PNG ``path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    epochs = ds.schedule
    for k, (init, label) in enumerate(methods.items()):
        colour = _COLOURS[k % len(_COLOURS)]
        fractions = sorted({r.fraction for r in ds.runs if r.init == init and r.epochs == epochs})
        points = [(f, s) for f in fractions if (s := spread(ds.cell(init, f, epochs), "AP50")) is not None and s.n]
        if points:
            counts = sorted({s.n for _, s in points})
            n = f"n={counts[0]}" if len(counts) == 1 else f"n={counts[0]}-{counts[-1]}"
            ax.errorbar([100 * f for f, _ in points], [s.mean for _, s in points],
                        yerr=[s.std or 0.0 for _, s in points], fmt="-o", color=colour, capsize=3,
                        label=f"{label} (ours, {ds.name}, {n})")
        else:
            ax.plot([], [], "-o", color=colour, label=f"{label} (ours: {MISSING})")
        theirs = sorted((f, row[label]) for f, row in paper.LOW_DATA.get(ds.paper or "", {}).items() if label in row)
        if theirs:
            xs, ys = zip(*theirs)
            ax.plot([100 * x for x in xs], ys, "--s", color=colour, alpha=0.7, label=f"{label} paper ({ds.paper})")
    ax.set_xlabel("fraction of training data (%)")
    ax.set_ylabel("AP50 (%), mean ± std over seeds")
    ax.set_xlim(0, 105)
    ax.grid(True, alpha=0.3)
    ax.set_title(f"{ds.name}: AP50 vs data fraction ({epochs if epochs is not None else '?'} epochs)")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return Path(path)


def read_rows(path: Path, kind: str, columns: Sequence[str], *, key: str, ids: Sequence[str] | None = None,
              min_score: float | None = None) -> pa.Table:
    """Only ``columns`` of the rows of an artefact file whose ``key`` column is in ``ids`` (all when None)
    and, with ``min_score``, whose ``score`` is at least that. The filter is applied while the file is
    read (row groups whose statistics exclude it are skipped), so memory follows the rows returned, not
    the file. Errors name the file."""
    path = Path(path)
    check_schema(read_file_schema(path, kind), kind, str(path))
    condition = None
    if ids is not None:
        condition = pc.field(key).isin(pa.array(list(ids), pa.string()))
    if min_score is not None:
        at_least = pc.field("score").cast(pa.float64()) >= pa.scalar(float(min_score), pa.float64())
        condition = at_least if condition is None else condition & at_least
    try:
        return pq.read_table(path, columns=list(columns), filters=condition)
    except (pa.ArrowInvalid, OSError) as exc:
        raise ArtefactError(f"{path}: cannot read the {kind} rows: {exc}") from None


def _by_id(ids: np.ndarray) -> dict[str, np.ndarray]:
    """Row indices of each id, in row order (one sort, not one scan per id)."""
    order = np.argsort(ids, kind="stable")
    unique, starts = np.unique(ids[order], return_index=True)
    stops = np.append(starts[1:], len(order))
    return {str(u): order[a:b] for u, a, b in zip(unique, starts, stops)}


def object_counts(dirs: Sequence[Path]) -> dict[str, int]:
    """Ground-truth objects per tile of the tiles folders ``dirs`` (only the ``tile_id`` column is read)."""
    counts: dict[str, int] = {}
    for folder in map(Path, dirs):
        ids = read_rows(folder / "objects.parquet", "objects", ["tile_id"], key="tile_id").column("tile_id")
        for item in pc.value_counts(ids).to_pylist():
            counts[item["values"]] = counts.get(item["values"], 0) + item["counts"]
    return counts


def read_tiles(dirs: Sequence[Path], tile_ids: Sequence[str] | None = None
               ) -> tuple[dict[str, Path], dict[str, dict[str, np.ndarray]]]:
    """Tile image paths and ground truth (``boxes`` ``(N, 5)`` le90 tile pixels, ``class_name``, ``difficult``)
    of the tiles folders ``dirs`` (each with ``tiles.parquet`` and ``objects.parquet``); only the objects
    of ``tile_ids`` when given (read with a filter, not the whole file)."""
    paths, objects = {}, {}
    for folder in map(Path, dirs):
        tiles = read_artefact(folder / "tiles.parquet", "tiles", columns=["tile_id", "tile_path"])
        for tile_id, rel in zip(*(tiles.column(c).to_pylist() for c in ("tile_id", "tile_path"))):
            paths[tile_id] = folder / rel  # as TileDataset: relative to the folder of tiles.parquet
        obj = read_rows(folder / "objects.parquet", "objects", ["tile_id", *_LE90, "class_name", "difficult"],
                        key="tile_id", ids=tile_ids)
        boxes = np.stack([obj.column(k).to_numpy() for k in _LE90], -1).reshape(-1, 5).astype(np.float64)
        ids = np.asarray(obj.column("tile_id").to_pylist(), dtype=object)
        names = np.asarray(obj.column("class_name").to_pylist(), object)
        difficult = obj.column("difficult").to_numpy().astype(np.int8)
        for tile_id, mine in _by_id(ids).items():
            objects[tile_id] = {"boxes": boxes[mine], "class_name": names[mine], "difficult": difficult[mine]}
    return paths, objects


def pick_tiles(objects: Mapping[str, Mapping[str, np.ndarray] | int], count: int) -> list[str]:
    """The ``count`` tiles with the most ground-truth objects (ties: tile id), deterministic. ``objects``
    maps a tile to its objects (a dict with ``boxes``) or to their number."""
    def size(v) -> int:
        return int(v) if isinstance(v, (int, np.integer)) else len(v["boxes"])

    return sorted(objects, key=lambda t: (-size(objects[t]), t))[:count]


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
        cv2.rectangle(lines[-1], (x, 6), (x + 14, height - 6), class_colour(name, classes), -1)
        cv2.putText(lines[-1], name, (x + 18, height - 7), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
        x += text_width
    return np.concatenate(lines, axis=0)


def _tile_detections(path: Path, tile_ids: Sequence[str], score_threshold: float) -> dict[str, dict]:
    """Detections of ``path`` (frame ``tile``) on each of ``tile_ids`` scoring at least ``score_threshold``:
    only those rows and the drawn columns are read."""
    dets = read_rows(path, "detections", ["id", "score", "class_name", *_LE90], key="id", ids=tile_ids,
                     min_score=score_threshold)
    ids = np.asarray(dets.column("id").to_pylist(), object)
    names = np.asarray(dets.column("class_name").to_pylist(), object)
    boxes = np.stack([dets.column(k).to_numpy() for k in _LE90], -1).reshape(-1, 5).astype(np.float64)
    rows = _by_id(ids)
    empty = np.zeros(0, np.int64)
    return {t: {"boxes": boxes[rows.get(t, empty)], "class_name": names[rows.get(t, empty)]} for t in tile_ids}


def detection_grid(ds: DatasetRuns, methods: Mapping[str, str], tiles_dirs: Sequence[Path], path: Path, *,
                   num_tiles: int, score_threshold: float, cell_size: int = 256) -> dict[str, str]:
    """Grid of test tiles (rows: the ``num_tiles`` tiles of ``tiles_dirs`` with the most objects) x ground
    truth and each method of ``methods`` (our init -> label) at fraction 1.0 and the longest schedule
    (columns). Writes the PNG ``path``.

    A method's detections are those of the lowest seed of its cell whose :attr:`RunResult.detections`
    file exists (frame ``tile``, le90 tile pixels), kept from ``score_threshold`` up; the column is
    labelled with that seed when the cell has several. Returns init -> reason for each method left out.
    """
    counts = object_counts(tiles_dirs)
    image_paths, _ = read_tiles(tiles_dirs, tile_ids=[])
    tile_ids = pick_tiles({t: n for t, n in counts.items() if t in image_paths}, num_tiles)
    _, objects = read_tiles(tiles_dirs, tile_ids=tile_ids)
    columns: list[tuple[str, dict[str, dict]]] = [("ground truth", {t: objects[t] for t in tile_ids})]
    skipped = {}
    for init, label in methods.items():
        cell = ds.cell(init, 1.0, ds.schedule)
        with_file = [c for c in cell if c.detections is not None and Path(c.detections).is_file()]
        r = (with_file or cell or [None])[0]
        if len(cell) > 1 and r.seed is not None:
            label = f"{label} (seed {r.seed})"
        if r is None:
            skipped[init] = f"no run at fraction 1.0, {ds.schedule} epochs"
        elif r.detections is None or not Path(r.detections).is_file():
            skipped[init] = f"no detections file {r.detections}"
        elif read_metadata(r.detections).get("frame", "tile") != "tile":
            skipped[init] = f"{r.detections} is not in the tile frame"
        else:
            columns.append((label, _tile_detections(Path(r.detections), tile_ids, score_threshold)))

    seen = [str(n) for _, per_tile in columns for e in per_tile.values() for n in e["class_name"]]
    classes = list(dict.fromkeys([*ds.classes, *sorted(set(seen))]))  # one colour per class, in every column
    width = cell_size * len(columns)
    grid_rows = [np.concatenate([_label(name, cell_size) for name, _ in columns], axis=1)]
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
        for _, per_tile in columns:
            entry = per_tile[t]
            difficult = entry.get("difficult")
            cells.append(draw_boxes(canvas, entry["boxes"], entry["class_name"], classes, captions=False,
                                    scale=scale, thin=None if difficult is None else difficult > 0))
        grid_rows.append(_label(t, width))
        grid_rows.append(np.concatenate(cells, axis=1))
    grid_rows.append(_label(f"score >= {score_threshold}; thin ground-truth boxes: difficult", width))
    grid_rows.append(_legend(classes, width))
    ok, png = cv2.imencode(".png", np.concatenate(grid_rows, axis=0))
    if not ok:
        raise RuntimeError(f"could not encode {path}")
    write_bytes(path, png.tobytes())
    return skipped
