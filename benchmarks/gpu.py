"""The one GPU check: CUDA/bf16 smoke tests of every GPU code path, then throughput and peak memory.

    .venv/bin/python benchmarks/gpu.py --out results/bench-gpu        (or: make bench-gpu)

Sections, each in its own process (a CUDA fault in one, e.g. an illegal address in the Triton kernel,
cannot take the others down; each gets its own peak-memory figure) and each under the time left of
one budget (``--budget-s``, default 450 s, so the whole run stays under 8 minutes on one large GPU):

================  ======================================================================================
``launcher``      :func:`mutdet.engine.launch.launch` claims one GPU with its lock file and the child
                  sees exactly that ``CUDA_VISIBLE_DEVICES``; a second claim of the same GPU waits.
``deform_attn``   the Triton kernel (:mod:`mutdet.models.ms_deform_attn_triton`) against the pure-PyTorch
                  reference on CUDA, float32 and bf16 (values and all three gradients), then both timed
                  (forward + backward) with their peak memory at the paper's encoder and decoder shapes
                  (1024 px, batch 2: 21760 tokens of 4 levels, 8 heads of 32, 4 points).
``finetune``      one bf16 fine-tuning step of the paper config (``config/paper/dota.yaml``: ResNet-50,
                  6 + 6 layers, 300 queries, random weights) at 1024 px, batch 2, through
                  :class:`mutdet.engine.trainer.Trainer`'s own step; then it/s, images/s and peak memory
                  with the torch and the Triton attention, and the attention's share of a step (its
                  calls of one step replayed alone, forward + backward, under the same autocast).
``pretrain``      the same for the MutDet pre-training model (k = 256 pseudo-classes, 30 boxes per image).
``detect``        :func:`mutdet.stages.detect.detect_image` on one 2048 x 2048 image (9 tiles of 1024).
``sam``           SAM automatic masks (:class:`mutdet.proposals.sam.SamProposer`, bf16) with a vit_h-shaped
                  model at random weights (segment-anything's registry, no checkpoint) on 2 tiles of
                  800 px, then tiles/s (masks of random weights are few and meaningless: the encoder
                  dominates, as with real weights; the post-processing of real masks is not measured).
``embed``         :func:`mutdet.embedding.pipeline.embed_tiles` (ResNet-50, random weights, bf16 autocast)
                  on 4 tiles with 512 proposals each: proposals/s and peak memory.
``compile``       ``train.compile: true``: the fine-tuning step through ``torch.compile`` (time of the
                  first steps, i.e. compilation, then it/s) against the same step eager.
================  ======================================================================================

Writes ``<out>/bench-gpu.json`` (every figure, every skip and failure with its reason) and
``<out>/bench-gpu.md`` (the same as tables). Without a CUDA device it writes both saying every section
was skipped and why, and exits 0. Exit status 1 if a section failed (its traceback is in the JSON).

``--device cpu --tiny`` runs the same code at toy sizes on the CPU (the Triton and CUDA-only parts are
skipped; with ``TRITON_INTERPRET=1`` the ``deform_attn`` section runs through Triton's interpreter): a
plumbing check of this script, not a measurement.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ("launcher", "deform_attn", "finetune", "pretrain", "detect", "sam", "embed", "compile")
CUDA_ONLY = {"launcher": "the GPU lock claim needs a GPU", "deform_attn": "the Triton kernel runs on CUDA only",
             "compile": "measured on the GPU only (CPU compilation of the paper model takes many minutes)"}
PAPER_CONFIG = REPO / "config" / "paper" / "dota.yaml"

# Sizes: the paper's on a GPU, toy ones for the CPU plumbing check (--tiny).
SIZES = {
    "paper": dict(image=1024, batch=2, warmup=2, steps=5, sam_type="vit_h", sam_tile=800, sam_tiles=2,
                  sam_extra_tiles=2, embed_tiles=4, embed_boxes=512, embed_backbone="resnet50", detect_image=2048,
                  attn_repeats=10, compile_warmup=3, objects=30,
                  attn_parity=dict(shapes=[(37, 51), (19, 26), (10, 13), (5, 7)], queries=300, heads=8, channels=32),
                  attn_timing=dict(shapes=[(128, 128), (64, 64), (32, 32), (16, 16)], heads=8, channels=32,
                                   decoder_queries=300 + 180)),
    "tiny": dict(image=64, batch=2, warmup=1, steps=1, sam_type="tiny", sam_tile=96, sam_tiles=2, sam_extra_tiles=0,
                 embed_tiles=2, embed_boxes=8, embed_backbone="resnet18", detect_image=160, attn_repeats=1,
                 compile_warmup=1, objects=4,
                 attn_parity=dict(shapes=[(5, 7), (3, 1)], queries=5, heads=2, channels=4),
                 attn_timing=dict(shapes=[(6, 6), (3, 3)], heads=2, channels=4, decoder_queries=7)),
}
TINY_MODEL = dict(backbone="light", frozen_stages=-1, frozen_bn=False, embed_dim=32, num_heads=4, num_levels=2,
                  num_points=2, num_encoder_layers=1, num_decoder_layers=1, ffn_dim=64, num_queries=10,
                  num_denoising_queries=6, norm_groups=8)


# -- helpers shared by the sections ------------------------------------------------------------------
def _torch():
    import torch

    return torch


def sync(device) -> None:
    if device.type == "cuda":
        _torch().cuda.synchronize(device)


@contextmanager
def peak_memory(device, record: dict, key: str = "peak_mem_mb"):
    """Peak allocated GPU memory (MiB) of the block into ``record[key]`` (None on the CPU)."""
    torch = _torch()
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
    yield
    if device.type == "cuda":
        sync(device)
        record[key] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    else:
        record[key] = None


def timed(fn, device, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - start)
    return out


def paper_config():
    from mutdet.config import load_config

    return load_config(PAPER_CONFIG)


def model_kwargs(sizes_name: str) -> dict:
    """The paper's ``finetune.model`` with random backbone weights (no download on a GPU node)."""
    if sizes_name == "tiny":
        return dict(TINY_MODEL)
    return {**dict(paper_config().finetune.model), "backbone_weights": "none"}


