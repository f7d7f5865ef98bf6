"""SAM proposals: segment-anything's ``SamAutomaticMaskGenerator``, each mask turned into a le90 box.

Loading: :data:`SAM_BUILDERS` maps a ``model_type`` to a function building the randomly initialised
architecture (by default ``segment_anything.sam_model_registry``'s ``vit_h``, ``vit_l``, ``vit_b``).
:func:`load_sam` reads the checkpoint (``torch.load(weights_only=True)``), compares its keys and shapes
with the architecture *before* any work starts and raises :class:`SamCheckpointError` naming the file
and the expected model type; it never runs with random weights. Other architectures with SAM's
classes plug in by adding a builder (tests register :func:`build_sam_tiny`).

Proposals: the generator runs on the tile (RGB, tile pixels) with every configured keyword; its
records come back as uncompressed RLE, so at most one full mask is decoded at a time. Records are
ranked by predicted IoU, each mask is cropped to SAM's box and goes through
:func:`mutdet.proposals.mask_box` (largest external contour -> minimum-area rectangle -> le90), and
at most ``max_per_tile`` boxes are kept, with SAM's predicted IoU, stability score and mask area.
"""
from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from segment_anything import SamAutomaticMaskGenerator, sam_model_registry
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

from mutdet.config import SamConfig
from mutdet.engine.device import resolve_device
from mutdet.proposals import ProposalSet, check_image, mask_box

log = logging.getLogger(__name__)

SAM_BUILDERS: dict[str, Callable[[], Sam]] = {name: sam_model_registry[name] for name in ("vit_h", "vit_l", "vit_b")}
"""``model_type`` -> builder of the randomly initialised architecture (called without arguments)."""

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
_SHOWN_MISMATCHES = 5


class SamCheckpointError(ValueError):
    """A SAM checkpoint that is missing, unreadable or does not fit the configured model type."""


def expected_state_shapes(model_type: str) -> dict[str, tuple[int, ...]]:
    """State-dict key -> tensor shape of ``model_type``'s architecture (built on the meta device: free)."""
    if model_type not in SAM_BUILDERS:
        raise ValueError(f"proposals.sam.model_type: unknown SAM model type {model_type!r} "
                         f"(have {sorted(SAM_BUILDERS)})")
    with torch.device("meta"):
        model = SAM_BUILDERS[model_type]()
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _describe_mismatch(expected: Mapping[str, tuple], found: Mapping[str, tuple]) -> list[str]:
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shapes = [f"{k}: checkpoint {found[k]}, model {expected[k]}" for k in expected
              if k in found and found[k] != expected[k]]
    problems = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
        if items:
            more = f" (+{len(items) - _SHOWN_MISMATCHES} more)" if len(items) > _SHOWN_MISMATCHES else ""
            problems.append(f"{len(items)} {label}: {', '.join(items[:_SHOWN_MISMATCHES])}{more}")
    return problems


def read_sam_checkpoint(model_type: str, checkpoint: str | Path | None) -> dict[str, torch.Tensor]:
    """Read a SAM checkpoint and check it fits ``model_type``; returns its state dict (CPU tensors).

    Raises:
        SamCheckpointError: no path, no file, not a readable ``torch.save`` state dict, or keys/shapes
            that do not match the architecture (the message lists the first mismatches and, when the
            file fits another registered model type, names it).
    """
    expected = expected_state_shapes(model_type)
    if checkpoint is None:
        raise SamCheckpointError(f"proposals.sam.checkpoint is not set: method sam needs the {model_type} weights "
                                 f"(e.g. sam_{model_type}_*.pth from the segment-anything release)")
    path = Path(checkpoint)
    if not path.is_file():
        raise SamCheckpointError(f"SAM checkpoint {path} not found (proposals.sam.checkpoint, model_type {model_type})")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises pickle, zip and runtime errors alike for bad files
        raise SamCheckpointError(f"SAM checkpoint {path}: not a readable PyTorch state dict "
                                 f"(expected model_type {model_type}): {exc}") from exc
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SamCheckpointError(f"SAM checkpoint {path}: expected a state dict of tensors for model_type "
                                 f"{model_type}, got {type(state).__name__}")
    found = {k: tuple(v.shape) for k, v in state.items()}
    problems = _describe_mismatch(expected, found)
    if problems:
        fits = [t for t in SAM_BUILDERS if t != model_type and expected_state_shapes(t) == found]
        hint = f"; it fits model_type {' / '.join(fits)}" if fits else ""
        raise SamCheckpointError(f"SAM checkpoint {path} does not match model_type {model_type}{hint}: "
                                 + "; ".join(problems))
    return dict(state)


