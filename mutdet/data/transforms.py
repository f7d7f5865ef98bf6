"""Augmentation and normalisation for oriented detection, with torchvision v2 on rotated boxes.

Boxes enter and leave as **le90** ``(N, 5)`` tensors (pixels, radians, clockwise; see
:mod:`mutdet.boxes`). Inside, torchvision works on ``tv_tensors.BoundingBoxes`` in ``CXCYWHR``
(degrees, counter-clockwise); the two are converted only through :func:`mutdet.boxes.le90_to_cxcywhr`
and :func:`mutdet.boxes.cxcywhr_to_le90`.

Pipeline (:func:`build_transforms`), applied to ``(image, target)``:

1. training only: :class:`RandomOrientedFlip` -- at most one of horizontal, vertical, diagonal
   (= both axes, a 180-degree turn, as mmdet/mmrotate's ``RandomFlip(direction=[...])``), each with
   probability 0.25 by default (so no flip with probability 0.25);
2. resize, keeping the aspect ratio, so that the longer side is ``input_size`` (tiles are square:
   ``input_size x input_size``); ``None`` keeps the size;
3. uint8 -> float in [0, 1] -> ImageNet normalisation (RGB mean / std).

Images are ``(3, H, W)`` uint8 RGB tensors. The target dict must hold ``boxes`` ``(N, 5)`` le90 pixels
of the image; ``boxes`` and ``size`` (``(2,)`` valid ``(h, w)`` after the transform) are rewritten,
``scale`` ``(2,)`` ``(sx, sy)`` (output pixels per input pixel) is set, other keys pass through.
"""
from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from mutdet.boxes import cxcywhr_to_le90, le90_to_cxcywhr
from mutdet.models.backbone import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "RandomOrientedFlip", "DetectionTransform", "build_transforms",
           "FLIP_DIRECTIONS"]

FLIP_DIRECTIONS = ("horizontal", "vertical", "diagonal")


def flip(inputs, direction: str):
    """Flip an image / ``BoundingBoxes`` (any tv_tensor) in one of :data:`FLIP_DIRECTIONS`."""
    if direction == "horizontal":
        return TF.horizontal_flip(inputs)
    if direction == "vertical":
        return TF.vertical_flip(inputs)
    if direction == "diagonal":
        return TF.vertical_flip(TF.horizontal_flip(inputs))
    raise ValueError(f"unknown flip direction {direction!r} (expected one of {FLIP_DIRECTIONS})")


class RandomOrientedFlip(v2.Transform):
    """One of horizontal / vertical / diagonal flips (or none), the same one for every input of a call.

    Args:
        probabilities: direction -> probability; their sum must be <= 1 (the rest: no flip).
        generator: optional ``random.Random`` (default: the global ``random`` module, which the data
            loader seeds per worker).
    """

    def __init__(self, probabilities: Mapping[str, float] | None = None, generator: random.Random | None = None):
        super().__init__()
        probs = dict(probabilities if probabilities is not None else {d: 0.25 for d in FLIP_DIRECTIONS})
        unknown = sorted(set(probs) - set(FLIP_DIRECTIONS))
        if unknown:
            raise ValueError(f"flip directions {unknown} unknown (expected {FLIP_DIRECTIONS})")
        if any(p < 0 for p in probs.values()) or sum(probs.values()) > 1 + 1e-9:
            raise ValueError(f"flip probabilities must be >= 0 and sum to <= 1, got {probs}")
        self.probabilities = probs
        self.generator = generator

    def choose(self) -> str | None:
        u = (self.generator or random).random()
        acc = 0.0
        for direction, p in self.probabilities.items():
            acc += p
            if u < acc:
                return direction
        return None

    def forward(self, *inputs):
        direction = self.choose()
        inputs = inputs if len(inputs) > 1 else inputs[0]
        if direction is None:
            return inputs
        if isinstance(inputs, tuple):
            return tuple(flip(x, direction) if isinstance(x, (tv_tensors.Image, tv_tensors.BoundingBoxes)) else x
                         for x in inputs)
        return flip(inputs, direction)


def to_tv_boxes(boxes: torch.Tensor, canvas_size: tuple[int, int]) -> tv_tensors.BoundingBoxes:
    """``(N, 5)`` le90 pixels -> ``BoundingBoxes`` ``CXCYWHR`` (degrees CCW), no clamping."""
    cxcywhr = torch.from_numpy(le90_to_cxcywhr(boxes.detach().cpu().double().numpy().reshape(-1, 5)))
    return tv_tensors.BoundingBoxes(cxcywhr, format="CXCYWHR", canvas_size=tuple(canvas_size), clamping_mode=None)


def from_tv_boxes(boxes: tv_tensors.BoundingBoxes) -> torch.Tensor:
    """``BoundingBoxes`` ``CXCYWHR`` -> ``(N, 5)`` float32 le90 pixels."""
    le90 = cxcywhr_to_le90(boxes.as_subclass(torch.Tensor).double().numpy().reshape(-1, 5))
    return torch.from_numpy(le90).float()


class DetectionTransform:
    """``(image uint8 (3, H, W), target) -> (image float (3, H', W') normalised, target)``.

    Args:
        flip_probabilities: see :class:`RandomOrientedFlip`; None or all zero: no flips (evaluation).
        input_size: longer side after resizing (None: keep).
        mean, std: normalisation (RGB, on [0, 1] values).
        generator: random source for the flips.
    """

    def __init__(self, *, flip_probabilities: Mapping[str, float] | None = None, input_size: int | None = None,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 generator: random.Random | None = None):
        steps = []
        self.flip = None
        if flip_probabilities and any(p > 0 for p in flip_probabilities.values()):
            self.flip = RandomOrientedFlip(flip_probabilities, generator)
            steps.append(self.flip)
        if input_size is not None:
            if input_size < 1:
                raise ValueError(f"input_size must be >= 1, got {input_size}")
            steps.append(v2.Resize(size=None, max_size=int(input_size), antialias=True))
        steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(mean), std=list(std))]
        self.pipeline = v2.Compose(steps)

    def __call__(self, image: torch.Tensor, target: Mapping,
                 generator: random.Random | None = None) -> tuple[torch.Tensor, dict]:
        """Transform one image and its target; ``generator`` (optional) replaces the random source of
        the flips for this call (a per-item seeded generator makes augmentation reproducible)."""
        height, width = image.shape[-2:]
        if generator is not None and self.flip is not None:
            self.flip.generator = generator
        boxes = to_tv_boxes(target["boxes"], (height, width))
        out_image, out_boxes = self.pipeline(tv_tensors.Image(image), boxes)
        new_h, new_w = out_image.shape[-2:]
        target = dict(target)
        target["boxes"] = from_tv_boxes(out_boxes)
        target["size"] = torch.tensor([new_h, new_w], dtype=torch.int64)
        target["scale"] = torch.tensor([new_w / width, new_h / height], dtype=torch.float64)
        return out_image.as_subclass(torch.Tensor), target


def build_transforms(*, train: bool, input_size: int | None, flip_probability: float = 0.25,
                     generator: random.Random | None = None) -> DetectionTransform:
    """The paper's pipeline: flips (training only; ``flip_probability`` per direction), resize, normalise."""
    flips = {d: flip_probability for d in FLIP_DIRECTIONS} if train else None
    return DetectionTransform(flip_probabilities=flips, input_size=input_size, generator=generator)
