"""Pre-training throughput: MutDet against DETReg on the same config (the cost of the enhancement
module, the embedding heads and the siamese pass).

Runs a few optimiser steps of the real pre-training path (ProposalTileDataset with flips -> collate ->
PretrainModel -> PretrainCriterion -> AdamW) for each variant, each in a fresh process so that peak
memory (VmHWM) is its own. Tiles are cut from generated synthetic scenes by the tile stage; the
proposals are the graph method's (the demo's); the target embeddings are random unit vectors with
random pseudo-classes (the step's cost does not depend on their values, and computing real ones would
add minutes of embedding). The model is the demo's (`finetune.model` and `pretrain` of config.yaml)
unless ``--paper`` asks for the paper's (ResNet-50, 6 + 6 layers, 300 queries, k = 256, at a reduced
input size on a CPU).

Usage: ``python benchmarks/pretrain.py [--steps 8] [--threads 2] [--paper --size 512] [--json]``. Prints
it/s, peak memory and the ratio MutDet / DETReg (``--json``: also one JSON line of step times).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent('''
    import json, sys, time
    import torch
    from torch.utils.data import DataLoader
    from mutdet.config import from_dict
    from mutdet.data.datasets import collate
    from mutdet.data.pretrain import ProposalTileDataset
    from mutdet.data.transforms import build_transforms
    from mutdet.engine.optim import build_optimizer
    from mutdet.stages.pretrain import build_pretrain_model
    from mutdet.variants import variant_from_dict

    args = json.loads(sys.argv[1])
    torch.manual_seed(0)
    torch.set_num_threads(args["threads"])
    variant = variant_from_dict(args["variant"], args["flags"])
    data = ProposalTileDataset([args["tiles"]], [args["proposals"]], [args["targets"]],
                               class_agnostic=variant.classes == "agnostic", max_boxes=args["max_boxes"],
                               transform=build_transforms(train=True, input_size=args["input_size"]))
    loader = DataLoader(data, batch_size=args["batch_size"], shuffle=True, collate_fn=collate, num_workers=0,
                        generator=torch.Generator().manual_seed(0))
    pt = from_dict({"pretrain": {"enhancement": args["enhancement"]}}).pretrain  # the schema's defaults
    model, criterion = build_pretrain_model(variant=variant, num_classes=data.num_classes, model_kwargs=args["model"],
                                            enhancement=dict(pt.enhancement),
                                            encoder_head_hidden=args["encoder_head_hidden"],
                                            freeze_backbone=pt.freeze_backbone, loss=dict(pt.loss))
    model.train()
    optimizer = build_optimizer(model, lr=1e-4)
    step_s = 0.0
    batches = iter(loader)
    for step in range(args["steps"] + 1):  # the first step warms up and is not counted
        try:
            images, mask, targets = next(batches)
        except StopIteration:
            batches = iter(loader)
            images, mask, targets = next(batches)
        t0 = time.perf_counter()
        losses = criterion(model(images, targets, padding_mask=mask), targets)
        loss = sum(losses[k] * w for k, w in criterion.weight_dict.items() if k in losses)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 35.0)
        optimizer.step()
        if step:
            step_s += time.perf_counter() - t0
    with open("/proc/self/status") as fh:
        hwm = next(int(l.split()[1]) for l in fh if l.startswith("VmHWM")) / 1024
    print(json.dumps({"it_per_s": args["steps"] / step_s, "peak_mb": hwm, "losses": len(criterion.weight_dict),
                      "params_m": sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6}))
''')

PAPER_MODEL = {"backbone": "resnet50", "backbone_weights": "none", "frozen_stages": 1, "embed_dim": 256,
               "num_heads": 8, "num_levels": 4, "num_points": 4, "num_encoder_layers": 6,
               "num_decoder_layers": 6, "ffn_dim": 1024, "num_queries": 300, "num_denoising_queries": 100}
VARIANTS = {"detreg": {"base": "detreg"}, "mutdet": {"base": "mutdet"},
            "mutdet without siamese pass": {"base": "mutdet", "siamese": False}}


def make_inputs(root: Path, size: int, dim: int, k: int, max_per_tile: int) -> dict:
    """Tiles (tile stage), graph proposals (propose stage), random unit targets (targets schema)."""
    import pyarrow as pa

    from mutdet.config import from_dict
    from mutdet.embedding.artefacts import vector_column, write_targets
    from mutdet.io.artefacts import read_artefact
    from mutdet.stages import propose, tile
    from mutdet.synthetic import SYNTHETIC_CLASSES, write_dota_dataset

    write_dota_dataset(root / "data", num_train=2, num_test=1, size=1500, seed=0)
    cfg = from_dict({"datasets": {"bench": {"root": str(root / "data"), "format": "dota",
                                            "classes": list(SYNTHETIC_CLASSES), "splits": {"train": {"list": "train.txt"}},
                                            "tiling": {"size": size, "gap": size // 4}}},
                     "proposals": {"datasets": ["bench/train"], "method": "graph", "max_per_tile": max_per_tile}})
    tile.run(cfg, dataset="bench", split="train", shard=0, out_dir=root / "tiles", threads=1)
    propose.run(cfg, dataset="bench", split="train", shard=0, tiles_dir=root / "tiles", out_dir=root / "proposals")
    proposals = read_artefact(root / "proposals" / "proposals.parquet", "proposals")
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((proposals.num_rows, dim))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    table = pa.table({"tile_id": proposals.column("tile_id"), "proposal_index": proposals.column("proposal_index"),
                      "embedding": vector_column(vectors),
                      "cluster_id": pa.array(rng.integers(0, k, proposals.num_rows), pa.int16())})
    write_targets(table, root / "targets.parquet", {"dim": dim, "params": {"random": True}})
    return {"tiles": str(root / "tiles"), "proposals": str(root / "proposals" / "proposals.parquet"),
            "targets": str(root / "targets.parquet"), "num_proposals": proposals.num_rows}


def run(args: dict) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--paper", action="store_true", help="the paper's model (slow on a CPU)")
    parser.add_argument("--size", type=int, help="input size (default: the demo's pretrain.input_size; paper 1024)")
    parser.add_argument("--json", action="store_true", help="also print the step times as one JSON line (last)")
    args = parser.parse_args()
    raw = yaml.safe_load((REPO / "config.yaml").read_text())
    pre = raw.get("pretrain", {})
    if args.paper:
        model, dim, k, batch, max_boxes = PAPER_MODEL, 256, 256, 1, 300
        enhancement, hidden, size = {"num_layers": 3, "num_heads": 8, "mlp_dim": 2048}, 1024, args.size or 512
    else:
        model = raw["finetune"]["model"]
        dim, k = raw["cluster"]["pca_dim"], raw["cluster"]["k"]
        batch, max_boxes = pre.get("train", {}).get("batch_size", 2), pre.get("max_boxes")
        enhancement, hidden = pre.get("enhancement", {}), pre.get("encoder_head_hidden", 1024)
        size = args.size or pre.get("input_size", 1024)
    with tempfile.TemporaryDirectory(prefix="mutdet-pretrain-bench-") as tmp:
        inputs = make_inputs(Path(tmp), 512, dim, k, max_per_tile=max_boxes or 100)
        common = {**inputs, "model": model, "enhancement": enhancement, "encoder_head_hidden": hidden,
                  "input_size": size, "batch_size": batch, "max_boxes": max_boxes, "steps": args.steps,
                  "threads": args.threads}
        results = {name: run({**common, "variant": name.split()[0], "flags": flags}) for name, flags in VARIANTS.items()}
    print(f"Pre-training steps ({'paper' if args.paper else 'demo'} model, {size} px, batch {batch}, "
          f"{inputs['num_proposals']} graph proposals on 512 px tiles, {args.threads} torch threads, CPU):")
    base = results["detreg"]
    for name, r in results.items():
        print(f"  {name:28s} {r['it_per_s']:.3f} it/s ({base['it_per_s'] / r['it_per_s']:.2f}x the time of DETReg), "
              f"peak {r['peak_mb']:.0f} MB ({r['peak_mb'] / base['peak_mb']:.2f}x), "
              f"{r['params_m']:.2f} M trainable parameters, {r['losses']} loss terms")
    if args.json:
        step_ms = {name: 1000.0 / r["it_per_s"] for name, r in results.items()}
        print(json.dumps({"threads": args.threads, "step_ms": step_ms,
                          "ratio": step_ms["mutdet"] / step_ms["detreg"],
                          "peak_mb": {name: r["peak_mb"] for name, r in results.items()}}))


if __name__ == "__main__":
    main()
