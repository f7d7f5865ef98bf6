"""MutDet / DETReg pre-training model and criterion: variants, siamese weight sharing, what each ablation
flag changes, gradients into the enhancement module, padding objects changing nothing."""
import dataclasses

import pytest
import torch

from mutdet.losses import build_criterion
from mutdet.losses.pretrain import PretrainCriterion
from mutdet.models import build_detector
from mutdet.models.pretrain import PretrainModel
from mutdet.variants import PRESETS, PretrainVariant, variant_from_dict
from tests.numerics import rounding_tolerance


def with_flags(variant: PretrainVariant, **flags) -> PretrainVariant:
    """A copy of ``variant`` with some flags changed (validated)."""
    return dataclasses.replace(variant, **flags).validate()

DIM = 32
TINY = dict(backbone="light", light_width=16, frozen_stages=-1, embed_dim=DIM, num_heads=4, num_levels=2,
            num_points=2, num_encoder_layers=1, num_decoder_layers=2, ffn_dim=64, num_queries=12, norm_groups=8,
            num_denoising_queries=6, dropout=0.0)
K = 5


def _targets(seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in (3, 2):
        xy = torch.rand(n, 2, generator=g) * 60 + 20
        wh = torch.rand(n, 2, generator=g) * 20 + 8
        wh = torch.stack([wh.max(1).values, wh.min(1).values], 1)
        theta = torch.rand(n, 1, generator=g) * 3.0 - 1.5
        out.append({"labels": torch.randint(K, (n,), generator=g), "boxes": torch.cat([xy, wh, theta], 1),
                    "embeddings": torch.nn.functional.normalize(torch.randn(n, DIM, generator=g), dim=1),
                    "size": torch.tensor([96, 96])})
    return out


def _build(variant, seed=0):
    torch.manual_seed(seed)
    classes = 1 if variant.classes == "agnostic" else K
    detector = build_detector(num_classes=classes, **TINY)
    model = PretrainModel(detector=detector, variant=variant, enhancement_layers=2, enhancement_heads=4,
                          enhancement_mlp_dim=64, encoder_head_hidden=64, freeze_backbone=True).train()
    criterion = PretrainCriterion(detection=build_criterion(num_classes=classes, num_decoder_layers=2),
                                  variant=variant)
    return model, criterion


def _losses(model, criterion, targets, seed=1):
    if model.variant.classes == "agnostic":  # as the dataset gives them
        targets = [dict(t, labels=torch.zeros_like(t["labels"])) for t in targets]
    torch.manual_seed(seed)  # denoising noise
    images = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(3))
    return criterion(model(images, targets), targets)


def _copy_common(src, dst):
    state = src.state_dict()
    dst.load_state_dict({k: v for k, v in state.items() if k in dst.state_dict()}, strict=False)


MUTDET = variant_from_dict("mutdet")


def test_presets_and_validation():
    detreg = variant_from_dict("detreg")
    assert (detreg.classes, detreg.alignment, detreg.siamese, detreg.uses_enhancement) == ("agnostic", "l1", False, False)
    assert MUTDET.uses_enhancement and MUTDET.siamese and MUTDET.proposal_selection == "similarity"
    custom = variant_from_dict("contrastive", {"base": "detreg", "alignment": "contrastive"})
    assert custom.alignment == "contrastive" and custom.classes == "agnostic"
    with pytest.raises(ValueError, match="siamese"):
        variant_from_dict("x", {"base": "detreg", "siamese": True})
    with pytest.raises(ValueError, match="unknown flag"):
        variant_from_dict("x", {"base": "mutdet", "sieamese": True})
    with pytest.raises(ValueError, match="base"):
        variant_from_dict("x", {"alignment": "l1"})
    with pytest.raises(ValueError, match="similarity"):
        variant_from_dict("x", {"base": "mutdet", "encoder_embedding_loss": False})


def test_mutdet_losses_backward_and_gradient_reaches_enhancement():
    model, criterion = _build(MUTDET)
    targets = _targets()
    losses = _losses(model, criterion, targets)
    for key in ("loss_align", "loss_align_dn", "loss_align_enc", "loss_align_siam", "loss_cls_siam", "loss_cls_enc",
                "align_pos_cosine", "align_neg_cosine"):
        assert key in losses, key
    assert set(criterion.weight_dict) <= set(losses)
    total = sum(losses[k] * w for k, w in criterion.weight_dict.items())
    assert torch.isfinite(total)
    total.backward()
    enh = model.mutual_enhancement
    assert enh.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0  # through O_enh (target not detached)
    assert model.encoder_embedding_head.mlp.layers[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.detector.backbone.parameters())  # frozen


