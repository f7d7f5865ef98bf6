"""Optimiser lr groups: the x0.1 roles (backbone, sampling offsets, learned reference points) are found
by module, so they hold for the fine-tuning detector, the pre-training model that wraps it, and any
wrapper; nothing else trains at the low rate."""
import pytest
import torch
from torch import nn

from mutdet.engine.optim import LOW_LR_NAMES, build_optimizer, low_lr_roles
from mutdet.models import build_detector
from mutdet.stages.pretrain import build_pretrain_model
from mutdet.variants import PRESETS, variant_from_dict

TINY = dict(backbone="light", light_width=16, frozen_stages=-1, frozen_bn=False, embed_dim=32, num_heads=4,
            num_levels=2, num_points=2, num_encoder_layers=2, num_decoder_layers=2, ffn_dim=64, num_queries=12,
            norm_groups=8, num_denoising_queries=6, dropout=0.0)
LR, MULT = 1e-4, 0.1


def _expected_low(detector) -> set[int]:
    """Ids of the parameters the references train at lr x 0.1, listed by hand from the detector's layout:
    the backbone and the sampling-offset Linear of every encoder and decoder attention."""
    modules = [detector.backbone]
    modules += [layer.self_attn.sampling_offsets for layer in detector.encoder.layers]
    modules += [layer.cross_attn.sampling_offsets for layer in detector.decoder.layers]
    return {id(p) for m in modules for p in m.parameters()}


def _lr_by_parameter(optimizer) -> dict[int, float]:
    lrs: dict[int, float] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            assert id(p) not in lrs, "a parameter is in two groups"
            lrs[id(p)] = group["lr"]
    return lrs


def _check_groups(model: nn.Module, detector) -> dict[int, float]:
    """Every trainable parameter is in exactly one group, at lr x MULT iff the references say so."""
    lrs = _lr_by_parameter(build_optimizer(model, lr=LR, weight_decay=1e-5, lr_multiplier=MULT))
    low = _expected_low(detector)
    trainable = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    assert set(lrs) == set(trainable), "the groups must hold exactly the trainable parameters"
    assert any(p.requires_grad for p in detector.backbone.parameters()), "the test needs a trainable backbone"
    wrong = [(name, lrs[i]) for i, name in trainable.items() if lrs[i] != (LR * MULT if i in low else LR)]
    assert not wrong, f"parameters at the wrong lr: {wrong[:8]}"
    return lrs


def test_fine_tuning_detector_groups():
    torch.manual_seed(0)
    detector = build_detector(num_classes=5, **TINY)
    _check_groups(detector, detector)
    roles = low_lr_roles(detector)
    assert set(roles.values()) == {"backbone", "sampling_offsets"}
    # two-stage: no learned reference-point layer exists; the query-position MLP is not one
    assert not any("reference_points" in n for n, _ in detector.named_parameters())
    assert not any(n.startswith("decoder.ref_point_head") for n in roles)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_pretraining_model_groups_with_a_trainable_backbone(preset):
    torch.manual_seed(0)
    model, _ = build_pretrain_model(variant=variant_from_dict(preset), num_classes=5, model_kwargs=TINY,
                                    enhancement={"num_layers": 1, "num_heads": 4, "mlp_dim": 64},
                                    encoder_head_hidden=64, freeze_backbone=False, loss={})
    lrs = _check_groups(model, model.detector)
    # the detector's parameters get the same rate whether it is trained alone or inside the wrapper
    alone = _lr_by_parameter(build_optimizer(model.detector, lr=LR, lr_multiplier=MULT))
    assert alone == {i: lrs[i] for i in alone}
    assert all(name.startswith("detector.") for name in low_lr_roles(model))


def test_frozen_backbone_is_left_out():
    torch.manual_seed(0)
    model, _ = build_pretrain_model(variant=variant_from_dict("mutdet"), num_classes=5, model_kwargs=TINY,
                                    enhancement={"num_layers": 1, "num_heads": 4, "mlp_dim": 64},
                                    encoder_head_hidden=64, freeze_backbone=True, loss={})
    lrs = _lr_by_parameter(build_optimizer(model, lr=LR, lr_multiplier=MULT))
    assert not any(id(p) in lrs for p in model.detector.backbone.parameters())
    offsets = model.detector.encoder.layers[0].self_attn.sampling_offsets.weight
    assert lrs[id(offsets)] == LR * MULT


def test_any_wrapper_prefix_keeps_the_groups():
    torch.manual_seed(0)
    detector = build_detector(num_classes=5, **TINY)

    class Wrapper(nn.Module):  # as DDP's `module.` or the pre-training model's `detector.`
        def __init__(self):
            super().__init__()
            self.module = nn.ModuleDict({"inner": detector})

    _check_groups(Wrapper(), detector)


def test_learned_reference_points_and_nothing_named_alike():
    class OneStage(nn.Module):  # one-stage Deformable DETR's layer and look-alike names
        def __init__(self):
            super().__init__()
            self.reference_points = nn.Linear(4, 2)
            self.ref_point_head = nn.Linear(4, 4)
            self.backbone_proj = nn.Linear(4, 4)
            self.sampling_offsets_like = nn.Linear(4, 4)

    model = OneStage()
    lrs = _lr_by_parameter(build_optimizer(model, lr=LR, lr_multiplier=MULT))
    for name, p in model.named_parameters():
        assert lrs[id(p)] == (LR * MULT if name.startswith("reference_points.") else LR), name
    assert set(low_lr_roles(model).values()) == {"reference_points"}


def test_roles_can_be_switched_off_and_unknown_roles_raise():
    torch.manual_seed(0)
    detector = build_detector(num_classes=5, **TINY)
    lrs = _lr_by_parameter(build_optimizer(detector, lr=LR, lr_multiplier=MULT, low_lr_names=("sampling_offsets",)))
    assert all(lrs[id(p)] == LR for p in detector.backbone.parameters())
    assert lrs[id(detector.decoder.layers[1].cross_attn.sampling_offsets.bias)] == LR * MULT
    assert set(LOW_LR_NAMES) == {"backbone", "sampling_offsets", "reference_points"}
    with pytest.raises(ValueError, match="unknown"):
        build_optimizer(detector, low_lr_names=("backbone.",))
