"""``mutdet outputs``: a short listing of what a run produced and where (printed after ``make demo``)."""
from __future__ import annotations

import json

from mutdet.config import Config
from mutdet.stages.layout import tiles_dir


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
    return "\n".join(lines)
