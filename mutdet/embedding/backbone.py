"""The frozen proposal embedder: ImageNet-normalise, rotated crop, torchvision ResNet to C5, average pool.

Two ways to embed a proposal (``embedding.mode``):

* ``crop`` (the paper, METHOD.md step 3): a rotated crop of the context-enlarged box, stretched to
  ``crop_size`` squared, through the ResNet to C5, average-pooled: one backbone pass per proposal.
* ``pooled`` (not in the paper or its reference code; a faster approximation): one backbone pass over the
  whole (resized) tile, then :func:`~mutdet.embedding.rotated_crop.roi_align_rotated` of each
  context-enlarged box on the C5 map into ``ceil(crop_size / 32)`` squared bins (the grid C5 has for
  a crop; 2 x 2 samples a bin), average-pooled: the same ``D``-dimensional vector, from features
  that see the box at the tile's scale and with the tile's surroundings rather than stretched to
  ``crop_size``. ``pool_level="c4"`` instead aligns on C4 into ``ceil(crop_size / 16)`` squared bins
  and runs the C5 stage (``layer4``) on them, as Faster R-CNN's C4 head: kept for the measurement in
  ``benchmarks/embeddings.py``, not offered by the config (see the README for the figures and the choice).

The ResNet comes from :func:`mutdet.models.backbone.build_backbone` (the project's one backbone
builder) with every stage frozen and frozen BatchNorm. The embedding dimension follows the backbone:
C5 has 2048 channels for ResNet-50/101 and 512 for ResNet-18/34.

Weights (``weights``):

* ``imagenet``: torchvision's ``IMAGENET1K_V1`` of that ResNet, as a file in the torch hub cache
  (``torch.hub.get_dir()/checkpoints/<file name of the weights URL>``, e.g. ``resnet50-0676ba61.pth``).
  :func:`resolve_weights` checks for the file before any work; if it is absent it tries the download
  once and turns a failure into :class:`BackboneWeightsError` naming the path to put the file at.
* a path: a torchvision ResNet ``state_dict`` of the same depth (``fc.*`` keys are ignored).
* ``none``: random weights (torchvision's init under a fixed seed, so every shard and rerun embeds
  with the same network), for tests and the offline demo; logged as a warning, because such
  embeddings carry no semantics.
"""
from __future__ import annotations

import logging
import math
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn

from mutdet.embedding.rotated_crop import roi_align_rotated, roi_mean_weights, rotated_roi_align
from mutdet.models.backbone import IMAGENET_MEAN, IMAGENET_STD, RESNET_DEPTHS, build_backbone

__all__ = ["BackboneWeightsError", "IMAGENET_MEAN", "IMAGENET_STD", "EMBEDDING_BACKBONES", "EMBEDDING_MODES",
           "POOL_LEVELS", "imagenet_checkpoint", "resolve_weights", "embedding_dim", "ProposalEmbedder",
           "build_embedder"]

log = logging.getLogger("mutdet.embedding")

EMBEDDING_BACKBONES = tuple(RESNET_DEPTHS[d] for d in sorted(RESNET_DEPTHS))  # resnet18 ... resnet101
RANDOM_WEIGHTS_SEED = 0  # weights "none": a fixed random init, so every shard embeds with the same network
DOWNLOAD_SOCKET_TIMEOUT_S = 30.0  # per socket operation while trying the one download
EMBEDDING_MODES = ("crop", "pooled")  # embedding.mode: per-proposal crops (the paper) or one pass per tile
POOL_LEVELS = ("c5", "c4")  # where the pooled mode aligns its boxes (c4: then the C5 stage on the bins)
POOL_SAMPLING_RATIO = 2  # samples per bin side in the pooled mode (torchvision's MultiScaleRoIAlign uses 2)
POOL_CHUNK = 64  # boxes per roi_align_rotated / layer4 call in the pooled mode (memory bound only)


class BackboneWeightsError(ValueError):
    """Backbone weights that cannot be found or loaded; the message says where the file should be."""


def _check_backbone(backbone: str) -> None:
    if backbone not in EMBEDDING_BACKBONES:
        raise ValueError(f"embedding.backbone: {backbone!r} is not one of {list(EMBEDDING_BACKBONES)}")


