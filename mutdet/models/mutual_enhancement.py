"""MutDet's mutual enhancement module: object embeddings and encoder features refine each other.

Per image, ``O`` ``(M, C)`` are the cached embeddings of its ``M`` proposals and ``F`` ``(K, C)`` the
encoder features of its ``K`` multi-scale tokens (after the Linear + LayerNorm of the two-stage head,
invalid tokens zeroed). ``num_layers`` two-way layers, post-LayerNorm, no positional encodings; one layer:

    O1 = LN(O  + SelfAttn(O))
    O2 = LN(O1 + CrossAttn(q=O1, k=v=F))
    O3 = LN(O2 + MLP(O2))                      (MLP: C -> mlp_dim -> C, ReLU)
    F' = LN(F  + CrossAttn(q=F,  k=v=O3))

``M`` varies per image: the batch is padded to the largest ``M`` and every attention masks padded keys,
so a padded slot influences nothing (the result for image ``b`` equals that of image ``b`` run alone
without padding). Padded object slots and padded feature tokens of the outputs are zeroed.

Empty key sets (an image with ``M = 0`` objects, or with no valid feature token): an attention over an
empty set contributes *nothing*, i.e. its whole residual update (out-projection bias included) is zero,
and the LayerNorm still applies. So for ``M = 0`` every layer gives ``F' = LN(F)``: the features go through
the same normalisations as those of images with objects (the decoder sees one feature distribution), but
no information is added. The same rule gives ``O2 = LN(O1)`` if an image has no valid feature token.
No softmax row is ever fully masked (such rows are computed over a dummy key and their output discarded),
so no NaN appears, in the forward or the backward pass.

Against the reference (``TwoWayTransformer`` in floatingstarZ/MutDet, adapted from SAM's decoder):

* initialisation: the reference module lives in its detection transformer, whose ``init_weights``
  puts Xavier-uniform on every weight matrix (q / k / v / output projections, both MLP layers), biases
  and LayerNorms keeping PyTorch's default; :class:`MutualEnhancement` does the same;
* the reference runs image by image without masks, and its feature tokens include the invalid ones
  (the constant ``LN(bias)`` of a zeroed memory row); here the batch is padded and masked, and invalid
  tokens are keys of nothing (they carry no image content), so an image's result equals that of the
  image alone with its invalid tokens removed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mutdet.models.layers import FeedForward, xavier_weights

__all__ = ["MaskedAttention", "MutualEnhancementLayer", "MutualEnhancement"]


class MaskedAttention(nn.Module):
    """Multi-head attention with a key padding mask that tolerates fully padded key sets.

    Same parameters as ``nn.MultiheadAttention`` (q, k, v and output projections with biases); runs
    ``F.scaled_dot_product_attention``, so efficient kernels apply on GPU.

    Args:
        embed_dim: ``C``.
        num_heads: ``H``; must divide ``C``.
        dropout: attention-weight dropout (training only).
    """

    def __init__(self, *, embed_dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"MaskedAttention: embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.dropout = num_heads, dropout
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor) -> torch.Tensor:
        """Attend ``query`` to the unpadded keys.

        Args:
            query: ``(B, Lq, C)``; key, value: ``(B, Lk, C)`` with ``Lk >= 1``.
            key_padding_mask: ``(B, Lk)`` bool, True on padding.
        Returns:
            ``(B, Lq, C)``; exactly zero for the images whose keys are all padding.
        """
        batch, len_q, dim = query.shape
        len_k = key.shape[1]
        heads = self.num_heads
        empty = key_padding_mask.all(dim=1)  # (B,)
        # an all-padded key set would give NaN rows: attend over everything instead, discard below
        safe_mask = key_padding_mask & ~empty[:, None]
        q = self.q_proj(query).view(batch, len_q, heads, dim // heads).transpose(1, 2)  # (B, H, Lq, C/H)
        k = self.k_proj(key).view(batch, len_k, heads, dim // heads).transpose(1, 2)  # (B, H, Lk, C/H)
        v = self.v_proj(value).view(batch, len_k, heads, dim // heads).transpose(1, 2)  # (B, H, Lk, C/H)
        attn_mask = ~safe_mask[:, None, None, :]  # (B, 1, 1, Lk), True = may attend
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                             dropout_p=self.dropout if self.training else 0.0)
        out = self.out_proj(out.transpose(1, 2).reshape(batch, len_q, dim))  # (B, H, Lq, C/H) -> (B, Lq, C)
        return out * (~empty).to(out.dtype)[:, None, None]


class MutualEnhancementLayer(nn.Module):
    """One two-way layer (see the module docstring for the four equations).

    Args:
        embed_dim: ``C``.
        num_heads: attention heads.
        mlp_dim: hidden width of the object MLP.
        dropout: on attention weights and on every residual branch.
    """

    def __init__(self, *, embed_dim: int, num_heads: int, mlp_dim: int, dropout: float = 0.0):
        super().__init__()
        self.self_attn = MaskedAttention(embed_dim=embed_dim, num_heads=num_heads, dropout=dropout)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(embed_dim)
        self.object_to_feature_attn = MaskedAttention(embed_dim=embed_dim, num_heads=num_heads, dropout=dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(embed_dim)
        self.mlp = FeedForward(embed_dim=embed_dim, ffn_dim=mlp_dim, dropout=dropout)  # LN(x + MLP(x))
        self.feature_to_object_attn = MaskedAttention(embed_dim=embed_dim, num_heads=num_heads, dropout=dropout)
        self.dropout3 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(embed_dim)

    def forward(self, objects: torch.Tensor, object_mask: torch.Tensor, features: torch.Tensor,
                feature_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Args: objects ``(B, M, C)``, object_mask ``(B, M)``, features ``(B, K, C)``, feature_mask
        ``(B, K)`` (masks True on padding, ``M, K >= 1``). Returns ``(O3 (B, M, C), F' (B, K, C))``,
        padded positions zeroed."""
        keep_objects = (~object_mask).to(objects.dtype)[..., None]  # (B, M, 1)
        keep_features = (~feature_mask).to(features.dtype)[..., None]  # (B, K, 1)
        o = self.norm1(objects + self.dropout1(self.self_attn(objects, objects, objects, object_mask)))
        o = self.norm2(o + self.dropout2(self.object_to_feature_attn(o, features, features, feature_mask)))
        o = self.mlp(o) * keep_objects
        f = self.norm3(features + self.dropout3(self.feature_to_object_attn(features, o, o, object_mask)))
        return o, f * keep_features


