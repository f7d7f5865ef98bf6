"""The pre-training model: the oriented DETR plus what MutDet (or DETReg) adds around it.

One class serves MutDet, the DETReg baseline and every ablation in between; a :class:`PretrainVariant`
says which parts are on (METHOD.md, "What MutDet adds in pre-training"):

==========================  ====================================================================
``classes``                 ``pseudo``: the k-means pseudo-classes are the labels (MutDet);
                            ``agnostic``: one objectness class (DETReg)
``alignment``               ``contrastive``: symmetric InfoNCE against the target embeddings on the
                            last decoder layer and the first denoising group (+ encoder tokens, and
                            the siamese pass's last layer and first denoising group, when those are
                            on); ``l1``: DETReg's L1 on the last layer only (un-normalised, below)
``target``                  ``enhanced``: the alignment target is ``O_enh`` (not detached);
                            ``raw``: the cached ``O`` (for ``l1``: its un-normalised PCA projection)
``decoder_features``        ``enhanced``: the decoder (and its two-stage proposals) run on ``F_enh``;
                            ``plain``: on the encoder output, as in fine-tuning
``encoder_embedding_loss``  the encoder embedding head and its alignment loss on the matched tokens
``siamese``                 a second pass of the same decoder on the plain encoder output, with all
                            detection losses and the alignment loss (needs ``decoder_features: enhanced``)
``proposal_selection``      ``similarity``: the enhanced branch ranks tokens by ``max cos(Z_enc, O_enh) x
                            sigmoid(objectness)`` (needs the encoder head and ``decoder_features: enhanced``);
                            ``objectness``: by objectness alone
==========================  ====================================================================

The mutual enhancement module exists iff ``target`` or ``decoder_features`` is ``enhanced``.

Forward: ``(images, targets, padding_mask)`` like the detector, where each target also carries
``embeddings`` ``(N, C)`` (the cached unit-norm ``O`` of its proposals, in box order) and optionally
``embedding_norms`` ``(N,)`` (the norm of each PCA projection before normalisation, see
:mod:`mutdet.data.pretrain`; 1 when absent). Output: the detector's output dict of the main branch, plus

* ``pred_embed`` ``(B, Q, C)``: decoder embedding head on the last layer (also in ``dn_outputs`` when
  denoising ran, and ``enc_outputs["pred_embed"]`` ``(B, S, C)`` = ``Z_enc`` when the encoder head is on);
* ``align_targets``: ``B`` tensors ``(N_b, C)``, the alignment targets (``O_enh`` rows, ``O``, or for
  the L1 loss the un-normalised ``O * norm``);
* ``siamese``: the second pass's output dict (with its own ``pred_embed``, also on its denoising
  queries) or None.

The enhanced branch (as the reference, floatingstarZ/MutDet ``..._template_matching.py``): ``F`` is the
encoder memory through the branch's *own* Linear + LayerNorm (:class:`FeatureProjection`, attribute
``enhancement_projection``; the reference's ``patch_enc_output``), invalid tokens zeroed; the mutual
enhancement module turns it into ``F_enh``, and the decoder of the enhanced branch reads ``F_enh`` both
in its cross-attention and in its two-stage proposals, whose heads run on ``F_enh`` directly (no second
projection). The two-stage head's Linear + LayerNorm, which fine-tuning inherits, only ever sees the
plain memory (siamese pass, ``decoder_features: plain``, fine-tuning). The projection exists iff the
enhancement module or the encoder embedding head does (``Z_enc`` always reads this branch's features),
and is dropped at transfer (:mod:`mutdet.engine.transfer`). Both passes share one draw of denoising
queries, as the reference feeds the same noised queries to both.

Alignment targets and the two losses:

* contrastive (MutDet): both sides are L2-normalised (the decoder head normalises, and so does the
  loss), so only the direction of the target matters;
* ``l1`` (DETReg): DETReg's ``loss_object_embedding``, ``F.l1_loss(reduction="mean")`` over the matched
  pairs of the last decoder layer, weight 1, between the decoder head's *un-normalised* MLP output and
  the *un-normalised* target. With ``target: raw`` the target is the proposal's PCA projection before
  normalisation, ``P = O * ||P||`` (the targets artefact's ``norm`` column); with ``target: enhanced``
  it is ``O_enh`` as the module outputs it. Why the PCA projection and not the raw 2048-d C5 feature
  DETReg regresses (its SwAV average-pooled map): it is the very information MutDet's target carries,
  so the ablation row "DETReg -> + contrastive" changes the loss only; it has the detector's width (one
  head MLP ``C -> C -> C`` for every variant); PCA is a rotation plus a truncation that keeps most of the
  variance and all of its scale (no whitening); and the dataset holds every target in memory, where
  2048-d vectors would take 8x the space. One difference remains: the projection is centred, so the
  pool's mean feature (which DETReg's un-centred targets share, and which its head learns first) is not
  part of the target; the head has to tell proposals apart to lower the loss.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial

import torch
from torch import nn

from mutdet.models.detector import OrientedDeformableDETR
from mutdet.models.embedding_heads import (DecoderEmbeddingHead, EncoderEmbeddingHead, FeatureProjection,
                                           proposal_scores)
from mutdet.models.mutual_enhancement import MutualEnhancement
from mutdet.models.two_stage import token_anchors
from mutdet.variants import PretrainVariant

__all__ = ["PretrainModel", "pad_embeddings", "row_sparse_backward", "unnormalised_targets"]

def pad_embeddings(targets: Sequence[Mapping[str, torch.Tensor]], dim: int,
                   like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image ``embeddings`` ``(N_b, C)`` -> padded ``(B, M, C)`` and mask ``(B, M)`` (True on padding),
    ``M = max N_b`` (may be 0), on ``like``'s device and dtype."""
    counts = [len(t["embeddings"]) for t in targets]
    longest = max(counts, default=0)
    objects = like.new_zeros(len(targets), longest, dim)
    mask = torch.ones(len(targets), longest, dtype=torch.bool, device=like.device)
    for b, (t, n) in enumerate(zip(targets, counts)):
        if t["embeddings"].shape[-1] != dim:
            raise ValueError(f"target {b}: embeddings of dimension {t['embeddings'].shape[-1]}, the model expects "
                             f"{dim} (cluster.pca_dim must equal the detector's embed_dim)")
        objects[b, :n] = t["embeddings"].to(objects.dtype)
        mask[b, :n] = False
    return objects, mask


