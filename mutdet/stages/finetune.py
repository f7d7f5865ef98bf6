"""Stage ``finetune``: train the oriented DETR on labelled tiles from an initialisation, then
detect on the test tiles. The ``merge`` stage maps the tile detections to full images (a CPU job, not
held inside the GPU job) and the ``evaluate`` stage scores them.

Outputs in ``out_dir``:

====================================  ==================================================================
``config.json``                       the resolved parameters of this run + code version
``init.json``                         what the initialisation loaded / dropped (see :mod:`mutdet.engine.transfer`)
``metrics.jsonl``                     training log, one line per logged step
``checkpoints/last.pt``               resume state (a rerun resumes from it if made by the same settings,
                                      tiles, init checkpoint and code; else it is set aside)
``checkpoint.pt``                     final weights + the config needed to rebuild the model
``detections_tiles.parquet``          ``detections``, frame ``tile`` (test tiles); under DDP every rank
                                      detects every world-size-th tile and rank 0 joins the shards
                                      (``detections_tiles.rank-<r>.parquet``, removed once joined)
====================================  ==================================================================

Logic lives in :mod:`mutdet.data` and :mod:`mutdet.engine`; this module wires them.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path


import numpy as np
import pyarrow as pa
from torch.utils.data import Subset

from mutdet.config import Config
from mutdet.data.datasets import TileDataset
from mutdet.data.transforms import build_transforms
from mutdet.engine import dist
from mutdet.engine.checkpoint import json_safe, save_checkpoint, seed_all
from mutdet.engine.device import resolve_device
from mutdet.engine.inference import predict_tiles
from mutdet.engine.trainer import TrainConfig, Trainer
from mutdet.engine.transfer import load_pretrained
from mutdet.io.artefacts import read_artefact, write_artefact
from mutdet.io.datasets import list_image_ids
from mutdet.io.atomic import write_json
from mutdet.io.identity import file_digest, files_identity
from mutdet.losses import build_criterion
from mutdet.models import build_detector
from mutdet.stages.common import code_version, log

__all__ = ["run", "build_model_and_criterion"]


def build_model_and_criterion(num_classes: int, model_kwargs: dict, loss_kwargs: dict | None = None):
    """The detector (``finetune.model`` keywords) and its criterion (``finetune.loss``), with the same
    decoder depth."""
    model = build_detector(num_classes=num_classes, **model_kwargs)
    criterion = build_criterion(num_classes=num_classes, num_decoder_layers=len(model.decoder.layers),
                                **(loss_kwargs or {}))
    return model, criterion


def _check_classes(dataset: TileDataset, classes: list[str]) -> list[str]:
    """The configured class order, checked against the class ids and names the tiles carry."""
    bad = {i: n for i, n in dataset.class_names.items() if i >= len(classes) or classes[i] != n}
    if bad:
        raise ValueError(f"class ids/names of the tiles {bad} do not match the configured classes {classes}")
    return classes


def run(cfg: Config, *, dataset: str, epochs: int, tiles_dirs: Sequence[Path], test_tiles_dirs: Sequence[Path],
        image_ids_file: Path | None, init: str | Path, out_dir: Path, seed: int | None = None) -> dict:
    """Fine-tune on ``tiles_dirs`` with the ``finetune`` section's settings, then detect on the test tiles.

    Args:
        dataset: the dataset's name (its class order names the classes).
        epochs: the schedule (one value of ``finetune.runs[].epochs``).
        tiles_dirs: training tiles folders (the shards of the training split).
        test_tiles_dirs: tiles folders to detect on after training (empty: no detection).
        image_ids_file: train only on tiles of the images listed there (a data fraction); None: all.
        init: ``none`` (backbone weights from ``finetune.model`` only) or a pre-training checkpoint path.
        out_dir: output folder (see the module docstring).
        seed: the training seed (one value of ``finetune.runs[].seeds``: the job's ``{seed}`` wildcard); None:
            the config's top-level ``seed``. It seeds the weights not loaded from ``init``, the tile order and
            the augmentation; the training images are ``image_ids_file``'s whatever the seed.
    Returns:
        ``{"train": trainer result, "detections": path or None}``.
    """
    ft, ds = cfg.finetune, cfg.dataset(dataset)
    seed = cfg.seed if seed is None else int(seed)
    if seed < 0:
        raise ValueError(f"finetune: seed {seed} is negative (finetune.runs[].seeds are non-negative integers)")
    model_kwargs, loss_kwargs, input_size = dict(ft.model), dict(ft.loss), ft.input_size
    image_ids = (None if image_ids_file is None
                 else list_image_ids(Path(), Path(image_ids_file), ds.image_extensions))
    out_dir = Path(out_dir)
    torch_device = dist.init_distributed(resolve_device(ft.device, "finetune.device"))
    seed_all(seed)
    train_config = TrainConfig.from_dict({**ft.train_kwargs(epochs), "seed": seed})
    train_set = TileDataset(tiles_dirs, image_ids=image_ids, skip_empty=True,
                            transform=build_transforms(train=True, input_size=input_size,
                                                       flip_probability=ft.flip_probability))
    classes = _check_classes(train_set, list(ds.classes))
    model, criterion = build_model_and_criterion(len(classes), model_kwargs, loss_kwargs)
    init_report = {"init": "none"} if str(init) == "none" else load_pretrained(model, Path(init))
    params = json_safe({
        "model": model_kwargs, "train": asdict(train_config), "loss": loss_kwargs, "classes": classes,
        "input_size": input_size, "flip_probability": ft.flip_probability, "init": str(init), "seed": seed,
        "tiles_dirs": list(tiles_dirs), "test_tiles_dirs": list(test_tiles_dirs or []),
        "image_ids": None if image_ids is None else sorted(image_ids), "num_train_tiles": len(train_set),
        "num_select": ft.num_select, "score_threshold": ft.score_threshold,
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
        "model": model_kwargs, "loss": loss_kwargs, "classes": classes, "input_size": input_size,
        "flip_probability": ft.flip_probability, "seed": seed,
        "image_ids": None if image_ids is None else sorted(image_ids),
        "init": "none" if str(init) == "none" else file_digest(init),
        "tiles": [files_identity([Path(d) / "tiles.parquet", Path(d) / "objects.parquet"]) for d in tiles_dirs],
        "code_version": code_version(),
    })
    trainer = Trainer(model=model, criterion=criterion, dataset=train_set, config=train_config, out_dir=out_dir,
                      device=torch_device, run_config=params, resume_key=resume_key, wandb_mode=ft.wandb_mode)
    result = trainer.fit()
    if dist.is_main_process():
        save_checkpoint(out_dir / "checkpoint.pt", model=trainer.model, epoch=trainer.epoch, step=trainer.step,
                        config=params, meta={"finished": result["finished"], "kind": "finetune"})
    if not test_tiles_dirs:
        return {"train": result, "detections": None}

    # Detection on the test tiles, sharded over the ranks (tile i on rank i mod world size) so that a
    # multi-GPU job does not idle all but one device; rank 0 reassembles the shards in tile order.
    test_set = TileDataset(test_tiles_dirs, transform=build_transforms(train=False, input_size=input_size))
    rank, world = dist.get_rank(), dist.get_world_size()
    shard = test_set if world == 1 else Subset(test_set, range(rank, len(test_set), world))
    tile_dets = predict_tiles(trainer.model, shard, classes=classes, device=torch_device,
                              batch_size=ft.eval_batch_size, num_select=ft.num_select,
                              score_threshold=ft.score_threshold)
    meta = {"frame": "tile", "checkpoint": str(out_dir / "checkpoint.pt"), "code_version": code_version()}
    detections_path = out_dir / "detections_tiles.parquet"
    if world > 1:
        write_artefact(tile_dets, rank_part(detections_path, rank), "detections", meta)
        dist.barrier()
        if not dist.is_main_process():
            return {"train": result, "detections": None}
        part_files = [rank_part(detections_path, r) for r in range(world)]
        tile_dets = in_tile_order(read_artefact(part_files, "detections"), test_set.tile_ids)
    write_artefact(tile_dets, detections_path, "detections", meta)
    if world > 1:
        for part in part_files:
            part.unlink()
    log.info("finetune: %d tile detections on %d tiles (%d rank(s)) -> %s", tile_dets.num_rows, len(test_set),
             world, detections_path)
    return {"train": result, "detections": detections_path}


def rank_part(path: Path, rank: int) -> Path:
    """The file one rank writes its shard of the detections to, beside ``path``."""
    return path.with_name(f"{path.stem}.rank-{rank}{path.suffix}")


def in_tile_order(table: pa.Table, tile_ids: Sequence[str]) -> pa.Table:
    """Rows of ``table`` (column ``id`` = tile id) grouped in the order of ``tile_ids``, each tile's rows
    in their order in ``table``: the single-process output's order, whatever rank wrote which tile."""
    position = {t: i for i, t in enumerate(tile_ids)}
    ids = table.column("id").to_pylist()
    unknown = sorted({i for i in ids if i not in position})
    if unknown:
        raise ValueError(f"detections of tiles that are not in the test set: {unknown[:3]}")
    key = np.fromiter((position[i] for i in ids), dtype=np.int64, count=len(ids))
    return table.take(pa.array(np.argsort(key, kind="stable")))