class MutualEnhancement(nn.Module):
    """``num_layers`` :class:`MutualEnhancementLayer` (independent weights), Xavier-uniform weight matrices.

    Args:
        num_layers: depth (3).
        embed_dim: ``C`` of both objects and features (256).
        num_heads: attention heads (8).
        mlp_dim: hidden width of the object MLP (2048).
        dropout: attention and residual dropout (0.0).
    """

    def __init__(self, *, num_layers: int = 3, embed_dim: int = 256, num_heads: int = 8, mlp_dim: int = 2048,
                 dropout: float = 0.0):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"MutualEnhancement: num_layers must be >= 1, got {num_layers}")
        self.layers = nn.ModuleList(
            MutualEnhancementLayer(embed_dim=embed_dim, num_heads=num_heads, mlp_dim=mlp_dim, dropout=dropout)
            for _ in range(num_layers))
        xavier_weights(self)  # the reference transformer's init (module docstring)

    def forward(self, objects: torch.Tensor, object_mask: torch.Tensor | None, features: torch.Tensor,
                feature_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Enhance objects and features of a padded batch.

        Args:
            objects: ``(B, M, C)`` object (proposal) embeddings, images padded to the largest ``M``;
                ``M = 0`` allowed.
            object_mask: ``(B, M)`` bool, True on padded slots; None = no padding.
            features: ``(B, K, C)`` encoder features.
            feature_mask: ``(B, K)`` bool, True on padded / invalid tokens; None = no padding.
        Returns:
            ``objects_enh`` ``(B, M, C)`` (O_enh; padded slots zero) and ``features_enh`` ``(B, K, C)``
            (F_enh; padded tokens zero). An image without objects gets ``F_enh = LN3(..LN1(F))``, no
            information added (module docstring).
        """
        batch, num_objects, dim = objects.shape
        if features.shape[0] != batch or features.shape[2] != dim:
            raise ValueError(f"MutualEnhancement: objects {tuple(objects.shape)} and features "
                             f"{tuple(features.shape)} disagree on batch or channels")
        if object_mask is None:
            object_mask = objects.new_zeros(objects.shape[:2], dtype=torch.bool)
        if feature_mask is None:
            feature_mask = features.new_zeros(features.shape[:2], dtype=torch.bool)
        if num_objects == 0:  # one dummy padded slot keeps every tensor non-empty; sliced off below
            objects = objects.new_zeros(batch, 1, dim)
            object_mask = object_mask.new_ones(batch, 1)
        # padded inputs may hold anything (even NaN): zero them so that masked keys stay exactly inert
        o = objects.masked_fill(object_mask[..., None], 0.0)
        f = features.masked_fill(feature_mask[..., None], 0.0)
        for layer in self.layers:
            o, f = layer(o, object_mask, f, feature_mask)
        return o[:, :num_objects], f

