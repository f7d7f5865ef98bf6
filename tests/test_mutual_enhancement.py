import pytest
import torch
import torch.nn.functional as F

from mutdet.models.embedding_heads import DecoderEmbeddingHead, EncoderEmbeddingHead, proposal_scores
from mutdet.models.mutual_enhancement import MaskedAttention, MutualEnhancement

pytestmark = pytest.mark.numerics  # run again under other CPU kernels by `make test`

C = 16


def small_module(**kwargs):
    torch.manual_seed(0)
    args = dict(num_layers=2, embed_dim=C, num_heads=4, mlp_dim=32, dropout=0.0)
    args.update(kwargs)
    return MutualEnhancement(**args).double().eval()


def padded_batch():
    """3 images: 3 of 5 objects and all 7 tokens; 5 objects and 5 of 7 tokens; no object."""
    torch.manual_seed(1)
    objects = torch.randn(3, 5, C, dtype=torch.float64)
    features = torch.randn(3, 7, C, dtype=torch.float64)
    object_mask = torch.zeros(3, 5, dtype=torch.bool)
    object_mask[0, 3:] = True
    object_mask[2] = True
    feature_mask = torch.zeros(3, 7, dtype=torch.bool)
    feature_mask[1, 5:] = True
    return objects, object_mask, features, feature_mask


def test_default_config_shapes_and_parameter_count():
    torch.manual_seed(0)
    module = MutualEnhancement()
    attention = 4 * (256 * 256 + 256)
    mlp = 256 * 2048 + 2048 + 2048 * 256 + 256
    per_layer = 3 * attention + mlp + 4 * 2 * 256
    assert sum(p.numel() for p in module.parameters()) == 3 * per_layer == 5_527_296
    objects, features = torch.randn(2, 4, 256), torch.randn(2, 10, 256)
    objects_enh, features_enh = module(objects, None, features, None)
    assert objects_enh.shape == (2, 4, 256) and features_enh.shape == (2, 10, 256)
    # layers are independently initialised
    assert not torch.equal(module.layers[0].self_attn.q_proj.weight, module.layers[1].self_attn.q_proj.weight)


def test_padding_invariance():
    module = small_module()
    objects, object_mask, features, feature_mask = padded_batch()
    # garbage (even NaN) in padded slots must not matter
    objects = objects.masked_fill(object_mask[..., None], float("nan"))
    features = features.masked_fill(feature_mask[..., None], 1e3)
    objects_enh, features_enh = module(objects, object_mask, features, feature_mask)
    assert torch.isfinite(objects_enh).all() and torch.isfinite(features_enh).all()
    for b in range(3):
        m, k = int((~object_mask[b]).sum()), int((~feature_mask[b]).sum())
        alone_o, alone_f = module(objects[b:b + 1, :m], None, features[b:b + 1, :k], None)
        torch.testing.assert_close(objects_enh[b:b + 1, :m], alone_o, atol=1e-5, rtol=0)
        torch.testing.assert_close(features_enh[b:b + 1, :k], alone_f, atol=1e-5, rtol=0)
    assert (objects_enh[object_mask] == 0).all()
    assert (features_enh[feature_mask] == 0).all()


def test_padding_invariance_float32_default_config():
    torch.manual_seed(0)
    module = MutualEnhancement(num_layers=1, embed_dim=32, num_heads=8, mlp_dim=64).eval()
    objects, features = torch.randn(2, 6, 32), torch.randn(2, 9, 32)
    object_mask = torch.tensor([[False] * 2 + [True] * 4, [False] * 6])
    objects_enh, features_enh = module(objects, object_mask, features, None)
    alone_o, alone_f = module(objects[:1, :2], None, features[:1], None)
    torch.testing.assert_close(objects_enh[:1, :2], alone_o, atol=1e-5, rtol=0)
    torch.testing.assert_close(features_enh[:1], alone_f, atol=1e-5, rtol=0)


def test_no_objects_gives_layernormed_features():
    """M = 0: every cross-attention update onto F is zero, so each layer gives F' = LN(F)."""
    module = small_module()
    features = torch.randn(2, 7, C, dtype=torch.float64)
    expected = features
    for layer in module.layers:
        expected = layer.norm3(expected)
    for objects, mask in [(torch.zeros(2, 0, C, dtype=torch.float64), torch.zeros(2, 0, dtype=torch.bool)),
                          (torch.randn(2, 3, C, dtype=torch.float64), torch.ones(2, 3, dtype=torch.bool))]:
        objects_enh, features_enh = module(objects, mask, features, None)
        assert objects_enh.shape == (2, objects.shape[1], C)
        assert (objects_enh == 0).all()
        torch.testing.assert_close(features_enh, expected)
    # an image without objects in a batch with objects: the same
    objects, object_mask, features, feature_mask = padded_batch()
    _, features_enh = module(objects, object_mask, features, feature_mask)
    expected = features[2:3]
    for layer in module.layers:
        expected = layer.norm3(expected)
    torch.testing.assert_close(features_enh[2:3], expected)


