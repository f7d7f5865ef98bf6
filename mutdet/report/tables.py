"""The paper's tables from our fine-tuning results, ours beside the paper's, as Markdown / CSV / LaTeX.

``metrics.json`` (written by :mod:`mutdet.stages.evaluate`) stores AP as a fraction in ``[0, 1]``;
tables show percent with one decimal. The paper's numbers come from :mod:`mutdet.paper`.

Seeds: every (init, fraction, epochs) cell of the sweep may have been fine-tuned with several seeds
(``finetune.runs[].seeds``, one :class:`RunResult` each). A cell of ours aggregates them
(:class:`Spread`, :func:`format_spread`): ``mean ± std (n=k)`` with the sample standard deviation
(``ddof=1``) over the ``k`` seeds that have a value; with ``k = 1`` the mean alone, ``mean (n=1)``; when
some seeds of the cell have no value yet, ``(n=k of m)``. Per-seed values stay in each job's
``metrics.json`` and in :func:`runs_table` (one row per job).

Within-spread marker :data:`WITHIN_SPREAD` (``≈``), appended to a cell of ours: the cell's difference
to the cell it is compared with lies within the seed spread, by this rule (:meth:`Spread.within`):

    ``|mean_a - mean_b| <= max(std of those of the two cells with n >= 2)``

so it needs both cells to have a value and at least one of them n >= 2 (two single runs are never
marked: they have no spread). The compared cell is the one in the row above (main table: the method
above; ablation table: the rung above, same schedule) or, in the low-data table, whose methods are
columns, the previous method's cell at the same fraction.

Cell markers: :data:`MISSING` (``n/a``) where we have no number (run not done, method not run, AP
undefined), :data:`NO_PAPER` (``—``) where the paper reports none. The LaTeX tables are booktabs
tables (``\\usepackage{booktabs}``); ``±`` and ``≈`` become ``$\\pm$`` and ``$\\approx$`` there.
"""
from __future__ import annotations

import csv
import io
import json
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mutdet import paper
from mutdet.io.atomic import write_text

__all__ = ["MISSING", "NO_PAPER", "WITHIN_SPREAD", "DatasetRuns", "RunResult", "Spread", "Table", "ablation_table",
           "format_spread", "latex_escape", "low_data_table", "main_table", "read_metrics", "runs_table", "spread",
           "write_table"]

MISSING = "n/a"
NO_PAPER = "—"
WITHIN_SPREAD = "≈"


# ----------------------------------------------------------------------------------------------- runs


def read_metrics(path: Path, *, dataset: str, split: str) -> dict:
    """``metrics.json`` at ``path`` of a run on ``split`` of ``dataset``; AP values must be fractions in [0, 1].

    Raises:
        ValueError naming ``path`` for invalid JSON, a missing ``classes`` / ``mean``, a dataset or split
        other than the run's (where the file records them), or an AP outside [0, 1].
    """
    try:
        metrics = json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(metrics, dict):
        raise ValueError(f"{path}: not an evaluation metrics file (a JSON object)")
    for key in ("classes", "mean"):
        if not isinstance(metrics.get(key), dict):
            raise ValueError(f"{path}: missing key {key!r} of an evaluation metrics file")
    for key, ours in (("dataset", dataset), ("split", split)):
        if metrics.get(key, ours) != ours:
            raise ValueError(f"{path}: {key} {metrics[key]!r} in the file, {ours!r} in the run it is given for")
    for name, entry in [("mean", metrics["mean"]), *metrics["classes"].items()]:
        for k, v in entry.items():
            if k.startswith("AP") and v is not None and not 0.0 <= float(v) <= 1.0:
                raise ValueError(f"{path}: {name} {k} = {v}; metrics.json stores AP as a fraction in [0, 1]")
    return metrics


