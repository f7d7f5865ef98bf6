"""Backbones returning C3, C4, C5 (strides 8, 16, 32): torchvision ResNets and a light CPU net.

Both kinds share one layout, ``stem`` (stride 2 or 4) then ``layer1..layer4`` (strides 4, 8, 16, 32),
so freezing means the same thing for both: ``frozen_stages = -1`` trains everything, ``0`` freezes the
stem, ``k >= 1`` freezes the stem and ``layer1..layerk`` (4: the whole backbone), as in mmdet.

Input images are ``(B, 3, H, W)`` float, ImageNet-normalised (RGB, mean/std) for ResNets.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torchvision
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

__all__ = ["Backbone", "ResNetBackbone", "LightBackbone", "build_backbone", "RESNET_DEPTHS", "IMAGENET_MEAN",
           "IMAGENET_STD"]

RESNET_DEPTHS = {18: "resnet18", 34: "resnet34", 50: "resnet50", 101: "resnet101"}
# The normalisation every torchvision ImageNet backbone expects: RGB, for images scaled to [0, 1].
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Backbone(nn.Module):
    """Common part: freezing and the C3..C5 forward over ``stem, layer1..layer4``.

    Attributes:
        out_channels: channels of C3, C4, C5.
        strides: ``(8, 16, 32)``.
    """

    strides = (8, 16, 32)

    def __init__(self, *, stem: nn.Module, layers: list[nn.Module], out_channels: list[int], frozen_stages: int):
        super().__init__()
        if not -1 <= frozen_stages <= 4:
            raise ValueError(f"frozen_stages must be in [-1, 4], got {frozen_stages}")
        self.stem = stem
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.out_channels = list(out_channels)
        self.frozen_stages = frozen_stages
        self._freeze()

    def _frozen_modules(self) -> list[nn.Module]:
        stages = [self.stem, self.layer1, self.layer2, self.layer3, self.layer4]
        return stages[: self.frozen_stages + 1]

    def _freeze(self) -> None:
        for module in self._frozen_modules():
            for p in module.parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True) -> "Backbone":
        """Frozen stages stay in eval mode (their dropout/BN statistics never change)."""
        super().train(mode)
        for module in self._frozen_modules():
            module.eval()
        return self

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """``(B, 3, H, W)`` -> ``[C3 (B, c3, H/8, W/8), C4 (B, c4, H/16, W/16), C5 (B, c5, H/32, W/32)]``
        (sizes rounded up)."""
        x = self.layer1(self.stem(images))
        c3 = self.layer2(x)
        c4 = self.layer3(c3)
        return [c3, c4, self.layer4(c4)]


def _load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"backbone weights: no file {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    return state


class ResNetBackbone(Backbone):
    """A torchvision ResNet cut after ``layer4`` (no pooling, no fc).

    Args:
        depth: 18, 34, 50 or 101.
        weights: ``"none"`` (random init), ``"imagenet"`` (torchvision's ``IMAGENET1K_V1``, through its
            weights API and cache: needs the file in ``$TORCH_HOME`` or a network), or a path to a
            torchvision ResNet state dict (``fc.*`` keys are ignored; any other mismatch is an error).
        frozen_stages: see the module docstring.
        frozen_bn: BatchNorm layers are :class:`torchvision.ops.FrozenBatchNorm2d` (fixed statistics
            and affine); otherwise ordinary ``BatchNorm2d``.
    """

    def __init__(self, *, depth: int = 50, weights: str = "none", frozen_stages: int = 1, frozen_bn: bool = True):
        if depth not in RESNET_DEPTHS:
            raise ValueError(f"ResNet depth must be one of {sorted(RESNET_DEPTHS)}, got {depth}")
        norm_layer = FrozenBatchNorm2d if frozen_bn else nn.BatchNorm2d
        net = getattr(torchvision.models, RESNET_DEPTHS[depth])(weights=None, norm_layer=norm_layer)
        if weights == "imagenet":
            enum = torchvision.models.get_model_weights(RESNET_DEPTHS[depth])
            state = enum.IMAGENET1K_V1.get_state_dict(progress=False)
        elif weights == "none":
            state = None
        else:
            state = _load_state_dict(weights)
        if state is not None:
            state = {k: v for k, v in state.items() if not k.startswith("fc.")}
            net.fc = nn.Identity()
            missing, unexpected = net.load_state_dict(state, strict=False)
            missing = [k for k in missing if not k.endswith("num_batches_tracked")]
            unexpected = [k for k in unexpected if not k.endswith("num_batches_tracked")]
            if missing or unexpected:
                raise ValueError(f"backbone weights {weights}: missing keys {missing[:5]}, unexpected {unexpected[:5]}")
        stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        channels = [_block_out(net.layer2), _block_out(net.layer3), _block_out(net.layer4)]
        super().__init__(stem=stem, layers=[net.layer1, net.layer2, net.layer3, net.layer4],
                         out_channels=channels, frozen_stages=frozen_stages)


def _block_out(layer: nn.Sequential) -> int:
    last = layer[-1]
    return (last.conv3 if hasattr(last, "conv3") else last.conv2).out_channels


def _conv_gn(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.GroupNorm(min(8, cout), cout),
                         nn.ReLU(inplace=True))


class LightBackbone(Backbone):
    """A small plain conv net (3x3 conv + GroupNorm + ReLU) for CPU runs and tests; random init.

    ``stem``: one stride-2 conv; ``layer1``: one stride-2 conv (stride 4); ``layer2..layer4`` (strides
    8, 16, 32): a stride-2 conv followed by ``depth_per_stage - 1`` convs (11 convs with the defaults).

    Args:
        width: channels of the stem and ``layer1``; ``layer2..4`` use ``2, 4, 8 x width`` (C3, C4, C5).
        depth_per_stage: convs in each of ``layer2..layer4``.
        frozen_stages: see the module docstring.
    """

    def __init__(self, *, width: int = 32, depth_per_stage: int = 3, frozen_stages: int = -1):
        widths = [width * 2, width * 4, width * 8]

        def stage(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(_conv_gn(cin, cout, 2), *[_conv_gn(cout, cout, 1) for _ in range(depth_per_stage - 1)])

        layers = [_conv_gn(width, width, 2), stage(width, widths[0]), stage(widths[0], widths[1]),
                  stage(widths[1], widths[2])]
        super().__init__(stem=_conv_gn(3, width, 2), layers=layers, out_channels=widths, frozen_stages=frozen_stages)


def build_backbone(*, name: str = "resnet50", weights: str = "none", frozen_stages: int = 1,
                   frozen_bn: bool = True, light_width: int = 32) -> Backbone:
    """Backbone by name.

    Args:
        name: ``"resnet18" | "resnet34" | "resnet50" | "resnet101" | "light"``.
        weights: ResNets: ``"none" | "imagenet" | <path>``; light: ``"none" | <path>`` (a state dict of
            this class).
        frozen_stages: -1..4, see the module docstring.
        frozen_bn: ResNets only.
        light_width: light backbone only.
    """
    if name == "light":
        net = LightBackbone(width=light_width, frozen_stages=frozen_stages)
        if weights != "none":
            net.load_state_dict(_load_state_dict(weights))
        return net
    depths = {v: k for k, v in RESNET_DEPTHS.items()}
    if name not in depths:
        raise ValueError(f"unknown backbone {name!r}; expected one of {sorted(depths) + ['light']}")
    return ResNetBackbone(depth=depths[name], weights=weights, frozen_stages=frozen_stages, frozen_bn=frozen_bn)