def test_target_o_enh_is_not_detached():
    model, criterion = _build(MUTDET)
    targets = _targets()
    model.zero_grad()
    losses = _losses(model, criterion, targets)
    losses["loss_align"].backward()  # only the decoder alignment loss: reaches the module through O_enh
    grad = model.mutual_enhancement.layers[-1].mlp.linear2.weight.grad  # FeedForward of the last layer
    assert grad is not None and grad.abs().sum() > 0


def test_siamese_pass_shares_the_decoder():
    model, criterion = _build(MUTDET)
    names = [n for n, _ in model.named_parameters()]
    assert len(names) == len(set(names))
    assert not any("siam" in n for n in names)  # one parameter set ...
    calls = []
    handle = model.detector.decoder.register_forward_hook(lambda m, i, o: calls.append(i[3].data_ptr()))
    targets = _targets()
    torch.manual_seed(0)
    out = model(torch.randn(2, 3, 96, 96), targets)
    handle.remove()
    assert len(calls) == 2 and calls[0] != calls[1]  # ... two forward passes, on F_enh then on the plain memory
    assert out["siamese"]["memory"].data_ptr() == calls[1]
    no_siam, _ = _build(with_flags(MUTDET, siamese=False))
    assert [n for n, _ in no_siam.named_parameters()] == names  # the siamese head adds no parameter
    # the siamese gradient reaches the shared decoder weights
    model.zero_grad()
    losses = _losses(model, criterion, targets)
    losses["loss_cls_siam"].backward()
    assert model.detector.class_heads[-1].weight.grad.abs().sum() > 0


def _detection_keys(losses):
    return {k for k in losses if k.startswith("loss_") and "align" not in k and not k.endswith("_siam")}


def test_flag_alignment_changes_only_the_alignment_loss():
    base = variant_from_dict("a", {"base": "detreg"})
    other = with_flags(base, alignment="contrastive")
    m1, c1 = _build(base)
    m2, c2 = _build(other)
    _copy_common(m1, m2)
    targets = _targets()
    l1, l2 = _losses(m1, c1, targets), _losses(m2, c2, targets)
    for key in _detection_keys(l1):
        torch.testing.assert_close(l1[key], l2[key])
    assert not torch.allclose(l1["loss_align"], l2["loss_align"])
    assert "loss_align_dn" in l2 and "loss_align_dn" not in l1


def test_flag_target_changes_only_the_target():
    base = with_flags(MUTDET, target="raw")
    m1, c1 = _build(MUTDET)
    m2, c2 = _build(base)
    _copy_common(m1, m2)
    targets = _targets()
    torch.manual_seed(0)
    out1 = m1(torch.zeros(2, 3, 96, 96), targets)
    torch.manual_seed(0)
    out2 = m2(torch.zeros(2, 3, 96, 96), targets)
    torch.testing.assert_close(out1["pred_logits"], out2["pred_logits"])  # same features, same detections
    torch.testing.assert_close(out2["align_targets"][0], targets[0]["embeddings"])  # raw O
    assert not torch.allclose(out1["align_targets"][0], targets[0]["embeddings"])  # O_enh


def test_flag_decoder_features_changes_the_decoder_input():
    plain = variant_from_dict("p", {"base": "mutdet", "decoder_features": "plain", "siamese": False,
                                    "proposal_selection": "objectness"})
    enhanced = with_flags(plain, decoder_features="enhanced")
    m1, _ = _build(plain)
    m2, _ = _build(enhanced)
    _copy_common(m1, m2)
    targets = _targets()
    images = torch.randn(2, 3, 96, 96)
    torch.manual_seed(0)
    out1 = m1(images, targets)
    torch.manual_seed(0)
    out2 = m2(images, targets)
    enc = m1.detector.encode(images)
    torch.testing.assert_close(out1["memory"], enc["memory"])
    assert not torch.allclose(out2["memory"], enc["memory"])
    torch.testing.assert_close(out1["align_targets"][0], out2["align_targets"][0])  # same O_enh