@dataclass(frozen=True)
class RunResult:
    """One fine-tuning run (one seed of a cell): its settings, its metrics (None: not done yet), its
    tile-frame detections and its training seed (None: not known, e.g. runs given by hand)."""

    init: str
    fraction: float
    epochs: int
    metrics: Mapping | None = None
    detections: Path | None = None
    seed: int | None = None

    def ap(self, key: str, class_name: str | None = None) -> float | None:
        """Mean (or per-class) AP ``key`` (``"AP50"``, ``"AP75"``) in percent; None if unknown."""
        if self.metrics is None:
            return None
        entry = self.metrics["mean"] if class_name is None else self.metrics["classes"].get(class_name)
        value = None if entry is None else entry.get(key)
        return None if value is None else 100.0 * float(value)


@dataclass(frozen=True)
class Spread:
    """One AP (percent) of one cell over its seeds.

    ``values`` and ``seeds``: the seeds that have a value, in seed order; ``runs``: the seeds of the cell in
    the sweep, with or without a value (``runs - n`` are not done yet or have the AP undefined).
    """

    values: tuple[float, ...]
    seeds: tuple[int | None, ...]
    runs: int

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.values) if self.values else None

    @property
    def std(self) -> float | None:
        """Sample standard deviation (``ddof=1``); None below two values."""
        return statistics.stdev(self.values) if self.n >= 2 else None

    def within(self, other: Spread | None) -> bool:
        """Whether the difference of means to ``other`` lies within the seed spread:
        ``|mean - other.mean| <= max(std of the two with n >= 2)``; False when either has no value or
        neither has two values (no spread to compare with)."""
        if other is None or not self.n or not other.n:
            return False
        stds = [s.std for s in (self, other) if s.std is not None]
        return bool(stds) and abs(self.mean - other.mean) <= max(stds)


def spread(runs: Sequence[RunResult], key: str, class_name: str | None = None) -> Spread | None:
    """AP ``key`` (per class: ``class_name``) over ``runs``, the seeds of one cell; None without runs
    (the cell is not part of the sweep). Seeds without metrics or with the AP undefined (None, NaN)
    count in :attr:`Spread.runs` only."""
    if not runs:
        return None
    have = [(r.seed, r.ap(key, class_name)) for r in sorted(runs, key=_seed_order)]
    have = [(seed, v) for seed, v in have if v is not None and not math.isnan(v)]
    return Spread(tuple(v for _, v in have), tuple(seed for seed, _ in have), len(runs))


def _seed_order(r: RunResult) -> tuple:
    return (r.seed is None, r.seed if r.seed is not None else 0)


def format_spread(s: Spread | None, marked: bool = False) -> str:
    """A cell of ours: ``mean ± std (n=k)``, ``mean (n=1)``, ``... (n=k of m)`` when ``m - k`` seeds of the
    cell have no value, :data:`MISSING` without any value; ``marked`` appends :data:`WITHIN_SPREAD`."""
    if s is None or not s.n:
        return MISSING
    of = f" of {s.runs}" if s.runs > s.n else ""
    text = f"{s.mean:.1f} (n=1{of})" if s.n == 1 else f"{s.mean:.1f} ± {s.std:.1f} (n={s.n}{of})"
    return f"{text} {WITHIN_SPREAD}" if marked else text


@dataclass
class DatasetRuns:
    """The runs of one of our datasets and how it maps onto the paper."""

    name: str
    runs: list[RunResult]
    paper: str | None  # paper dataset compared with, None: no comparison
    classes: list[str]  # per-class columns, in order
    split: str | None = None  # the split evaluated on (captions)
    protocol: str | None = None  # the evaluation protocol of its metrics (captions)

    def cell(self, init: str, fraction: float, epochs: int | None) -> list[RunResult]:
        """The runs (one per seed, in seed order) of one cell of the sweep; empty if it was not run."""
        return sorted((r for r in self.runs
                       if r.init == init and abs(r.fraction - fraction) < 1e-9 and r.epochs == epochs),
                      key=_seed_order)

    def find(self, init: str, fraction: float, epochs: int | None) -> RunResult | None:
        """The run of the cell's lowest seed, None if the cell was not run."""
        runs = self.cell(init, fraction, epochs)
        return runs[0] if runs else None

    @property
    def schedule(self) -> int | None:
        """The longest schedule at fraction 1.0 (of any fraction if none), None without runs."""
        full = [r.epochs for r in self.runs if abs(r.fraction - 1.0) < 1e-9] or [r.epochs for r in self.runs]
        return max(full, default=None)

    def paper_header(self) -> str:
        return f"paper ({self.paper})"

    def scored(self) -> str:
        """The caption's words on how AP was computed."""
        return f" Scored with the {self.protocol} protocol." if self.protocol else ""


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
          "}": "\\}", "~": "\\textasciitilde{}", "^": "\\textasciicircum{}", NO_PAPER: "---", "±": "$\\pm$",
          WITHIN_SPREAD: "$\\approx$", "≤": "$\\leq$", "≥": "$\\geq$"}


