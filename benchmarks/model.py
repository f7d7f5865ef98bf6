"""Detector training-step cost on this machine: time, peak memory, deformable-attention share.

Each configuration runs in a fresh process (so its peak resident memory is its own): build the model
and criterion, make a random batch with targets, run ``--warmup`` training steps (forward with
denoising, all losses, backward), then time ``--steps`` more. Reported per configuration:

* ``step_s``: median seconds of forward + criterion + backward;
* ``peak_rss_mb``: peak resident memory of the process (``ru_maxrss``), and ``model_rss_mb`` before
  the first step (model + inputs), so the difference is roughly the activations;
* ``deform_attn_share``: the :func:`mutdet.models.ms_deform_attn` calls of one step (their inputs
  recorded during a step) re-run alone, forward + backward, divided by the step time; the rest of the
  attention modules (projections) is not counted.

Configurations: ``small-256`` / ``small-512`` (light backbone, width 128, 1 encoder + 3 decoder layers,
100 queries, 8 heads, 4 levels x 4 points, batch 2; the overfit benchmark's model) and, with
``--paper``, ``paper-512``: the paper's model (ResNet-50 random init with stem + layer1 frozen, width
256, 6 + 6 layers, 300 queries, FFN 1024) for ONE timed step (after one warm-up step) at a reduced
input (512 px, batch 1; the paper trains 1024 px, batch 2 per GPU).

    .venv/bin/python benchmarks/model.py [--paper] [--steps 3] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import subprocess
import sys
import time

import torch

CONFIGS = {
    "small-256": dict(size=256, batch=2, model=dict(backbone="light", frozen_stages=-1, frozen_bn=False,
                                                     embed_dim=128, ffn_dim=512, num_encoder_layers=1,
                                                     num_decoder_layers=3, num_queries=100)),
    "small-512": dict(size=512, batch=2, model=dict(backbone="light", frozen_stages=-1, frozen_bn=False,
                                                     embed_dim=128, ffn_dim=512, num_encoder_layers=1,
                                                     num_decoder_layers=3, num_queries=100)),
    "paper-512": dict(size=512, batch=1, model=dict(backbone="resnet50", frozen_stages=1)),
}
NUM_CLASSES = 15
OBJECTS_PER_IMAGE = 20


def random_targets(batch: int, size: int, generator: torch.Generator) -> list[dict]:
    targets = []
    for _ in range(batch):
        n = OBJECTS_PER_IMAGE
        wh = torch.rand(n, 2, generator=generator) * size / 8 + 6
        wh = torch.stack([wh.max(1).values, wh.min(1).values], 1)
        boxes = torch.cat([torch.rand(n, 2, generator=generator) * size, wh,
                           (torch.rand(n, 1, generator=generator) - 0.5) * math.pi], 1)
        targets.append({"labels": torch.randint(0, NUM_CLASSES, (n,), generator=generator), "boxes": boxes,
                        "size": torch.tensor([size, size])})
    return targets


def run_one(name: str, warmup: int, steps: int) -> dict:
    """Measure one configuration in this process."""
    from mutdet.losses import build_criterion
    from mutdet.models import build_detector, deformable_attention

    cfg = CONFIGS[name]
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = build_detector(num_classes=NUM_CLASSES, **cfg["model"]).train()
    criterion = build_criterion(num_classes=NUM_CLASSES, num_decoder_layers=len(model.decoder.layers))
    images = torch.randn(cfg["batch"], 3, cfg["size"], cfg["size"], generator=g)
    targets = random_targets(cfg["batch"], cfg["size"], g)
    model_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def step() -> float:
        start = time.perf_counter()
        losses = criterion(model(images, targets), targets)
        total = sum(losses[k] * criterion.weight_dict[k] for k in losses)
        model.zero_grad(set_to_none=True)
        total.backward()
        return time.perf_counter() - start

    for _ in range(warmup):
        step()
    times = [step() for _ in range(steps)]

    recorded = []
    original = deformable_attention.ms_deform_attn

    def recording(*args):
        recorded.append([a.detach().clone() for a in args])
        return original(*args)

    deformable_attention.ms_deform_attn = recording
    try:
        step()
    finally:
        deformable_attention.ms_deform_attn = original
    op_times = []
    for args in recorded:
        value, shapes, start, locations, weights = args
        inputs = [t.requires_grad_(True) for t in (value, locations, weights)]
        t0 = time.perf_counter()
        out = original(inputs[0], shapes, start, inputs[1], inputs[2])
        out.backward(torch.ones_like(out))
        op_times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    return {"config": name, "input": f"{cfg['batch']}x3x{cfg['size']}x{cfg['size']}",
            "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
            "trainable_m": round(sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6, 2),
            "tokens": int(sum(h * w for h, w in model.encode(images[:1])["spatial_shapes"].tolist())),
            "step_s": round(step_s, 3), "steps": [round(t, 3) for t in times],
            "model_rss_mb": round(model_rss),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "deform_attn_calls": len(recorded), "deform_attn_s": round(sum(op_times), 3),
            "deform_attn_share": round(sum(op_times) / step_s, 3)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--paper", action="store_true", help="also one step of the paper config at 512 px, batch 1")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--one", choices=sorted(CONFIGS), help=argparse.SUPPRESS)  # child process mode
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(run_one(args.one, args.warmup, args.steps)))
        return 0
    names = ["small-256", "small-512"] + (["paper-512"] if args.paper else [])
    for name in names:
        steps, warmup = (1, 1) if name.startswith("paper") else (args.steps, args.warmup)
        out = subprocess.run([sys.executable, __file__, "--one", name, "--steps", str(steps), "--warmup",
                              str(warmup), "--threads", str(args.threads)], capture_output=True, text=True)
        if out.returncode:
            print(out.stderr, file=sys.stderr)
            return out.returncode
        print(out.stdout.strip().splitlines()[-1], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