def random_batch(size: int, batch: int, objects: int, num_classes: int, seed: int, embedding_dim: int | None = None):
    """``batch`` normalised random images ``(3, size, size)`` with ``objects`` random le90 boxes each
    (pixels), labels, and for pre-training unit target embeddings; collated as the trainer's loader does."""
    torch = _torch()
    from mutdet.data.datasets import collate

    g = torch.Generator().manual_seed(seed)
    items = []
    for k in range(batch):
        wh = torch.rand(objects, 2, generator=g) * size / 8 + 8
        wh = torch.stack([wh.max(1).values, wh.min(1).values], 1)
        boxes = torch.cat([torch.rand(objects, 2, generator=g) * size * 0.8 + size * 0.1, wh,
                           (torch.rand(objects, 1, generator=g) - 0.5) * math.pi], 1)
        target = {"labels": torch.randint(0, num_classes, (objects,), generator=g), "boxes": boxes,
                  "size": torch.tensor([size, size]), "scale": torch.ones(2, dtype=torch.float64),
                  "tile_id": f"random-{seed}-{k}"}
        if embedding_dim is not None:
            emb = torch.randn(objects, embedding_dim, generator=g)
            target["embeddings"] = emb / emb.norm(dim=1, keepdim=True)
            target["embedding_norms"] = torch.ones(objects)
        items.append((torch.randn(3, size, size, generator=g), target))
    return items, collate(items)


def _dataset(items):
    torch = _torch()

    class Items(torch.utils.data.Dataset):
        def __len__(self):
            return len(items)

        def __getitem__(self, i):
            return items[i]

    return Items()


def make_trainer(model, criterion, items, device, out_dir, *, compile: bool = False, kernel: str = "torch"):
    """The real :class:`~mutdet.engine.trainer.Trainer` (optimiser groups, autocast, compile, kernel choice)."""
    from mutdet.engine.trainer import TrainConfig, Trainer

    config = TrainConfig(epochs=1, batch_size=len(items), num_workers=0, progress=False, warmup_iterations=10,
                         amp="auto", compile=compile, attention_kernel=kernel, checkpoint_every_epochs=1000)
    return Trainer(model=model, criterion=criterion, dataset=_dataset(items), config=config, out_dir=out_dir,
                   device=device, run_config={}, wandb_mode="disabled")


