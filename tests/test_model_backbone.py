"""Backbones and neck: weights from a file, frozen stages, frozen BN, strides."""
import pytest
import torch
import torchvision
from torchvision.ops import FrozenBatchNorm2d

from mutdet.models.backbone import build_backbone
from mutdet.models.neck import ChannelMapper


def test_resnet18_weights_from_a_file(tmp_path):
    torch.manual_seed(0)
    source = torchvision.models.resnet18(weights=None)
    path = tmp_path / "r18.pth"
    torch.save(source.state_dict(), path)
    net = build_backbone(name="resnet18", weights=str(path), frozen_stages=-1)
    torch.testing.assert_close(net.layer3[0].conv1.weight, source.layer3[0].conv1.weight)
    torch.testing.assert_close(net.stem[1].running_mean, source.bn1.running_mean)
    assert net.out_channels == [128, 256, 512]


def test_bad_weights_are_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no file"):
        build_backbone(name="resnet18", weights=str(tmp_path / "missing.pth"))
    path = tmp_path / "r34.pth"
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), path)
    with pytest.raises(ValueError, match="unexpected"):
        build_backbone(name="resnet18", weights=str(path))
    with pytest.raises(ValueError, match="unknown backbone"):
        build_backbone(name="vgg16")


@pytest.mark.parametrize("frozen_stages", [-1, 0, 1, 4])
def test_frozen_stages(frozen_stages):
    net = build_backbone(name="resnet18", frozen_stages=frozen_stages, frozen_bn=False).train()
    stages = ["stem", "layer1", "layer2", "layer3", "layer4"]
    for i, name in enumerate(stages):
        module = getattr(net, name)
        frozen = i <= frozen_stages
        assert all(p.requires_grad != frozen for p in module.parameters()), name
        assert module.training != frozen, name  # frozen stages stay in eval mode (BN statistics fixed)


def test_frozen_bn_and_output_strides():
    net = build_backbone(name="resnet18", frozen_bn=True)
    assert any(isinstance(m, FrozenBatchNorm2d) for m in net.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    feats = net(torch.randn(1, 3, 64, 96))
    assert [f.shape[-2:] for f in feats] == [(8, 12), (4, 6), (2, 3)]


def test_light_backbone_and_neck_levels():
    net = build_backbone(name="light", light_width=8, frozen_stages=-1)
    feats = net(torch.randn(2, 3, 64, 64))
    assert [tuple(f.shape) for f in feats] == [(2, 16, 8, 8), (2, 32, 4, 4), (2, 64, 2, 2)]
    neck = ChannelMapper(in_channels=net.out_channels, out_channels=32, num_levels=5, num_groups=8)
    maps = neck(feats)
    assert [tuple(m.shape) for m in maps] == [(2, 32, 8, 8), (2, 32, 4, 4), (2, 32, 2, 2), (2, 32, 1, 1),
                                              (2, 32, 1, 1)]