def unnormalised_targets(targets: Sequence[Mapping[str, torch.Tensor]], like: torch.Tensor) -> list[torch.Tensor]:
    """Per image ``embeddings * embedding_norms[:, None]`` ``(N_b, C)`` (the PCA projections before their
    L2 normalisation; norms of 1 when a target has no ``embedding_norms``), on ``like``'s device and dtype."""
    out = []
    for b, t in enumerate(targets):
        vectors = t["embeddings"].to(device=like.device, dtype=like.dtype)
        norms = t.get("embedding_norms")
        if norms is None:
            out.append(vectors)
            continue
        if norms.shape != vectors.shape[:1]:
            raise ValueError(f"target {b}: embedding_norms of shape {tuple(norms.shape)} for {len(vectors)} embeddings")
        out.append(vectors * norms.to(device=like.device, dtype=like.dtype)[:, None])
    return out


class _RowSparseBackward(torch.autograd.Function):
    """``module(x)`` on every row; the backward only on the rows whose output gradient is non-zero.

    For a row-wise module (each output row depends on its input row alone: an MLP, a normalisation of
    the last dimension). The forward keeps no activations; the backward recomputes the module on the
    rows with a gradient and backpropagates through them only. The gradients are those of the plain
    module (the other rows' contributions are exact zeros), up to the order of float summation."""

    @staticmethod
    def forward(ctx, module: nn.Module, x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        ctx.module = module
        device = x.device.type
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        ctx.save_for_backward(x)
        return module(x)  # autograd is off inside Function.forward: no activations are kept

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        params = [p for p in ctx.module.parameters() if p.requires_grad]
        flat_x = x.reshape(-1, x.shape[-1])  # (..., C) -> (N, C)
        flat_grad = grad.reshape(-1, grad.shape[-1])
        rows = flat_grad.ne(0).any(-1).nonzero().squeeze(1)  # (R,) rows that receive a gradient
        device, autocast, dtype = ctx.autocast  # recomputed as the forward ran (mixed precision included)
        with torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=autocast):
            xs = flat_x[rows].detach().requires_grad_(ctx.needs_input_grad[1])
            out = ctx.module(xs)  # (R, C_out)
        inputs = ([xs] if ctx.needs_input_grad[1] else []) + params
        grads = list(torch.autograd.grad(out, inputs, flat_grad[rows], allow_unused=True)) if inputs else []
        grad_x = None
        if ctx.needs_input_grad[1]:
            grad_x = flat_x.new_zeros(flat_x.shape).index_copy_(0, rows, grads.pop(0)).view_as(x)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
        return (None, grad_x, *grads)


