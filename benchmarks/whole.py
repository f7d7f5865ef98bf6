"""Whole commands against the tools users would otherwise run: interleaved runs, medians and ratios.

Every measurement is a fresh process (or process tree) timed from the outside, the way a user meets
it, repeated ``--repeats`` times with the contenders interleaved (A B A B ...), so a busy machine slows
both alike; the medians and their ratio are printed. Peak memory is the largest summed RSS of the
process and all its descendants (sampled from /proc every 20 ms); CPU is the user + system time of the
command and of the descendants it waited for (workers of a forkserver, which nobody waits for, are
missing: the earlier tile stage's CPU figure is too low); ``left behind`` counts processes of the command
still alive 0.3 s after it exited (found by a marker in their environment).

Parts (``--parts``, default all):

* ``tiling``: ``mutdet tile`` against the DOTA devkit's ``ImgSplit_multi_process.splitbase`` on the same
  images, windows (800 px, gap 200) and number of processes: the real aerial images that deepforest
  ships (the demo's tree scenes, VOC boxes written as DOTA polygons) and ``--big`` generated 4000 px
  scenes. The devkit is run from ``--devkit DIR`` (a checkout of github.com/CAPTAIN-WHU/DOTA_devkit; it
  needs only cv2, numpy and shapely); without one, a re-implementation of its procedure in this file
  (same loops, same shapely calls, same ``cv2.imwrite``) stands in, and the output says so.
* ``noop``: a no-op rerun of the demo workflow (``snakemake --cores 2`` when every output is present
  and current). A finished demo is simulated in a temporary folder: its outputs are created empty and
  ``snakemake --touch`` records them, so the rerun does exactly the work of a real no-op (parse,
  validate, build the DAG, compare every job's params and code with the last run's).
* ``startup``: ``mutdet --help``, ``mutdet tile --help`` and ``mutdet evaluate --help`` wall time, plus
  the largest imports of each from ``python -X importtime``.
* ``pretrain``: the MutDet / DETReg pre-training step ratio of ``benchmarks/pretrain.py`` (one thread;
  each variant in its own process, after one warm-up step).

Usage: ``python benchmarks/whole.py [--parts tiling,noop,startup,pretrain] [--repeats 5] [--big 20]
[--devkit /tmp/DOTA_devkit] [--baseline DIR]`` (``--baseline``: a source tree of another version, e.g.
``git archive HEAD | tar -x -C DIR``, whose ``mutdet tile`` and Snakefile run interleaved with these).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
SNAKEMAKE = str(Path(sys.executable).parent / "snakemake")
MARK = "MUTDET_WHOLE_BENCH"


# --------------------------------------------------------------------------------------------------
# Measuring one command


def _proc_table() -> tuple[dict[int, list[int]], dict[int, float]]:
    children: dict[int, list[int]] = {}
    rss: dict[int, float] = {}
    page = os.sysconf("SC_PAGE_SIZE") / 2**20
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/statm") as fh:
                rss[int(entry)] = int(fh.read().split()[1]) * page
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    return children, rss


def _tree_rss_mb(root: int) -> float:
    children, rss = _proc_table()
    stack, total = [root], 0.0
    while stack:
        pid = stack.pop()
        total += rss.get(pid, 0.0)
        stack.extend(children.get(pid, []))
    return total


def _marked(tag: str) -> list[int]:
    """Live processes whose environment carries ``MARK=tag``."""
    needle = f"{MARK}={tag}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/environ", "rb") as fh:
                    if needle in fh.read().split(b"\0"):
                        found.append(int(entry))
            except OSError:
                continue
    return found


def measure(cmd: list[str], *, cwd: str | Path | None = None, env: dict | None = None, check: bool = True) -> dict:
    """Wall seconds, peak tree memory (MB) and processes left behind of one command."""
    tag = uuid.uuid4().hex
    full_env = {**os.environ, **(env or {}), MARK: tag}
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    peak = 0.0
    while proc.poll() is None:
        peak = max(peak, _tree_rss_mb(proc.pid))
        time.sleep(0.02)
    seconds = time.perf_counter() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)  # the command and every descendant it waited for
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    out = proc.stdout.read().decode(errors="replace")
    time.sleep(0.3)  # a worker that outlives its parent is still there after this
    left = _marked(tag)
    for pid in left:  # do not let them pile up over the repeats
        try:
            os.kill(pid, 9)
        except OSError:
            pass
    if check and proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(map(str, cmd))}\n{out[-4000:]}")
    return {"seconds": seconds, "cpu_s": cpu, "peak_mb": peak, "left_behind": len(left), "output": out,
            "rc": proc.returncode}


def interleaved(contenders: dict[str, dict], repeats: int) -> dict[str, list[dict]]:
    """Run each contender (kwargs of :func:`measure`, plus an optional ``prepare`` callable run untimed
    before every run) ``repeats`` times, interleaved."""
    runs: dict[str, list[dict]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, spec in contenders.items():
            spec = dict(spec)
            prepare = spec.pop("prepare", None)
            if prepare is not None:
                prepare()
            runs[name].append(measure(**spec))
    return runs


def med(runs: list[dict], key: str = "seconds") -> float:
    return statistics.median(r[key] for r in runs)


def row(name: str, runs: list[dict], reference: list[dict] | None = None, ref_name: str = "") -> str:
    fastest = min(r["seconds"] for r in runs)
    text = (f"  {name:<44} {med(runs):6.2f} s (min {fastest:5.2f}), CPU {med(runs, 'cpu_s'):5.2f} s, "
            f"peak {med(runs, 'peak_mb'):4.0f} MB, left behind {max(r['left_behind'] for r in runs)}")
    if reference is not None:
        text += (f"; ratio {med(runs) / med(reference):.2f}x {ref_name} (median of per-round ratios "
                 f"{statistics.median(a['seconds'] / b['seconds'] for a, b in zip(runs, reference)):.2f}x)")
    return text


# --------------------------------------------------------------------------------------------------
# Tiling


# The devkit's procedure (ImgSplit_multi_process.splitbase, CAPTAIN-WHU/DOTA_devkit), written out for
# machines without a checkout: the same window loop, shapely IoF per object and window, label-file
# lines and cv2.imwrite of a zero-padded float copy, one image per task of a Pool.
DEVKIT_REIMPLEMENTED = textwrap.dedent('''
    import copy, os, sys
    from functools import partial
    from multiprocessing import Pool
    import cv2, numpy as np
    import shapely.geometry as shgeo

    def parse(path):
        objects = []
        for line in open(path):
            t = line.strip().split(" ")
            if len(t) < 9:
                continue
            poly = [int(float(v)) for v in t[:8]]
            objects.append({"name": t[8], "difficult": t[9] if len(t) > 9 else "0", "poly": poly})
        return objects

    def split_single(name, src, dst, size, gap, thresh):
        img = cv2.imread(os.path.join(src, "images", name + ".png"))
        objects = parse(os.path.join(src, "labelTxt", name + ".txt"))
        height, width = img.shape[:2]
        slide = size - gap
        left = 0
        while left < width:
            if left + size >= width:
                left = max(width - size, 0)
            up = 0
            while up < height:
                if up + size >= height:
                    up = max(height - size, 0)
                right, down = min(left + size, width - 1), min(up + size, height - 1)
                sub = f"{name}__1__{left}___{up}"
                window = shgeo.Polygon([(left, up), (right, up), (right, down), (left, down)])
                with open(os.path.join(dst, "labelTxt", sub + ".txt"), "w") as out:
                    for obj in objects:
                        p = obj["poly"]
                        gt = shgeo.Polygon([(p[0], p[1]), (p[2], p[3]), (p[4], p[5]), (p[6], p[7])])
                        if gt.area <= 0:
                            continue
                        iof = gt.intersection(window).area / gt.area
                        if iof == 1:
                            xy = [p[i] - (left if i % 2 == 0 else up) for i in range(8)]
                            out.write(" ".join(map(str, map(float, xy))) + f" {obj['name']} {obj['difficult']}\\n")
                        elif iof > 0:
                            inter = shgeo.polygon.orient(gt.intersection(window), sign=1)
                            pts = list(inter.exterior.coords)[:-1]
                            if 4 <= len(pts) <= 5:
                                flat = [min(max(c - (left if i % 2 == 0 else up), 1), size)
                                        for i, c in enumerate(v for pt in pts[:4] for v in pt)]
                                d = obj["difficult"] if iof > thresh else "2"
                                out.write(" ".join(map(str, flat)) + f" {obj['name']} {d}\\n")
                patch = copy.deepcopy(img[up:up + size, left:left + size])
                h, w = patch.shape[:2]
                padded = np.zeros((size, size, 3))
                padded[:h, :w] = patch
                cv2.imwrite(os.path.join(dst, "images", sub + ".png"), padded)
                if up + size >= height:
                    break
                up += slide
            if left + size >= width:
                break
            left += slide

    if __name__ == "__main__":
        src, dst, size, gap, procs = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
        for d in ("images", "labelTxt"):
            os.makedirs(os.path.join(dst, d), exist_ok=True)
        names = [os.path.splitext(f)[0] for f in sorted(os.listdir(os.path.join(src, "images")))]
        pool = Pool(procs)
        pool.map(partial(split_single, src=src, dst=dst, size=size, gap=gap, thresh=0.7), names)
''')

DEVKIT = textwrap.dedent('''
    import sys
    sys.path.insert(0, sys.argv[1])
    from ImgSplit_multi_process import splitbase
    split = splitbase(sys.argv[2], sys.argv[3], gap=int(sys.argv[5]), subsize=int(sys.argv[4]),
                      num_process=int(sys.argv[6]))
    split.splitdata(1)
''')


def _voc_to_dota(xml: Path) -> list[str]:
    import xml.etree.ElementTree as ET

    lines = []
    for obj in ET.parse(xml).getroot().iter("object"):
        b = obj.find("bndbox")
        x0, y0, x1, y1 = (float(b.find(k).text) for k in ("xmin", "ymin", "xmax", "ymax"))
        lines.append(f"{x0:.1f} {y0:.1f} {x1:.1f} {y0:.1f} {x1:.1f} {y1:.1f} {x0:.1f} {y1:.1f} tree 0")
    return lines


def make_real(root: Path) -> list[str]:
    """deepforest's annotated aerial images larger than a window, as a DOTA folder; returns their names."""
    import cv2

    from mutdet.stages.demo_data import deepforest_data_dir

    src = deepforest_data_dir()
    (root / "images").mkdir(parents=True)
    (root / "labelTxt").mkdir()
    names = []
    for xml in sorted(src.glob("*.xml")):
        image = src / f"{xml.stem}.png"
        if not image.is_file():
            continue
        pixels = cv2.imread(str(image))
        if max(pixels.shape[:2]) < 800:
            continue
        name = re.sub(r"[^A-Za-z0-9_-]", "_", xml.stem)
        shutil.copy(image, root / "images" / f"{name}.png")
        (root / "labelTxt" / f"{name}.txt").write_text("\n".join(_voc_to_dota(xml)) + "\n")
        names.append(f"{name} {pixels.shape[1]}x{pixels.shape[0]}")
    jpg = src / "AWPE Pigeon Lake 2020 DJI_0005.JPG"  # real, unlabelled: written as PNG like the others
    if jpg.is_file():
        pixels = cv2.imread(str(jpg))
        cv2.imwrite(str(root / "images" / "AWPE_Pigeon_Lake_2020_DJI_0005.png"), pixels)
        (root / "labelTxt" / "AWPE_Pigeon_Lake_2020_DJI_0005.txt").write_text("")
        names.append(f"AWPE_Pigeon_Lake_2020_DJI_0005 {pixels.shape[1]}x{pixels.shape[0]}")
    (root / "all.txt").write_text("\n".join(sorted(p.stem for p in (root / "images").glob("*.png"))) + "\n")
    return names


