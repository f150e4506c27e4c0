"""Distillation losses; every one is a :class:`xmodal.contracts.DistillLoss`."""

from xmodal.losses.contrastive import AffinityMimicLoss, CLIPContrastiveLoss
from xmodal.losses.features import FeatureCosineLoss, FeatureMSELoss
from xmodal.losses.logits import KLDivLoss
from xmodal.losses.sequence import TimeAlignedMSELoss

__all__ = [
    "AffinityMimicLoss",
    "CLIPContrastiveLoss", "FeatureCosineLoss", "FeatureMSELoss", "KLDivLoss", "TimeAlignedMSELoss"]
