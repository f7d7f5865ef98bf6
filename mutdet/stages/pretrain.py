"""Stage ``pretrain``: MutDet / DETReg / ablation-variant pre-training on tiles + proposals + targets.

Outputs in ``out_dir``:

=========================  =====================================================================
``config.json``            the resolved parameters of this run (variant flags included) + code version
``metrics.jsonl``          training log: every loss term, ``align_pos_cosine`` / ``align_neg_cosine``
``checkpoints/last.pt``    resume state (a rerun resumes from it if made by the same settings, inputs
                           and code; else it is set aside, see mutdet.engine.trainer)
``checkpoint.pt``          final weights of the whole pre-training model (``detector.*`` and the
                           pre-training-only parts); :func:`mutdet.engine.transfer.load_pretrained`
                           takes what fine-tuning can use
``loss_curves.png``        this run's four losses against the step
``dataset/<key>.npy``      while training: the kept proposals (``pretrain.max_boxes`` per tile) as one
                           record array, memory-mapped by every rank (mutdet.data.pretrain), with its
                           index ``<key>.json``; removed when the run has finished
=========================  =====================================================================

Logic lives in :mod:`mutdet.models.pretrain`, :mod:`mutdet.losses.pretrain`, :mod:`mutdet.data.pretrain`
and :mod:`mutdet.engine`; this module wires them.
"""
from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path


from mutdet.config import Config
from mutdet.data.pretrain import ProposalTileDataset
from mutdet.data.transforms import build_transforms
from mutdet.engine import dist
from mutdet.engine.checkpoint import json_safe, save_checkpoint, seed_all
from mutdet.engine.device import resolve_device
from mutdet.engine.trainer import TrainConfig, Trainer
from mutdet.io.atomic import write_json
from mutdet.io.identity import file_digest, files_identity
from mutdet.losses.pretrain import PretrainCriterion, build_pretrain_criterion
from mutdet.models import build_detector
from mutdet.models.pretrain import PretrainModel
from mutdet.stages.common import code_version, log
from mutdet.variants import PretrainVariant

__all__ = ["run", "build_pretrain_model"]


def build_pretrain_model(*, variant: PretrainVariant, num_classes: int, model_kwargs: Mapping,
                         enhancement: Mapping, encoder_head_hidden: int, freeze_backbone: bool,
                         loss: Mapping) -> tuple[PretrainModel, PretrainCriterion]:
    """The pre-training model and its criterion (``num_classes``: k pseudo-classes, or 1 for ``agnostic``)
    from the ``finetune.model`` keywords and the ``pretrain`` section's ``enhancement`` and ``loss``."""
    classes = 1 if variant.classes == "agnostic" else num_classes
    detector = build_detector(num_classes=classes, **model_kwargs)
    model = PretrainModel(detector=detector, variant=variant, enhancement_layers=enhancement["num_layers"],
                          enhancement_heads=enhancement["num_heads"], enhancement_mlp_dim=enhancement["mlp_dim"],
                          encoder_head_hidden=encoder_head_hidden, freeze_backbone=freeze_backbone)
    criterion = build_pretrain_criterion(variant=variant, num_classes=classes,
                                         num_decoder_layers=len(detector.decoder.layers), **loss)
    return model, criterion