def test_flag_encoder_loss_and_siamese_add_exactly_their_terms():
    full_keys = set(PretrainCriterion(detection=build_criterion(num_classes=K, num_decoder_layers=2),
                                      variant=MUTDET).weight_dict)
    no_enc = with_flags(MUTDET, encoder_embedding_loss=False, proposal_selection="objectness")
    no_siam = with_flags(MUTDET, siamese=False)
    keys = {v: set(PretrainCriterion(detection=build_criterion(num_classes=K, num_decoder_layers=2),
                                     variant=v).weight_dict) for v in (no_enc, no_siam)}
    assert full_keys - keys[no_enc] == {"loss_align_enc"}
    assert all(k.endswith("_siam") for k in full_keys - keys[no_siam]) and "loss_cls_siam" in full_keys
    model, _ = _build(no_enc)
    assert model.encoder_embedding_head is None
    model, criterion = _build(no_siam)
    losses = _losses(model, criterion, _targets())
    assert not any(k.endswith("_siam") for k in losses)


def test_proposal_selection_similarity_changes_the_queries():
    objectness = with_flags(MUTDET, proposal_selection="objectness")
    m1, _ = _build(MUTDET)
    m2, _ = _build(objectness)
    _copy_common(m1, m2)
    targets = _targets()
    images = torch.randn(2, 3, 96, 96)
    torch.manual_seed(0)
    top1 = m1(images, targets)["enc_outputs"]["topk_indices"]
    torch.manual_seed(0)
    out2 = m2(images, targets)
    top2 = out2["enc_outputs"]["topk_indices"]
    expected = out2["enc_outputs"]["pred_logits"][..., 0].masked_fill(~out2["enc_outputs"]["valid"], -1e9)
    assert torch.equal(top2, expected.topk(top2.shape[1], dim=1).indices)
    assert not torch.equal(top1, top2)


def test_padding_objects_change_nothing():
    model, criterion = _build(MUTDET)
    model.eval()  # no denoising noise, no dropout
    targets = _targets()
    images = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        together = model(images, targets)  # image 1 (2 objects) is padded to 3
        alone = model(images[1:], targets[1:])
    torch.testing.assert_close(together["pred_logits"][1], alone["pred_logits"][0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(together["align_targets"][1], alone["align_targets"][0], atol=1e-5, rtol=1e-4)


def test_detreg_model_has_no_mutdet_parts():
    model, criterion = _build(variant_from_dict("detreg"))
    assert model.mutual_enhancement is None and model.encoder_embedding_head is None
    assert model.detector.class_heads[0].out_features == 1
    losses = _losses(model, criterion, _targets())
    assert set(k for k in criterion.weight_dict if "align" in k) == {"loss_align"}
    assert losses["loss_align"] > 0 and set(PRESETS) == {"detreg", "mutdet"}


# --- DETReg's L1 alignment (un-normalised), the enhanced branch's own projection, both passes' losses -----------


def _with_norms(targets, seed=0):
    """Targets whose embeddings are unit rows with a mean of zero over the batch (like centred PCA
    projections) and ``embedding_norms`` of about sqrt(C) (per-coordinate scale ~1)."""
    g = torch.Generator().manual_seed(seed)
    counts = [len(t["boxes"]) for t in targets]
    dim = targets[0]["embeddings"].shape[1]
    o = torch.randn(sum(counts), dim, generator=g)
    o = torch.nn.functional.normalize(o - o.mean(0), dim=1)
    norms = (torch.rand(sum(counts), generator=g) * 0.5 + 0.75) * dim ** 0.5
    out, start = [], 0
    for t, n in zip(targets, counts):
        out.append(dict(t, embeddings=o[start:start + n], embedding_norms=norms[start:start + n]))
        start += n
    return out


def test_detreg_l1_compares_unnormalised_head_output_and_target():
    from mutdet.losses.contrastive import gather_matched

    model, criterion = _build(variant_from_dict("detreg"))
    targets = [dict(t, labels=torch.zeros_like(t["labels"])) for t in _with_norms(_targets())]
    torch.manual_seed(1)
    out = model(torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(3)), targets)
    # the head's raw MLP output, not a unit vector
    torch.testing.assert_close(out["pred_embed"], model.decoder_embedding_head.mlp(out["hidden_states"][-1]),
                               rtol=0, atol=0)
    assert not torch.allclose(out["pred_embed"].norm(dim=-1), torch.ones(2, TINY["num_queries"]))
    # the target: the PCA projection before its normalisation, O * norm
    for got, t in zip(out["align_targets"], targets):
        torch.testing.assert_close(got, t["embeddings"] * t["embedding_norms"][:, None], rtol=0, atol=0)
    # DETReg's loss_object_embedding: F.l1_loss(reduction="mean") on the matched pairs, weight 1
    losses = criterion(out, targets)
    z, o = gather_matched(out["pred_embed"], out["align_targets"], criterion.detection.match(out, targets)[""])
    torch.testing.assert_close(losses["loss_align"], torch.nn.functional.l1_loss(z, o, reduction="mean"))
    assert criterion.weight_dict["loss_align"] == 1.0
    # the contrastive head still normalises
    mutdet, _ = _build(MUTDET)
    torch.manual_seed(1)
    embed = mutdet(torch.randn(2, 3, 96, 96), _targets())["pred_embed"]
    scale = rounding_tolerance(embed.dtype, DIM)
    torch.testing.assert_close(embed.norm(dim=-1), torch.ones(embed.shape[:2]), rtol=0, atol=scale)


def test_detreg_alignment_trains_on_a_fixed_batch():
    """A few dozen AdamW steps of the DETReg variant at the paper's width (C = 256) on one fixed batch:
    the matched cosine between head outputs and targets rises clearly above chance (for unrelated 256-d
    vectors it is 0 +- 1/16 per pair; 8 pairs averaged over 5 steps: +- 0.01). With an L1 loss between
    unit vectors it stays near 0 for these steps (the issue this guards against)."""
    dim, steps, lr = 256, 50, 1e-3
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small matrices: threads only add overhead
    try:
        cosines = _train_detreg_on_a_fixed_batch(dim, steps, lr)
    finally:
        torch.set_num_threads(threads)
    assert abs(sum(cosines[:5]) / 5) < 0.1  # chance at the start
    assert sum(cosines[-5:]) / 5 > 0.15, cosines


def _train_detreg_on_a_fixed_batch(dim, steps, lr):
    tiny = dict(TINY, embed_dim=dim, ffn_dim=2 * dim)
    variant = variant_from_dict("detreg")
    torch.manual_seed(3)
    model = PretrainModel(detector=build_detector(num_classes=1, **tiny), variant=variant).train()
    criterion = PretrainCriterion(detection=build_criterion(num_classes=1, num_decoder_layers=2), variant=variant)
    g = torch.Generator().manual_seed(3)
    targets = []
    for _ in range(2):
        xy = torch.rand(4, 2, generator=g) * 60 + 18
        wh = torch.rand(4, 2, generator=g) * 20 + 8
        wh = torch.stack([wh.max(1).values, wh.min(1).values], 1)
        theta = torch.rand(4, 1, generator=g) * 3.0 - 1.5
        targets.append({"labels": torch.zeros(4, dtype=torch.long), "boxes": torch.cat([xy, wh, theta], 1),
                        "embeddings": torch.zeros(4, dim), "size": torch.tensor([96, 96])})
    targets = _with_norms(targets, seed=3)
    images = torch.randn(2, 3, 96, 96, generator=g)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-5)
    cosines = []
    for _ in range(steps):
        losses = criterion(model(images, targets), targets)
        total = sum(losses[k] * w for k, w in criterion.weight_dict.items())
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        cosines.append(float(losses["align_pos_cosine"]))
    return cosines