def train_step(trainer, batch) -> dict:
    """One optimiser step exactly as :meth:`Trainer.fit` makes it (one micro-batch)."""
    images, mask, targets = batch
    values = trainer._micro_step(images, mask, targets, 1.0, sync=True)
    trainer._optimizer_step()
    return values


def step_metrics(trainer, batch, device, sizes, label: str) -> dict:
    """Warm-up + timed steps: it/s, images/s, peak memory, last losses finite."""
    record: dict = {}
    values = None
    for _ in range(sizes["warmup"]):
        values = train_step(trainer, batch)
    with peak_memory(device, record, f"{label}_peak_mem_mb"):
        times = timed(lambda: train_step(trainer, batch), device, sizes["steps"])
    step_s = statistics.median(times)
    record.update({f"{label}_step_s": round(step_s, 4), f"{label}_it_per_s": round(1 / step_s, 3),
                   f"{label}_images_per_s": round(len(batch[2]) / step_s, 2)})
    if values is not None:
        bad = {k: v for k, v in values.items() if not math.isfinite(v)}
        if bad:
            raise FloatingPointError(f"{label}: non-finite losses {bad}")
        record[f"{label}_loss"] = round(values["loss"], 4)
    return record


def attention_share(trainer, batch, device, step_s: dict, triton_ok: bool) -> dict:
    """Record the ``ms_deform_attn`` calls of one step, replay them alone (forward + backward, same
    autocast) with the torch and the Triton kernel; their sums over the step time of the same kernel."""
    torch = _torch()
    from mutdet.models import deformable_attention

    recorded = []
    original = deformable_attention.ms_deform_attn

    def recording(*args):
        recorded.append([a.detach().clone() for a in args])
        return original(*args)

    deformable_attention.ms_deform_attn = recording
    try:
        train_step(trainer, batch)
    finally:
        deformable_attention.ms_deform_attn = original
    kernels = {"torch": original}
    if triton_ok:
        from mutdet.models.ms_deform_attn_triton import ms_deform_attn_triton

        kernels["triton"] = ms_deform_attn_triton
    out = {"attn_calls_per_step": len(recorded)}
    for name, fn in kernels.items():
        def replay():
            for value, shapes, start, loc, weights in recorded:
                inputs = [t.requires_grad_(True) for t in (value, loc, weights)]
                with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=trainer.autocast):
                    y = fn(inputs[0], shapes, start, inputs[1], inputs[2])
                y.float().sum().backward()
                for t in inputs:
                    t.grad = None
        replay()  # warm-up (Triton compiles here)
        seconds = statistics.median(timed(replay, device, 3))
        out[f"attn_{name}_s_per_step"] = round(seconds, 4)
        if name in step_s:
            out[f"attn_{name}_share"] = round(seconds / step_s[name], 3)
    return out


def triton_usable(device) -> tuple[bool, str]:
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":  # the interpreter: a CPU check
        return False, "the Triton kernel runs on CUDA only"
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return False, f"triton is not importable: {exc}"
    return True, ""


