"""The oriented Deformable DETR detector (ARS-DETR-like) that MutDet pre-trains.

Public entry points: :func:`build_detector` (the model), :class:`PostProcess` (outputs -> le90
detections), :class:`ARCSLCoder` (angle classification), :func:`ms_deform_attn` (the deformable
sampling op, the one place a faster kernel would plug in).
"""
from mutdet.models.angle_coder import ARCSLCoder, aspect_ratio_weight
from mutdet.models.backbone import build_backbone
from mutdet.models.box_ops import normalize_targets
from mutdet.models.deformable_attention import MultiScaleDeformableAttention, ms_deform_attn
from mutdet.models.detector import OrientedDeformableDETR, build_detector
from mutdet.models.postprocess import PostProcess

__all__ = ["ARCSLCoder", "aspect_ratio_weight", "build_backbone", "normalize_targets",
           "MultiScaleDeformableAttention", "ms_deform_attn", "OrientedDeformableDETR", "build_detector",
           "PostProcess"]