def test_enhanced_branch_has_its_own_projection():
    from mutdet.engine.transfer import transfer_state_dict

    model, criterion = _build(MUTDET)
    targets = _targets()
    model.zero_grad()
    losses = _losses(model, criterion, targets)
    losses["loss_align"].backward()  # the enhanced branch only
    head = model.detector.proposal_head
    for p in (*head.output_proj.parameters(), *head.output_norm.parameters()):  # inherited by fine-tuning
        assert p.grad is None or not p.grad.any()
    assert model.enhancement_projection.proj.weight.grad.abs().sum() > 0
    # the proposal heads of the enhanced pass read F_enh as it is (no second Linear + LayerNorm)
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 96, 96), targets)
        enc = out["enc_outputs"]
        torch.testing.assert_close(enc["features"], out["memory"].masked_fill(~enc["valid"][..., None], 0.0),
                                   rtol=0, atol=0)
        torch.testing.assert_close(enc["pred_logits"], head.class_head(out["memory"]), rtol=0, atol=0)
    # the projection is pre-training only: dropped at transfer with the other MutDet parts
    finetune = build_detector(num_classes=3, **TINY)
    _, report = transfer_state_dict(model.state_dict(), finetune.state_dict())
    dropped = {k for k, why in report["dropped"].items() if why == "pretraining-only"}
    assert {"enhancement_projection.proj.weight", "enhancement_projection.norm.weight"} <= dropped
    assert "unknown" not in report["dropped"].values()
    assert "proposal_head.output_proj.weight" in report["loaded"]
    detreg, _ = _build(variant_from_dict("detreg"))
    assert detreg.enhancement_projection is None