# -- sections (each returns a dict of figures; raising marks it failed) ----------------------------
def section_launcher(device, sizes, work: Path) -> dict:
    from mutdet.engine.launch import candidate_devices, claim_devices, launch, release_devices

    # as on a workstation: no device preset, so the launcher claims one with a lock file
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "SLURM_STEP_GPUS",
                                                          "SLURM_JOB_GPUS", "GPU_DEVICE_ORDINAL")}
    devices = candidate_devices(env)
    if not devices:
        raise RuntimeError("the launcher sees no GPU (MUTDET_GPUS, nvidia-smi -L and torch list none)")
    lock_dir = work / "locks"
    seen = work / "child_devices.txt"
    code = f"import os; open({str(seen)!r}, 'w').write(os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>'))"
    start = time.perf_counter()
    rc = launch([sys.executable, "-c", code], gpus=1, lock_dir=lock_dir, env=env, poll=0.1, wait_timeout=30)
    child = seen.read_text() if seen.is_file() else None
    if rc != 0 or child not in devices:
        raise RuntimeError(f"launch(gpus=1): exit {rc}, child CUDA_VISIBLE_DEVICES={child!r}, devices {devices}")
    held = claim_devices(len(devices), devices, lock_dir, poll=0.1, timeout=10)  # every GPU: all were released
    try:
        try:
            claim_devices(1, devices, lock_dir, poll=0.1, timeout=0.5)
            double = True
        except TimeoutError:  # the expected outcome: every GPU is held
            double = False
    finally:
        release_devices(held)
    if double:
        raise RuntimeError("a GPU whose lock is held was claimed a second time")
    return {"devices": devices, "child_visible": child, "launch_s": round(time.perf_counter() - start, 2)}


def _attn_inputs(batch, shapes, queries, heads, channels, points, dtype, device, seed):
    torch = _torch()
    g = torch.Generator(device="cpu").manual_seed(seed)
    shapes_t = torch.tensor(shapes, dtype=torch.int64)
    start = torch.cat([shapes_t.new_zeros(1), shapes_t.prod(1).cumsum(0)[:-1]])
    tokens = int(shapes_t.prod(1).sum())
    levels = len(shapes)
    value = torch.randn(batch, tokens, heads, channels, generator=g)
    loc = torch.rand(batch, queries, heads, levels, points, 2, generator=g) * 1.2 - 0.1
    weights = torch.rand(batch, queries, heads, levels, points, generator=g).softmax(-1)
    return ([t.to(device=device, dtype=dtype) for t in (value, loc, weights)],
            shapes_t.to(device), start.to(device))


def section_deform_attn(device, sizes, work: Path) -> dict:
    torch = _torch()
    from mutdet.models.deformable_attention import ms_deform_attn
    from mutdet.models.ms_deform_attn_triton import ms_deform_attn_triton

    out: dict = {}
    # parity at a moderate size with odd level shapes and points outside the maps
    par, tim = sizes["attn_parity"], sizes["attn_timing"]
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 2e-2)):
        (value, loc, weights), st, start = _attn_inputs(2, par["shapes"], par["queries"], par["heads"],
                                                        par["channels"], 4, dtype, device, 0)
        results = {}
        for name, fn in (("torch", ms_deform_attn), ("triton", ms_deform_attn_triton)):
            # the reference in float32 on the same (rounded) inputs; the kernel on the inputs as they are
            inputs = [(t.float() if name == "torch" else t).detach().clone().requires_grad_(True)
                      for t in (value, loc, weights)]
            y = fn(inputs[0], st, start, inputs[1], inputs[2])
            grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(device)
            grads = torch.autograd.grad(y, inputs, grad.to(y.dtype))
            results[name] = [y.detach().float()] + [g.float() for g in grads]
        diffs = {}
        for what, a, b in zip(("out", "grad_value", "grad_loc", "grad_weights"), results["triton"], results["torch"]):
            diffs[what] = float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
        tag = "fp32" if dtype == torch.float32 else "bf16"
        out[f"parity_{tag}_max_rel_diff"] = {k: float(f"{v:.3g}") for k, v in diffs.items()}
        if max(diffs.values()) > tol:
            raise AssertionError(f"Triton vs torch ({tag}): max |diff| / scale {diffs} > {tol}")
    # timing at the paper's shapes: encoder self-attention (Q = S) and decoder cross-attention
    tokens = sum(h * w for h, w in tim["shapes"])
    for label, queries in (("encoder", tokens), ("decoder", tim["decoder_queries"])):
        for dtype in (torch.float32, torch.bfloat16):
            tag = f"{label}_{'fp32' if dtype == torch.float32 else 'bf16'}"
            (value, loc, weights), st, start = _attn_inputs(sizes["batch"], tim["shapes"], queries, tim["heads"],
                                                            tim["channels"], 4, dtype, device, 1)
            row = {}
            for name, fn in (("torch", ms_deform_attn), ("triton", ms_deform_attn_triton)):
                inputs = [t.detach().clone().requires_grad_(True) for t in (value, loc, weights)]

                def step():
                    y = fn(inputs[0], st, start, inputs[1], inputs[2])
                    y.float().sum().backward()
                    for t in inputs:
                        t.grad = None

                step()  # warm-up / Triton compilation
                base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
                rec: dict = {}
                with peak_memory(device, rec):
                    times = timed(step, device, sizes["attn_repeats"])
                row[f"{name}_ms"] = round(1000 * statistics.median(times), 3)
                if rec["peak_mem_mb"] is not None:
                    row[f"{name}_extra_mem_mb"] = round(rec["peak_mem_mb"] - base / 2**20, 1)
            row["speedup"] = round(row["torch_ms"] / row["triton_ms"], 2)
            out[tag] = row
    out["note"] = (f"median forward + backward over {sizes['attn_repeats']} runs; B={sizes['batch']}, levels "
                   f"{tim['shapes']}, {tim['heads']} heads x {tim['channels']}, 4 points; extra memory: peak above "
                   f"the inputs")
    return out


