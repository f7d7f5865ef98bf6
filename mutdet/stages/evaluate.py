"""Stage ``evaluate``: rotated VOC AP of full-image detections against a labelled split.

Inputs: the split's ground truth (every image of the split, read through :mod:`mutdet.io.datasets`)
and either a ``detections`` artefact (frame ``image``: ``id`` is the image id, le90 boxes in
full-image pixels) or a folder of DOTA Task1 files. Outputs in ``out_dir``:

* ``metrics.json``: per class and mean AP at each IoU threshold (``AP50``, ``AP75`` kept separate),
  ground-truth and detection counts, the settings (``protocol``, and ``difficulty_threshold`` for
  ``mmrotate``, among them), the inputs, skipped objects and images (with file, line and reason),
  ``polygons`` (labels and detection polygons that are not simple or have area 0, labels dropped by
  mmrotate as thinner than 2 px, and labels the reader skipped as self-intersecting or degenerate), the
  mutdet version and the code version (with the git commit);
* ``pr_curve.png``: precision-recall curves at the first threshold.

The protocol (:mod:`mutdet.evaluation.rotated_ap`: ``dota_devkit`` or ``mmrotate``) is the dataset's
``evaluation.protocol`` unless ``run`` is given one.

The ground truth is what tiling accepted: each image goes through
:func:`mutdet.io.datasets.load_image` (image present and complete, label file parsed, objects
entirely outside the image handled by ``on_bad_object``), without decoding JPEG and PNG pixels. Under
``on_bad_object: skip`` a skipped image is left out of the evaluation with its detections (counted in
``detections_on_skipped_images``), where the devkit would count its objects as misses.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

import mutdet
from mutdet.config import Config, DatasetConfig
from mutdet.evaluation import ap_key, evaluate_detections
from mutdet.evaluation.rotated_ap import PROTOCOLS
from mutdet.evaluation.plots import plot_pr_curves
from mutdet.io.annotations import AnnotationError, ClassMap
from mutdet.io.atomic import write_json
from mutdet.io.datasets import list_image_ids, load_image
from mutdet.io.task1 import read_task1
from mutdet.stages.common import code_version, log

if TYPE_CHECKING:
    import pyarrow as pa

# pyarrow (and the artefact readers) are imported where Parquet detections are read: evaluating Task1
# files does not need them, and the import is a noticeable part of a whole evaluation's time.

__all__ = ["format_table", "load_ground_truth", "run"]


def load_ground_truth(ds: DatasetConfig, split: str, on_bad_object: str) -> tuple[dict, list[dict]]:
    """Ground truth of ``split``, accepted by the rule tiling applies (module docstring).

    Returns:
        image id -> :class:`~mutdet.io.annotations.ImageAnnotations` for every accepted image, and the
        skipped images (``on_bad_object="skip"``) as ``{"image_id", "reason"}``.
    """
    split_cfg = ds.split(split)
    if not split_cfg.labels.is_dir():
        raise FileNotFoundError(f"datasets.{ds.name}.splits.{split}: label folder {split_cfg.labels} "
                                "not found; an unlabelled split cannot be evaluated (write Task1 files instead)")
    class_map = ClassMap(ds.classes, ds.class_aliases)
    gt, skipped_images = {}, []
    for image_id in list_image_ids(split_cfg.images, split_cfg.list, ds.image_extensions):
        try:
            loaded = load_image(ds.format, split_cfg.images, split_cfg.labels, image_id,
                                ds.image_extensions, class_map, on_bad_object, decode=False)
        except (AnnotationError, FileNotFoundError) as exc:
            if on_bad_object == "error":
                raise
            skipped_images.append({"image_id": image_id, "reason": str(exc)})
            continue
        gt[image_id] = loaded.annotations
    return gt, skipped_images


# Columns of a detections artefact that must be finite, and those that must also not be negative.
_FINITE_COLUMNS = ("score", "cx", "cy", "w", "h", "theta")
_NON_NEGATIVE_COLUMNS = ("w", "h")


def _check_detection_values(table: pa.Table, path: Path) -> None:
    """Raise naming the file, row, column and value at the first NaN, infinity or negative side."""
    from mutdet.io.artefacts import ArtefactError

    for name in _FINITE_COLUMNS:
        values = table.column(name).to_numpy(zero_copy_only=False).astype(np.float64)
        bad = ~np.isfinite(values)
        if name in _NON_NEGATIVE_COLUMNS:
            bad |= values < 0
        if bad.any():
            row = int(np.argmax(bad))
            rule = "finite and not negative" if name in _NON_NEGATIVE_COLUMNS else "finite"
            raise ArtefactError(f"{path}: row {row}: {name} is {values[row]} (must be {rule})")


def _task1_by_class(folder: Path, classes: Sequence[str]) -> dict:
    """Task1 files -> the per-class input of :func:`evaluate_detections` (polygons, image pixels)."""
    cols = read_task1(folder, classes)
    # read_task1 returns the classes in the order of ``classes``, each class's lines together: cut the
    # columns where the class name changes.
    names = cols["class_names"]
    counts = np.zeros(len(classes), dtype=np.int64)
    if len(names):
        change = np.flatnonzero(names[1:] != names[:-1]) + 1
        index = {c: k for k, c in enumerate(classes)}
        for a, b in zip(np.r_[0, change], np.r_[change, len(names)]):
            counts[index[names[a]]] = b - a
    bounds = np.r_[0, np.cumsum(counts)]
    return {c: {key: cols[key][bounds[k]:bounds[k + 1]] for key in ("image_ids", "scores", "polygons")}
            for k, c in enumerate(classes)}


def _skipped_polygon_counts(skipped: list[dict]) -> dict:
    """Labels the reader skipped (``on_bad_object: skip``) as self-intersecting or degenerate."""
    reasons = [s["reason"] for s in skipped]
    return {"gt_skipped_self_intersecting": sum(r.startswith("self-intersecting") for r in reasons),
            "gt_skipped_degenerate": sum(r.startswith("degenerate") for r in reasons)}


def format_table(metrics: dict) -> str:
    """A plain-text table of per-class AP (percent) and counts, then the mean."""
    keys = [ap_key(t) for t in metrics["settings"]["iou_thresholds"]]
    width = max(len("mean"), *(len(c) for c in metrics["classes"]))
    head = f"{'class':<{width}}  " + "  ".join(f"{k:>6}" for k in keys) + f"  {'gt':>7}  {'dets':>8}"

    def row(name: str, entry: dict, num_gt: int) -> str:
        aps = "  ".join(f"{'n/a':>6}" if entry[k] is None else f"{100 * entry[k]:6.2f}" for k in keys)
        return f"{name:<{width}}  {aps}  {num_gt:>7}  {entry['num_detections']:>8}"

    lines = [head, "-" * len(head)]
    lines += [row(name, e, e["num_gt"]) for name, e in metrics["classes"].items()]
    lines += ["-" * len(head), row("mean", metrics["mean"], metrics["mean"]["num_gt"])]
    return "\n".join(lines)


def run(cfg: Config, *, dataset: str, split: str, out_dir: Path, detections: Path | None = None,
        task1_dir: Path | None = None, iou_thresholds: Sequence[float] = (0.5, 0.75),
        use_07_metric: bool = True, protocol: str | None = None) -> dict:
    """Evaluate one detection set on one split; write ``metrics.json`` and ``pr_curve.png`` to ``out_dir``.

    The ground truth is read as the tile stage reads it (``on_bad_object`` included), so an image or
    object that tiling skipped is skipped here too, and listed. Self-intersecting and degenerate label
    quadrilaterals are such bad objects (an error, or skipped under ``on_bad_object: skip``); the
    devkit would score them with its signed-area formula, which
    :func:`~mutdet.evaluation.evaluate_detections` also implements.

    Args:
        dataset, split: the labelled split to evaluate on (every image of it counts, with or without
            detections).
        out_dir: output folder.
        detections: a ``detections`` Parquet artefact in the full-image frame; or
        task1_dir: a folder with ``Task1_<class>.txt`` for every class of the dataset (exactly one of
            the two).
        iou_thresholds: IoU thresholds (``dota_devkit``: a match needs IoU > threshold; ``mmrotate``: >=).
        use_07_metric: VOC07 11-point AP (both references' default) if true, else all-points AP.
        protocol: ``"dota_devkit"`` or ``"mmrotate"``; ``None``: the dataset's ``evaluation.protocol``
            (``mmrotate`` takes the dataset's ``evaluation.difficulty_threshold``).
    Returns:
        The dict written to ``metrics.json``.
    """
    if (detections is None) == (task1_dir is None):
        raise ValueError("evaluate: give exactly one of detections (Parquet) or task1_dir (Task1 files)")
    out_dir = Path(out_dir)
    ds = cfg.dataset(dataset)
    protocol = ds.evaluation.protocol if protocol is None else protocol
    if protocol not in PROTOCOLS:
        raise ValueError(f"evaluate: protocol must be one of {PROTOCOLS}, got {protocol!r}")
    gt, skipped_images = load_ground_truth(ds, split, cfg.on_bad_object)
    skipped = [s.to_dict() for ann in gt.values() for s in ann.skipped]
    skipped_ids = {s["image_id"] for s in skipped_images}
    if detections is not None:
        import pyarrow as pa
        import pyarrow.compute as pc

        from mutdet.io.artefacts import ArtefactError, read_artefact, read_metadata

        dets = read_artefact(detections, "detections")
        frame = read_metadata(detections).get("frame")
        if frame is not None and frame != "image":
            raise ArtefactError(f"{detections}: detections are in the {frame!r} frame; evaluation needs full-image "
                                "detections (frame 'image', merged across tiles)")
        _check_detection_values(dets, detections)
        unknown = sorted(set(dets.column("id").to_pylist()) - set(gt) - skipped_ids)
        if unknown:
            raise ArtefactError(f"{detections}: detections on {len(unknown)} image ids that are not in split "
                                f"{split!r} of {ds.name}: {unknown[:5]}")
        on_skipped = pc.is_in(dets.column("id"), value_set=pa.array(sorted(skipped_ids), pa.string()))
        num_on_skipped = pc.sum(on_skipped).as_py() or 0
        dets = dets.filter(pc.invert(on_skipped))
        source = {"detections": str(detections)}
    else:
        dets = _task1_by_class(Path(task1_dir), ds.classes)
        unknown = sorted({i for d in dets.values() for i in d["image_ids"]} - set(gt) - skipped_ids)
        if unknown:
            raise ValueError(f"{task1_dir}: Task1 lines on {len(unknown)} image ids that are not in split "
                             f"{split!r} of {ds.name}: {unknown[:5]}")
        num_on_skipped = 0
        for name, d in dets.items() if skipped_ids else ():
            keep = ~np.isin(d["image_ids"], list(skipped_ids))
            num_on_skipped += int((~keep).sum())
            dets[name] = {key: value[keep] for key, value in d.items()}
        source = {"task1_dir": str(task1_dir)}

    result = evaluate_detections(gt, dets, ds.classes, iou_thresholds=iou_thresholds, use_07_metric=use_07_metric,
                                 protocol=protocol, difficulty_threshold=ds.evaluation.difficulty_threshold)
    polygons = {**result["polygons"], **_skipped_polygon_counts(skipped)}
    metrics = {
        "dataset": ds.name,
        "split": split,
        **source,
        "num_images": len(gt),
        "settings": result["settings"],
        "classes": result["classes"],
        "mean": result["mean"],
        "skipped_objects": skipped,
        "skipped_images": skipped_images,
        "detections_on_skipped_images": num_on_skipped,
        "polygons": polygons,
        "mutdet_version": mutdet.__version__,
        "code_version": code_version(),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "metrics.json", metrics)
    plot_pr_curves(result, out_dir / "pr_curve.png", key=ap_key(result["settings"]["iou_thresholds"][0]),
                   title=f"{ds.name} {split}")
    log.info("evaluation of %s on %s/%s (%d images, protocol %s, %s AP, %s)\n%s", next(iter(source.values())),
             ds.name, split, len(gt), protocol, result["settings"]["ap"], result["settings"]["iou_rule"],
             format_table(metrics))
    if skipped or skipped_images:
        log.warning("%d bad object(s) and %d image(s) skipped (on_bad_object: skip), %d detection(s) on skipped "
                    "images left out; listed in %s", len(skipped), len(skipped_images), num_on_skipped,
                    out_dir / "metrics.json")
    return metrics