def run(cfg: Config, *, variant: str, tiles_dirs: Sequence[Path], proposals_files: Sequence[Path],
        targets_files: Sequence[Path], out_dir: Path) -> dict:
    """Pre-train the ``pretrain.variants`` entry ``variant`` with the ``pretrain`` section's settings on
    the detector of ``finetune.model`` (so that the weights transfer).

    Args:
        variant: a ``pretrain.variants`` name (its flags: :mod:`mutdet.variants`).
        tiles_dirs, proposals_files, targets_files: one entry per shard, in the same order.
        out_dir: output folder (module docstring).
    Returns:
        ``{"train": trainer result, "checkpoint": path}``.
    """
    pt, seed = cfg.pretrain, cfg.seed
    variant = cfg.variant(variant)
    model_kwargs, enhancement, loss = dict(cfg.finetune.model), dict(pt.enhancement), dict(pt.loss)
    out_dir = Path(out_dir)
    torch_device = dist.init_distributed(resolve_device(pt.device, "pretrain.device"))
    seed_all(seed)
    train_config = TrainConfig.from_dict({**pt.train_kwargs(), "seed": seed})
    # The kept proposals (best max_boxes per tile) in one memory-mapped array under out_dir/dataset,
    # keyed to the inputs: rank 0 builds it (streaming the shards), the other ranks then map the same
    # file, so the pages are shared instead of each rank loading every shard.
    dataset_kwargs = dict(class_agnostic=variant.classes == "agnostic", max_boxes=pt.max_boxes,
                          require_norms=variant.alignment == "l1", cache_dir=out_dir / "dataset",
                          transform=build_transforms(train=True, input_size=pt.input_size,
                                                     flip_probability=pt.flip_probability))
    if dist.is_main_process():
        train_set = ProposalTileDataset(tiles_dirs, proposals_files, targets_files, **dataset_kwargs)
    dist.barrier()
    if not dist.is_main_process():
        train_set = ProposalTileDataset(tiles_dirs, proposals_files, targets_files, **dataset_kwargs)
    if len(train_set) == 0:
        raise ValueError(f"pretrain: no tile with proposals in {[str(p) for p in proposals_files]}")
    model, criterion = build_pretrain_model(
        variant=variant, num_classes=train_set.num_classes, model_kwargs=model_kwargs, enhancement=enhancement,
        encoder_head_hidden=pt.encoder_head_hidden, freeze_backbone=pt.freeze_backbone, loss=loss)
    params = json_safe({
        "kind": "pretrain", "variant": asdict(variant), "num_classes": train_set.num_classes,
        "embedding_dim": train_set.dim, "model": model_kwargs, "train": asdict(train_config),
        "loss": loss, "enhancement": enhancement, "encoder_head_hidden": pt.encoder_head_hidden,
        "freeze_backbone": pt.freeze_backbone, "input_size": pt.input_size,
        "flip_probability": pt.flip_probability, "max_boxes": pt.max_boxes, "seed": seed,
        "tiles_dirs": list(tiles_dirs), "proposals_files": list(proposals_files),
        "targets_files": list(targets_files), "num_tiles": len(train_set), "code_version": code_version(),
    })
    if dist.is_main_process():
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json(out_dir / "config.json", params)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("pretrain %s: %d tiles, %d %s, %.2fM trainable parameters, flags %s -> %s", variant.name, len(train_set),
             train_set.num_classes, "pseudo-classes" if variant.classes == "pseudo" else "class (agnostic)",
             trainable / 1e6, {k: v for k, v in asdict(variant).items() if k != "name"}, out_dir)

    # What the trained weights depend on: the settings above without paths, and the inputs' content.
    paths = ("tiles_dirs", "proposals_files", "targets_files", "train")
    resume_key = {**{k: v for k, v in params.items() if k not in paths},
                  "tiles": [file_digest(Path(d) / "tiles.parquet") for d in tiles_dirs],
                  "proposals": files_identity(proposals_files), "targets": files_identity(targets_files)}
    trainer = Trainer(model=model, criterion=criterion, dataset=train_set, config=train_config, out_dir=out_dir,
                      device=torch_device, run_config=params, resume_key=resume_key, wandb_mode=pt.wandb_mode)
    result = trainer.fit()
    if not dist.is_main_process():
        return {"train": result, "checkpoint": None}
    checkpoint = out_dir / "checkpoint.pt"
    shutil.rmtree(out_dir / "dataset", ignore_errors=True)  # a cache of the inputs: not kept past the run
    save_checkpoint(checkpoint, model=trainer.model, epoch=trainer.epoch, step=trainer.step, config=params,
                    meta={"finished": result["finished"], "kind": "pretrain", "variant": variant.name})
    from mutdet.stages.loss_curves import plot_loss_curves

    plot_loss_curves({variant.name: out_dir / "metrics.jsonl"}, out_dir / "loss_curves.png",
                     title=f"pre-training losses: {variant.name}")
    log.info("pretrain %s: %d steps -> %s", variant.name, trainer.step, checkpoint)
    return {"train": result, "checkpoint": checkpoint}
