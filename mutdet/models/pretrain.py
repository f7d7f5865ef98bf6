"""The pre-training model: the oriented DETR plus what MutDet (or DETReg) adds around it.

One class serves MutDet, the DETReg baseline and every ablation in between; a :class:`PretrainVariant`
says which parts are on (METHOD.md, "What MutDet adds in pre-training"):

==========================  ====================================================================
``classes``                 ``pseudo``: the k-means pseudo-classes are the labels (MutDet);
                            ``agnostic``: one objectness class (DETReg)
``alignment``               ``contrastive``: symmetric InfoNCE against the target embeddings on the
                            last decoder layer and the first denoising group (+ encoder tokens and
                            siamese pass when those are on); ``l1``: DETReg's L1 on the last layer only
``target``                  ``enhanced``: the alignment target is ``O_enh`` (not detached);
                            ``raw``: the cached ``O``
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
``embeddings`` ``(N, C)`` (the cached ``O`` of its proposals, in box order). Output: the detector's
output dict of the main branch, plus

* ``pred_embed`` ``(B, Q, C)``: decoder embedding head on the last layer (also in ``dn_outputs`` when
  denoising ran, and ``enc_outputs["pred_embed"]`` ``(B, S, C)`` = ``Z_enc`` when the encoder head is on);
* ``align_targets``: ``B`` tensors ``(N_b, C)``, the alignment targets (``O_enh`` rows or ``O``);
* ``siamese``: the second pass's output dict (with its own ``pred_embed``) or None.

Where the enhanced features enter the decoder: ``F`` is the two-stage head's Linear + LayerNorm of
the encoder memory (METHOD.md); ``F_enh`` then replaces the memory in :meth:`decode`, so the decoder's
cross-attention reads ``F_enh`` and the proposal head projects ``F_enh`` once more for the enhanced
branch's proposals. The siamese pass and fine-tuning read the plain memory.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial

import torch
from torch import nn

from mutdet.models.detector import OrientedDeformableDETR
from mutdet.models.embedding_heads import DecoderEmbeddingHead, EncoderEmbeddingHead, proposal_scores
from mutdet.models.mutual_enhancement import MutualEnhancement
from mutdet.variants import PretrainVariant

__all__ = ["PretrainModel", "pad_embeddings"]

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
        self.mutual_enhancement = (MutualEnhancement(num_layers=enhancement_layers, embed_dim=dim,
                                                     num_heads=enhancement_heads, mlp_dim=enhancement_mlp_dim)
                                   if variant.uses_enhancement else None)
        self.encoder_embedding_head = (EncoderEmbeddingHead(embed_dim=dim, hidden_dim=encoder_head_hidden, output_dim=dim)
                                       if variant.encoder_embedding_loss else None)
        self.decoder_embedding_head = DecoderEmbeddingHead(embed_dim=dim, hidden_dim=dim, output_dim=dim)
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
        objects, object_mask = pad_embeddings(targets, self.embed_dim, encoded["memory"])

        features, _, valid = det.proposal_head.project(encoded["memory"], encoded["memory_padding_mask"],
                                                       encoded["spatial_shapes"])  # F (B, S, C)
        objects_enh, features_enh = objects, features
        if self.mutual_enhancement is not None:
            objects_enh, features_enh = self.mutual_enhancement(objects, object_mask, features, ~valid)

        z_enc = self.encoder_embedding_head(features_enh) if self.encoder_embedding_head is not None else None
        score_fn = None
        if variant.proposal_selection == "similarity":
            score_fn = partial(_similarity_scores, z_enc, objects_enh, object_mask)

        memory = features_enh if variant.decoder_features == "enhanced" else None
        outputs = self._embed(det.decode(encoded, targets, memory=memory, proposal_score_fn=score_fn))
        if z_enc is not None:
            outputs["enc_outputs"]["pred_embed"] = z_enc
        source = objects_enh if variant.target == "enhanced" else objects
        outputs["align_targets"] = [source[b, :len(t["embeddings"])] for b, t in enumerate(targets)]
        outputs["siamese"] = self._embed(det.decode(encoded, targets)) if variant.siamese else None
        return outputs