def load_sam(model_type: str, checkpoint: str | Path | None) -> Sam:
    """Build ``model_type`` (a key of :data:`SAM_BUILDERS`) with ``checkpoint``'s weights: CPU, eval mode."""
    state = read_sam_checkpoint(model_type, checkpoint)
    model = SAM_BUILDERS[model_type]()
    model.load_state_dict(state, strict=True)
    return model.eval()


def build_sam_tiny(img_size: int = 128, embed_dim: int = 32, depth: int = 2) -> Sam:
    """A randomly initialised SAM of the library's own classes at toy size (its masks are meaningless).

    For tests and CPU benchmarks of the proposal plumbing: register it as a model type with
    ``SAM_BUILDERS["tiny"] = build_sam_tiny``. The image encoder sees ``img_size`` x ``img_size``
    inputs (patch 16, window 4, the last block global); prompts and masks are ``embed_dim`` wide.
    """
    patch = 16
    grid = img_size // patch
    return Sam(
        image_encoder=ImageEncoderViT(
            img_size=img_size, patch_size=patch, embed_dim=embed_dim, depth=depth, num_heads=2, mlp_ratio=2.0,
            out_chans=embed_dim, qkv_bias=True, norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6),
            use_rel_pos=True, window_size=4, global_attn_indexes=(depth - 1,),
        ),
        prompt_encoder=PromptEncoder(embed_dim=embed_dim, image_embedding_size=(grid, grid),
                                     input_image_size=(img_size, img_size), mask_in_chans=4),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=1, embedding_dim=embed_dim, mlp_dim=2 * embed_dim, num_heads=2),
            transformer_dim=embed_dim, iou_head_depth=2, iou_head_hidden_dim=embed_dim,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    ).eval()


def decode_rle(rle: Mapping[str, Any]) -> np.ndarray:
    """SAM's uncompressed RLE -> bool mask ``(H, W)``, vectorised (``amg.rle_to_mask`` loops in Python).

    The RLE is ``{"size": [H, W], "counts": [...]}``: run lengths over the column-major (Fortran order)
    flattened mask, alternating 0s and 1s, starting with a (possibly empty) run of 0s.
    """
    h, w = rle["size"]
    counts = np.asarray(rle["counts"], dtype=np.int64)
    values = np.arange(len(counts)) % 2 == 1  # runs alternate 0, 1, 0, ...
    return np.repeat(values, counts).reshape(w, h).T  # (W, H) column-major -> (H, W) view


def _autocast_forward(module: torch.nn.Module, device_type: str, dtype: torch.dtype) -> None:
    """Run ``module``'s forward under autocast and hand float32 tensors back to the caller."""
    forward = module.forward

    @functools.wraps(forward)
    def wrapped(*args, **kwargs):
        with torch.autocast(device_type=device_type, dtype=dtype):
            out = forward(*args, **kwargs)
        if isinstance(out, torch.Tensor):
            return out.float()
        return tuple(o.float() for o in out)

    module.forward = wrapped