def latex_escape(text: str) -> str:
    """Escape LaTeX specials (``_``, ``%``, ``&``, ...); the no-number dash becomes ``---``, ``±`` and
    ``≈`` (and ``≤``, ``≥``) math symbols."""
    return "".join(_LATEX.get(ch, ch) for ch in text)


def write_table(table: Table, out_dir: Path) -> dict[str, Path]:
    """Write ``<name>.md``, ``<name>.csv`` and ``<name>.tex`` to ``out_dir``; returns extension -> path."""
    paths = {}
    for ext, text in (("md", table.markdown()), ("csv", table.csv()), ("tex", table.latex())):
        paths[ext] = Path(out_dir) / f"{table.name}.{ext}"
        write_text(paths[ext], text)
    return paths


# The captions' words on seeds; the notes under each table give the rule in full (_seed_notes).
_SEEDS_CAPTION = (f" Ours: mean ± std over seeds (n); {WITHIN_SPREAD}: within the seed spread of {{compared}} "
                  "(see the notes).")


def _ours(runs: Sequence[RunResult], key: str, class_name: str | None = None,
          above: Sequence[RunResult] | None = None) -> str:
    """Our cell of ``runs`` (the seeds of one cell), marked when within the spread of the cell ``above``."""
    mine = spread(runs, key, class_name)
    return format_spread(mine, mine is not None and mine.within(spread(above or [], key, class_name)))


def _seed_notes(ds: DatasetRuns, compared: str) -> list[str]:
    """The footnote on seeds: how cells aggregate them and the within-spread rule (``compared``: which
    cell a cell is compared with)."""
    seeds = sorted({r.seed for r in ds.runs if r.seed is not None})
    used = f" (seeds in the sweep: {', '.join(map(str, seeds))})" if seeds else ""
    return [f"Our cells: mean ± sample standard deviation (ddof=1) over fine-tuning seeds{used}; (n=k): the k "
            "seeds with a result, (n=k of m): m seeds in the sweep, the others without a result (not done yet, or "
            "the AP undefined); n=1: the one run's value, no spread.",
            f"{WITHIN_SPREAD}: the difference of means to {compared} lies within the seed spread: "
            "|difference of means| ≤ the larger standard deviation of the two cells (of those with n ≥ 2); "
            "two cells with n=1 each are never marked."]


def _theirs(value: float | None) -> str:
    return NO_PAPER if value is None else f"{value:.1f}"


def _percent(fraction: float) -> str:
    return f"{100 * fraction:g} %"


def _missing_notes(ds: DatasetRuns, runs: list[RunResult], what: str) -> list[str]:
    if not ds.runs:
        return [f"No fine-tuning metrics for {ds.name} yet: every cell of ours is {MISSING}."]
    if not any(r.metrics is not None for r in runs):
        return [f"No run of {what} has metrics yet: every cell of ours is {MISSING}."]
    return []