def make_big(root: Path, n: int, size: int = 4000) -> None:
    """``n`` generated ``size`` px scenes (DOTA format), the size of DOTA's large images."""
    import cv2

    from mutdet.io.dota import format_dota_line
    from mutdet.synthetic import render_image

    (root / "images").mkdir(parents=True)
    (root / "labelTxt").mkdir()
    for i in range(n):
        scene = render_image(seed=1000 + i, size=size)
        cv2.imwrite(str(root / "images" / f"big_{i:02d}.png"), scene.image)
        lines = [format_dota_line(p, c, d) for p, c, d in zip(scene.polygons, scene.classes, scene.difficult)]
        (root / "labelTxt" / f"big_{i:02d}.txt").write_text("\n".join(lines) + "\n")
    (root / "all.txt").write_text("\n".join(f"big_{i:02d}" for i in range(n)) + "\n")


def _tile_config(root: Path, classes: list[str], path: Path, size: int, gap: int) -> Path:
    import yaml

    path.write_text(yaml.safe_dump({"datasets": {"bench": {
        "root": str(root), "format": "dota", "classes": classes, "splits": {"all": {"list": "all.txt"}},
        "shards": 1, "tiling": {"size": size, "gap": gap},
    }}}))
    return path


def _baseline_env(baseline: str | None) -> dict | None:
    """Environment that runs the mutdet of another source tree (``--baseline``, e.g. ``git archive HEAD |
    tar -x -C DIR``): its folder first on PYTHONPATH, ahead of the installed (editable) package."""
    return None if not baseline else {"PYTHONPATH": str(Path(baseline).resolve())}