def _train_section(kind: str, device, sizes_name: str, sizes: dict, work: Path) -> dict:
    torch = _torch()
    ok, why = triton_usable(device)
    kwargs = model_kwargs(sizes_name)
    if kind == "finetune":
        from mutdet.stages.finetune import build_model_and_criterion

        num_classes, emb_dim = 15, None
        build = lambda: build_model_and_criterion(num_classes, dict(kwargs))  # noqa: E731
    else:
        from mutdet.stages.pretrain import build_pretrain_model

        cfg = paper_config()
        pt = cfg.pretrain
        num_classes, emb_dim = (cfg.cluster.k, kwargs.get("embed_dim", 256)) if sizes_name == "paper" else (8, 32)
        build = lambda: build_pretrain_model(  # noqa: E731
            variant=cfg.variant("mutdet"), num_classes=num_classes, model_kwargs=dict(kwargs),
            enhancement=dict(pt.enhancement), encoder_head_hidden=pt.encoder_head_hidden,
            freeze_backbone=pt.freeze_backbone, loss=dict(pt.loss))
    items, batch = random_batch(sizes["image"], sizes["batch"], sizes["objects"], num_classes, 0, emb_dim)
    record: dict = {"input": f"{sizes['batch']}x3x{sizes['image']}x{sizes['image']}",
                    "amp": "bf16 autocast" if device.type == "cuda" else "none (CPU)"}
    torch.manual_seed(0)
    model, criterion = build()
    record["params_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
    trainer = make_trainer(model, criterion, items, device, work / kind)
    record.update(step_metrics(trainer, batch, device, sizes, "torch"))
    step_s = {"torch": record["torch_step_s"]}
    errors = []
    if ok:  # a failure of the Triton path is reported, and the torch figures above are kept
        from mutdet.models.deformable_attention import set_attention_kernel

        try:
            set_attention_kernel(trainer.model, "triton")
            record.update(step_metrics(trainer, batch, device, sizes, "triton"))
            step_s["triton"] = record["triton_step_s"]
            record["triton_step_speedup"] = round(record["torch_step_s"] / record["triton_step_s"], 3)
        except Exception as exc:  # noqa: BLE001
            errors.append(f"triton step: {type(exc).__name__}: {exc}\n{traceback.format_exc()[-3000:]}")
            ok = False
        finally:
            set_attention_kernel(trainer.model, "torch")
    else:
        record["triton"] = f"skipped: {why}"
    try:
        record.update(attention_share(trainer, batch, device, step_s, ok))
    except Exception as exc:  # noqa: BLE001
        errors.append(f"attention share: {type(exc).__name__}: {exc}\n{traceback.format_exc()[-3000:]}")
    if errors:
        record["_errors"] = errors
    return record


def section_finetune(device, sizes, work, sizes_name="paper") -> dict:
    return _train_section("finetune", device, sizes_name, sizes, work)


def section_pretrain(device, sizes, work, sizes_name="paper") -> dict:
    return _train_section("pretrain", device, sizes_name, sizes, work)


def section_detect(device, sizes, work, sizes_name="paper") -> dict:
    import numpy as np

    torch = _torch()
    from mutdet.stages.detect import detect_image
    from mutdet.stages.finetune import build_model_and_criterion
    from mutdet.tiling import TilingParams

    torch.manual_seed(0)
    model, _ = build_model_and_criterion(15, model_kwargs(sizes_name))
    model = model.to(device).eval()
    side = sizes["detect_image"]
    tile = sizes["image"]
    tiling = TilingParams(size=tile, gap=tile // 5)
    image = np.random.default_rng(0).integers(0, 255, (side, side, 3), dtype=np.uint8)
    record: dict = {"image": f"{side}x{side}", "tile": tile}
    run = lambda: detect_image(model, image, "random", tiling=tiling, input_size=tile, device=device)  # noqa: E731
    with torch.no_grad():
        labels, scores, boxes = run()  # warm-up
        with peak_memory(device, record):
            times = timed(run, device, 2 if sizes_name == "paper" else 1)
    if not (np.isfinite(scores).all() and np.isfinite(boxes).all()):
        raise FloatingPointError("detect: non-finite scores or boxes")
    record.update({"detections": int(len(labels)), "image_s": round(statistics.median(times), 3)})
    return record


def section_sam(device, sizes, work, sizes_name="paper") -> dict:
    import numpy as np

    torch = _torch()
    from mutdet.proposals import sam as sam_module

    torch.manual_seed(0)
    start = time.perf_counter()
    if sizes["sam_type"] == "tiny":
        model = sam_module.build_sam_tiny()
        generator = {"points_per_side": 4, "points_per_batch": 16}
    else:
        try:
            with torch.device(device):  # random weights straight on the GPU: no 2.5 GB CPU init
                model = sam_module.SAM_BUILDERS[sizes["sam_type"]]()
        except Exception:  # noqa: BLE001 -- a constructor that ignores the default device: build on the CPU
            model = sam_module.SAM_BUILDERS[sizes["sam_type"]]()
        generator = dict(paper_config().proposals.sam.generator)
    precision = "bf16" if device.type == "cuda" else "fp32"
    proposer = sam_module.SamProposer(model, generator=generator, max_per_tile=1000, device=str(device),
                                      precision=precision)
    record: dict = {"model": sizes["sam_type"], "precision": precision, "generator": generator,
                    "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
                    "build_s": round(time.perf_counter() - start, 2)}
    rng = np.random.default_rng(0)
    tiles = [rng.integers(0, 255, (sizes["sam_tile"], sizes["sam_tile"], 3), dtype=np.uint8)
             for _ in range(sizes["sam_tiles"] + sizes["sam_extra_tiles"])]
    with peak_memory(device, record):
        counts, times = [], []
        for image in tiles:
            sync(device)
            t0 = time.perf_counter()
            counts.append(len(proposer(image)))
            sync(device)
            times.append(time.perf_counter() - t0)
    timed_tiles = times[1:] or times  # the first tile includes cuDNN / autotuning warm-up
    record.update({"tiles": len(tiles), "proposals": counts, "first_tile_s": round(times[0], 3),
                   "tiles_per_s": round(len(timed_tiles) / sum(timed_tiles), 3)})
    return record


def section_embed(device, sizes, work, sizes_name="paper") -> dict:
    import numpy as np

    torch = _torch()
    from mutdet.embedding.backbone import build_embedder
    from mutdet.embedding.pipeline import embed_tiles

    crop = 224 if sizes_name == "paper" else 32
    embedder = build_embedder(backbone=sizes["embed_backbone"], weights="none", crop_size=crop).to(device)
    rng = np.random.default_rng(0)
    side = sizes["image"]

    def tiles():
        for k in range(sizes["embed_tiles"]):
            n = sizes["embed_boxes"]
            boxes = np.column_stack([rng.uniform(0.1, 0.9, (n, 2)) * side, rng.uniform(8, side / 4, (n, 2)),
                                     rng.uniform(-math.pi / 2, math.pi / 2, n)])
            yield {"position": k, "tile_id": f"t{k}", "frame_size": (side, side), "boxes": torch.from_numpy(boxes),
                   "image": torch.from_numpy(rng.integers(0, 255, (3, side, side), dtype=np.uint8))}

    precision = "bf16" if device.type == "cuda" else "fp32"
    batch = 256 if sizes_name == "paper" else 4
    list(embed_tiles(embedder, tiles(), batch_size=batch, precision=precision))  # warm-up
    record: dict = {"backbone": sizes["embed_backbone"], "precision": precision, "crop": crop, "batch_size": batch}
    with peak_memory(device, record):
        sync(device)
        t0 = time.perf_counter()
        outs = list(embed_tiles(embedder, tiles(), batch_size=batch, precision=precision))
        sync(device)
        seconds = time.perf_counter() - t0
    total = sum(len(e) for _, e in outs)
    if not all(np.isfinite(e).all() for _, e in outs):
        raise FloatingPointError("embed: non-finite embeddings")
    record.update({"proposals": total, "dim": int(outs[0][1].shape[1]), "proposals_per_s": round(total / seconds, 1)})
    return record


def section_compile(device, sizes, work, sizes_name="paper") -> dict:
    from mutdet.stages.finetune import build_model_and_criterion

    torch = _torch()
    items, batch = random_batch(sizes["image"], sizes["batch"], sizes["objects"], 15, 0)
    record: dict = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        model, criterion = build_model_and_criterion(15, model_kwargs(sizes_name))
        trainer = make_trainer(model, criterion, items, device, work / f"compile-{compiled}", compile=compiled)
        label = "compiled" if compiled else "eager"
        t0 = time.perf_counter()
        for _ in range(sizes["compile_warmup"]):
            train_step(trainer, batch)
        sync(device)
        record[f"{label}_first_{sizes['compile_warmup']}_steps_s"] = round(time.perf_counter() - t0, 1)
        with peak_memory(device, record, f"{label}_peak_mem_mb"):
            times = timed(lambda: train_step(trainer, batch), device, sizes["steps"])
        record[f"{label}_it_per_s"] = round(1 / statistics.median(times), 3)
        del trainer, model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    record["compile_speedup"] = round(record["compiled_it_per_s"] / record["eager_it_per_s"], 3)
    return record


# -- driver -------------------------------------------------------------------------------------------
def run_section(name: str, device_name: str, sizes_name: str, out_file: Path) -> int:
    """Child process: one section, its result as JSON in ``out_file``."""
    torch = _torch()
    device = torch.device(device_name)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    sizes = SIZES[sizes_name]
    fn = globals()[f"section_{name}"]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"bench-gpu-{name}-") as work:
        try:
            kwargs = {} if name in ("launcher", "deform_attn") else {"sizes_name": sizes_name}
            figures = fn(device, sizes, Path(work), **kwargs)
            errors = figures.pop("_errors", [])
            result = {"status": "ok", "figures": figures}
            if errors:  # part of the section failed; its other figures stand
                result.update(status="failed", reason=errors[0].splitlines()[0], traceback="\n\n".join(errors))
        except Exception as exc:  # noqa: BLE001 -- reported, the other sections still run
            result = {"status": "failed", "reason": f"{type(exc).__name__}: {exc}",
                      "traceback": traceback.format_exc()[-4000:]}
    result["seconds"] = round(time.perf_counter() - start, 1)
    out_file.write_text(json.dumps(result, default=str))
    return 0


def environment() -> dict:
    torch = _torch()
    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda_build": torch.version.cuda,
            "cuda_available": torch.cuda.is_available(), "host": platform.node()}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError as exc:
        info["triton"] = f"not importable: {exc}"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update({"gpu": props.name, "gpu_memory_gb": round(props.total_memory / 2**30, 1),
                     "gpu_count": torch.cuda.device_count(), "bf16_supported": torch.cuda.is_bf16_supported()})
    return info