def test_siamese_pass_has_the_denoising_alignment_loss_on_the_same_queries():
    from mutdet.losses.contrastive import contrastive_alignment_loss, gather_matched
    from mutdet.models.denoising import denoising_indices

    model, criterion = _build(MUTDET)
    assert criterion.weight_dict["loss_align_dn_siam"] == criterion.weight_dict["loss_align_dn"] == 1.0
    targets = _targets()
    inputs = []
    handle = model.detector.decoder.register_forward_hook(lambda m, i, o: inputs.append((i[0], i[1], i[2])))
    torch.manual_seed(1)
    out = model(torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(3)), targets)
    handle.remove()
    siamese = out["siamese"]
    assert siamese["dn_meta"] == out["dn_meta"]
    num_dn = out["dn_meta"]["num_queries"]
    for a, b in zip(inputs[0], inputs[1]):  # the same noised denoising queries in both passes
        torch.testing.assert_close(a[:, :num_dn], b[:, :num_dn], rtol=0, atol=0)
    losses = criterion(out, targets)
    group0 = denoising_indices([len(t["labels"]) for t in targets], {**out["dn_meta"], "num_groups": 1})
    expected = contrastive_alignment_loss(*gather_matched(siamese["dn_outputs"]["pred_embed"], out["align_targets"],
                                                          group0), 0.2)
    torch.testing.assert_close(losses["loss_align_dn_siam"], expected)
    model.zero_grad()
    losses["loss_align_dn_siam"].backward()
    assert model.mutual_enhancement.layers[-1].mlp.linear2.weight.grad.abs().sum() > 0  # O_enh, not detached
    no_siam = PretrainCriterion(detection=build_criterion(num_classes=K, num_decoder_layers=2),
                                variant=with_flags(MUTDET, siamese=False))
    assert "loss_align_dn_siam" not in no_siam.weight_dict


def test_row_sparse_backward_gives_the_plain_gradients():
    """The encoder embedding head's backward runs on the rows that receive a gradient only: the same
    output, and the same gradients (input and parameters) as the plain module; rows without gradient
    get an exact zero."""
    from mutdet.models.embedding_heads import EncoderEmbeddingHead
    from mutdet.models.pretrain import row_sparse_backward

    torch.manual_seed(0)
    head = EncoderEmbeddingHead(embed_dim=16, hidden_dim=48, output_dim=16)
    x = torch.randn(3, 40, 16)
    weight = torch.zeros(3, 40, 16)
    weight[0, [1, 7]] = torch.randn(2, 16)
    weight[2, 39] = torch.randn(16)  # 3 of 120 rows carry a gradient, as matched tokens do
    grads = {}
    for name, fn in (("plain", head), ("sparse", lambda t: row_sparse_backward(head, t))):
        head.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        out = fn(xi)
        (out * weight).sum().backward()
        grads[name] = (out.detach(), xi.grad, [p.grad.clone() for p in head.parameters()])
    (out_a, gx_a, gp_a), (out_b, gx_b, gp_b) = grads["plain"], grads["sparse"]
    assert torch.equal(out_a, out_b)
    assert torch.allclose(gx_a, gx_b, rtol=0, atol=1e-6) and gx_b[1].abs().sum() == 0
    for a, b in zip(gp_a, gp_b):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


def test_row_sparse_encoder_head_keeps_the_losses_and_gradients(monkeypatch):
    """One MutDet step, same model, seed and batch, with the row-sparse backward of the encoder head and
    with the plain head: every loss is equal and every gradient agrees to float rounding."""
    import mutdet.models.pretrain as pretrain_module

    model, criterion = _build(MUTDET)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    results = []
    for plain in (True, False):
        if plain:
            monkeypatch.setattr(pretrain_module, "row_sparse_backward", lambda module, x: module(x))
        else:
            monkeypatch.undo()
        model.load_state_dict(state)
        model.zero_grad(set_to_none=True)
        losses = _losses(model, criterion, _targets())
        sum(losses[k] * w for k, w in criterion.weight_dict.items() if k in losses).backward()
        results.append(({k: v.detach() for k, v in losses.items()},
                        {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (losses_a, grads_a), (losses_b, grads_b) = results
    assert losses_a.keys() == losses_b.keys() and "loss_align_enc" in losses_a
    for key in losses_a:
        assert torch.allclose(losses_a[key], losses_b[key], rtol=1e-6, atol=1e-7), key
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        scale = float(grads_a[name].abs().max())
        assert float((grads_a[name] - grads_b[name]).abs().max()) <= 1e-4 * scale + 1e-8, name
