"""The oriented two-stage Deformable DETR (ARS-DETR-like) that MutDet pre-trains and fine-tunes.

Pipeline: backbone (C3-C5) -> channel mapper (``L`` levels) -> deformable encoder -> two-stage
proposals (top-``Q`` tokens by objectness) -> decoder with rotated deformable cross-attention and
iterative box / angle refinement (+ denoising queries in training) -> per-layer class, box and
angle heads.

Input: ``images`` ``(B, 3, H, W)`` (ImageNet-normalised RGB for ResNets), optional ``padding_mask``
``(B, H, W)`` bool (True on padded pixels; the valid image is the top-left corner), optional
``targets`` (list of per-image dicts, see :func:`mutdet.models.box_ops.normalize_targets`: ``labels``
``(N,)`` int64, ``boxes`` ``(N, 5)`` le90 pixels of the input, ``size`` ``(2,)`` valid ``(h, w)``),
used only in training, for the denoising queries.

Output of :meth:`OrientedDeformableDETR.forward` (``K`` classes, ``Q`` queries, ``D`` decoder
layers, ``S`` encoder tokens, ``C`` width, ``A`` angle bins; boxes normalised cxcywh of the *valid*
image, angles as bin logits):

=====================  =====================================================================
``pred_logits``        ``(B, Q, K)`` class logits of the last layer (sigmoid, no background)
``pred_boxes``         ``(B, Q, 4)`` normalised cxcywh, last layer
``pred_angle_logits``  ``(B, Q, A)`` AR-CSL bin logits, last layer
``aux_outputs``        list of ``D - 1`` dicts with the three keys above, layers ``0 .. D-2``
``enc_outputs``        dict: ``pred_logits`` ``(B, S, 1)`` objectness, ``pred_boxes`` ``(B, S, 4)``
                       (``(1, 1, 1, 1)`` on invalid tokens), ``pred_angle_logits`` ``(B, S, A)``,
                       ``features`` ``(B, S, C)`` (the heads' input: the proposal head's
                       Linear+LayerNorm of the memory, or ``decode``'s ``proposal_features``;
                       invalid tokens zeroed),
                       ``valid`` ``(B, S)`` bool, ``topk_indices`` ``(B, Q)`` tokens that seeded the queries
``hidden_states``      ``(D, B, Q, C)`` decoder outputs (after the final LayerNorm), matching queries
``memory``             ``(B, S, C)`` the memory the decoder attended (encoder output unless replaced)
``memory_padding_mask``  ``(B, S)`` bool; ``spatial_shapes`` ``(L, 2)``; ``level_start_index``
                       ``(L,)``; ``valid_ratios`` ``(B, L, 2)``
``dn_outputs``         None, or (training with targets) a dict like the top level for the ``G_dn``
                       denoising queries: ``pred_logits`` ``(B, G_dn, K)``, ``pred_boxes``,
                       ``pred_angle_logits``, ``aux_outputs``, ``hidden_states`` ``(D, B, G_dn, C)``
``dn_meta``            None, or :class:`mutdet.models.denoising.DenoisingQueries` ``meta``
=====================  =====================================================================

Seams for MutDet pre-training: :meth:`encode` and :meth:`decode` are separate, and ``decode`` takes
a replacement ``memory`` (e.g. the enhanced features), precomputed ``proposal_features`` (the proposal
heads then skip their Linear + LayerNorm), replacement ``proposal_scores`` and precomputed
``denoising`` queries (:meth:`make_denoising`), so the same decoder can run twice on different
memories with the same queries.

Initialisation (:meth:`OrientedDeformableDETR._reset_parameters`), as Deformable DETR's and ARS-DETR's
``DeformableTransformer`` init: Xavier-uniform on every weight matrix of the transformer (encoder,
decoder with its reference-point MLP, and the two-stage Linear that the reference calls
``enc_output``; biases keep PyTorch's default), then each deformable attention's own init (sampling
offsets: zero weights, the radial bias pattern; attention weights: zero; value / output projections:
Xavier, zero bias), level embeddings ``N(0, 1)``, query embeddings ``N(0, 1)`` (``nn.Embedding``'s
default, what the reference's ``normal_`` gives). The heads outside the transformer keep PyTorch's
default except the class biases (prior 0.01) and the last box-MLP layers (zero), as ARS-DETR's head.
One departure: ARS-DETR's ``RotatedMultiScaleDeformableAttention`` (the decoder's cross-attention) is
not an ``mmcv`` ``MultiScaleDeformableAttention``, so the reference's ``isinstance`` check skips its
re-initialisation and its sampling-offset and attention-weight matrices keep the Xavier init of the
first loop; here they get Deformable DETR's init like the encoder's, which is what the attention's
own ``init_weights`` (called in its constructor) intends.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mutdet.models.angle_coder import ARCSLCoder
from mutdet.models.backbone import Backbone, build_backbone
from mutdet.models.box_ops import normalize_targets
from mutdet.models.decoder import DeformableDecoder, DeformableDecoderLayer
from mutdet.models.deformable_attention import MultiScaleDeformableAttention
from mutdet.models.denoising import DenoisingQueries, make_denoising_queries
from mutdet.models.encoder import DeformableEncoder, DeformableEncoderLayer
from mutdet.models.layers import MLP, xavier_weights
from mutdet.models.neck import ChannelMapper
from mutdet.models.position_encoding import PositionEmbeddingSine
from mutdet.models.two_stage import EncoderProposalHead, select_top_proposals

__all__ = ["OrientedDeformableDETR", "build_detector", "PRIOR_PROB"]

PRIOR_PROB = 0.01  # initial foreground probability of every class logit (focal-loss init)


def _valid_ratio(mask: torch.Tensor) -> torch.Tensor:
    """``(B, H, W)`` padding mask -> ``(B, 2)`` valid ``(w, h)`` fractions."""
    _, h, w = mask.shape
    valid_h = (~mask[:, :, 0]).sum(1).float() / h
    valid_w = (~mask[:, 0, :]).sum(1).float() / w
    return torch.stack([valid_w, valid_h], -1)


def _gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x`` ``(B, S, ...)``, ``index`` ``(B, Q)`` -> ``(B, Q, ...)``."""
    return x[torch.arange(x.shape[0], device=x.device)[:, None], index]


