"""Initialising a fine-tuning detector from a pre-training checkpoint (MutDet, DETReg or a variant).

Transfer rule (METHOD.md, "Transfer to fine-tuning"): drop the mutual enhancement module with the
enhanced branch's own projection, the embedding heads, the pre-training classifier (k pseudo-classes
or the DETReg objectness class) and the denoising label embedding; keep backbone, neck, encoder,
decoder, box and angle branches, query and level embeddings and the encoder proposal head.

A pre-training checkpoint holds the state dict of :class:`mutdet.models.pretrain.PretrainModel`:
the detector's keys under ``detector.`` (the prefix is removed here) and the pre-training-only parts
(``enhancement_projection.``, ``mutual_enhancement.``, ``encoder_embedding_head.``,
``decoder_embedding_head.``) beside it. A bare
detector state dict (no ``detector.`` keys) is accepted too. Every key ends in exactly one of:

* ``loaded``: kept, copied into the fine-tuning model;
* ``dropped`` with its reason: ``pretraining-only`` (:data:`DROP_PATTERNS`) or ``unknown`` (the
  fine-tuning model has no such key);
* ``missing``: fine-tuning keys the checkpoint does not provide; they keep their fresh initialisation.

A kept key whose shape differs from the fine-tuning model's is an error (the checkpoint was trained
with another architecture: different width, depth or levels), listing the mismatches: nothing is
silently reinitialised.
"""
from __future__ import annotations

import logging
import re
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from mutdet.engine.checkpoint import load_checkpoint

__all__ = ["DROP_PATTERNS", "DETECTOR_PREFIX", "TransferError", "transfer_state_dict", "load_pretrained"]

log = logging.getLogger("mutdet")

DETECTOR_PREFIX = "detector."
DROP_PATTERNS = (
    r"^enhancement_projection\.",  # the enhanced branch's Linear + LayerNorm (F), not the two-stage head's
    r"^mutual_enhancement\.",  # the enhancement module
    r"embedding_head\.",  # encoder / decoder embedding heads
    r"^class_heads\.",  # pre-training classifier (pseudo-classes / objectness)
    r"^label_embed\.",  # denoising label embedding (one row per pre-training class)
)


class TransferError(ValueError):
    """A pre-training checkpoint whose kept weights do not fit the fine-tuning model."""


def _strip(source: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detector keys without the ``detector.`` prefix; other keys of a pre-training model unchanged."""
    if not any(k.startswith(DETECTOR_PREFIX) for k in source):
        return dict(source)
    return {k[len(DETECTOR_PREFIX):] if k.startswith(DETECTOR_PREFIX) else k: v for k, v in source.items()}


def transfer_state_dict(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor],
                        drop_patterns=DROP_PATTERNS, source_name: str = "checkpoint") -> tuple[dict[str, torch.Tensor], dict]:
    """Select the entries of ``source`` to load into a model whose state dict is ``target``.

    Returns ``(kept, report)``; ``report`` = ``{"loaded": [...], "dropped": {key: reason}, "missing": [...]}``.
    Raises :class:`TransferError` naming every kept key whose shape differs.
    """
    kept, dropped, mismatched = {}, {}, []
    for key, value in _strip(source).items():
        if any(re.search(p, key) for p in drop_patterns):
            dropped[key] = "pretraining-only"
        elif key not in target:
            dropped[key] = "unknown"
        elif tuple(target[key].shape) != tuple(value.shape):
            mismatched.append(f"{key}: {tuple(value.shape)} in the checkpoint, {tuple(target[key].shape)} in the model")
        else:
            kept[key] = value
    if mismatched:
        raise TransferError(f"{source_name}: {len(mismatched)} weight(s) do not fit the fine-tuning model (was it "
                            f"pre-trained with another `finetune.model`?): " + "; ".join(mismatched[:8])
                            + (" ..." if len(mismatched) > 8 else ""))
    missing = sorted(k for k in target if k not in kept)
    return kept, {"loaded": sorted(kept), "dropped": dict(sorted(dropped.items())), "missing": missing}


def _groups(keys) -> str:
    """``encoder.layers.0.x``, ``encoder.layers.1.y`` -> ``encoder (2)``: a one-line summary by top module."""
    counts = Counter(k.split(".")[0] for k in keys)
    return ", ".join(f"{name} ({n})" for name, n in sorted(counts.items())) or "none"


def load_pretrained(model: nn.Module, path: str | Path) -> dict:
    """Load the transferable weights of a pre-training checkpoint (``model`` entry of a
    :mod:`mutdet.engine.checkpoint` file) into ``model``; returns the report of
    :func:`transfer_state_dict` plus ``source``, and logs which keys were kept, dropped and left new."""
    ckpt = load_checkpoint(path)
    kept, report = transfer_state_dict(ckpt["model"], model.state_dict(), source_name=str(path))
    if not kept:
        raise TransferError(f"{path}: no weight of this checkpoint fits the fine-tuning model "
                            f"(dropped: {list(report['dropped'].items())[:5]})")
    model.load_state_dict(kept, strict=False)
    log.info("init from %s: %d tensors kept, %d dropped, %d newly initialised", path, len(report["loaded"]),
             len(report["dropped"]), len(report["missing"]))
    log.info("  kept: %s", _groups(report["loaded"]))
    reasons = Counter(report["dropped"].values())
    for reason in sorted(reasons):
        log.info("  dropped (%s): %s", reason, _groups(k for k, r in report["dropped"].items() if r == reason))
    log.info("  newly initialised: %s", _groups(report["missing"]))
    meta = ckpt.get("meta") or {}
    return {"source": str(path), "kind": meta.get("kind"), "variant": meta.get("variant"), **report}
