"""``mutdet outputs``: a short listing of what a run produced and where (printed after ``make demo``)."""
from __future__ import annotations

import json

from mutdet.config import Config
from mutdet.engine.tracking import read_jsonl
from mutdet.stages.layout import FINETUNE_DIR, TABLES_DIR, embedding_tag, pretrain_dir, proposals_tag, tiles_dir


def describe(cfg: Config) -> str:
    lines = [f"Results under {cfg.results.resolve()}:"]
    for name, ds in cfg.datasets.items():
        for split in ds.splits:
            images = tiles = objects = 0
            done = 0
            for shard in range(ds.shards):
                summary = tiles_dir(cfg.results, name, split, shard) / "summary.json"
                if summary.is_file():
                    s = json.loads(summary.read_text())
                    images, tiles, objects, done = images + s["images"], tiles + s["tiles"], objects + s["objects"], done + 1
            where = tiles_dir(cfg.results, name, split, "*")
            state = f"{images} images -> {tiles} tiles, {objects} objects" if done else "not produced yet"
            lines.append(f"  tiles  {name}/{split}: {state}  [{done}/{ds.shards} shards]  {where}/")
    for name, split in cfg.proposals.datasets:
        ds = cfg.dataset(name)
        for kind, manifest in (("proposals", "manifest.json"), ("embeddings", "manifest.json"), ("targets", "targets.parquet")):
            done = sum((pretrain_dir(cfg.results, kind, name, split, k, cfg) / manifest).is_file() for k in range(ds.shards))
            where = pretrain_dir(cfg.results, kind, name, split, "*", cfg)
            lines.append(f"  {kind:<10} {name}/{split}: [{done}/{ds.shards} shards]  {where}/")
    model = cfg.results / "targets" / proposals_tag(cfg) / embedding_tag(cfg) / "pca_kmeans.npz"
    lines.append(f"  clusters   {'fitted' if model.is_file() else 'not fitted yet'}: {model}")
    for name, split in cfg.fractions.datasets:
        lines.append(f"  fractions  {name}/{split}: {cfg.results / name / 'fractions' / split}/frac~<p>.txt")
    pretrain_root = cfg.results / "pretrain" / proposals_tag(cfg) / embedding_tag(cfg)
    for name in cfg.pretrain.variants:
        folder = pretrain_root / name
        state = "not produced yet"
        if (folder / "checkpoint.pt").is_file():
            records = read_jsonl(folder / "metrics.jsonl")
            last = records[-1] if records else {}
            state = f"{last.get('step', '?')} steps, last loss {last.get('loss', float('nan')):.3f}"
        lines.append(f"  pretrain   {name}: {state}  {folder}/")
    if (pretrain_root / "loss_curves.png").is_file():
        lines.append(f"  figure     pre-training loss curves: {pretrain_root / 'loss_curves.png'}")
    seen = set()
    for run in cfg.finetune.runs:
        for init in run.inits:
            for fraction in run.fractions:
                for epochs in run.epochs:
                    folder = cfg.results / FINETUNE_DIR.format(init=init, fraction=fraction, epochs=epochs,
                                                               dataset=run.dataset, split=run.test_split)
                    if folder in seen:
                        continue
                    seen.add(folder)
                    state = "not produced yet"
                    if (folder / "metrics.json").is_file():
                        mean = json.loads((folder / "metrics.json").read_text())["mean"]
                        state = "  ".join(f"{k} {100 * mean[k]:.1f}" for k in ("AP50", "AP75") if mean.get(k) is not None)
                    lines.append(f"  finetune   {run.dataset}/{run.test_split} init {init}, fraction {fraction}, "
                                 f"{epochs} epochs: {state}  {folder}/")
    tables = cfg.results / TABLES_DIR / "index.md"
    lines.append(f"  tables     {'written' if tables.is_file() else 'not produced yet'}: {tables}")
    report = cfg.results / "report.html"
    lines.append(f"  report     {'written' if report.is_file() else 'not produced yet (snakemake --report ' + str(report) + ')'}"
                 f": {report}")
    return "\n".join(lines)