class SamProposer:
    """SAM's automatic masks of one tile as le90 boxes in tile pixels.

    Args:
        model: a :class:`segment_anything.modeling.Sam` with its weights (see :func:`load_sam`); it is
            moved to ``device`` and, for ``bf16``/``fp16``, its image encoder and mask decoder are set
            to run under autocast (in place).
        generator: keyword arguments of ``SamAutomaticMaskGenerator`` (``points_per_side``,
            ``points_per_batch``, thresholds, crops, ...); ``output_mode`` is ours (uncompressed RLE).
        max_per_tile: keep at most this many boxes, highest predicted IoU first.
        device: ``auto`` | ``cpu`` | ``cuda`` | ``cuda:N``.
        precision: ``fp32`` | ``bf16`` | ``fp16``: autocast of the two networks; SAM's post-processing
            (mask upsampling, thresholds, stability scores, NMS) stays in float32.

    Score = predicted IoU. ``area`` is SAM's mask area in tile pixels.
    """

    def __init__(self, model: Sam, *, generator: Mapping[str, Any] | None = None, max_per_tile: int = 1000,
                 device: str = "auto", precision: str = "fp32"):
        generator = dict(generator or {})
        if "output_mode" in generator:
            raise ValueError("proposals.sam.generator.output_mode is fixed by mutdet (uncompressed_rle)")
        if precision not in PRECISIONS:
            raise ValueError(f"proposals.sam.precision: {precision!r} is not one of {sorted(PRECISIONS)}")
        self.device = resolve_device(device, "proposals.sam.device")
        self.precision = precision
        self.max_per_tile = max_per_tile
        model = model.to(self.device).eval()
        if PRECISIONS[precision] is not None:
            for module in (model.image_encoder, model.mask_decoder):
                _autocast_forward(module, self.device.type, PRECISIONS[precision])
        self.generator = SamAutomaticMaskGenerator(model, output_mode="uncompressed_rle", **generator)

    def generate(self, image_bgr: np.ndarray) -> list[dict]:
        """SAM's mask records of one tile ``(H, W, 3)`` BGR uint8 (``segmentation`` as uncompressed RLE)."""
        check_image(image_bgr)
        rgb = cv2.cvtColor(image_bgr, cv2.COLOR_BGR2RGB)
        return self.generator.generate(rgb)

    def to_proposals(self, records: list[dict]) -> ProposalSet:
        """Mask records -> the ``max_per_tile`` best boxes; decodes one mask at a time, cropped to SAM's box."""
        order = sorted(range(len(records)), key=lambda i: -records[i]["predicted_iou"])
        boxes, score, stability, area = [], [], [], []
        for i in order:
            if len(boxes) == self.max_per_tile:
                break
            record = records[i]
            x, y, w, h = (int(round(v)) for v in record["bbox"])  # XYWH, x + w is the last column
            mask = decode_rle(record["segmentation"])[y:y + h + 1, x:x + w + 1]
            box = mask_box(mask, (x, y))
            if box is None:  # an empty mask: nothing to box
                continue
            boxes.append(box)
            score.append(record["predicted_iou"])
            stability.append(record["stability_score"])
            area.append(record["area"])
        return ProposalSet.from_lists(np.reshape(boxes, (-1, 5)), score, area, predicted_iou=score,
                                      stability_score=stability)

    def __call__(self, image_bgr: np.ndarray) -> ProposalSet:
        """Propose on one tile ``(H, W, 3)`` BGR uint8 -> :class:`ProposalSet` (tile pixels)."""
        return self.to_proposals(self.generate(image_bgr))


def build_sam_proposer(cfg: SamConfig, *, max_per_tile: int) -> SamProposer:
    """Load and check the configured checkpoint, then build the proposer (precision applies on GPU only)."""
    device = resolve_device(cfg.device, "proposals.sam.device")
    precision = cfg.precision
    if device.type == "cpu" and precision != "fp32":
        log.warning("proposals.sam.precision %s is ignored on the CPU: running fp32", precision)
        precision = "fp32"
    model = load_sam(cfg.model_type, cfg.checkpoint)
    return SamProposer(model, generator=cfg.generator, max_per_tile=max_per_tile, device=str(device),
                       precision=precision)