def row_sparse_backward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` (row-wise module, ``(..., C)``) whose backward skips the rows without gradient (see
    :class:`_RowSparseBackward`): for a head run on every encoder token whose loss reads a few of them."""
    params = [p for p in module.parameters() if p.requires_grad]
    if not torch.is_grad_enabled() or not (x.requires_grad or params):
        return module(x)
    return _RowSparseBackward.apply(module, x, *params)


def _similarity_scores(z_enc, objects_enh, object_mask, enc_outputs):
    return proposal_scores(z_enc, objects_enh, object_mask, enc_outputs["pred_logits"])


class PretrainModel(nn.Module):
    """See the module docstring.

    Args:
        detector: the oriented DETR (its classifier has ``k`` pseudo-classes or 1 class).
        variant: the parts that are on.
        enhancement_layers, enhancement_heads, enhancement_mlp_dim: the mutual enhancement module (3, 8, 2048).
        encoder_head_hidden: hidden width of the encoder embedding head (1024).
        freeze_backbone: no gradient into the backbone (METHOD.md: frozen in pre-training).
    """

    def __init__(self, *, detector: OrientedDeformableDETR, variant: PretrainVariant, enhancement_layers: int = 3,
                 enhancement_heads: int = 8, enhancement_mlp_dim: int = 2048, encoder_head_hidden: int = 1024,
                 freeze_backbone: bool = True):
        super().__init__()
        self.detector, self.variant = detector, variant.validate()
        dim = detector.decoder.embed_dim
        self.embed_dim = dim
        branch = variant.uses_enhancement or variant.encoder_embedding_loss
        self.enhancement_projection = FeatureProjection(embed_dim=dim) if branch else None  # F, pre-training only
        self.mutual_enhancement = (MutualEnhancement(num_layers=enhancement_layers, embed_dim=dim,
                                                     num_heads=enhancement_heads, mlp_dim=enhancement_mlp_dim)
                                   if variant.uses_enhancement else None)
        self.encoder_embedding_head = (EncoderEmbeddingHead(embed_dim=dim, hidden_dim=encoder_head_hidden, output_dim=dim)
                                       if variant.encoder_embedding_loss else None)
        self.decoder_embedding_head = DecoderEmbeddingHead(embed_dim=dim, hidden_dim=dim, output_dim=dim,
                                                           normalize=variant.alignment == "contrastive")
        if freeze_backbone:
            for p in self.detector.backbone.parameters():
                p.requires_grad_(False)

    def _embed(self, outputs: dict) -> dict:
        outputs["pred_embed"] = self.decoder_embedding_head(outputs["hidden_states"][-1])
        if outputs.get("dn_outputs") is not None:
            outputs["dn_outputs"]["pred_embed"] = self.decoder_embedding_head(outputs["dn_outputs"]["hidden_states"][-1])
        return outputs

    def forward(self, images: torch.Tensor, targets: Sequence[Mapping[str, torch.Tensor]],
                padding_mask: torch.Tensor | None = None) -> dict:
        variant, det = self.variant, self.detector
        encoded = det.encode(images, padding_mask)
        memory = encoded["memory"]
        objects, object_mask = pad_embeddings(targets, self.embed_dim, memory)
        denoising = det.make_denoising(targets)  # one draw, shared by both passes

        objects_enh, features_enh, z_enc = objects, None, None
        if self.enhancement_projection is not None:
            _, valid = token_anchors(encoded["memory_padding_mask"], encoded["spatial_shapes"])
            features_enh = self.enhancement_projection(memory, valid)  # F (B, S, C), the branch's own projection
            if self.mutual_enhancement is not None:
                objects_enh, features_enh = self.mutual_enhancement(objects, object_mask, features_enh, ~valid)
            if self.encoder_embedding_head is not None:
                # Z_enc (B, S, C) of every token ranks the proposals (detached) and its alignment loss reads the
                # matched tokens only: the head's backward runs on those rows (the same gradients; at the demo
                # size it was a 1344-token backward of a C -> 4C -> C MLP for ~30 rows per image).
                z_enc = row_sparse_backward(self.encoder_embedding_head, features_enh)

        if variant.decoder_features == "enhanced":
            score_fn = (partial(_similarity_scores, z_enc, objects_enh, object_mask)
                        if variant.proposal_selection == "similarity" else None)
            main = det.decode(encoded, targets, memory=features_enh, proposal_features=features_enh,
                              proposal_score_fn=score_fn, denoising=denoising)
        else:
            main = det.decode(encoded, targets, denoising=denoising)
        outputs = self._embed(main)
        if z_enc is not None:
            outputs["enc_outputs"]["pred_embed"] = z_enc
        if variant.target == "enhanced":
            outputs["align_targets"] = [objects_enh[b, :len(t["embeddings"])] for b, t in enumerate(targets)]
        elif variant.alignment == "l1":  # DETReg: the un-normalised PCA projection (module docstring)
            outputs["align_targets"] = unnormalised_targets(targets, objects)
        else:  # the contrastive loss normalises: the unit O
            outputs["align_targets"] = [objects[b, :len(t["embeddings"])] for b, t in enumerate(targets)]
        outputs["siamese"] = self._embed(det.decode(encoded, targets, denoising=denoising)) if variant.siamese else None
        return outputs