def markdown(summary: dict) -> str:
    lines = ["# bench-gpu", "", f"Generated {summary['date']} in {summary['total_s']} s "
             f"(budget {summary['budget_s']} s), device `{summary['device']}`, sizes `{summary['sizes']}`.", "",
             "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in summary["environment"].items()]
    lines += ["", "| section | status | seconds | note |", "|---|---|---|---|"]
    for name, r in summary["sections"].items():
        lines.append(f"| {name} | {r['status']} | {r.get('seconds', '')} | {r.get('reason', '')} |")
    for name, r in summary["sections"].items():
        if r.get("figures"):
            lines += ["", f"## {name}", "", "| figure | value |", "|---|---|"]
            for k, v in r["figures"].items():
                lines.append(f"| {k} | {json.dumps(v) if isinstance(v, (dict, list)) else v} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=REPO / "results" / "bench-gpu", help="folder for the summaries")
    p.add_argument("--budget-s", type=float, default=450.0, help="wall-clock budget of all sections together")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (with --tiny: a plumbing check)")
    p.add_argument("--tiny", action="store_true", help="toy sizes (for --device cpu)")
    p.add_argument("--one", help=argparse.SUPPRESS)  # child mode: run one section
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    sizes_name = "tiny" if args.tiny else "paper"
    if args.one:
        return run_section(args.one, args.device, sizes_name, args.result)

    wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(wanted) - set(SECTIONS))
    if unknown:
        p.error(f"unknown section(s) {unknown}; have {list(SECTIONS)}")
    began = time.perf_counter()
    env = environment()
    device = args.device
    no_gpu = None
    if device.startswith("cuda") and not env["cuda_available"]:
        no_gpu = (f"no CUDA device (torch {env['torch']}, torch.cuda.is_available() is False, "
                  f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')!r})")
    sections: dict = {}
    for name in wanted:
        left = args.budget_s - (time.perf_counter() - began)
        if no_gpu:
            sections[name] = {"status": "skipped", "reason": no_gpu}
        elif not device.startswith("cuda") and name in CUDA_ONLY and not (
                name == "deform_attn" and os.environ.get("TRITON_INTERPRET") == "1"):
            sections[name] = {"status": "skipped", "reason": CUDA_ONLY[name]}
        elif left < 20:
            sections[name] = {"status": "skipped", "reason": f"the budget of {args.budget_s:.0f} s is spent"}
        else:
            with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as fh:
                result_file = Path(fh.name)
            cmd = [sys.executable, str(Path(__file__).resolve()), "--one", name, "--device", device,
                   "--result", str(result_file)] + (["--tiny"] if args.tiny else [])
            print(f"[bench-gpu] {name} (at most {left:.0f} s) ...", flush=True)
            t0 = time.perf_counter()
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=left, cwd=REPO)
                text = result_file.read_text() if result_file.is_file() else ""
                if text:
                    sections[name] = json.loads(text)
                else:
                    sections[name] = {"status": "failed", "reason": f"the section process exited {proc.returncode}",
                                      "traceback": proc.stderr[-4000:]}
            except subprocess.TimeoutExpired:  # not a failure of the code: the budget ran out
                sections[name] = {"status": "timed out",
                                  "reason": f"stopped after {left:.0f} s, the rest of --budget-s {args.budget_s:.0f}"}
            finally:
                result_file.unlink(missing_ok=True)
            sections[name].setdefault("seconds", round(time.perf_counter() - t0, 1))
        r = sections[name]
        why = "no CUDA device" if no_gpu else r.get("reason")
        print(f"[bench-gpu] {name}: {r['status']}" + (f" ({why})" if why else ""), flush=True)
    summary = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "device": device, "sizes": sizes_name,
               "budget_s": args.budget_s, "total_s": round(time.perf_counter() - began, 1), "environment": env,
               "sections": sections}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench-gpu.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    (args.out / "bench-gpu.md").write_text(markdown(summary))
    print(f"[bench-gpu] wrote {args.out / 'bench-gpu.json'} and {args.out / 'bench-gpu.md'}")
    failed = [n for n, r in sections.items() if r["status"] == "failed"]
    if failed:
        print(f"[bench-gpu] FAILED: {failed} (tracebacks in the JSON)")
        return 1
    if no_gpu:
        print(f"[bench-gpu] every section skipped: {no_gpu}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
