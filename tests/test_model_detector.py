"""Detector: paper-config parameter shapes (no forward), tiny-config forward/backward/inference."""
import math

import pytest
import torch
from torchvision.ops import FrozenBatchNorm2d

from mutdet.losses import build_criterion
from mutdet.models import PostProcess, build_detector

TINY = dict(backbone="light", light_width=16, frozen_stages=-1, embed_dim=32, num_heads=4, num_levels=4,
            num_points=2, num_encoder_layers=1, num_decoder_layers=2, ffn_dim=64, num_queries=20, norm_groups=8,
            num_denoising_queries=10)
HEAD_KEYS = {"pred_logits", "pred_boxes", "pred_angle_logits"}
OUTPUT_KEYS = HEAD_KEYS | {"aux_outputs", "enc_outputs", "hidden_states", "memory", "memory_padding_mask",
                           "spatial_shapes", "level_start_index", "valid_ratios", "dn_outputs", "dn_meta"}


def _targets():
    return [{"labels": torch.tensor([0, 2]), "boxes": torch.tensor([[30.0, 40.0, 24.0, 8.0, 0.3],
                                                                    [80.0, 90.0, 30.0, 30.0, -1.2]]),
             "size": torch.tensor([96, 128])},
            {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 5), "size": torch.tensor([96, 128])}]


@pytest.fixture(scope="module")
def paper():
    return build_detector(num_classes=20)


def test_paper_config_parameters(paper):
    params = dict(paper.named_parameters())
    c = 256
    # backbone: ResNet-50, frozen BN, stem and layer1 frozen (fine-tuning default)
    assert params["backbone.layer4.2.conv3.weight"].shape == (2048, 512, 1, 1)
    assert isinstance(paper.backbone.stem[1], FrozenBatchNorm2d)
    assert not any(p.requires_grad for n, p in params.items() if n.startswith(("backbone.stem", "backbone.layer1")))
    assert all(p.requires_grad for n, p in params.items() if n.startswith("backbone.layer2"))
    # neck: C3-C5 1x1 + GN(32), one stride-2 extra level from C5
    assert [params[f"neck.lateral.{i}.0.weight"].shape for i in range(3)] == [(c, 512, 1, 1), (c, 1024, 1, 1),
                                                                             (c, 2048, 1, 1)]
    assert params["neck.extra.0.0.weight"].shape == (c, 2048, 3, 3) and paper.neck.extra[0][1].num_groups == 32
    # 6 + 6 layers, 8 heads x 4 levels x 4 points, FFN 1024
    assert len(paper.encoder.layers) == 6 and len(paper.decoder.layers) == 6
    assert params["encoder.layers.5.self_attn.sampling_offsets.weight"].shape == (8 * 4 * 4 * 2, c)
    assert params["decoder.layers.5.cross_attn.attention_weights.weight"].shape == (8 * 4 * 4, c)
    assert paper.decoder.layers[0].cross_attn.rotated and not paper.encoder.layers[0].self_attn.rotated
    assert params["decoder.layers.0.ffn.linear1.weight"].shape == (1024, c)
    assert params["decoder.layers.0.self_attn.in_proj_weight"].shape == (3 * c, c)
    # heads: per decoder layer, plus the two-stage proposal head; 300 queries; 180 angle bins
    assert params["query_embed.weight"].shape == (300, c) and params["level_embed"].shape == (4, c)
    assert params["label_embed.weight"].shape == (20, c)
    for k in range(6):
        assert params[f"class_heads.{k}.weight"].shape == (20, c)
        assert params[f"box_heads.{k}.layers.2.weight"].shape == (4, c)
        assert params[f"angle_heads.{k}.weight"].shape == (180, c)
    assert params["proposal_head.class_head.weight"].shape == (1, c)
    assert params["proposal_head.angle_head.weight"].shape == (180, c)
    assert params["decoder.ref_point_head.layers.0.weight"].shape == (c, 2 * c)
    # initial class probability 0.01, box deltas 0
    torch.testing.assert_close(params["class_heads.0.bias"].sigmoid(), torch.full((20,), 0.01))
    assert not params["box_heads.3.layers.2.weight"].any()
    assert paper.num_queries == 300 and paper.denoising["num_denoising_queries"] == 100


