"""Matching and losses of the oriented DETR: :func:`build_criterion` is the entry point."""
from mutdet.losses.criterion import LOSS_NAMES, SetCriterion, build_criterion, loss_suffixes
from mutdet.losses.focal import focal_cost, sigmoid_focal_loss
from mutdet.losses.matcher import HungarianMatcher, angle_cost, build_matcher
from mutdet.losses.targets import prepare_targets

__all__ = ["LOSS_NAMES", "SetCriterion", "build_criterion", "loss_suffixes", "focal_cost", "sigmoid_focal_loss",
           "HungarianMatcher", "angle_cost", "build_matcher", "prepare_targets"]
