"""MutDet's embedding heads, the enhanced branch's own projection and the similarity-aware two-stage
proposal score.

* :class:`FeatureProjection`: the enhanced branch's Linear + LayerNorm of the encoder memory (``F``,
  the input of the mutual enhancement module). Pre-training only: the reference
  (``patch_enc_output`` + ``patch_enc_output_norm``) gives the enhanced branch its own projection,
  separate from the two-stage head's (``enc_output``), which fine-tuning inherits and which must not be
  trained on features fine-tuning never sees.
* :class:`EncoderEmbeddingHead`: enhanced encoder features ``F_enh`` -> per-token embeddings ``Z_enc``
  (MLP C -> 1024 -> C, ReLU, then L2-normalise).
* :class:`DecoderEmbeddingHead`: decoder hidden states -> per-query embeddings (MLP C -> C -> C, ReLU,
  then L2-normalise for the contrastive loss; raw for DETReg's L1 loss).
* :func:`proposal_scores`: the enhanced branch ranks encoder tokens by ``s_k * sigmoid(objectness_k)``
  with ``s_k = max_m cos(Z_enc[k], O_enh[m])``.

Initialisation as the reference's: the projection and the encoder head live in its transformer,
whose ``init_weights`` puts Xavier-uniform on every weight matrix (biases keep PyTorch's default);
the decoder head lives in its detection head (``feature_embed``) and keeps PyTorch's default.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mutdet.models.layers import MLP, xavier_weights

__all__ = ["FeatureProjection", "EncoderEmbeddingHead", "DecoderEmbeddingHead", "proposal_scores"]

NORM_EPS = 1e-6


class FeatureProjection(nn.Module):
    """``F = LN(Linear(memory))`` with invalid tokens zeroed (the enhanced branch's projection).

    Shapes: memory ``(B, S, C)``, valid ``(B, S)`` bool -> ``(B, S, C)``. Xavier-uniform weight.
    """

    def __init__(self, *, embed_dim: int = 256):
        super().__init__()
        self.proj = nn.Linear(embed_dim, embed_dim)
        self.norm = nn.LayerNorm(embed_dim)
        xavier_weights(self)

    def forward(self, memory: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(memory)).masked_fill(~valid[..., None], 0.0)


class EncoderEmbeddingHead(nn.Module):
    """``Z_enc = normalize(MLP(F_enh))``, MLP ``embed_dim -> hidden_dim -> output_dim`` with ReLU.

    Shapes: ``(B, K, embed_dim) -> (B, K, output_dim)``, unit L2 norm on the last axis (a zero MLP
    output stays zero). Xavier-uniform weights.
    """

    def __init__(self, *, embed_dim: int = 256, hidden_dim: int = 1024, output_dim: int = 256):
        super().__init__()
        self.mlp = MLP(input_dim=embed_dim, hidden_dim=hidden_dim, output_dim=output_dim, num_layers=2)
        xavier_weights(self)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.mlp(features), dim=-1, eps=NORM_EPS)


class DecoderEmbeddingHead(nn.Module):
    """``z = normalize(MLP(h))`` (or ``MLP(h)`` when ``normalize`` is False), MLP ``embed_dim -> hidden_dim
    -> output_dim`` with ReLU.

    ``normalize=False`` is DETReg's head: its L1 loss compares the *raw* MLP output with the raw target
    (an L1 between two unit vectors barely trains anything). The contrastive loss normalises anyway.

    Shapes: ``(B, Q, embed_dim) -> (B, Q, output_dim)``, unit L2 norm on the last axis if ``normalize``.
    """

    def __init__(self, *, embed_dim: int = 256, hidden_dim: int = 256, output_dim: int = 256, normalize: bool = True):
        super().__init__()
        self.normalize = normalize
        self.mlp = MLP(input_dim=embed_dim, hidden_dim=hidden_dim, output_dim=output_dim, num_layers=2)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        out = self.mlp(hidden)
        return F.normalize(out, dim=-1, eps=NORM_EPS) if self.normalize else out


def proposal_scores(z_enc: torch.Tensor, objects_enh: torch.Tensor, object_mask: torch.Tensor | None,
                    objectness_logits: torch.Tensor) -> torch.Tensor:
    """Ranking score of every encoder token for the enhanced branch's two-stage selection.

    ``score_k = s_k * sigmoid(objectness_k)``, ``s_k = max over unpadded m of cos(Z_enc[k], O_enh[m])``.

    Choices (METHOD.md): the reference code multiplies the *raw* objectness logit, so a negative logit
    times a negative similarity ranks high; here the sigmoid probability is used, so the score is
    monotone in both factors. ``s_k`` is in ``[-1, 1]`` and is not clamped: tokens unlike every object
    rank below all tokens with a positive similarity. An image with no objects has no similarity to
    take the max over: ``s_k = 1`` there, i.e. the plain objectness ranking of the un-enhanced branch.
    Both inputs are L2-normalised here (a no-op on ``Z_enc``, which is normalised already). Padded or
    invalid tokens are not masked here: :func:`mutdet.models.two_stage.select_top_proposals` does that.
    The result is differentiable; detach it if it only feeds ``topk``.

    Args:
        z_enc: ``(B, K, C)`` token embeddings (normalised).
        objects_enh: ``(B, M, C)`` enhanced object embeddings, ``M = 0`` allowed.
        object_mask: ``(B, M)`` bool, True on padded slots; None = no padding.
        objectness_logits: ``(B, K)`` (or ``(B, K, 1)``) objectness logits.
    Returns:
        ``(B, K)`` scores.
    """
    if objectness_logits.dim() == 3:
        objectness_logits = objectness_logits.squeeze(-1)  # (B, K, 1) -> (B, K)
    batch, num_tokens = objectness_logits.shape
    if object_mask is None:
        object_mask = objects_enh.new_zeros(objects_enh.shape[:2], dtype=torch.bool)
    has_objects = (~object_mask).any(dim=1)  # (B,)
    if objects_enh.shape[1] == 0:
        similarity = objectness_logits.new_ones(batch, num_tokens)
    else:
        z = F.normalize(z_enc, dim=-1, eps=NORM_EPS)
        o = F.normalize(objects_enh, dim=-1, eps=NORM_EPS)
        cosine = torch.einsum("bkc,bmc->bkm", z, o)  # (B, K, M)
        cosine = cosine.masked_fill(object_mask[:, None, :], float("-inf"))
        similarity = cosine.max(dim=2).values  # (B, K); -inf for images without objects
        similarity = torch.where(has_objects[:, None], similarity, torch.ones_like(similarity))
    return similarity * objectness_logits.sigmoid()