def bench_tiling(tmp: Path, repeats: int, procs: int, big: int, devkit: str | None,
                 baseline: str | None = None) -> list[str]:
    from mutdet.synthetic import SYNTHETIC_CLASSES

    lines = []
    if devkit and (Path(devkit) / "ImgSplit_multi_process.py").is_file():
        devkit_cmd = [PY, "-c", DEVKIT, devkit]
        devkit_name = f"devkit ImgSplit_multi_process ({devkit})"
    else:
        devkit_cmd = [PY, "-c", DEVKIT_REIMPLEMENTED]
        devkit_name = "devkit procedure, RE-IMPLEMENTED here (no checkout)"
        lines.append("  (no DOTA devkit checkout given with --devkit: its procedure is re-implemented in this file)")
    sets = [("real", "real aerial images (deepforest)", ["tree"])]
    if big:
        sets.append(("big", f"{big} generated scenes of 4000 px", list(SYNTHETIC_CLASSES)))
    for key, title, classes in sets:
        root = tmp / f"data-{key}"
        if key == "real":
            names = make_real(root)
            title += ": " + ", ".join(names)
        else:
            make_big(root, big)
        cfg = _tile_config(root, classes, tmp / f"tile-{key}.yaml", 800, 200)
        ours_out, dk_out = tmp / f"ours-{key}", tmp / f"devkit-{key}"

        def clean(*dirs):
            return lambda: [shutil.rmtree(d, ignore_errors=True) for d in dirs]

        def devkit_prepare(out=dk_out):
            shutil.rmtree(out, ignore_errors=True)
            for d in ("images", "labelTxt"):
                (out / d).mkdir(parents=True)

        tile_cmd = [PY, "-m", "mutdet", "tile", "--config", str(cfg), "--dataset", "bench", "--split", "all",
                    "--shard", "0", "--threads", str(procs), "--out"]
        contenders = {
            "devkit": {"cmd": devkit_cmd + [str(root), str(dk_out), "800", "200", str(procs)],
                       "prepare": devkit_prepare},
            "mutdet": {"cmd": tile_cmd + [str(ours_out)], "prepare": clean(ours_out), "cwd": tmp},
        }
        if baseline:
            base_out = tmp / f"baseline-{key}"
            contenders["baseline"] = {"cmd": tile_cmd + [str(base_out)], "prepare": clean(base_out), "cwd": tmp,
                                      "env": _baseline_env(baseline)}
        runs = interleaved(contenders, repeats)
        ours_tiles = len(list((ours_out / "images").rglob("*.png")))
        dk_tiles = len(list((dk_out / "images").glob("*.png")))
        ours_mb = sum(p.stat().st_size for p in (ours_out / "images").rglob("*.png")) / 2**20
        dk_mb = sum(p.stat().st_size for p in (dk_out / "images").glob("*.png")) / 2**20
        lines.append(f"Tiling {title} at 800/200, {procs} processes, {repeats} interleaved runs:")
        lines.append(row(devkit_name[:44], runs["devkit"]) + f"  {dk_tiles} tiles, {dk_mb:.1f} MB of PNG")
        lines.append(row(f"mutdet tile --threads {procs}", runs["mutdet"], runs["devkit"], "the devkit's time")
                     + f"  {ours_tiles} tiles, {ours_mb:.1f} MB of PNG")
        if baseline:
            lines.append(row(f"mutdet tile --threads {procs}, --baseline tree", runs["baseline"], runs["devkit"],
                             "the devkit's time"))
    return lines