def main_table(ds: DatasetRuns, methods: Mapping[str, str]) -> Table:
    """Tables 2/3: per-class AP50, then AP50 and AP75 with the paper's numbers, one row per method
    (``methods``: our init -> the paper's label, in row order) at fraction 1.0 and the longest schedule;
    the paper's other methods as rows marked "paper only". Our cells aggregate the seeds and are marked
    when within the spread of the method above (module docstring)."""
    epochs = ds.schedule
    header = ["method", *ds.classes, "AP50"] + ([f"AP50 {ds.paper_header()}"] if ds.paper else []) + ["AP75"] + (
        [f"AP75 {ds.paper_header()}"] if ds.paper else [])
    rows, used, above = [], [], None
    for init, label in methods.items():
        runs = ds.cell(init, 1.0, epochs)
        used += runs
        ap50, ap75 = paper.main_ap(ds.paper, label) or (None, None)
        row = [label] + [_ours(runs, "AP50", c, above) for c in ds.classes]
        row += [_ours(runs, "AP50", None, above)] + ([_theirs(ap50)] if ds.paper else [])
        row += [_ours(runs, "AP75", None, above)] + ([_theirs(ap75)] if ds.paper else [])
        rows.append(row)
        above = runs
    notes = _missing_notes(ds, used, "the main comparison") + _seed_notes(ds, "the method in the row above")
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
    caption = (f"{ds.name} {ds.split or 'test'}: AP (%) after fine-tuning on all training data "
               f"for {epochs if epochs is not None else '?'} epochs; per-class columns are AP50.{ds.scored()}"
               f"{_SEEDS_CAPTION.format(compared='the row above')}")
    return Table(f"main_{ds.name}", caption, header, rows, notes)


def low_data_table(ds: DatasetRuns, methods: Mapping[str, str]) -> Table:
    """The low-data table: AP50 per data fraction (rows: ours and the paper's) and method (columns),
    ours beside the paper's, at the main table's schedule. Our cells aggregate the seeds and are marked
    when within the spread of the previous method's cell at the same fraction (module docstring)."""
    epochs = ds.schedule
    fractions = {r.fraction for r in ds.runs} | set(paper.LOW_DATA.get(ds.paper or "", {}))
    header = ["data fraction"]
    for label in methods.values():
        header += [label] + ([f"{label} {ds.paper_header()}"] if ds.paper else [])
    rows, used = [], []
    for frac in sorted(fractions):
        row, left = [_percent(frac)], None
        for init, label in methods.items():
            runs = ds.cell(init, frac, epochs)
            used += runs
            row.append(_ours(runs, "AP50", None, left))
            if ds.paper:
                row.append(_theirs(paper.low_data_ap50(ds.paper, frac, label)))
            left = runs
        rows.append(row)
    notes = _missing_notes(ds, used, "the low-data sweep") + _seed_notes(
        ds, "the previous method's cell of ours in the same row (methods are columns here)")
    if ds.paper and ds.paper not in paper.LOW_DATA:
        notes.append(f"The paper reports low-data results on {', '.join(paper.LOW_DATA)} only, not {ds.paper}.")
    elif ds.paper:
        notes.append(f"Paper columns: {paper.DETECTOR} on {ds.paper}, not our {ds.name} data.")
    caption = (f"{ds.name}: AP50 (%) against the fraction of training data used for fine-tuning "
               f"({epochs if epochs is not None else '?'} epochs).{ds.scored()}"
               f"{_SEEDS_CAPTION.format(compared='the previous method at the same fraction')}")
    return Table(f"low_data_{ds.name}", caption, header, rows, notes)


def _change(previous: Mapping | None, flags: Mapping | None) -> dict:
    """The flags that differ from the row above (all of them for the first row or unknown flags)."""
    if flags is None:
        return {}
    return {k: v for k, v in flags.items() if previous is None or previous.get(k) != v}


