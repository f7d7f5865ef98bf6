"""Tiling throughput and peak memory: ``mutdet tile`` against a straightforward reference.

Generates the demo's synthetic images (1500 px, DOTA format) plus one 4000 x 4000 scene, then tiles
them (512 px windows, gap 128) twice in fresh processes:

* ``mutdet``: the tile stage (worker processes, vectorised shapely IoF, OpenCV PNG level 1);
* ``reference``: one process, PIL crops, a Python loop over windows x objects with shapely polygons
  (the DOTA devkit's structure), PIL PNG level 1.

Prints images/s, peak resident memory (the largest summed RSS of the process and all its
descendants, sampled every 20 ms from /proc) and the speed ratio measured in this run. Usage: ``python benchmarks/tiling.py [--images 12] [--threads 2]``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REFERENCE = textwrap.dedent('''
    import json, sys, time
    from pathlib import Path
    import numpy as np, pyarrow as pa, pyarrow.parquet as pq, shapely
    from PIL import Image
    Image.MAX_IMAGE_PIXELS = None
    root, out, size, gap = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    ids = [l.strip() for l in (root / "all.txt").read_text().splitlines() if l.strip()]
    t0 = time.perf_counter()
    rows = []
    for image_id in ids:
        img = Image.open(root / "images" / f"{image_id}.png").convert("RGB")
        W, H = img.size
        objs = []
        for line in (root / "labelTxt" / f"{image_id}.txt").read_text().splitlines():
            t = line.split()
            if len(t) < 9:
                continue
            objs.append((shapely.Polygon(np.array(t[:8], float).reshape(4, 2)), t[8]))
        step = size - gap
        xs = list(range(0, max(W - size, 0) + 1, step)) or [0]
        if xs[-1] + size < W: xs.append(W - size)
        ys = list(range(0, max(H - size, 0) + 1, step)) or [0]
        if ys[-1] + size < H: ys.append(H - size)
        for x in xs:
            for y in ys:
                win = shapely.box(x, y, x + size, y + size)
                tile = img.crop((x, y, x + size, y + size))
                name = f"{image_id}__1.0__{x}___{y}"
                (out / "images").mkdir(parents=True, exist_ok=True)
                tile.save(out / "images" / f"{name}.png", compress_level=1)
                for poly, cls in objs:
                    iof = poly.intersection(win).area / poly.area
                    if iof >= 0.7:
                        rows.append({"tile_id": name, "class_name": cls, "iof": iof,
                                     "difficult": 2 if iof < 1 else 0})
    pq.write_table(pa.Table.from_pylist(rows), out / "objects.parquet")
    seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": seconds, "objects": len(rows)}))
''')

OURS = textwrap.dedent('''
    import json, sys, time
    from mutdet.config import from_dict
    from mutdet.stages import tile
    cfg = from_dict(json.loads(sys.argv[1]))
    t0 = time.perf_counter()
    s = tile.run(cfg, dataset="bench", split="all", shard=0, out_dir=sys.argv[2], threads=int(sys.argv[3]))
    seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": seconds, "objects": s["objects"], "tiles": s["tiles"]}))
''')


def _tree_rss_mb(root_pid: int) -> tuple[float, float]:
    """(summed RSS of root_pid and all descendants, largest single process RSS) in MB, from /proc."""
    children: dict[int, list[int]] = {}
    rss: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/statm") as fh:
                rss[int(entry)] = int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    stack, total, largest = [root_pid], 0.0, 0.0
    while stack:
        pid = stack.pop()
        total += rss.get(pid, 0.0)
        largest = max(largest, rss.get(pid, 0.0))
        stack.extend(children.get(pid, []))
    return total, largest


def run_child(code: str, *args: str) -> dict:
    """Run ``code`` in a fresh interpreter, sampling the memory of its process tree."""
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak_total = peak_single = 0.0
    while proc.poll() is None:
        total, single = _tree_rss_mb(proc.pid)
        peak_total, peak_single = max(peak_total, total), max(peak_single, single)
        time.sleep(0.02)
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(err)
    result = json.loads(out.strip().splitlines()[-1])
    result.update(peak_mb=peak_total, peak_process_mb=peak_single)
    return result


def make_data(root: Path, n: int) -> None:
    import cv2

    from mutdet.synthetic import render_image, write_dota_dataset
    from mutdet.io.dota import format_dota_line

    write_dota_dataset(root, num_train=n, num_test=1, size=1500, seed=0)
    big = render_image(seed=12345, size=4000)
    cv2.imwrite(str(root / "images" / "big_4000.png"), big.image)
    lines = ["imagesource:benchmark", "gsd:0.5"]
    lines += [format_dota_line(p, c, d) for p, c, d in zip(big.polygons, big.classes, big.difficult)]
    (root / "labelTxt" / "big_4000.txt").write_text("\n".join(lines) + "\n")
    ids = sorted(p.stem for p in (root / "images").glob("*.png") if p.stem != "big_4000")[:n]
    (root / "all.txt").write_text("\n".join(ids) + "\n")
    (root / "big.txt").write_text("big_4000\n")


def config(root: Path, split_list: str) -> str:
    from mutdet.synthetic import SYNTHETIC_CLASSES

    return json.dumps({"datasets": {"bench": {
        "root": str(root), "format": "dota", "classes": list(SYNTHETIC_CLASSES),
        "splits": {"all": {"list": split_list}}, "tiling": {"size": 512, "gap": 128},
    }}})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mutdet-bench-") as tmp:
        root = Path(tmp) / "data"
        print(f"generating {args.images} synthetic 1500 px images and one 4000 px scene ...", flush=True)
        make_data(root, args.images)
        ours = run_child(OURS, config(root, "all.txt"), str(Path(tmp) / "ours"), str(args.threads))
        ref = run_child(REFERENCE, str(root), str(Path(tmp) / "ref"), "512", "128")
        big = run_child(OURS, config(root, "big.txt"), str(Path(tmp) / "big"), "1")
    n = args.images
    print(f"\nTiling {n} images of 1500 x 1500 (512 px windows, gap 128), this machine:")
    print(f"  reference (1 process, PIL + shapely loop): {ref['seconds']:6.2f} s  {n / ref['seconds']:5.2f} img/s  "
          f"peak {ref['peak_mb']:5.0f} MB  objects {ref['objects']}")
    print(f"  mutdet tile ({args.threads} workers):            {ours['seconds']:6.2f} s  {n / ours['seconds']:5.2f} img/s  "
          f"peak {ours['peak_mb']:5.0f} MB in all, {ours['peak_process_mb']:.0f} MB largest process  objects {ours['objects']}")
    print(f"  speed-up: {ref['seconds'] / ours['seconds']:.2f}x (same run, same machine)")
    print(f"One 4000 x 4000 scene, mutdet tile, 1 process: {big['seconds']:.2f} s, {big['tiles']} tiles, "
          f"peak {big['peak_mb']:.0f} MB")


if __name__ == "__main__":
    main()
