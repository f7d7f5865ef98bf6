"""Training throughput: iterations/s, peak memory and the data-loading share of a step.

Runs a few optimiser steps of the real fine-tuning path (TileDataset with flips -> collate ->
detector -> criterion -> AdamW) on tiles that the benchmark cuts from generated synthetic scenes, once
for the demo config of config.yaml and once for the paper config (ResNet-50, 6 + 6 layers, 300
queries; at a reduced input size on a CPU, printed). Each config runs in a fresh process so peak
memory (VmHWM) is its own. Usage: ``python benchmarks/train.py [--steps 8] [--paper-size 512]``.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent('''
    import json, sys, time
    import torch
    from torch.utils.data import DataLoader
    from mutdet.data.datasets import TileDataset, collate
    from mutdet.data.transforms import build_transforms
    from mutdet.engine.optim import build_optimizer
    from mutdet.stages.finetune import build_model_and_criterion

    args = json.loads(sys.argv[1])
    torch.manual_seed(0)
    torch.set_num_threads(args["threads"])
    data = TileDataset([args["tiles"]], skip_empty=True,
                       transform=build_transforms(train=True, input_size=args["input_size"]))
    loader = DataLoader(data, batch_size=args["batch_size"], shuffle=True, collate_fn=collate, num_workers=0)
    model, criterion = build_model_and_criterion(args["num_classes"], args["model"])
    model.train()
    optimizer = build_optimizer(model, lr=1e-4)
    load_s = step_s = 0.0
    batches = iter(loader)
    for step in range(args["steps"] + 1):  # the first step warms up and is not counted
        t0 = time.perf_counter()
        try:
            images, mask, targets = next(batches)
        except StopIteration:
            batches = iter(loader)
            images, mask, targets = next(batches)
        t1 = time.perf_counter()
        losses = criterion(model(images, targets, padding_mask=mask), targets)
        loss = sum(losses[k] * w for k, w in criterion.weight_dict.items() if k in losses)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 35.0)
        optimizer.step()
        t2 = time.perf_counter()
        if step:
            load_s += t1 - t0
            step_s += t2 - t0
    with open("/proc/self/status") as fh:
        hwm = next(int(l.split()[1]) for l in fh if l.startswith("VmHWM")) / 1024
    print(json.dumps({"it_per_s": args["steps"] / step_s, "load_share": load_s / step_s, "peak_mb": hwm,
                      "params_m": sum(p.numel() for p in model.parameters()) / 1e6}))
''')

PAPER_MODEL = {"backbone": "resnet50", "backbone_weights": "none", "frozen_stages": 1, "embed_dim": 256,
               "num_heads": 8, "num_levels": 4, "num_points": 4, "num_encoder_layers": 6,
               "num_decoder_layers": 6, "ffn_dim": 1024, "num_queries": 300, "num_denoising_queries": 100}


def make_tiles(root: Path, size: int) -> Path:
    from mutdet.config import from_dict
    from mutdet.stages import tile
    from mutdet.synthetic import SYNTHETIC_CLASSES, write_dota_dataset

    write_dota_dataset(root / "data", num_train=2, num_test=1, size=1500, seed=0)
    cfg = from_dict({"datasets": {"bench": {"root": str(root / "data"), "format": "dota",
                                            "classes": list(SYNTHETIC_CLASSES), "splits": {"train": {"list": "train.txt"}},
                                            "tiling": {"size": size, "gap": size // 4}}}})
    tile.run(cfg, dataset="bench", split="train", shard=0, out_dir=root / "tiles", threads=1)
    return root / "tiles"


def run(args: dict) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--paper-size", type=int, default=512, help="input size of the paper config (paper: 1024)")
    parser.add_argument("--paper-batch", type=int, default=1, help="batch of the paper config (paper: 2 per GPU)")
    args = parser.parse_args()
    demo = yaml.safe_load((REPO / "config.yaml").read_text())["finetune"]
    with tempfile.TemporaryDirectory(prefix="mutdet-train-bench-") as tmp:
        tiles = str(make_tiles(Path(tmp), 512))
        common = {"tiles": tiles, "num_classes": 5, "steps": args.steps, "threads": args.threads}
        small = run({**common, "model": demo["model"], "input_size": demo["input_size"],
                     "batch_size": demo["train"]["batch_size"]})
        paper = run({**common, "model": PAPER_MODEL, "input_size": args.paper_size, "batch_size": args.paper_batch,
                     "steps": max(2, args.steps // 4)})
    print(f"Training steps on this machine ({args.threads} torch threads, CPU):")
    print(f"  demo config  ({small['params_m']:.1f} M params, {demo['input_size']} px, batch {demo['train']['batch_size']}): "
          f"{small['it_per_s']:.2f} it/s, peak {small['peak_mb']:.0f} MB, data loading {100 * small['load_share']:.1f}% of a step")
    print(f"  paper config ({paper['params_m']:.1f} M params, {args.paper_size} px, batch {args.paper_batch}; the paper: "
          f"1024 px, batch 2): {paper['it_per_s']:.3f} it/s, peak {paper['peak_mb']:.0f} MB, "
          f"data loading {100 * paper['load_share']:.1f}% of a step")


if __name__ == "__main__":
    main()
