"""Batched inference on tiles -> a ``detections`` table in the tile frame.

Boxes come out of :class:`mutdet.models.PostProcess` in pixels of the (resized) model input and are
divided by the item's ``scale`` to get back to tile pixels (resizing is isotropic for square tiles;
for an anisotropic resize the angle would be approximate, so that case raises).
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from mutdet.data.datasets import collate
from mutdet.engine.checkpoint import load_checkpoint
from mutdet.engine.dist import unwrap_model
from mutdet.models import PostProcess

__all__ = ["predict_tiles", "predict_batch", "detections_table", "load_detector"]


def detections_table(ids: Sequence[str], class_ids, scores, boxes, classes: Sequence[str]) -> pa.Table:
    """Columns of the ``detections`` schema (see :mod:`mutdet.io.artefacts`) from arrays:
    ``ids`` ``(D,)``, ``class_ids`` ``(D,)``, ``scores`` ``(D,)``, ``boxes`` ``(D, 5)`` le90."""
    class_ids = np.asarray(class_ids, dtype=np.int16).reshape(-1)
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 5)
    return pa.table({
        "id": pa.array([str(i) for i in ids], pa.string()),
        "class_id": pa.array(class_ids, pa.int16()),
        "class_name": pa.array([classes[c] for c in class_ids.tolist()], pa.string()),
        "score": pa.array(np.asarray(scores, dtype=np.float32).reshape(-1), pa.float32()),
        **{c: pa.array(boxes[:, k]) for k, c in enumerate(("cx", "cy", "w", "h", "theta"))},
    })


def load_detector(checkpoint: str | Path, device: torch.device) -> tuple[nn.Module, dict]:
    """Rebuild a detector from a checkpoint alone (its ``config`` holds ``model`` keywords and
    ``classes``); returns ``(model in eval mode on device, config)``."""
    from mutdet.models import build_detector

    ckpt = load_checkpoint(checkpoint)
    config = ckpt.get("config") or {}
    if "model" not in config or "classes" not in config:
        raise ValueError(f"{checkpoint}: its config lacks 'model' and/or 'classes'; cannot rebuild the detector")
    model_kwargs = {**config["model"], "backbone_weights": "none"}  # the weights come from the checkpoint
    model = build_detector(num_classes=len(config["classes"]), **model_kwargs)
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), config


@torch.no_grad()
def predict_batch(model: nn.Module, post: PostProcess, images: torch.Tensor, padding_mask: torch.Tensor,
                  targets: Sequence[dict], device: torch.device, autocast: bool = False,
                  score_threshold: float = 0.0) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """One batch -> per item ``(labels (k,), scores (k,), boxes (k, 5) le90)`` in the item's own frame
    before its transform (model-input pixels divided by the item's ``scale``)."""
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=autocast):
        outputs = model(images.to(device), padding_mask=padding_mask.to(device))
    outputs = {k: outputs[k].float() for k in ("pred_logits", "pred_boxes", "pred_angle_logits")}
    sizes = torch.stack([t["size"] for t in targets]).to(device)
    results = []
    for target, result in zip(targets, post(outputs, sizes)):
        sx, sy = (float(v) for v in target["scale"])
        if abs(sx - sy) > 1e-6 * max(sx, sy):
            raise ValueError(f"item {target.get('tile_id')}: anisotropic resize ({sx}, {sy}) is not supported")
        keep = result["scores"] >= score_threshold
        boxes = result["boxes"][keep].double().cpu().numpy()
        boxes[:, :4] /= sx  # model-input pixels -> tile pixels (the angle is unchanged)
        results.append((result["labels"][keep].cpu().numpy(), result["scores"][keep].float().cpu().numpy(), boxes))
    return results


@torch.no_grad()
def predict_tiles(model: nn.Module, dataset: Dataset, *, classes: Sequence[str], device: torch.device,
                  batch_size: int = 2, num_select: int = 300, score_threshold: float = 0.0,
                  num_workers: int = 0, autocast: bool | None = None) -> pa.Table:
    """Run ``model`` on every item of ``dataset`` (items ``(image, target)`` with ``tile_id``,
    ``size`` and ``scale``, e.g. a :class:`mutdet.data.datasets.TileDataset` with an evaluation transform).

    Returns:
        a detections table (frame: tile; ``id`` = tile id; le90 in tile pixels), at most
        ``num_select`` per tile with score >= ``score_threshold``.
    """
    model = unwrap_model(model)
    was_training = model.training
    model.eval()
    post = PostProcess(angle_coder=model.angle_coder, num_select=num_select)
    autocast = device.type == "cuda" if autocast is None else autocast
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate)
    ids, labels, scores, boxes = [], [], [], []
    for images, mask, targets in loader:
        for target, (lab, sc, bx) in zip(targets, predict_batch(model, post, images, mask, targets, device, autocast,
                                                                 score_threshold)):
            ids += [target["tile_id"]] * len(lab)
            labels.append(lab), scores.append(sc), boxes.append(bx)
    model.train(was_training)
    return detections_table(ids, _cat(labels, (0,)), _cat(scores, (0,)), _cat(boxes, (0, 5)), classes)


def _cat(arrays: list[np.ndarray], empty_shape: tuple) -> np.ndarray:
    return np.concatenate(arrays) if arrays else np.zeros(empty_shape)