def test_tiny_forward_backward_and_losses():
    torch.manual_seed(0)
    model = build_detector(num_classes=3, **TINY).train()
    criterion = build_criterion(num_classes=3, num_decoder_layers=2)
    images = torch.randn(2, 3, 96, 128)
    outputs = model(images, _targets())
    assert set(outputs) == OUTPUT_KEYS
    q, s = 20, 12 * 16 + 6 * 8 + 3 * 4 + 2 * 2
    assert outputs["pred_logits"].shape == (2, q, 3) and outputs["pred_boxes"].shape == (2, q, 4)
    assert outputs["pred_angle_logits"].shape == (2, q, 180)
    assert len(outputs["aux_outputs"]) == 1 and set(outputs["aux_outputs"][0]) == HEAD_KEYS
    assert outputs["hidden_states"].shape == (2, 2, q, 32) and outputs["memory"].shape == (2, s, 32)
    assert outputs["spatial_shapes"].tolist() == [[12, 16], [6, 8], [3, 4], [2, 2]]
    enc = outputs["enc_outputs"]
    assert enc["pred_logits"].shape == (2, s, 1) and enc["pred_boxes"].shape == (2, s, 4)
    assert enc["pred_angle_logits"].shape == (2, s, 180) and enc["topk_indices"].shape == (2, q)
    meta = outputs["dn_meta"]
    assert meta == {"num_queries": 20, "num_groups": 5, "max_targets": 2, "group_size": 4}
    assert outputs["dn_outputs"]["pred_boxes"].shape == (2, 20, 4)
    assert outputs["dn_outputs"]["hidden_states"].shape == (2, 2, 20, 32)
    assert ((outputs["pred_boxes"] > 0) & (outputs["pred_boxes"] < 1)).all()

    losses = criterion(outputs, _targets())
    assert set(losses) == set(criterion.weight_dict)
    total = sum(losses[k] * criterion.weight_dict[k] for k in losses)
    assert torch.isfinite(total)
    total.backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert unused == []


def test_tiny_inference_and_postprocess():
    torch.manual_seed(0)
    model = build_detector(num_classes=3, **TINY).eval()
    with torch.no_grad():
        outputs = model(torch.randn(2, 3, 96, 128), _targets())  # targets are ignored in eval
    assert outputs["dn_outputs"] is None and outputs["dn_meta"] is None
    results = PostProcess(angle_coder=model.angle_coder, num_select=30)(outputs, torch.tensor([[96, 128]] * 2))
    assert len(results) == 2
    for r in results:
        assert r["scores"].shape == (30,) and r["labels"].shape == (30,) and r["boxes"].shape == (30, 5)
        assert (r["scores"][:-1] >= r["scores"][1:]).all() and r["labels"].max() < 3
        b = r["boxes"]
        assert (b[:, 2] >= b[:, 3]).all() and (b[:, 4] >= -math.pi / 2).all() and (b[:, 4] < math.pi / 2).all()
        assert (b[:, 0] <= 128).all() and (b[:, 1] <= 96).all()


def test_padding_mask_and_decode_seams():
    torch.manual_seed(0)
    model = build_detector(num_classes=3, **TINY).eval()
    images = torch.randn(2, 3, 128, 128)
    padding = torch.zeros(2, 128, 128, dtype=torch.bool)
    padding[1, :, 96:] = True  # image 1 is 128 x 96 (h x w)
    with torch.no_grad():
        encoded = model.encode(images, padding)
        ratios = encoded["valid_ratios"]
        torch.testing.assert_close(ratios[0], torch.ones(4, 2))
        torch.testing.assert_close(ratios[1, 0], torch.tensor([0.75, 1.0]))
        out = model.decode(encoded)
        assert not out["enc_outputs"]["valid"][1][encoded["memory_padding_mask"][1]].any()
        # MutDet seams: another memory, and external proposal scores pick the queries
        chosen = [r * 16 + c for r in range(2) for c in range(10)]  # level 0 tokens valid in both images
        scores = torch.zeros(2, encoded["memory"].shape[1])
        scores[:, chosen] = torch.arange(20, 0, -1).float()
        other = model.decode(encoded, memory=torch.randn_like(encoded["memory"]), proposal_scores=scores)
        assert other["enc_outputs"]["topk_indices"].tolist() == [chosen] * 2
        assert not torch.equal(other["memory"], out["memory"])


