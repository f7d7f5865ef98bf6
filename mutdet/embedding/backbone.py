"""The frozen proposal embedder: ImageNet-normalise, rotated crop, torchvision ResNet to C5, average pool.

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
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn

from mutdet.embedding.rotated_crop import rotated_roi_align
from mutdet.models.backbone import IMAGENET_MEAN, IMAGENET_STD, RESNET_DEPTHS, build_backbone

__all__ = ["BackboneWeightsError", "IMAGENET_MEAN", "IMAGENET_STD", "EMBEDDING_BACKBONES", "imagenet_checkpoint",
           "resolve_weights", "embedding_dim", "ProposalEmbedder", "build_embedder"]

log = logging.getLogger("mutdet.embedding")

EMBEDDING_BACKBONES = tuple(RESNET_DEPTHS[d] for d in sorted(RESNET_DEPTHS))  # resnet18 ... resnet101
RANDOM_WEIGHTS_SEED = 0  # weights "none": a fixed random init, so every shard embeds with the same network
DOWNLOAD_SOCKET_TIMEOUT_S = 30.0  # per socket operation while trying the one download


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
        crop_size: side of the square crop fed to the backbone (224).
        context: the box's ``w`` and ``h`` are enlarged by this factor before cropping (1.5).

    Attributes:
        dim: the embedding dimension, C5's channels.
    """

    def __init__(self, backbone: nn.Module, *, crop_size: int = 224, context: float = 1.5):
        super().__init__()
        self.backbone = backbone.eval().requires_grad_(False)
        self.crop_size = crop_size
        self.context = context
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


def build_embedder(*, backbone: str = "resnet50", weights: str = "imagenet", crop_size: int = 224,
                   context: float = 1.5) -> ProposalEmbedder:
    """A frozen :class:`ProposalEmbedder` on CPU; ``weights`` is resolved by :func:`resolve_weights`."""
    resolved = resolve_weights(backbone, weights)
    try:
        with torch.random.fork_rng(devices=[]):  # random weights are the same in every job and shard
            torch.manual_seed(RANDOM_WEIGHTS_SEED)
            net = build_backbone(name=backbone, weights=resolved, frozen_stages=4, frozen_bn=True)
    except Exception as exc:  # torch.load raises pickle, zip and runtime errors alike; load_state_dict ValueError
        raise BackboneWeightsError(f"embedding.weights: {weights} ({resolved}) is not a usable torchvision "
                                   f"{backbone} state_dict: {exc}") from exc
    return ProposalEmbedder(net, crop_size=crop_size, context=context)


def embedding_dim(backbone: str) -> int:
    """The embedding dimension of ``backbone`` (C5 channels), without building its weights."""
    _check_backbone(backbone)
    with torch.device("meta"):
        return build_backbone(name=backbone, weights="none", frozen_stages=4).out_channels[-1]