def imagenet_checkpoint(backbone: str) -> tuple[str, Path]:
    """``(url, cache path)`` of torchvision's ``IMAGENET1K_V1`` weights of ``backbone`` in the torch hub cache."""
    _check_backbone(backbone)
    url = torchvision.models.get_model_weights(backbone).IMAGENET1K_V1.url
    return url, Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def resolve_weights(backbone: str, weights: str) -> str:
    """Check that the weights exist before any work; returns ``"none"`` or a local state-dict path.

    Args:
        backbone: ``resnet18 | resnet34 | resnet50 | resnet101``.
        weights: ``imagenet | none | <path>``.
    Raises:
        BackboneWeightsError: ``imagenet`` not cached and not downloadable (the message gives the exact
            cache path and URL), or a path that is not a file.
    """
    _check_backbone(backbone)
    if weights == "none":
        log.warning("embedding.weights is 'none': the %s has RANDOM weights. Its embeddings and clusters "
                    "carry no semantics; use this only for tests and the offline demo.", backbone)
        return "none"
    if weights != "imagenet":
        if not Path(weights).is_file():
            raise BackboneWeightsError(f"embedding.weights: no file {weights} (expected a torchvision {backbone} "
                                       f"state_dict, or 'imagenet' or 'none')")
        return str(weights)
    url, path = imagenet_checkpoint(backbone)
    if path.is_file():
        return str(path)
    log.info("%s ImageNet weights not in the torch hub cache (%s); downloading %s", backbone, path, url)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_SOCKET_TIMEOUT_S)
    try:
        torch.hub.load_state_dict_from_url(url, progress=False, check_hash=True)
    except Exception as exc:  # URLError, OSError, hash mismatch: all mean the file is not usable here
        raise BackboneWeightsError(
            f"embedding.weights: imagenet: torchvision's {backbone} IMAGENET1K_V1 weights are not in the torch "
            f"hub cache and could not be downloaded ({type(exc).__name__}: {exc}). Put the file {path.name} at "
            f"{path} (download {url} on a machine with internet; TORCH_HOME moves the cache), or set "
            f"embedding.weights to a local {backbone} state_dict path") from exc
    finally:
        socket.setdefaulttimeout(previous)
    if not path.is_file():
        raise BackboneWeightsError(f"embedding.weights: imagenet: the download of {url} did not leave {path}")
    return str(path)