def test_no_nan_gradients_with_empty_images_and_gradients_flow():
    module = small_module()
    objects, object_mask, features, feature_mask = padded_batch()
    objects.requires_grad_(True)
    features.requires_grad_(True)
    objects_enh, features_enh = module(objects, object_mask, features, feature_mask)
    (objects_enh.square().sum() + features_enh.sin().sum()).backward()
    assert torch.isfinite(objects.grad).all() and torch.isfinite(features.grad).all()
    assert objects.grad[0, :3].abs().sum() > 0 and features.grad[0].abs().sum() > 0
    assert (objects.grad[object_mask] == 0).all() and (features.grad[feature_mask] == 0).all()
    for name, p in module.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_features_depend_on_objects_and_objects_on_features():
    module = small_module()
    objects, features = torch.randn(1, 3, C, dtype=torch.float64), torch.randn(1, 4, C, dtype=torch.float64)
    o1, f1 = module(objects, None, features, None)
    o2, f2 = module(objects + 1.0, None, features, None)
    o3, f3 = module(objects, None, features * 2 + 1, None)
    assert not torch.allclose(f1, f2) and not torch.allclose(o1, o3)


def test_masked_attention_matches_torch_and_zero_on_empty_keys():
    torch.manual_seed(0)
    attention = MaskedAttention(embed_dim=C, num_heads=4).double()
    reference = torch.nn.MultiheadAttention(C, 4, batch_first=True).double()
    with torch.no_grad():
        reference.in_proj_weight.copy_(torch.cat([attention.q_proj.weight, attention.k_proj.weight,
                                                  attention.v_proj.weight]))
        reference.in_proj_bias.copy_(torch.cat([attention.q_proj.bias, attention.k_proj.bias, attention.v_proj.bias]))
        reference.out_proj.load_state_dict(attention.out_proj.state_dict())
    query, key = torch.randn(2, 3, C, dtype=torch.float64), torch.randn(2, 5, C, dtype=torch.float64)
    mask = torch.tensor([[False, False, True, True, True], [True] * 5])
    out = attention(query, key, key, mask)
    expected = reference(query[:1], key[:1], key[:1], key_padding_mask=mask[:1], need_weights=False)[0]
    torch.testing.assert_close(out[:1], expected)
    assert (out[1] == 0).all()


def test_dropout_train_mode_runs():
    module = small_module(dropout=0.1).train()
    objects, object_mask, features, feature_mask = padded_batch()
    objects_enh, features_enh = module(objects, object_mask, features, feature_mask)
    assert torch.isfinite(objects_enh).all() and torch.isfinite(features_enh).all()


def test_mismatched_shapes_raise():
    module = small_module()
    with pytest.raises(ValueError, match="disagree"):
        module(torch.randn(2, 3, C, dtype=torch.float64), None, torch.randn(1, 4, C, dtype=torch.float64), None)


def test_embedding_heads_are_normalised():
    torch.manual_seed(0)
    encoder_head, decoder_head = EncoderEmbeddingHead(), DecoderEmbeddingHead()
    assert [tuple(layer.weight.shape) for layer in encoder_head.mlp.layers] == [(1024, 256), (256, 1024)]
    assert [tuple(layer.weight.shape) for layer in decoder_head.mlp.layers] == [(256, 256), (256, 256)]
    x = torch.randn(2, 5, 256)
    for head in (encoder_head, decoder_head):
        out = head(x)
        assert out.shape == (2, 5, 256)
        torch.testing.assert_close(out.norm(dim=-1), torch.ones(2, 5))
        torch.testing.assert_close(out, F.normalize(head.mlp(x), dim=-1))


