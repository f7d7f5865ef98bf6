"""Evaluation: rotated VOC AP with the DOTA devkit's rules, and precision-recall plots (``plots``)."""
from mutdet.evaluation.rotated_ap import ap_key, evaluate_detections, voc_ap

__all__ = ["ap_key", "evaluate_detections", "voc_ap"]
