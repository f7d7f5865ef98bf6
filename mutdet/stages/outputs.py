"""``mutdet outputs``: a short listing of what a run produced and where (printed after ``make demo``)."""
from __future__ import annotations

import json

from mutdet.config import Config
from mutdet.engine.tracking import read_jsonl
from mutdet.layout import Layout


def describe(cfg: Config) -> str:
    layout = Layout(cfg)
    lines = [f"Results under {cfg.results.resolve()}:"]
    for name, ds in cfg.datasets.items():
        for split in ds.splits:
            images = tiles = objects = 0
            done = 0
            for folder in layout.split_tiles_dirs(name, split):
                summary = folder / "summary.json"
                if summary.is_file():
                    s = json.loads(summary.read_text())
                    images, tiles, objects, done = images + s["images"], tiles + s["tiles"], objects + s["objects"], done + 1
            state = f"{images} images -> {tiles} tiles, {objects} objects" if done else "not produced yet"
            lines.append(f"  tiles  {name}/{split}: {state}  [{done}/{ds.shards} shards]  "
                         f"{layout.tiles_dir(name, split, '*')}/")
    for name, split in cfg.proposals.datasets:
        shards = range(cfg.dataset(name).shards)
        for kind, done_file in (("proposals", lambda k: layout.proposals_dir(name, split, k) / "manifest.json"),
                                ("embeddings", lambda k: layout.embeddings_dir(name, split, k) / "manifest.json"),
                                ("targets", lambda k: layout.targets_file(name, split, k))):
            done = sum(done_file(k).is_file() for k in shards)
            lines.append(f"  {kind:<10} {name}/{split}: [{done}/{len(shards)} shards]  {done_file('*').parent}/")
    model = layout.cluster_dir() / "pca_kmeans.npz"
    lines.append(f"  clusters   {'fitted' if model.is_file() else 'not fitted yet'}: {model}")
    for name, split in cfg.fractions.datasets:
        lines.append(f"  fractions  {name}/{split}: {layout.fractions_file(name, split, '<p>')}")
    for name in cfg.pretrain.variants:
        folder = layout.pretrain_dir(name)
        state = "not produced yet"
        if (folder / "checkpoint.pt").is_file():
            records = read_jsonl(folder / "metrics.jsonl")
            last = records[-1] if records else {}
            state = f"{last.get('step', '?')} steps, last loss {last.get('loss', float('nan')):.3f}"
        lines.append(f"  pretrain   {name}: {state}  {folder}/")
    if layout.loss_curves_figure().is_file():
        lines.append(f"  figure     pre-training loss curves: {layout.loss_curves_figure()}")
    for job in layout.finetune_jobs():
        folder = layout.job_dir(job)
        state = "not produced yet"
        if (folder / "metrics.json").is_file():
            mean = json.loads((folder / "metrics.json").read_text())["mean"]
            state = "  ".join(f"{k} {100 * mean[k]:.1f}" for k in ("AP50", "AP75") if mean.get(k) is not None)
        lines.append(f"  finetune   {job.dataset}/{job.split} init {job.init}, fraction {job.fraction}, "
                     f"{job.epochs} epochs: {state}  {folder}/")
    tables = layout.tables_dir() / "index.md"
    lines.append(f"  tables     {'written' if tables.is_file() else 'not produced yet'}: {tables}")
    report = cfg.results / "report.html"
    lines.append(f"  report     {'written' if report.is_file() else 'not produced yet (snakemake --report ' + str(report) + ')'}"
                 f": {report}")
    return "\n".join(lines)