def ablation_table(ds: DatasetRuns, ladder: Sequence[tuple[str, Mapping | None]],
                   paper_epochs: Mapping[int, int]) -> Table:
    """The ablation table: one row per rung of the pre-training ladder (``(init, its variant flags or
    None when the init is not configured)``, in order), labelled by the flags it changes from the row
    above; columns = our schedules at fraction 1.0, ours beside the paper's AP50 for the rows whose
    flags are exactly those of one of the paper's rows (:data:`mutdet.paper.ABLATION_FLAGS`; our epochs
    mapped to the paper's by ``paper_epochs``, identity for epochs not listed). Our cells aggregate the
    seeds and are marked when within the spread of the rung above, same schedule (module docstring)."""
    labels = [label for label, _ in paper.ABLATION["DIOR-R"]]
    # our schedules at 100 % data; else any of ours; without runs the schedules the comparison would use
    epochs_list = (sorted({r.epochs for r in ds.runs if abs(r.fraction - 1.0) < 1e-9})
                   or sorted({r.epochs for r in ds.runs}) or sorted(paper_epochs) or list(paper.ABLATION_EPOCHS))
    header = ["pre-training", "paper row"]
    for e in epochs_list:
        pe = paper_epochs.get(e, e)
        header.append(f"{e} ep" + (f" (paper {pe} ep)" if ds.paper else ""))
        if ds.paper:
            header.append(f"{ds.paper_header()} {pe} ep")
    rows, used, jumps = [], [], []
    previous, above = None, {}
    for k, (init, flags) in enumerate(ladder):
        change = _change(previous, flags)
        if flags is None:
            label = f"{init} (not configured)"
        elif k == 0:
            label = f"{init}: " + ", ".join(f"{key} {value}" for key, value in change.items())
        else:
            label = f"+ {', '.join(f'{key} {value}' for key, value in change.items()) or 'no change'} ({init})"
            if len(change) > 1:
                jumps.append(init)
        paper_row = paper.ablation_row(flags)
        row = [label, labels[paper_row] if paper_row is not None else "-"]
        for e in epochs_list:
            runs = ds.cell(init, 1.0, e)
            used += runs
            row.append(_ours(runs, "AP50", None, above.get(e)))
            above[e] = runs
            if ds.paper:
                value = paper.ablation_ap50(ds.paper, paper_row, paper_epochs.get(e, e)) if paper_row is not None else None
                row.append(_theirs(value))
        rows.append(row)
        previous = flags
    notes = _missing_notes(ds, used, "the ablation") + _seed_notes(ds, "the rung in the row above (same schedule)")
    if not ladder:
        notes.append("No ablation ladder configured (tables.ablation is empty).")
    if jumps:
        notes.append(f"Rows that change more than one flag from the row above: {', '.join(jumps)}.")
    notes.append("Paper rows are matched by flags: a row shows the paper's numbers only if it pre-trained "
                 "exactly as that row of the paper did.")
    if ds.paper and ds.paper not in paper.ABLATION:
        notes.append(f"The paper reports the ablation on {', '.join(paper.ABLATION)} only, not {ds.paper}.")
    caption = (f"{ds.name}: ablation of the pre-training components, AP50 (%) after each fine-tuning schedule."
               f"{ds.scored()}{_SEEDS_CAPTION.format(compared='the row above')}")
    return Table(f"ablation_{ds.name}", caption, header, rows, notes)


def runs_table(ds: DatasetRuns) -> Table:
    """One row per fine-tuning run (job, i.e. seed) of ``ds``: init, fraction, epochs, seed, AP50, AP75
    and per-class AP50 in percent, unrounded (empty where the run has no metrics or the AP is undefined):
    the values behind the aggregated cells of the other tables, for a reader's own statistics."""
    header = ["init", "fraction", "epochs", "seed", "AP50", "AP75", *[f"AP50 {c}" for c in ds.classes]]

    def value(r: RunResult, key: str, class_name: str | None = None) -> str:
        v = r.ap(key, class_name)
        return "" if v is None or math.isnan(v) else f"{v:.10g}"

    runs = sorted(ds.runs, key=lambda r: (r.init, r.fraction, r.epochs, *_seed_order(r)))
    rows = [[r.init, f"{r.fraction:g}", str(r.epochs), "" if r.seed is None else str(r.seed), value(r, "AP50"),
             value(r, "AP75"), *[value(r, "AP50", c) for c in ds.classes]] for r in runs]
    return Table(f"runs_{ds.name}", f"{ds.name}: every fine-tuning run (one row per seed), AP (%) unrounded.",
                 header, rows)