def test_too_few_tokens_for_the_queries_is_an_error():
    model = build_detector(num_classes=3, **{**TINY, "num_queries": 500}).eval()
    with pytest.raises(ValueError, match="queries"):
        model(torch.randn(1, 3, 64, 64))


def test_transformer_initialisation_follows_deformable_detr():
    """Xavier-uniform on every weight matrix of the reference's transformer (encoder, decoder, the two-stage
    projection ``enc_output``), then each deformable attention's own init; heads keep PyTorch's default."""
    from tests.test_mutual_enhancement import assert_uniform, xavier_bound

    torch.manual_seed(0)
    model = build_detector(num_classes=3, **TINY)
    head = model.proposal_head
    assert_uniform(head.output_proj.weight, xavier_bound(head.output_proj.weight), "proposal_head.output_proj")
    attn = model.decoder.layers[0].self_attn
    assert_uniform(attn.in_proj_weight, xavier_bound(attn.in_proj_weight), "decoder self-attention in_proj")
    ffn = model.encoder.layers[0].ffn.linear1.weight
    assert_uniform(ffn, xavier_bound(ffn), "encoder ffn")
    for layer in (model.encoder.layers[0].self_attn, model.decoder.layers[0].cross_attn):
        assert not layer.sampling_offsets.weight.any() and not layer.attention_weights.weight.any()
        assert not layer.attention_weights.bias.any() and layer.sampling_offsets.bias.abs().max() > 0
        assert not layer.value_proj.bias.any() and not layer.output_proj.bias.any()
    angle = model.angle_heads[0].weight  # outside the transformer: PyTorch's default
    assert_uniform(angle, angle.shape[1] ** -0.5, "angle head")


def _padded_batch():
    images = torch.randn(2, 3, 96, 128)
    padding = torch.zeros(2, 96, 128, dtype=torch.bool)
    padding[1, :, 64:] = True
    return images, padding


def test_invalid_tokens_get_the_reference_sentinel_box():
    """As the reference's ``10000`` anchors: an invalid token's proposal is (1, 1, 1, 1), no gradient."""
    torch.manual_seed(0)
    model = build_detector(num_classes=3, **TINY).train()
    out = model.decode(model.encode(*_padded_batch()), _targets())
    enc = out["enc_outputs"]
    valid = enc["valid"]
    assert (~valid[1]).sum() > 0  # the padding of image 1
    assert (enc["pred_boxes"][~valid] == 1.0).all()
    assert ((enc["pred_boxes"][valid] > 0) & (enc["pred_boxes"][valid] < 1)).all()
    head = model.proposal_head.box_head.layers[-1]
    box_grad = torch.autograd.grad((enc["pred_boxes"] * valid[..., None]).sum(), head.bias, retain_graph=True)[0]
    all_grad = torch.autograd.grad(enc["pred_boxes"].sum(), head.bias)[0]
    torch.testing.assert_close(all_grad, box_grad, rtol=0, atol=0)  # the invalid tokens add nothing


def test_decode_takes_proposal_features_and_denoising_queries():
    torch.manual_seed(0)
    model = build_detector(num_classes=3, **TINY).train()
    encoded = model.encode(*_padded_batch())
    features = torch.randn_like(encoded["memory"], requires_grad=True)
    dn = model.make_denoising(_targets())
    out = model.decode(encoded, _targets(), memory=features, proposal_features=features, denoising=dn)
    enc = out["enc_outputs"]
    valid = enc["valid"]
    # the heads read the given features directly (invalid tokens zeroed), no Linear + LayerNorm
    head = model.proposal_head
    torch.testing.assert_close(enc["features"], features.masked_fill(~valid[..., None], 0.0), rtol=0, atol=0)
    torch.testing.assert_close(enc["pred_logits"], head.class_head(enc["features"]), rtol=0, atol=0)
    assert out["dn_meta"] == dn.meta and out["memory"] is features
    (enc["pred_boxes"].sum() + enc["pred_logits"].sum()).backward()
    assert not features.grad[~valid].any() and features.grad[valid].abs().sum() > 0
    assert head.output_proj.weight.grad is None