class ProposalEmbedder(nn.Module):
    """Tiles + le90 proposals -> one ``D``-dimensional embedding per proposal (frozen, eval mode).

    Args:
        backbone: a :class:`mutdet.models.backbone.Backbone` returning ``[C3, C4, C5]``.
        crop_size: side of the square crop fed to the backbone (224); in the pooled mode it sets the bins.
        context: the box's ``w`` and ``h`` are enlarged by this factor before cropping (1.5).
        pool_level: ``c5 | c4``: the map the pooled mode aligns on (see the module docstring).

    Attributes:
        dim: the embedding dimension, C5's channels.
    """

    def __init__(self, backbone: nn.Module, *, crop_size: int = 224, context: float = 1.5, pool_level: str = "c5"):
        super().__init__()
        if pool_level not in POOL_LEVELS:
            raise ValueError(f"ProposalEmbedder: pool_level {pool_level!r} is not one of {list(POOL_LEVELS)}")
        self.backbone = backbone.eval().requires_grad_(False)
        self.crop_size = crop_size
        self.context = context
        self.pool_level = pool_level
        self.dim = backbone.out_channels[-1]
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(3, 1, 1) * 255, persistent=False)

    def train(self, mode: bool = True) -> "ProposalEmbedder":
        """Always eval: the embedder is frozen (BatchNorm statistics never change)."""
        return super().train(False)

    def normalize(self, image: torch.Tensor) -> torch.Tensor:
        """RGB uint8 ``(3, H, W)`` -> ImageNet-normalised float32 ``(3, H, W)`` on the module's device."""
        return (image.to(self.mean.device, torch.float32) - self.mean) / self.std

    def crops(self, images: list[torch.Tensor], boxes: torch.Tensor, image_index: torch.Tensor,
              frame_sizes: list[tuple[float, float]]) -> torch.Tensor:
        """Normalised images ``(3, H_b, W_b)`` + le90 boxes ``(N, 5)`` in each image's box frame ->
        crops ``(N, 3, crop_size, crop_size)`` (see :func:`mutdet.embedding.rotated_crop.rotated_roi_align`)."""
        return rotated_roi_align(images, boxes, image_index, frame_sizes, (self.crop_size, self.crop_size),
                                 self.context)

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        """Crops ``(N, 3, S, S)`` -> C5 ``(N, D, S/32, S/32)`` -> average pool -> ``(N, D)`` (dtype of C5)."""
        return self.backbone(crops)[-1].mean(dim=(2, 3))

    def pooled(self, images: torch.Tensor, boxes: torch.Tensor, image_index: torch.Tensor,
               frame_sizes: list[tuple[float, float]]) -> torch.Tensor:
        """One backbone pass over whole images, every box pooled from its map (``embedding.mode: pooled``).

        Args:
            images: ``(B, 3, H, W)`` normalised images (:meth:`normalize`), each resized edge to edge
                from its box frame.
            boxes: ``(N, 5)`` le90 in each image's box frame (tile pixels; pixel centres at integers).
            image_index: ``(N,)`` int64, the image of each box.
            frame_sizes: ``B`` pairs ``(frame_width, frame_height)``.
        Returns:
            ``(N, D)`` float32 in box order: the mean over ``ceil(crop_size / stride)`` squared bins of
            the context-enlarged box on C5 (computed as :func:`roi_mean_weights` times the map), or on
            C4 followed by ``layer4`` (see ``pool_level``).
        """
        net = self.backbone
        c4 = net.layer3(net.layer2(net.layer1(net.stem(images))))
        level, stride = (net.layer4(c4), net.strides[2]) if self.pool_level == "c5" else (c4, net.strides[1])
        level = level.float()
        bins = math.ceil(self.crop_size / stride)
        height, width = images.shape[-2:]
        out = torch.empty((len(boxes), self.dim), dtype=torch.float32, device=images.device)
        image_index = image_index.to(images.device)
        boxes = boxes.to(device=images.device, dtype=torch.float64)
        for b, (frame_w, frame_h) in enumerate(frame_sizes):
            rows = torch.nonzero(image_index == b).flatten()
            # Box frame -> torchvision's continuous image coordinates of the resized image: (x + 1/2) * W / W_frame.
            scale = (width / frame_w / stride, height / frame_h / stride)
            for start in range(0, len(rows), POOL_CHUNK):
                take = rows[start:start + POOL_CHUNK]
                rois = torch.cat([boxes[take, :2] + 0.5, boxes[take, 2:]], 1)  # (n, 5) cx, cy, w, h, theta
                if self.pool_level == "c5":  # the mean over the bins is linear in C5: (n, Hf Wf) @ (Hf Wf, D)
                    weights = roi_mean_weights(rois, tuple(level.shape[-2:]), (bins, bins), spatial_scale=scale,
                                               sampling_ratio=POOL_SAMPLING_RATIO, context=self.context)
                    out[take] = weights.float() @ level[b].flatten(1).T
                else:  # (n, C4, bins, bins) -> layer4 -> (n, D, bins / 2, bins / 2) -> mean
                    pooled = roi_align_rotated(level[b:b + 1], torch.cat([torch.zeros_like(rois[:, :1]), rois], 1),
                                               (bins, bins), spatial_scale=scale, sampling_ratio=POOL_SAMPLING_RATIO,
                                               context=self.context)
                    out[take] = net.layer4(pooled.to(c4.dtype)).float().mean(dim=(2, 3))
        return out


def build_embedder(*, backbone: str = "resnet50", weights: str = "imagenet", crop_size: int = 224,
                   context: float = 1.5, pool_level: str = "c5") -> ProposalEmbedder:
    """A frozen :class:`ProposalEmbedder` on CPU; ``weights`` is resolved by :func:`resolve_weights`."""
    resolved = resolve_weights(backbone, weights)
    try:
        with torch.random.fork_rng(devices=[]):  # random weights are the same in every job and shard
            torch.manual_seed(RANDOM_WEIGHTS_SEED)
            net = build_backbone(name=backbone, weights=resolved, frozen_stages=4, frozen_bn=True)
    except Exception as exc:  # torch.load raises pickle, zip and runtime errors alike; load_state_dict ValueError
        raise BackboneWeightsError(f"embedding.weights: {weights} ({resolved}) is not a usable torchvision "
                                   f"{backbone} state_dict: {exc}") from exc
    return ProposalEmbedder(net, crop_size=crop_size, context=context, pool_level=pool_level)


def embedding_dim(backbone: str) -> int:
    """The embedding dimension of ``backbone`` (C5 channels), without building its weights."""
    _check_backbone(backbone)
    with torch.device("meta"):
        return build_backbone(name=backbone, weights="none", frozen_stages=4).out_channels[-1]