def test_proposal_scores_against_direct_computation():
    torch.manual_seed(0)
    z_enc = F.normalize(torch.randn(3, 6, C, dtype=torch.float64), dim=-1)
    objects = torch.randn(3, 4, C, dtype=torch.float64) * 3
    object_mask = torch.zeros(3, 4, dtype=torch.bool)
    object_mask[0, 2:] = True
    object_mask[2] = True
    logits = torch.randn(3, 6, dtype=torch.float64)
    scores = proposal_scores(z_enc, objects, object_mask, logits)
    assert scores.shape == (3, 6)
    for b in range(3):
        for k in range(6):
            cosines = [F.cosine_similarity(z_enc[b, k], objects[b, m], dim=0)
                       for m in range(4) if not object_mask[b, m]]
            similarity = max(cosines) if cosines else 1.0  # no objects: objectness alone
            expected = similarity * torch.sigmoid(logits[b, k])
            torch.testing.assert_close(scores[b, k], torch.as_tensor(expected, dtype=torch.float64))
    # (B, K, 1) logits, M = 0 and no mask
    torch.testing.assert_close(proposal_scores(z_enc, objects[:, :0], None, logits[..., None]), logits.sigmoid())
    unmasked = proposal_scores(z_enc, objects, None, logits)
    torch.testing.assert_close(unmasked[1], scores[1])


def test_proposal_scores_gradient_is_finite_with_empty_images():
    z_enc = F.normalize(torch.randn(2, 5, C), dim=-1).requires_grad_(True)
    objects = torch.randn(2, 3, C, requires_grad=True)
    mask = torch.tensor([[False, True, True], [True, True, True]])
    proposal_scores(z_enc, objects, mask, torch.randn(2, 5)).sum().backward()
    assert torch.isfinite(z_enc.grad).all() and torch.isfinite(objects.grad).all()
    assert (objects.grad[mask] == 0).all()


def assert_uniform(weight: torch.Tensor, bound: float, what: str) -> None:
    """``weight`` looks drawn from U(-bound, bound): inside the bound, and its largest magnitude within
    10 % of it (a U(-a, a) sample of n values misses that with probability 0.9^n, < 1e-11 for n >= 256;
    PyTorch's default Linear init, U(+-1/sqrt(fan_in)), fails one side or the other here)."""
    top = float(weight.detach().abs().max())
    assert 0.9 * bound <= top <= bound, f"{what}: max |w| {top:.4g} for a bound of {bound:.4g}"


def xavier_bound(weight: torch.Tensor) -> float:
    fan_out, fan_in = weight.shape
    return (6.0 / (fan_in + fan_out)) ** 0.5


def test_reference_initialisation_xavier_on_every_weight_matrix():
    """The reference initialises the enhancement module, the enhanced branch's projection and the encoder
    embedding head with its transformer (Xavier-uniform weight matrices, default biases); the decoder
    embedding head lives in its detection head (PyTorch's default Linear init)."""
    torch.manual_seed(0)
    modules = {"enhancement": MutualEnhancement(num_layers=2, embed_dim=C, num_heads=4, mlp_dim=32),
               "encoder head": EncoderEmbeddingHead(embed_dim=C, hidden_dim=64, output_dim=C)}
    _check_xavier(modules)
    decoder_head = DecoderEmbeddingHead(embed_dim=C, hidden_dim=C, output_dim=C)
    for n, p in decoder_head.named_parameters():
        if p.dim() > 1:
            assert_uniform(p, p.shape[1] ** -0.5, f"decoder head.{n}")  # kaiming_uniform(a=sqrt(5))


def test_enhanced_branch_projection_initialisation():
    from mutdet.models.embedding_heads import FeatureProjection

    torch.manual_seed(0)
    _check_xavier({"projection": FeatureProjection(embed_dim=C)})


def _check_xavier(modules):
    for name, module in modules.items():
        matrices = [(n, p) for n, p in module.named_parameters() if p.dim() > 1]
        assert matrices, name
        for n, p in matrices:
            assert_uniform(p, xavier_bound(p), f"{name}.{n}")
        for n, p in module.named_parameters():
            if n.endswith("bias") and "norm" not in n:  # PyTorch's default: U(+-1/sqrt(fan_in))
                fan_in = dict(module.named_parameters())[n[:-len("bias")] + "weight"].shape[1]
                assert float(p.detach().abs().max()) <= fan_in ** -0.5, f"{name}.{n}"


def test_decoder_head_normalisation_is_optional():
    torch.manual_seed(0)
    raw = DecoderEmbeddingHead(embed_dim=C, hidden_dim=C, output_dim=C, normalize=False)
    unit = DecoderEmbeddingHead(embed_dim=C, hidden_dim=C, output_dim=C)
    unit.load_state_dict(raw.state_dict())
    x = torch.randn(2, 5, C, dtype=torch.float64)
    raw, unit = raw.double(), unit.double()
    torch.testing.assert_close(raw(x), raw.mlp(x), rtol=0, atol=0)
    torch.testing.assert_close(unit(x), F.normalize(raw(x), dim=-1))
