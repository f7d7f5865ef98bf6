"""Stage ``tables``: the paper's tables and figures regenerated from fine-tuning metrics, ours beside the paper's.

Inputs: one :class:`RunFiles` per job of the fine-tuning sweep, i.e. per seed of each (init, fraction,
epochs) cell (its settings, its ``metrics.json`` from
:mod:`mutdet.stages.evaluate` and its tile-frame ``detections_tiles.parquet``); a ``metrics.json`` that
does not exist yet is a run without results: its cells show ``n/a``. The test tiles folders of each
fine-tuned dataset feed the detection grid. Settings come from the config's ``tables`` section; the
rendering is :mod:`mutdet.report`.

Every cell of ours aggregates the seeds of its cell, ``mean ± std (n=k)`` (sample std, ddof=1;
``mean (n=1)`` for one seed), and is marked ``≈`` when its difference to the cell it is compared with lies
within the seed spread (the rule: :mod:`mutdet.report.tables`, and each table's notes).

Outputs in ``out_dir``, per dataset ``<d>`` of the runs (and of ``tables.compare``):

* ``main_<d>.{md,csv,tex}``: one row per method at data fraction 1.0 and the longest schedule: per-class
  AP50, then AP50 and AP75 each followed by the paper's number (Tables 2/3); the paper's other
  methods (UP-DETR, AlignDet) as rows marked "paper only" (our cells empty);
* ``low_data_<d>.{md,csv,tex}``: rows = data fractions (ours and the paper's), columns = methods, ours
  beside the paper's AP50, at the main table's schedule;
* ``ablation_<d>.{md,csv,tex}``: rows = the pre-training ladder of ``tables.ablation`` (each row labelled by
  the flags it changes from the row above), columns = our fine-tuning schedules at data fraction 1.0,
  ours beside the paper's AP50 for the rows that pre-trained exactly as a row of the paper's ablation
  (our epochs mapped to the paper's by ``paper_epochs``);
* ``runs_<d>.csv``: one row per job (seed): init, fraction, epochs, seed, AP50, AP75 and per-class AP50
  in percent, unrounded, empty where the job has no metrics yet: the per-seed values behind the cells;
* ``ap50_vs_fraction_<d>.png``: our AP50 (mean, ±std error bars, n in the legend) against the data
  fraction per method, the paper's points dashed;
* ``detections_<d>.png`` (datasets in ``test_tiles``): rotated boxes on the test tiles with the most
  ground-truth objects, one column for the ground truth and one per method;
* ``index.md``: every table and figure with a one-line caption, and the notes.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from mutdet import paper
from mutdet.config import Config
from mutdet.io.atomic import write_text
from mutdet.layout import FinetuneJob
from mutdet.report.figures import detection_grid, plot_ap50_vs_fraction
from mutdet.report.tables import (MISSING, NO_PAPER, WITHIN_SPREAD, DatasetRuns, RunResult, ablation_table,
                                  low_data_table, main_table, read_metrics, runs_table, write_table)
from mutdet.stages.common import log

__all__ = ["RunFiles", "run"]


@dataclass(frozen=True)
class RunFiles:
    """One job of the fine-tuning sweep and its files."""

    job: FinetuneJob  # dataset, train_split, split, init, fraction (float), epochs (int), seed (int)
    metrics: Path  # its metrics.json (may not exist yet: cells show n/a)
    detections: Path  # its detections_tiles.parquet (tile frame), for the grid


@dataclass(frozen=True)
class _Settings:
    """The ``tables`` section of the config as the report functions take it."""

    methods: dict[str, str]  # our init -> the paper's label, in row order
    ablation: list[tuple[str, dict | None]]  # (init, its variant flags; None: not a configured variant)
    compare: dict[str, str]
    paper_epochs: dict[int, int]
    num_tiles: int
    score_threshold: float  # as written in the config (the index quotes it)


def _settings(cfg: Config) -> _Settings:
    """The ``tables`` section, checked; methods in the paper's row order first (others after, in config order).

    Raises:
        ValueError naming the key for an unknown paper dataset.
    """
    t = cfg.raw["tables"]
    order = {label: k for k, label in enumerate(paper.MAIN_METHODS)}
    methods = dict(sorted(t["methods"].items(), key=lambda item: order.get(item[1], len(order))))
    variants = cfg.pretrain.variants
    ablation = [(init, {k: v for k, v in asdict(variants[init]).items() if k != "name"} if init in variants else None)
                for init in t["ablation"]]
    for ours, theirs in t["compare"].items():
        if theirs not in paper.DATASETS:
            raise ValueError(f"tables.compare.{ours}: unknown paper dataset {theirs!r} (one of {list(paper.DATASETS)})")
    return _Settings(methods=methods, ablation=ablation, compare=dict(t["compare"]),
                     paper_epochs={int(k): int(v) for k, v in t["paper_epochs"].items()},
                     num_tiles=t["num_tiles"], score_threshold=t["score_threshold"])


def _load(runs: Sequence[RunFiles]) -> dict[str, tuple[str, list[RunResult]]]:
    """Dataset -> (test split, its runs with the metrics that exist), in the order of ``runs``.

    Raises:
        ValueError naming the files for two files of the same run or one dataset evaluated on two splits,
        and naming the file for an unreadable ``metrics.json`` or one of another dataset or split.
    """
    seen, datasets = {}, {}
    for f in runs:
        j = f.job
        key = (j.dataset, j.init, j.fraction, j.epochs, j.seed)
        if key in seen:
            raise ValueError(f"{f.metrics}: same run (init, fraction, epochs, seed, dataset) as {seen[key]}")
        seen[key] = f.metrics
        split, results = datasets.setdefault(j.dataset, (j.split, []))
        if split != j.split:
            raise ValueError(f"{f.metrics}: dataset {j.dataset} evaluated on split {j.split!r} and {split!r}; "
                             "give the metrics of one split per dataset")
        metrics = read_metrics(f.metrics, dataset=j.dataset, split=j.split) if Path(f.metrics).is_file() else None
        results.append(RunResult(j.init, float(j.fraction), int(j.epochs), metrics, Path(f.detections), int(j.seed)))
    return datasets


def run(cfg: Config, *, runs: Sequence[RunFiles], test_tiles: Mapping[str, Sequence[Path]], out_dir: Path) -> dict:
    """Write the paper's tables and figures for our fine-tuning runs, with the paper's numbers beside ours.

    Args:
        cfg: the config (its ``tables`` section; each dataset's classes order the per-class columns).
        runs: every job of the sweep (one per seed of a cell) with its files; see :class:`RunFiles`.
        test_tiles: fine-tuned dataset -> tiles folders of its test split (the detection grid).
        out_dir: output folder.
    Returns:
        ``{"tables": {name: {"md", "csv", "tex": Path}}, "runs": {dataset: runs_<d>.csv Path},
        "figures": {name: Path}, "index": Path, "missing_metrics": [str, ...],
        "skipped": {figure name: {init: reason}}}``.
    Raises:
        ValueError naming the file or key for an unreadable metrics file, two files of one run or an
        unknown paper dataset.
    """
    out_dir = Path(out_dir)
    s = _settings(cfg)
    by_dataset = _load(runs)
    missing = [str(f.metrics) for f in runs if not Path(f.metrics).is_file()]
    log.info("tables: %d fine-tuning runs, %d without metrics yet", len(runs), len(missing))
    result: dict = {"tables": {}, "runs": {}, "figures": {}, "missing_metrics": missing, "skipped": {}}
    index = ["# Tables and figures", "",
             f"Ours beside the paper's ({paper.DETECTOR}); `{MISSING}`: no result of ours, `{NO_PAPER}`: "
             "no number in the paper, empty: a paper-only row. AP in percent. Each cell of ours is the mean ± "
             "sample standard deviation over its fine-tuning seeds with their number n (`mean (n=1)` for one "
             f"seed); `{WITHIN_SPREAD}` marks a cell whose difference to the cell it is compared with is within "
             "the seed spread (each table's notes give the rule).", ""]
    for name in dict.fromkeys([*by_dataset, *s.compare]):
        split, mine = by_dataset.get(name, (None, []))
        ds = DatasetRuns(name, mine, s.compare.get(name, name if name in paper.DATASETS else None),
                         list(cfg.dataset(name).classes), split, cfg.dataset(name).evaluation.protocol)
        index += [f"## {name}" + (f" (compared with the paper's {ds.paper})" if ds.paper else ""), ""]
        for table in (main_table(ds, s.methods), low_data_table(ds, s.methods),
                      ablation_table(ds, s.ablation, s.paper_epochs)):
            result["tables"][table.name] = write_table(table, out_dir)
            index.append(f"- [{table.name}.md]({table.name}.md) ([csv]({table.name}.csv), "
                         f"[tex]({table.name}.tex)): {table.caption}")
            log.info("tables: wrote %s", out_dir / f"{table.name}.md")
        per_run = runs_table(ds)
        result["runs"][name] = out_dir / f"{per_run.name}.csv"
        write_text(result["runs"][name], per_run.csv())
        index.append(f"- [{per_run.name}.csv]({per_run.name}.csv): every fine-tuning run, one row per seed "
                     "(AP in percent, unrounded; empty: no metrics yet): the values the cells aggregate")
        fig = f"ap50_vs_fraction_{name}"
        result["figures"][fig] = plot_ap50_vs_fraction(ds, s.methods, out_dir / f"{fig}.png")
        index.append(f"- [{fig}.png]({fig}.png): AP50 (mean ± std over seeds, n in the legend) against the data "
                     "fraction per method"
                     + (f", the paper's {ds.paper} points dashed." if ds.paper in paper.LOW_DATA else "."))
        if name in test_tiles:
            fig = f"detections_{name}"
            skipped = detection_grid(ds, s.methods, [Path(d) for d in test_tiles[name]], out_dir / f"{fig}.png",
                                     num_tiles=s.num_tiles, score_threshold=s.score_threshold)
            for init, why in skipped.items():
                log.warning("detections grid %s: %s left out: %s", name, init, why)
            result["figures"][fig] = out_dir / f"{fig}.png"
            result["skipped"][fig] = skipped
            index.append(f"- [{fig}.png]({fig}.png): rotated boxes on the {s.num_tiles} test tiles with the most "
                         f"objects: ground truth, then each method (score >= {s.score_threshold})"
                         + (f"; left out: {', '.join(f'{k} ({v})' for k, v in skipped.items())}." if skipped else "."))
        index.append("")
    if missing:
        index += ["## Runs without metrics yet", ""] + [f"- `{p}`" for p in missing] + [""]
    result["index"] = out_dir / "index.md"
    write_text(result["index"], "\n".join(index))
    log.info("tables: wrote %d tables and %d figures to %s", len(result["tables"]), len(result["figures"]), out_dir)
    return result