# --------------------------------------------------------------------------------------------------
# No-op rerun


def _finished_demo(workdir: Path) -> None:
    """A workdir whose demo outputs all exist and are recorded as made by their rules."""
    workdir.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "config.yaml", workdir / "config.yaml")
    base = [SNAKEMAKE, "-s", str(REPO / "Snakefile"), "-d", str(workdir)]
    summary = subprocess.run(base + ["--summary"], capture_output=True, text=True, check=True).stdout
    for line in summary.splitlines()[1:]:
        path = workdir / line.split("\t")[0]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    subprocess.run(base + ["--touch", "--cores", "1"], capture_output=True, text=True, check=True)


# Snakemake's command line with the SLURM executor plugins left out of its plugin scan: what a no-op
# costs where they are not installed (they import pandas when Snakemake starts). Measurement only.
WITHOUT_SLURM = textwrap.dedent('''
    import pkgutil, sys
    _iter = pkgutil.iter_modules
    pkgutil.iter_modules = lambda *a, **k: (m for m in _iter(*a, **k)
                                            if not m.name.startswith("snakemake_executor_plugin_slurm"))
    from snakemake.cli import main
    sys.argv[0] = "snakemake"
    main()
''')


def bench_noop(tmp: Path, repeats: int, baseline: str | None = None) -> list[str]:
    work = tmp / "demo-noop"
    _finished_demo(work)
    args = ["-s", str(REPO / "Snakefile"), "-d", str(work), "--cores", "2"]
    cmd = [SNAKEMAKE, *args]
    contenders = {
        "noop": {"cmd": cmd, "cwd": work},
        "noop without slurm": {"cmd": [PY, "-c", WITHOUT_SLURM, *args], "cwd": work},
        "dry": {"cmd": cmd[:-2] + ["-n"], "cwd": work},
        "version": {"cmd": [SNAKEMAKE, "--version"]},
    }
    if baseline:  # the same state, the other tree's Snakefile, rules and mutdet
        contenders["baseline"] = {"cmd": [SNAKEMAKE, "-s", str(Path(baseline).resolve() / "Snakefile"), *args[2:]],
                                  "cwd": work, "env": _baseline_env(baseline)}
    runs = interleaved(contenders, repeats)
    for name in ("noop", "noop without slurm", *(["baseline"] if baseline else [])):
        if "Nothing to be done" not in runs[name][0]["output"]:
            raise SystemExit(f"{name}: the simulated finished demo is not up to date:\n"
                             + runs[name][0]["output"][-3000:])
    return [
        f"No-op rerun of the demo workflow (outputs present and recorded), {repeats} interleaved runs (goal <= 1.5 s):",
        row("snakemake --cores 2 (nothing to be done)", runs["noop"]),
        row("the same, SLURM executor plugins not installed", runs["noop without slurm"]),
        row("snakemake -n (same state)", runs["dry"]),
        row("snakemake --version (its own start-up)", runs["version"]),
        *([row("snakemake --cores 2, --baseline tree", runs["baseline"])] if baseline else []),
    ]