class OrientedDeformableDETR(nn.Module):
    """See the module docstring for inputs and outputs.

    Args:
        backbone: C3-C5 backbone.
        neck: maps the last ``len(neck.lateral)`` backbone levels to ``num_levels`` maps of width ``C``.
        encoder, decoder: the transformer.
        angle_coder: AR-CSL coder (its ``num_bins`` sizes the angle heads).
        num_classes: ``K``.
        num_queries: ``Q``.
        num_levels: ``L``.
        num_denoising_queries, label_noise, box_noise, angle_noise: see :mod:`mutdet.models.denoising`.
    """

    def __init__(self, *, backbone: Backbone, neck: ChannelMapper, encoder: DeformableEncoder,
                 decoder: DeformableDecoder, angle_coder: ARCSLCoder, num_classes: int, num_queries: int,
                 num_levels: int, num_denoising_queries: int, label_noise: float, box_noise: float,
                 angle_noise: float):
        super().__init__()
        embed_dim = decoder.embed_dim
        num_layers = len(decoder.layers)
        self.backbone, self.neck, self.encoder, self.decoder = backbone, neck, encoder, decoder
        self.angle_coder = angle_coder
        self.num_classes, self.num_queries, self.num_levels = num_classes, num_queries, num_levels
        self.num_backbone_levels = len(neck.lateral)
        self.denoising = {"num_denoising_queries": num_denoising_queries, "label_noise": label_noise,
                          "box_noise": box_noise, "angle_noise": angle_noise}
        self.position_encoding = PositionEmbeddingSine(num_feats=embed_dim // 2)
        self.level_embed = nn.Parameter(torch.empty(num_levels, embed_dim))
        self.proposal_head = EncoderProposalHead(embed_dim=embed_dim, num_angle_bins=angle_coder.num_bins)
        self.query_embed = nn.Embedding(num_queries, embed_dim)
        self.label_embed = nn.Embedding(num_classes, embed_dim)
        self.class_heads = nn.ModuleList(nn.Linear(embed_dim, num_classes) for _ in range(num_layers))
        self.box_heads = nn.ModuleList(
            MLP(input_dim=embed_dim, hidden_dim=embed_dim, output_dim=4, num_layers=3) for _ in range(num_layers))
        self.angle_heads = nn.ModuleList(nn.Linear(embed_dim, angle_coder.num_bins) for _ in range(num_layers))
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # the reference's transformer: encoder, decoder and the two-stage projection (``enc_output``)
        for module in (self.encoder, self.decoder, self.proposal_head.output_proj):
            xavier_weights(module)
        for m in self.modules():
            if isinstance(m, MultiScaleDeformableAttention):
                m.reset_parameters()
        nn.init.normal_(self.level_embed)
        bias = -math.log((1 - PRIOR_PROB) / PRIOR_PROB)
        for head in [*self.class_heads, self.proposal_head.class_head]:
            nn.init.constant_(head.bias, bias)
        for mlp in [*self.box_heads, self.proposal_head.box_head]:
            nn.init.zeros_(mlp.layers[-1].weight)
            nn.init.zeros_(mlp.layers[-1].bias)

    def encode(self, images: torch.Tensor, padding_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Backbone, neck and encoder.

        Args:
            images: ``(B, 3, H, W)``; padding_mask: ``(B, H, W)`` bool or None (no padding).
        Returns:
            ``{"memory": (B, S, C), "memory_padding_mask": (B, S), "spatial_shapes": (L, 2) int64,
            "level_start_index": (L,) int64, "valid_ratios": (B, L, 2)}``.
        """
        if padding_mask is None:
            padding_mask = torch.zeros(images.shape[0], *images.shape[-2:], dtype=torch.bool, device=images.device)
        features = self.backbone(images)[-self.num_backbone_levels:]
        maps = self.neck(features)
        srcs, poss, masks, shapes, ratios = [], [], [], [], []
        for lvl, x in enumerate(maps):
            mask = F.interpolate(padding_mask[None].float(), size=x.shape[-2:])[0].bool()  # (B, H_l, W_l)
            pos = self.position_encoding(mask) + self.level_embed[lvl].view(1, -1, 1, 1)
            srcs.append(x.flatten(2).transpose(1, 2))  # (B, C, H, W) -> (B, HW, C)
            poss.append(pos.flatten(2).transpose(1, 2))
            masks.append(mask.flatten(1))
            shapes.append(x.shape[-2:])
            ratios.append(_valid_ratio(mask))
        spatial_shapes = torch.as_tensor(shapes, dtype=torch.long, device=images.device)
        level_start_index = torch.cat([spatial_shapes.new_zeros(1), spatial_shapes.prod(1).cumsum(0)[:-1]])
        memory_padding_mask = torch.cat(masks, 1)
        valid_ratios = torch.stack(ratios, 1)
        memory = self.encoder(torch.cat(srcs, 1), torch.cat(poss, 1), spatial_shapes, level_start_index,
                              valid_ratios, memory_padding_mask)
        return {"memory": memory, "memory_padding_mask": memory_padding_mask, "spatial_shapes": spatial_shapes,
                "level_start_index": level_start_index, "valid_ratios": valid_ratios}

    def make_denoising(self, targets: Sequence[Mapping[str, torch.Tensor]] | None) -> DenoisingQueries | None:
        """The denoising queries of a batch (None outside training, without targets or when the batch has
        no box); random. Pass them to :meth:`decode` to run several passes on the same noised queries."""
        if not self.training or targets is None:
            return None
        return make_denoising_queries(normalize_targets(targets), label_embed=self.label_embed,
                                      num_matching_queries=self.num_queries, **self.denoising)

    def decode(self, encoded: Mapping[str, torch.Tensor], targets: Sequence[Mapping[str, torch.Tensor]] | None = None,
               memory: torch.Tensor | None = None, proposal_scores: torch.Tensor | None = None,
               proposal_score_fn=None, proposal_features: torch.Tensor | None = None,
               denoising: DenoisingQueries | None = None) -> dict:
        """Two-stage query selection, decoder and heads.

        Args:
            encoded: output of :meth:`encode`.
            targets: per-image targets (module docstring); denoising queries are added iff the module is
                training and some image has a target.
            memory: ``(B, S, C)`` replaces ``encoded["memory"]`` for the decoder's cross-attention (and for
                the proposals unless ``proposal_features`` is given).
            proposal_scores: ``(B, S)`` replaces the objectness logits for ranking the proposals.
            proposal_score_fn: ``enc_outputs -> (B, S)`` scores computed from this pass's proposal head
                (e.g. MutDet's similarity x objectness); mutually exclusive with ``proposal_scores``.
            proposal_features: ``(B, S, C)`` features the proposal heads run on directly, skipping their
                Linear + LayerNorm (MutDet's ``F_enh``, already projected); None: project the memory.
            denoising: precomputed denoising queries (:meth:`make_denoising`) instead of drawing new ones
                from ``targets`` (their ``meta`` must fit ``num_queries``); used as given, even in eval.
        Returns:
            the output dict of the module docstring.
        """
        memory = encoded["memory"] if memory is None else memory
        padding, shapes = encoded["memory_padding_mask"], encoded["spatial_shapes"]
        enc = self.proposal_head(memory, padding, shapes, features=proposal_features)
        if proposal_scores is not None and proposal_score_fn is not None:
            raise ValueError("decode: give proposal_scores or proposal_score_fn, not both")
        if proposal_score_fn is not None:
            proposal_scores = proposal_score_fn(enc)
        scores = enc["pred_logits"][..., 0] if proposal_scores is None else proposal_scores
        topk = select_top_proposals(scores.detach(), enc["valid"], self.num_queries)
        enc["topk_indices"] = topk
        boxes = _gather(enc["pred_boxes"], topk).detach()  # (B, Q, 4)
        angles = self.angle_coder.decode(_gather(enc["pred_angle_logits"], topk).detach())  # (B, Q)
        tgt = self.query_embed.weight[None].expand(memory.shape[0], -1, -1)

        dn = self.make_denoising(targets) if denoising is None else denoising
        attn_mask, num_dn = None, 0
        if dn is not None:
            tgt = torch.cat([dn.content, tgt], 1)
            boxes = torch.cat([dn.boxes, boxes], 1)
            angles = torch.cat([dn.angles, angles], 1)
            attn_mask, num_dn = dn.attn_mask, dn.meta["num_queries"]

        dec = self.decoder(tgt, boxes, angles, memory, padding, shapes, encoded["level_start_index"],
                           encoded["valid_ratios"], attn_mask, self.box_heads, self.angle_heads,
                           self.angle_coder.decode)
        logits = torch.stack([head(h) for head, h in zip(self.class_heads, dec["hidden_states"])])
        per_layer = {"pred_logits": logits, "pred_boxes": dec["boxes"], "pred_angle_logits": dec["angle_logits"],
                     "hidden_states": dec["hidden_states"]}
        outputs = _split_outputs({k: v[:, :, num_dn:] for k, v in per_layer.items()})
        outputs.update(enc_outputs=enc, memory=memory, memory_padding_mask=padding, spatial_shapes=shapes,
                       level_start_index=encoded["level_start_index"], valid_ratios=encoded["valid_ratios"],
                       dn_outputs=None, dn_meta=None)
        if dn is not None:
            outputs["dn_outputs"] = _split_outputs({k: v[:, :, :num_dn] for k, v in per_layer.items()})
            outputs["dn_meta"] = dn.meta
        return outputs

    def forward(self, images: torch.Tensor, targets: Sequence[Mapping[str, torch.Tensor]] | None = None,
                padding_mask: torch.Tensor | None = None) -> dict:
        """``decode(encode(images, padding_mask), targets)``; see the module docstring."""
        return self.decode(self.encode(images, padding_mask), targets)


def _split_outputs(per_layer: dict[str, torch.Tensor]) -> dict:
    """Stacked per-layer predictions ``(D, B, N, ...)`` -> last layer + ``aux_outputs`` + ``hidden_states``."""
    keys = ("pred_logits", "pred_boxes", "pred_angle_logits")
    num_layers = per_layer["pred_logits"].shape[0]
    out = {k: per_layer[k][-1] for k in keys}
    out["aux_outputs"] = [{k: per_layer[k][i] for k in keys} for i in range(num_layers - 1)]
    out["hidden_states"] = per_layer["hidden_states"]
    return out


def build_detector(*, num_classes: int, backbone: str = "resnet50", backbone_weights: str = "none",
                   frozen_stages: int = 1, frozen_bn: bool = True, light_width: int = 32, embed_dim: int = 256,
                   num_heads: int = 8, num_levels: int = 4, num_points: int = 4, num_encoder_layers: int = 6,
                   num_decoder_layers: int = 6, ffn_dim: int = 1024, dropout: float = 0.1, num_queries: int = 300,
                   num_angle_bins: int = 180, angle_radius: int | None = None, num_denoising_queries: int = 100,
                   label_noise: float = 0.5, box_noise: float = 0.4, angle_noise: float = 0.02,
                   norm_groups: int = 32) -> OrientedDeformableDETR:
    """Build the detector from plain keyword arguments (defaults: the paper's fine-tuning model).

    Args:
        num_classes: ``K`` (e.g. 256 pseudo-classes in pre-training, 20 for DIOR-R).
        backbone, backbone_weights, frozen_stages, frozen_bn, light_width: see
            :func:`mutdet.models.backbone.build_backbone` (``"resnet50"``, ``"resnet18"``, ``"light"``, ...).
        embed_dim: width ``C`` (divisible by ``num_heads`` and ``norm_groups``).
        num_heads, num_levels, num_points: attention heads, feature levels (strides 8, 16, 32, 64 for 4;
            fewer levels drop the finest backbone maps first), sampling points per head and level.
        num_encoder_layers, num_decoder_layers, ffn_dim, dropout: transformer shape.
        num_queries: ``Q`` (two-stage proposals kept as queries).
        num_angle_bins, angle_radius: AR-CSL coder (radius None: the full-range label, as ARS-DETR; decoding ignores it).
        num_denoising_queries, label_noise, box_noise, angle_noise: denoising (0 queries: off).
        norm_groups: GroupNorm groups in the neck.
    """
    if num_levels < 1:
        raise ValueError(f"num_levels must be >= 1, got {num_levels}")
    net = build_backbone(name=backbone, weights=backbone_weights, frozen_stages=frozen_stages,
                         frozen_bn=frozen_bn, light_width=light_width)
    in_channels = net.out_channels[-min(num_levels, len(net.out_channels)):]
    neck = ChannelMapper(in_channels=in_channels, out_channels=embed_dim, num_levels=num_levels,
                         num_groups=norm_groups)
    shape = {"embed_dim": embed_dim, "num_heads": num_heads, "num_levels": num_levels, "num_points": num_points,
             "ffn_dim": ffn_dim, "dropout": dropout}
    encoder = DeformableEncoder(layer=DeformableEncoderLayer(**shape), num_layers=num_encoder_layers)
    decoder = DeformableDecoder(layer=DeformableDecoderLayer(**shape), num_layers=num_decoder_layers,
                                embed_dim=embed_dim)
    return OrientedDeformableDETR(
        backbone=net, neck=neck, encoder=encoder, decoder=decoder,
        angle_coder=ARCSLCoder(num_bins=num_angle_bins, radius=angle_radius), num_classes=num_classes,
        num_queries=num_queries, num_levels=num_levels, num_denoising_queries=num_denoising_queries,
        label_noise=label_noise, box_noise=box_noise, angle_noise=angle_noise)
