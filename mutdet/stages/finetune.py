"""Stage ``finetune``: train the oriented DETR on labelled tiles from an initialisation, then
detect on the test tiles, merge to full images and (optionally) evaluate.

Outputs in ``out_dir``:

====================================  ==================================================================
``config.json``                       the resolved parameters of this run + code version
``init.json``                         what the initialisation loaded / dropped (see :mod:`mutdet.engine.transfer`)
``metrics.jsonl``                     training log, one line per logged step
``checkpoints/last.pt``               resume state (a rerun resumes from it if made by the same settings,
                                      tiles, init checkpoint and code; else it is set aside)
``checkpoint.pt``                     final weights + the config needed to rebuild the model
``detections_tiles.parquet``          ``detections``, frame ``tile`` (test tiles)
``detections.parquet``                ``detections``, frame ``image`` (merged with rotated NMS)
``evaluation/metrics.json`` + plot    when a dataset config is given
====================================  ==================================================================

Logic lives in :mod:`mutdet.data` and :mod:`mutdet.engine`; this module wires them.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch

from mutdet.data.datasets import TileDataset
from mutdet.data.transforms import build_transforms
from mutdet.engine import dist
from mutdet.engine.checkpoint import json_safe, save_checkpoint
from mutdet.engine.device import resolve_device
from mutdet.engine.inference import predict_tiles
from mutdet.engine.trainer import TrainConfig, Trainer
from mutdet.engine.transfer import load_pretrained
from mutdet.io.artefacts import write_artefact
from mutdet.io.atomic import write_json
from mutdet.io.identity import file_digest, files_identity
from mutdet.losses import build_criterion
from mutdet.models import build_detector
from mutdet.stages.common import code_version, log
from mutdet.stages.merge import DEFAULT_MERGE_IOU, merge_table

__all__ = ["run", "build_model_and_criterion"]

# Keywords of build_detector that the config's `finetune.model` section sets (the paper's model).
def build_model_and_criterion(num_classes: int, model_kwargs: dict, loss_kwargs: dict | None = None):
    """The detector and its criterion from the same keywords (decoder depth and angle coder shared)."""
    model = build_detector(num_classes=num_classes, **model_kwargs)
    shared = {k: model_kwargs[k] for k in ("num_angle_bins", "angle_radius") if k in model_kwargs}
    criterion = build_criterion(num_classes=num_classes, num_decoder_layers=len(model.decoder.layers),
                                **shared, **(loss_kwargs or {}))
    return model, criterion


def _class_names(dataset: TileDataset, classes: Sequence[str] | None) -> list[str]:
    if classes is not None:
        classes = list(classes)
        seen = dataset.class_names
        bad = {i: n for i, n in seen.items() if i >= len(classes) or classes[i] != n}
        if bad:
            raise ValueError(f"class ids/names of the tiles {bad} do not match the configured classes {classes}")
        return classes
    if not dataset.class_names:
        raise ValueError("no objects in the training tiles and no class list given")
    top = max(dataset.class_names)
    return [dataset.class_names.get(i, f"class{i}") for i in range(top + 1)]


def run(*, tiles_dirs: Sequence[Path], test_tiles_dirs: Sequence[Path] | None, out_dir: Path, model_kwargs: dict,
        train_kwargs: dict, image_ids: Sequence[str] | None = None, init: str | Path = "none", seed: int = 0,
        classes: Sequence[str] | None = None, input_size: int | None = None, flip_probability: float = 0.25,
        loss_kwargs: dict | None = None, device: str = "auto", wandb_mode: str | None = None,
        dataset=None, test_split: str | None = None, merge_iou: float = DEFAULT_MERGE_IOU,
        num_select: int = 300, score_threshold: float = 0.0, eval_batch_size: int = 2) -> dict:
    """Fine-tune, detect on the test tiles, merge and evaluate.

    Args:
        tiles_dirs: training tiles folders (the shards of the training split).
        test_tiles_dirs: tiles folders to detect on after training (None: no detection).
        out_dir: output folder (see the module docstring).
        model_kwargs: keywords of :func:`mutdet.models.build_detector` except ``num_classes``.
        train_kwargs: fields of :class:`mutdet.engine.trainer.TrainConfig` (``seed`` is set from ``seed``).
        image_ids: train only on tiles of these source images (a data fraction); None: all.
        init: ``none`` (backbone weights from ``model_kwargs`` only) or a pre-training checkpoint path.
        seed: seeds model initialisation, data order and augmentation.
        classes: the dataset's class names (index = class id); None: taken from the training objects.
        input_size: longer side of the model input (tiles are resized; None keeps the tile size).
        flip_probability: probability of each flip direction (horizontal, vertical, diagonal).
        loss_kwargs: extra keywords of :func:`mutdet.losses.build_criterion` (weights, costs).
        device: ``auto | cpu | cuda | cuda:N``; under torchrun each rank uses ``cuda:LOCAL_RANK``.
        wandb_mode: online | offline | disabled (default: ``WANDB_MODE``, else offline).
        dataset, test_split: a :class:`mutdet.config.DatasetConfig` and split name to evaluate the
            merged detections with :func:`mutdet.stages.evaluate.run` (None: no evaluation).
        merge_iou: rotated-NMS IoU when merging tiles to images.
        num_select, score_threshold, eval_batch_size: inference settings (per tile).
    Returns:
        ``{"train": trainer result, "detections": path or None, "metrics": evaluation dict or None}``.
    """
    out_dir = Path(out_dir)
    torch_device = dist.init_distributed(resolve_device(device, "finetune.device"))
    torch.manual_seed(seed)
    train_config = TrainConfig.from_dict({**train_kwargs, "seed": seed})
    train_set = TileDataset(tiles_dirs, image_ids=image_ids, skip_empty=True,
                            transform=build_transforms(train=True, input_size=input_size,
                                                       flip_probability=flip_probability))
    classes = _class_names(train_set, classes)
    model, criterion = build_model_and_criterion(len(classes), model_kwargs, loss_kwargs)
    init_report = {"init": "none"} if str(init) == "none" else load_pretrained(model, Path(init))
    params = json_safe({
        "model": model_kwargs, "train": asdict(train_config), "loss": loss_kwargs or {}, "classes": classes,
        "input_size": input_size, "flip_probability": flip_probability, "init": str(init), "seed": seed,
        "tiles_dirs": list(tiles_dirs), "test_tiles_dirs": list(test_tiles_dirs or []),
        "image_ids": None if image_ids is None else sorted(image_ids), "num_train_tiles": len(train_set),
        "merge_iou": merge_iou, "num_select": num_select, "score_threshold": score_threshold,
        "code_version": code_version(),
    })
    if dist.is_main_process():
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json(out_dir / "config.json", params)
        write_json(out_dir / "init.json", init_report)
    log.info("finetune: %d training tiles, %d classes, init %s -> %s", len(train_set), len(classes), init, out_dir)

    # What the trained weights depend on (detection settings and paths do not): a resumable state made
    # with anything else is set aside, not resumed (mutdet.engine.trainer).
    resume_key = json_safe({
        "model": model_kwargs, "loss": loss_kwargs or {}, "classes": classes, "input_size": input_size,
        "flip_probability": flip_probability, "seed": seed,
        "image_ids": None if image_ids is None else sorted(image_ids),
        "init": "none" if str(init) == "none" else file_digest(init),
        "tiles": [files_identity([Path(d) / "tiles.parquet", Path(d) / "objects.parquet"]) for d in tiles_dirs],
        "code_version": code_version(),
    })
    trainer = Trainer(model=model, criterion=criterion, dataset=train_set, config=train_config, out_dir=out_dir,
                      device=torch_device, run_config=params, resume_key=resume_key, wandb_mode=wandb_mode)
    result = trainer.fit()
    if not dist.is_main_process():
        return {"train": result, "detections": None, "metrics": None}
    save_checkpoint(out_dir / "checkpoint.pt", model=trainer.model, epoch=trainer.epoch, step=trainer.step,
                    config=params, meta={"finished": result["finished"], "kind": "finetune"})

    detections_path, metrics = None, None
    if test_tiles_dirs:
        test_set = TileDataset(test_tiles_dirs, transform=build_transforms(train=False, input_size=input_size))
        tile_dets = predict_tiles(trainer.model, test_set, classes=classes, device=torch_device,
                                  batch_size=eval_batch_size, num_select=num_select, score_threshold=score_threshold)
        meta = {"frame": "tile", "checkpoint": str(out_dir / "checkpoint.pt"), "code_version": code_version()}
        write_artefact(tile_dets, out_dir / "detections_tiles.parquet", "detections", meta)
        merged = merge_table(tile_dets, test_set.tiles, merge_iou)
        detections_path = out_dir / "detections.parquet"
        write_artefact(merged, detections_path, "detections", {**meta, "frame": "image", "merge_iou": merge_iou})
        log.info("finetune: %d tile detections -> %d image detections -> %s", tile_dets.num_rows, merged.num_rows,
                 detections_path)
        if dataset is not None and test_split is not None:
            from mutdet.stages.evaluate import run as evaluate

            metrics = evaluate(dataset=dataset, split=test_split, out_dir=out_dir / "evaluation",
                               detections=detections_path)
    return {"train": result, "detections": detections_path, "metrics": metrics}