# --------------------------------------------------------------------------------------------------
# Start-up


def _importtime_top(cmd: list[str], n: int = 5) -> str:
    """The ``n`` largest top-level imports (cumulative microseconds) of a command."""
    proc = subprocess.run([PY, "-X", "importtime", *cmd], capture_output=True, text=True)
    top = []
    for line in proc.stderr.splitlines():
        m = re.match(r"import time:\s+\d+ \|\s+(\d+) \| (\S.*)$", line)
        if m and not m.group(2).startswith(" "):
            top.append((int(m.group(1)), m.group(2).strip()))
    total = sum(t for t, _ in top)
    top.sort(reverse=True)
    return f"imports {total / 1e6:.2f} s: " + ", ".join(f"{name} {t / 1e6:.2f}" for t, name in top[:n])


def bench_startup(tmp: Path, repeats: int) -> list[str]:
    # A command's start-up: the CLI, the config reader and its stage module (what `mutdet tile ...` and
    # `mutdet evaluate ...` import before they read a file).
    stage = "import mutdet.cli, mutdet.config, mutdet.stages.{}"
    commands = {
        "python -c pass": [PY, "-c", "pass"],
        "mutdet --help": [PY, "-m", "mutdet", "--help"],
        "mutdet tile: CLI + config + stage imports": [PY, "-c", stage.format("tile")],
        "mutdet evaluate: CLI + config + stage imports": [PY, "-c", stage.format("evaluate")],
    }
    runs = interleaved({k: {"cmd": v} for k, v in commands.items()}, repeats)
    lines = [f"Start-up, {repeats} interleaved runs (python -X importtime: the largest top-level imports):"]
    for name, cmd in commands.items():
        lines.append(row(name, runs[name]))
        if name != "python -c pass":
            lines.append("      " + _importtime_top(cmd[1:]))
    return lines


# --------------------------------------------------------------------------------------------------
# Pre-training step


def bench_pretrain(steps: int) -> list[str]:
    proc = measure([PY, str(REPO / "benchmarks" / "pretrain.py"), "--threads", "1", "--steps", str(steps), "--json"],
                   env={"OMP_NUM_THREADS": "1"})
    result = json.loads(proc["output"].strip().splitlines()[-1])
    ms = result["step_ms"]
    return [f"Pre-training step, demo config, 1 thread (benchmarks/pretrain.py, {steps} steps per variant, "
            "goal <= 1.4x):",
            *(f"  {name:<44} {value:7.1f} ms per step  ({value / ms['detreg']:.2f}x DETReg's time)"
              for name, value in ms.items())]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="tiling,noop,startup,pretrain")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--processes", type=int, default=2, help="tiling processes, both tools")
    parser.add_argument("--big", type=int, default=20, help="generated 4000 px scenes (0: none)")
    parser.add_argument("--devkit", default=os.environ.get("DOTA_DEVKIT"), help="DOTA_devkit checkout")
    parser.add_argument("--pretrain-steps", type=int, default=8)
    parser.add_argument("--baseline", help="a source tree of another version (git archive ... | tar -x -C DIR): "
                                           "its tile command and Snakefile run beside this one's")
    args = parser.parse_args()
    parts = args.parts.split(",")
    lines = [f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at the start"]
    with tempfile.TemporaryDirectory(prefix="mutdet-whole-") as tmp:
        tmp = Path(tmp)
        if "startup" in parts:
            lines += bench_startup(tmp, args.repeats)
        if "noop" in parts:
            lines += bench_noop(tmp, args.repeats, args.baseline)
        if "tiling" in parts:
            lines += bench_tiling(tmp, args.repeats, args.processes, args.big, args.devkit, args.baseline)
        if "pretrain" in parts:
            lines += bench_pretrain(args.pretrain_steps)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
